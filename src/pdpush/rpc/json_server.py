"""A tiny threaded HTTP server answering GET routes with JSON (or text), and its client call.

Used for D's per-rank NIXL metadata side channel and for the connector's live stats (free
blocks, decisions, fallbacks), which tests and `pdpush demo` read. Stdlib only: it runs inside
vLLM's engine and worker processes and must not pull in anything heavy.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Routes = dict[str, Callable[[], Any]]
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # peers are direct


class JsonServer:
    """Serves `routes` (path -> zero-argument callable returning JSON-able data or a str)."""

    def __init__(self, host: str, port: int, routes: Routes) -> None:
        handler = _handler_for(routes)
        self._server = ThreadingHTTPServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name=f"pdpush-http-{port}", daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _handler_for(routes: Routes) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            route = routes.get(self.path.split("?")[0])
            if route is None:
                self._send(404, {"error": f"no route {self.path}"})
                return
            try:
                self._send(200, route())
            except Exception as exc:  # a broken route must not kill the server thread
                self._send(500, {"error": repr(exc)})

        def _send(self, status: int, payload: Any) -> None:
            text = isinstance(payload, str)  # e.g. Prometheus exposition text
            body = payload.encode() if text else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "text/plain; version=0.0.4" if text else "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            return  # the engine's log is not an access log

    return Handler


def get_json(url: str, timeout_s: float) -> Any:
    """GET url and decode JSON; raises OSError (URLError) or ValueError on failure."""
    with _OPENER.open(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())
