"""The streaming client against a local stand-in that speaks the OpenAI SSE format."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from pdpush.local.client import complete, prompt_tokens_served


class FakeOpenAI(BaseHTTPRequestHandler):
    gap_s = 0.05

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if body["prompt"] == "bad":
            self.send_response(400)
            self.end_headers()
            self.wfile.write(b'{"error": "bad prompt"}')
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        time.sleep(2 * self.gap_s)  # "prefill"
        for i in range(body["max_tokens"]):
            self._event({"choices": [{"text": f"<t{i}>"}]})
            time.sleep(self.gap_s)
        self._event({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
        self.wfile.write(b"data: [DONE]\n\n")

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b'# HELP x\nvllm:prompt_tokens_total{model_name="a"} 10.0\n'
                         b'vllm:prompt_tokens_total{model_name="b"} 5.0\nvllm:other 3.0\n')

    def _event(self, obj):
        self.wfile.write(b"data: " + json.dumps(obj).encode() + b"\n\n")
        self.wfile.flush()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeOpenAI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_ttft_tpot_and_tokens(url):
    with httpx.Client() as client:
        result = complete(client, url, "hello", max_tokens=5)
    assert result.text == "<t0><t1><t2><t3><t4>"
    assert result.num_tokens == 5
    assert result.ttft_s >= 2 * FakeOpenAI.gap_s
    assert FakeOpenAI.gap_s * 0.8 <= result.tpot_s < FakeOpenAI.gap_s * 4
    assert result.e2e_s > result.ttft_s


def test_error_reply_raises(url):
    with httpx.Client() as client, pytest.raises(httpx.HTTPStatusError):
        complete(client, url, "bad")


def test_prompt_tokens_counter_sums_label_sets(url):
    with httpx.Client() as client:
        assert prompt_tokens_served(client, url) == 15.0
