"""P's API-server guard: refuse a push target D did not sign (HTTP 403) before the engine sees it,
and answer at once (HTTP 503) when the D that sent it cannot be reached or is not that D.

vLLM's OpenAI server answers 400 for anything its engine refuses, and only after the request
started; this ASGI middleware runs in the API server in front of every POST. Start P with

    --middleware pdpush.connector.auth_middleware.PushAuthMiddleware

(pdpush.local.cluster does). vLLM builds middleware without arguments, so it reads the same
`--kv-transfer-config` JSON from the server's command line that the connector gets, and the key
file / variable that config names (the key itself is never on the command line). P's scheduler
checks the signature and the nonce again (prefill_scheduler.py): it is the authority, this is
the early, cheap refusal that also spares the engine the prefill.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import sys
import time
from typing import Any

import httpx
import msgspec

from pdpush.connector.auth import ReplayGuard
from pdpush.connector.compat import wrong_d
from pdpush.connector.config import PREFILL_ROLE, ConfigError, PdpushConfig
from pdpush.connector.metadata import PARAMS_KEY, Forbidden, ParamsError, PushTarget
from pdpush.connector.peer_links import backoff_s
from pdpush.rpc.prefill_client import D_UNREACHABLE, FORBIDDEN, WRONG_D, error_body


def config_from_argv(argv: list[str]) -> PdpushConfig:
    """P's pdpush config from its server's `--kv-transfer-config JSON` (or `=JSON`) argument."""
    raw = None
    for i, arg in enumerate(argv):
        if arg == "--kv-transfer-config" and i + 1 < len(argv):
            raw = argv[i + 1]
        elif arg.startswith("--kv-transfer-config="):
            raw = arg.split("=", 1)[1]
    if raw is None:
        raise ConfigError("pdpush: PushAuthMiddleware found no --kv-transfer-config JSON on the "
                          "server's command line")
    try:
        kv = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"pdpush: --kv-transfer-config is not JSON: {exc}") from exc
    return PdpushConfig.from_extra_config(kv.get("kv_connector_extra_config"), PREFILL_ROLE)


class DChecks:
    """Is the D a target names reachable and the one that signed it? Cached per D start; a
    failure is cached with back-off, so requests for a dead D are answered at once."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._ok: set[tuple[str, str, str]] = set()
        self._failed: dict[tuple[str, str, str], tuple[str, str, int, float]] = {}
        self._locks: dict[tuple[str, str, str], asyncio.Lock] = {}

    async def check(self, target: PushTarget) -> tuple[str, str]:
        """("", "") when P may go ahead, else (error kind, message)."""
        key = (target.side_channel, target.d_engine_id, target.d_instance_id)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:  # one probe per D at a time; the others wait for its answer
            if key in self._ok:
                return "", ""
            failed = self._failed.get(key)
            if failed is not None and time.monotonic() < failed[3]:
                return failed[0], failed[1]
            kind, error = await self._probe(target)
            if not kind:
                self._ok.add(key)
                self._failed.pop(key, None)
                return "", ""
            failures = (failed[2] if failed else 0) + 1
            self._failed[key] = (kind, error, failures, time.monotonic() + backoff_s(failures))
            return kind, error

    async def _probe(self, target: PushTarget) -> tuple[str, str]:
        url = f"http://{target.side_channel}/meta"
        try:
            async with httpx.AsyncClient(trust_env=False, timeout=self.timeout_s) as client:
                desc = (await client.get(url)).raise_for_status().json()
        except (httpx.HTTPError, ValueError) as exc:
            return D_UNREACHABLE, f"P cannot reach D's side channel {url}: {exc!r}"
        error = wrong_d(desc if isinstance(desc, dict) else {}, target.d_engine_id,
                        target.d_instance_id, url)
        return (WRONG_D, error) if error else ("", "")


class PushAuthMiddleware:
    """Pure ASGI: buffers a POST's JSON body, checks its push target, then replays the body."""

    def __init__(self, app: Any, config: PdpushConfig | None = None) -> None:
        self.app = app
        config = config or config_from_argv(sys.argv)
        self.keys = config.keys()
        self.replays = ReplayGuard()
        self._calls = itertools.count()  # every HTTP request is a new one: no repeats here
        self.d_checks = DChecks(config.side_channel_timeout_s)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away while sending
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
        refusal = await self._refusal(body)
        if refusal is not None:
            await _answer(send, *refusal)
            return
        await self.app(scope, _replay(body, receive), send)

    async def _refusal(self, body: bytes) -> tuple[int, str, str] | None:
        try:
            params = params_of(body)
        except msgspec.DecodeError:
            return None  # not a JSON object: the server's own validation answers
        if not isinstance(params, dict) or PARAMS_KEY not in params:
            return None
        try:
            target = PushTarget.from_params(params, self.keys)
        except Forbidden as exc:
            return 403, FORBIDDEN, str(exc)
        except ParamsError:
            return None  # malformed but signed (or no key): the scheduler answers pdpush_error
        if target is None:
            return None
        if self.keys is not None:
            if refusal := target.replay_refusal(self.replays, str(next(self._calls))):
                return 403, FORBIDDEN, f"kv_transfer_params.pdpush: {refusal}"
        kind, error = await self.d_checks.check(target)
        return (503, kind, error) if kind else None


class _ParamsOnly(msgspec.Struct):
    """The one field the guard reads: decoding only it skips the prompt's token ids, which a
    full JSON parse would build as Python ints on the request's path (0.5-1 ms for 8000 tokens)."""

    kv_transfer_params: Any = None


_PARAMS_ONLY = msgspec.json.Decoder(_ParamsOnly)


def params_of(body: bytes) -> Any:
    """A request body's `kv_transfer_params` (None when absent); msgspec.DecodeError when the
    body is not a JSON object. `pdpush bench wire` times it against a full parse."""
    return _PARAMS_ONLY.decode(body).kv_transfer_params


def _replay(body: bytes, receive: Any) -> Any:
    """The body once, then the client's own messages (vLLM listens for its disconnect)."""
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Any, status: int, kind: str, message: str) -> None:
    payload = json.dumps(error_body(status, kind, message)).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(payload)).encode())]})
    await send({"type": "http.response.body", "body": payload})
