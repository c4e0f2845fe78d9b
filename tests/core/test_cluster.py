"""VllmServer's process handling with stand-in commands (no vLLM): health wait, failure, clean stop."""

import os
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from pdpush.local.cluster import ServerError, VllmServer

# Serves /health and starts a grandchild, like vLLM's api_server starting its engine core.
HEALTHY = textwrap.dedent("""
    import http.server, subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[2], "w").write(str(child.pid))
    class H(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404); self.end_headers()
        def log_message(self, *a): pass
    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
""")


@dataclass
class ScriptServer(VllmServer):
    script: str = ""

    def command(self) -> list[str]:
        return [sys.executable, "-c", self.script, str(self.port), str(self.log_dir / "child.pid")]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"


def test_healthy_server_and_stop_kills_its_children(tmp_path):
    server = ScriptServer("fake", Path("."), log_dir=tmp_path, script=HEALTHY)
    with server:
        assert server.alive()
        child = int((tmp_path / "child.pid").read_text())
        assert _alive(child)
    assert not server.alive()
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the server's child outlived stop()"


def test_exit_during_start_reports_log_tail(tmp_path):
    server = ScriptServer("broken", Path("."), log_dir=tmp_path,
                          script="import sys; print('model folder missing'); sys.exit(3)")
    with pytest.raises(ServerError, match="model folder missing"):
        with server:
            pass
    assert not server.alive()


def test_not_healthy_in_time(tmp_path):
    server = ScriptServer("mute", Path("."), log_dir=tmp_path, script="import time; time.sleep(60)")
    server.start()
    try:
        with pytest.raises(ServerError, match="not healthy after"):
            server.wait_healthy(timeout_s=1.5)
    finally:
        server.stop()
    assert not server.alive()


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """The kernel may offer the same free port again before a server binds it (CI saw D's side
    channel and P0's HTTP server given one port): free_port skips ports it already gave out."""
    import socket as socket_module

    from pdpush.local import cluster

    offered = iter([41001, 41001, 41002, 41001, 41003])

    class Kernel(socket_module.socket):
        def getsockname(self):
            return ("127.0.0.1", next(offered))

    monkeypatch.setattr(cluster, "_HANDED_OUT", set())
    monkeypatch.setattr(cluster.socket, "socket", Kernel)
    assert [cluster.free_port() for _ in range(3)] == [41001, 41002, 41003]
