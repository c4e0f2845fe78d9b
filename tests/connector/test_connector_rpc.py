"""do_prefill client against a fake P (stdlib HTTP server): outcomes, deadlines, cancel, health.

Whether P may have written decides whether D can reuse the blocks at once or must wait for the
lease to end, so each failure kind is checked for it.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from pdpush.local.cluster import free_port
from pdpush.rpc.prefill_client import PrefillClient, PrefillJob


class FakePrefill(BaseHTTPRequestHandler):
    """Behaviour by the prompt's first token: 0 ok, 1 bad params, 3 HTTP 403, 4 HTTP 400,
    5 HTTP 500, 9 slow."""

    seen: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        FakePrefill.seen.append(body)
        kind = body["prompt"][0]
        if kind == 9:
            time.sleep(2)
        if kind in (3, 4, 5):
            return self._send({3: 403, 4: 400, 5: 500}[kind], {"error": "no"})
        params = {"pdpush_error": "bad target"} if kind == 1 else {"pdpush": {"pushed": True}}
        self._send(200, {"choices": [{"token_ids": [77]}], "kv_transfer_params": params})

    def do_GET(self) -> None:  # noqa: N802
        if self.path == "/metrics":
            return self._send(200, 'vllm:num_requests_waiting{model_name="m"} 3.0\n', raw=True)
        self._send(200, {})

    def _send(self, status: int, payload, raw: bool = False) -> None:
        data = payload.encode() if raw else json.dumps(payload).encode()
        try:
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (deadline, cancel): what those tests do

    def log_message(self, *args) -> None:
        return


@pytest.fixture(scope="module")
def fake_p():
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), FakePrefill)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def client(fake_p):
    c = PrefillClient((fake_p,), health_interval_s=0.1)
    yield c
    c.close()


def job(url: str, kind: int, timeout_s: float = 5.0, req_id: str = "r") -> PrefillJob:
    return PrefillJob(req_id, url, [kind, 1, 2], {"temperature": 0.0}, {"pdpush": {"x": 1}},
                      time.monotonic() + timeout_s)


def wait_result(client: PrefillClient, timeout_s: float = 5.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        results = client.drain_results()
        if results:
            return results[0]
        time.sleep(0.02)
    raise AssertionError("no result")


def test_ok_returns_first_token_and_sends_one_token_request(client, fake_p):
    client.submit(job(fake_p, 0))
    result = wait_result(client)
    assert (result.ok, result.first_token) == (True, 77)
    sent = FakePrefill.seen[-1]
    assert sent["max_tokens"] == 1 and sent["kv_transfer_params"] == {"pdpush": {"x": 1}}


@pytest.mark.parametrize("kind, may_have_written, error", [
    # 400: vLLM answers it also for errors raised after its engine started the request.
    (1, False, "bad target"), (3, False, "P answered 403"), (4, True, "P answered 400"),
    (5, True, "P answered 500"),
])
def test_p_errors(client, fake_p, kind, may_have_written, error):
    client.submit(job(fake_p, kind))
    result = wait_result(client)
    assert not result.ok and result.may_have_written is may_have_written
    assert error in result.error


def test_unreachable_prefill_fails_fast_and_wrote_nothing(client):
    client.submit(job(f"http://127.0.0.1:{free_port()}", 0))
    result = wait_result(client)
    assert not result.ok and not result.may_have_written and "cannot reach" in result.error


def test_deadline_abandons_a_slow_prefill(client, fake_p):
    start = time.monotonic()
    client.submit(job(fake_p, 9, timeout_s=0.3))
    result = wait_result(client)
    assert time.monotonic() - start < 1.5
    assert not result.ok and result.may_have_written and "deadline" in result.error
    assert result.at - start >= 0.3  # the outcome's time is when it was known, not the call's start


def test_cancel_ends_the_call(client, fake_p):
    client.submit(job(fake_p, 9, req_id="c"))
    time.sleep(0.2)
    assert client.cancel("c")
    result = wait_result(client)
    assert result.error == "cancelled by D" and result.may_have_written and result.cancelled
    assert not client.cancel("c")


def test_health_reports_queue_from_metrics(client):
    deadline = time.monotonic() + 3
    reports = []
    while not reports and time.monotonic() < deadline:
        reports = client.drain_health()
        time.sleep(0.05)
    assert reports and reports[0].ok and reports[0].queue == 3


def test_refused_health_check_is_known_at_once(fake_p):
    """`refusing()` names a P whose port refuses connections without waiting for D to drain the
    reports; a P that answers is not named (the control)."""
    dead = f"http://127.0.0.1:{free_port()}"
    client = PrefillClient((fake_p, dead), health_interval_s=0.1)
    try:
        deadline = time.monotonic() + 5
        while not client.refusing() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.refusing() == {dead}
    finally:
        client.close()


LISTENING: list[socket.socket] = []


def dropping_p(ends_after_s: float | None) -> str:
    """A P that resets the do_prefill connection; its listening socket closes `ends_after_s`
    later when its process "ends" (a killed P's port stays open while its processes exit, and
    connects are queued unanswered meanwhile), or never (a stopped or wedged P)."""
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        while True:
            conn, _ = srv.accept()
            if conn.recv(65536).startswith(b"POST"):
                break
            conn.close()  # health checks before the call: no answer
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        conn.close()  # RST
        if ends_after_s is not None:
            time.sleep(ends_after_s)
            srv.close()

    threading.Thread(target=serve, daemon=True).start()
    LISTENING.append(srv)  # kept open (and referenced) until the module ends
    return f"http://127.0.0.1:{srv.getsockname()[1]}"


@pytest.mark.parametrize("ends_after_s, gone", [(0.0, True), (0.8, True), (None, False)],
                         ids=["process-ended", "process-ending", "still-listening"])
def test_dropped_connection_tells_a_p_gone_from_an_unreachable_one(ends_after_s, gone):
    url = dropping_p(ends_after_s)
    client = PrefillClient((url,), health_interval_s=60.0)
    try:
        start = time.monotonic()
        client.submit(job(url, 0, timeout_s=30.0))
        result = wait_result(client)
        assert not result.ok and "dropped the connection" in result.error
        assert result.p_gone is gone
        assert time.monotonic() - start < 5  # seconds, not the lease
    finally:
        client.close()
