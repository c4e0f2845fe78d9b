"""PNG plots of an interference run: step latency against context, and RX traffic over time, one
line per round. matplotlib's Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path

from pdpush.bench.interference_report import Protocol, Round, Step, in_round, is_background_only


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_latency(steps: list[Step], rounds: list[Round], proto: Protocol, path: Path) -> Path:
    """Latency of each background-only step against its context; the measured range shaded."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    for rnd in rounds:
        pts = [(s["ctx_max"], s["latency_ms"]) for s in in_round(steps, rnd)
               if s["mode"] == "full" and is_background_only(s, proto)]  # fmt: skip
        if pts:
            ax.plot(*zip(*pts), ".", markersize=2, label=rnd.label)
    ax.axvspan(proto.measure_from, proto.measure_to, color="grey", alpha=0.15, label="measured")
    ax.set(xlabel="context (tokens)", ylabel="step latency (ms)",
           title=f"Decode step latency, background batch {proto.batch}")  # fmt: skip
    ax.legend(markerscale=4)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_rx(steps: list[Step], rounds: list[Round], path: Path) -> Path:
    """RX rate per step (MB/s) against seconds since the round started."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    sources: set[str] = set()
    for rnd in rounds:
        pts = [(s["t"] - rnd.t_start, s["rx_bps"] / 1e6) for s in in_round(steps, rnd)
               if s.get("rx_bps") is not None]  # fmt: skip
        sources.update(s["rx_source"] for s in in_round(steps, rnd) if s.get("rx_source"))
        if pts:
            ax.plot(*zip(*pts), linewidth=0.8, label=rnd.label)
    ax.set(xlabel="seconds since the round started", ylabel="RX (MB/s)",
           title=f"Inbound KV traffic on D (source: {', '.join(sorted(sources)) or 'none'})")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
