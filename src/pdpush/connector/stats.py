"""The connector's live stats as JSON (/stats) and Prometheus text (/metrics).

Served from the scheduler process on `stats_port`: vLLM's own /metrics lives in the API
server process, which cannot see the connector's counters. Counters include the first-token
mismatches (suspected KV corruption) and, per P, the policy's inputs (in flight, queue, health).
"""

from __future__ import annotations

from typing import Any, Callable

from pdpush.rpc.json_server import JsonServer


def prometheus_text(stats: dict[str, Any]) -> str:
    """Numbers become `pdpush_<name>`; the per-P table becomes labelled `pdpush_prefill_<name>`."""
    lines = []
    for name, value in stats.items():
        if isinstance(value, (bool, int, float)):
            lines.append(f"pdpush_{name} {float(value)}")
    for url, peer in stats.get("prefills", {}).items():
        for name, value in peer.items():
            lines.append(f'pdpush_prefill_{name}{{url="{url}"}} {float(value)}')
    return "\n".join(lines) + "\n"


def serve_stats(host: str, port: int, collect: Callable[[], dict[str, Any]]) -> JsonServer:
    return JsonServer(host, port, {"/stats": collect, "/metrics": lambda: prometheus_text(collect())})
