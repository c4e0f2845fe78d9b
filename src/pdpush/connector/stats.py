"""The connector's live stats as JSON (/stats) and Prometheus text (/metrics).

Served from the scheduler process on `stats_port`: vLLM's own /metrics lives in the API
server process, which cannot see the connector's counters. Counters include the first-token
mismatches (suspected KV corruption) and, per P, the policy's inputs (in flight, queue, health).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from pdpush.rpc.json_server import JsonServer

if TYPE_CHECKING:
    from pdpush.connector.config import PdpushConfig
    from pdpush.vllm_api import BlockAccess


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


def serve_scheduler_stats(config: "PdpushConfig", role: str, blocks: "BlockAccess",
                          collect: Callable[[], dict[str, Any]]) -> JsonServer | None:
    """A scheduler half's stats with the engine's free/total KV blocks, when stats_port is set."""
    if not config.stats_port:
        return None
    return serve_stats(config.stats_host, config.stats_port,
                       lambda: {"role": role, "free_blocks": blocks.free_blocks(),
                                "total_blocks": blocks.total_blocks(), **collect()})
