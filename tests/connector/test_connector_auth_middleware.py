"""P's API-server guard (connector/auth_middleware.py) in front of a stand-in app, no vLLM.

The stand-in records what reached it: a refused request must never reach the engine.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from pdpush.connector.auth import Keys
from pdpush.connector.auth_middleware import PushAuthMiddleware, config_from_argv
from pdpush.connector.config import ConfigError, PdpushConfig
from pdpush.connector.metadata import PushTarget
from pdpush.local.cluster import free_port
from pdpush.rpc.json_server import JsonServer
from pdpush.rpc.prefill_client import error_kind

KEY = "k" * 32


class Engine:
    """The OpenAI server behind the middleware: answers 200 and remembers each body."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, scope, receive, send) -> None:
        message = await receive()
        self.bodies.append(message["body"])
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


@pytest.fixture
def d_meta():
    """D's side channel as P's guard sees it: who it is."""
    server = JsonServer("127.0.0.1", 0, {"/meta": lambda: {"engine_id": "d1", "instance_id": "s1"}})
    yield server.port
    server.close()


def post(app, body: dict, path="/v1/completions") -> httpx.Response:
    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://p") as client:
            return await client.post(path, json=body)
    return asyncio.run(go())


def request(port: int, keys, nonce="a" * 32, engine="d1", instance="s1", age_s=0.0) -> dict:
    t = PushTarget("r1", engine, f"127.0.0.1:{port}", (1, 2), 0, 16, 30.0, nonce, instance,
                   time.monotonic() - age_s)
    return {"prompt": [1, 2, 3], "max_tokens": 1, "kv_transfer_params": t.to_params(keys)}


def guard(tmp_path, engine: Engine) -> PushAuthMiddleware:
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    return PushAuthMiddleware(engine, PdpushConfig(auth_key_file=str(key_file)))


def test_signed_passes_forged_and_replayed_get_403(tmp_path, d_meta):
    engine = Engine()
    app = guard(tmp_path, engine)
    good = request(d_meta, Keys(KEY.encode()))
    assert post(app, good).status_code == 200
    assert json.loads(engine.bodies[0]) == good  # the engine gets the body as sent
    tampered = request(d_meta, Keys(KEY.encode()), nonce="b" * 32)
    tampered["kv_transfer_params"]["pdpush"]["d_block_ids"] = [7, 8]
    for body, path in [(good, "/v1/completions"),  # replay
                       (request(d_meta, None, nonce="c" * 32), "/v1/chat/completions"),
                       (request(d_meta, Keys(b"x" * 32), nonce="d" * 32), "/v1/completions"),
                       (tampered, "/v1/completions"),
                       (request(d_meta, Keys(KEY.encode()), nonce="e" * 32, age_s=31.0),
                        "/v1/completions")]:  # older than its budget: a replay once forgotten
        resp = post(app, body, path)
        assert resp.status_code == 403 and error_kind(resp.json()) == "forbidden", resp.text
    assert len(engine.bodies) == 1
    assert post(app, {"prompt": "plain request", "max_tokens": 1}).status_code == 200


def test_bodies_that_are_not_a_json_object_go_to_the_server_untouched(tmp_path):
    """The server's own validation answers them (422/400); the guard neither refuses nor drops."""
    engine = Engine()
    app = guard(tmp_path, engine)
    bodies = [b"[1, 2]", b"not json", b"\xff\xfe", b'"text"', b'{"kv_transfer_params": 3}']

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://p") as client:
            return [await client.post("/v1/completions", content=b) for b in bodies]
    assert [r.status_code for r in asyncio.run(go())] == [200] * len(bodies)
    assert engine.bodies == bodies


def test_unreachable_or_wrong_d_answers_at_once(tmp_path, d_meta):
    engine = Engine()
    app = guard(tmp_path, engine)
    keys = Keys(KEY.encode())
    dead = free_port()
    resp = post(app, request(dead, keys, nonce="e" * 32))
    assert resp.status_code == 503 and error_kind(resp.json()) == "d_unreachable"
    started = time.monotonic()  # cached with back-off: the next one does not even try
    resp = post(app, request(dead, keys, nonce="f" * 32))
    assert error_kind(resp.json()) == "d_unreachable" and time.monotonic() - started < 0.5
    resp = post(app, request(d_meta, keys, nonce="g" * 32, instance="s0"))  # D restarted
    assert resp.status_code == 503 and error_kind(resp.json()) == "wrong_d"
    assert engine.bodies == []


def test_config_comes_from_the_servers_command_line(tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY)
    kv = {"kv_connector_extra_config": {"auth_key_file": str(key_file)}}
    for argv in (["x", "--kv-transfer-config", json.dumps(kv)],
                 ["x", f"--kv-transfer-config={json.dumps(kv)}"]):
        assert config_from_argv(argv).keys() == Keys(KEY.encode())
    with pytest.raises(ConfigError, match="no --kv-transfer-config"):
        config_from_argv(["x", "--model", "m"])
