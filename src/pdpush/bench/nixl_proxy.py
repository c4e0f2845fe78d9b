"""The proxy flow vLLM documents for its NixlConnector 1P1D, as a small server for load tests.

A client (here `vllm bench serve`) sends an ordinary /v1/completions request to the proxy, which
1. sends it to P with `max_tokens` 1, no streaming and `kv_transfer_params`
   `{"do_remote_decode": true, "do_remote_prefill": false}` (P prefills and keeps the KV),
2. sends the original request to D with the `kv_transfer_params` P answered (D pulls or is
   pushed the KV), and streams D's answer back unchanged.
This is the flow of vLLM's disaggregated-serving examples (its "toy proxy"), written on aiohttp
(the load generator's own HTTP library) so that the NIXL paths of `pdpush bench serving` can be
driven by the same load generator as the others. Run: `python -m pdpush.bench.nixl_proxy
--port N --prefill URL --decode URL`.
"""

from __future__ import annotations

import argparse
import copy
from typing import Any

PREFILL_PARAMS = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                  "remote_block_ids": None, "remote_host": None, "remote_port": None}


def prefill_body(body: dict[str, Any]) -> dict[str, Any]:
    """P's copy of a request: one token, no stream, and the request to keep the KV for D."""
    out = copy.deepcopy(body)
    out.update(max_tokens=1, stream=False, kv_transfer_params=dict(PREFILL_PARAMS))
    out.pop("stream_options", None)
    out.pop("max_completion_tokens", None)
    out.pop("min_tokens", None)
    return out


def decode_body(body: dict[str, Any], p_answer: dict[str, Any]) -> dict[str, Any]:
    """D's copy: the original request with the KV parameters P answered."""
    return {**body, "kv_transfer_params": p_answer.get("kv_transfer_params") or {}}


def make_app(prefill_url: str, decode_url: str):
    import aiohttp
    from aiohttp import web

    async def on_startup(app: web.Application) -> None:
        timeout = aiohttp.ClientTimeout(total=None)
        app["session"] = aiohttp.ClientSession(timeout=timeout, trust_env=False,
                                               connector=aiohttp.TCPConnector(limit=0))

    async def on_cleanup(app: web.Application) -> None:
        await app["session"].close()

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        session = request.app["session"]
        async with session.post(f"{prefill_url}/v1/completions", json=prefill_body(body)) as p:
            if p.status != 200:
                return web.Response(status=p.status, body=await p.read(), content_type="application/json")
            p_answer = await p.json()
        async with session.post(f"{decode_url}/v1/completions", json=decode_body(body, p_answer)) as d:
            out = web.StreamResponse(status=d.status, headers={"Content-Type": d.content_type})
            await out.prepare(request)
            async for chunk in d.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out

    async def passthrough(request: web.Request) -> web.Response:
        """/health and /v1/models answer as D does (the load generator's ready check)."""
        async with request.app["session"].get(f"{decode_url}{request.path}") as d:
            return web.Response(status=d.status, body=await d.read(), content_type=d.content_type)

    app = web.Application()
    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/health", passthrough)
    app.router.add_get("/v1/models", passthrough)
    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--prefill", required=True, help="P's base URL")
    parser.add_argument("--decode", required=True, help="D's base URL")
    args = parser.parse_args(argv)
    from aiohttp import web

    web.run_app(make_app(args.prefill, args.decode), host="127.0.0.1", port=args.port,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
