"""PNG plots of an interference run: step latency against context, and RX traffic over time, one
line per round. matplotlib's Agg backend: no display needed."""

from __future__ import annotations

from pathlib import Path

from pdpush.bench.interference.report import Protocol, Round, Step, in_round, is_background_only


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


def rx_per_second(steps: list[Step], rnd: Round, bin_s: float = 1.0) -> list[tuple[float, float]]:
    """RX in MB/s per `bin_s` bin since the round started: the engine source books a request's
    bytes at once when its notification lands, so per-step rates are spikes, not a curve."""
    bins = [0.0] * (int((rnd.t_end - rnd.t_start) / bin_s) + 1)
    for s in in_round(steps, rnd):
        if s.get("rx_bytes"):
            bins[int((s["t"] - rnd.t_start) / bin_s)] += s["rx_bytes"] / 1e6 / bin_s
    return [(i * bin_s, mbps) for i, mbps in enumerate(bins)]


def plot_rx(steps: list[Step], rounds: list[Round], path: Path) -> Path:
    """RX (MB/s, one-second bins) against seconds since the round started, one line per round."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 5))
    sources = sorted({s["rx_source"] for r in rounds for s in in_round(steps, r) if s.get("rx_source")})
    for rnd in rounds:
        ax.step(*zip(*rx_per_second(steps, rnd)), where="post", linewidth=0.9, label=rnd.label)
    ax.set(xlabel="seconds since the round started", ylabel="RX (MB/s, 1 s bins)",
           title=f"Inbound KV traffic on D (source: {', '.join(sources) or 'none'})")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
