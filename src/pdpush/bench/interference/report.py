"""The interference experiment's arithmetic: from the probe's step records and the rounds' time
windows to DecodeLatency per round, the relative table of the design document the project came
from (docs/architecture.md, "Origin"), RX traffic and the probe's own cost.

Pure functions over plain dicts (the probe's JSON lines), so the math is tested on synthetic records.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

Step = dict[str, Any]


@dataclass(frozen=True)
class Protocol:
    """What counts as a DecodeLatency step: the background batch alone, contexts in the range."""

    batch: int
    measure_from: int = 1500
    measure_to: int = 2000


@dataclass(frozen=True)
class Round:
    """One run of the background batch at one QPS, as the bench saw it (wall-clock window)."""

    label: str
    qps: float
    t_start: float
    t_end: float
    sent: int = 0
    prefilled: dict[str, int] = field(default_factory=dict)  # load requests by where: remote, ...


@dataclass(frozen=True)
class LatencyStats:
    steps: int  # steps that count
    excluded: int  # steps in the context range whose batch was not the background batch alone
    min_ms: float
    max_ms: float
    avg_ms: float
    median_ms: float


def load_steps(path: Path | str) -> list[Step]:
    """The probe's JSON lines; a last line cut short by a live writer is skipped."""
    steps = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            steps.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return steps


def in_round(steps: list[Step], rnd: Round) -> list[Step]:
    return [s for s in steps if rnd.t_start <= s["t"] <= rnd.t_end]


def is_background_only(step: Step, proto: Protocol) -> bool:
    """A pure decode step of exactly the background batch (no prefill, no extra request)."""
    return step["num_reqs"] == proto.batch and step["num_tokens"] == proto.batch


def in_range(step: Step, proto: Protocol) -> bool:
    return step["ctx_min"] >= proto.measure_from and step["ctx_max"] <= proto.measure_to


def decode_latency(steps: list[Step], proto: Protocol, mode: str = "full") -> LatencyStats | None:
    """Step latency over the measured contexts, over steps the probe ran fully (`mode`)."""
    ranged = [s for s in steps if s["mode"] == mode and s["num_reqs"] and in_range(s, proto)]
    values = [s["latency_ms"] for s in ranged if is_background_only(s, proto)]
    if not values:
        return None
    return LatencyStats(
        steps=len(values), excluded=len(ranged) - len(values), min_ms=min(values),
        max_ms=max(values), avg_ms=statistics.fmean(values), median_ms=statistics.median(values),
    )  # fmt: skip


def relative(stats: LatencyStats, base: LatencyStats) -> dict[str, float]:
    """The design document's figures: (x - x at QPS 0) / (x at QPS 0) for min, max, avg."""
    return {
        key: (getattr(stats, f"{key}_ms") - getattr(base, f"{key}_ms")) / getattr(base, f"{key}_ms")
        for key in ("min", "max", "avg")
    }


def rx_summary(steps: list[Step], rnd: Round, proto: Protocol) -> dict[str, Any]:
    """Bytes received over the round, its mean rate, the bytes that arrived during the measured
    contexts (the traffic that could interfere) and the RX source(s) the probe named."""
    with_rx = [s for s in steps if s.get("rx_bytes") is not None]
    total = sum(s["rx_bytes"] for s in with_rx)
    measured = sum(s["rx_bytes"] for s in with_rx if s["num_reqs"] and in_range(s, proto))
    seconds = rnd.t_end - rnd.t_start
    sources = sorted({s["rx_source"] for s in with_rx if s.get("rx_source")})
    return {"bytes": total, "mean_bps": total / seconds if seconds > 0 else 0.0,
            "measured_bytes": measured, "sources": sources}  # fmt: skip


def _runs(steps: list[Step]) -> list[tuple[str, list[Step]]]:
    """Maximal runs of consecutive step indices with one probe mode."""
    runs: list[tuple[str, list[Step]]] = []
    for step in steps:
        if runs and runs[-1][0] == step["mode"] and runs[-1][1][-1]["step"] + 1 == step["step"]:
            runs[-1][1].append(step)
        else:
            runs.append((step["mode"], [step]))
    return runs


def _median_and_quartiles(values: list[float]) -> dict[str, float]:
    """Robust to the odd window hit by something else on the machine (a mean is not)."""
    q1, q2, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return {"median": q2, "q1": q1, "q3": q3}


def probe_cost(steps: list[Step], proto: Protocol) -> dict[str, Any] | None:
    """The probe's cost from its A/B windows on one engine: each bare window against the mean of
    the full windows either side (cancels the slow rise of latency with context), per-window
    medians, the first step of each window dropped (it carries the switch); the median and
    quartiles of those ratios over all window pairs. Positive = the full probe is slower. Also the probe's own measured work per step relative to the step period."""
    background = [s for s in steps if is_background_only(s, proto)]
    runs = [(m, run[1:]) for m, run in _runs(background) if len(run) > 2]
    out: dict[str, Any] = {}
    # A bare window times steps on the host; on a GPU the full probe uses CUDA events, another
    # measure: then only the step period compares the two.
    cuda = any(s.get("timer") == "cuda" for _, run in runs for s in run)
    for key in ("period_ms",) if cuda else ("period_ms", "latency_ms"):
        ratios = []
        for (m0, a), (m1, b), (m2, c) in zip(runs, runs[1:], runs[2:]):
            if (m0, m1, m2) != ("full", "bare", "full"):
                continue
            medians = [statistics.median(s[key] for s in run if s[key] is not None) for run in (a, b, c)]
            ratios.append((medians[0] + medians[2]) / 2 / medians[1] - 1)
        if not ratios:
            return None
        out[key] = {**_median_and_quartiles(ratios), "windows": len(ratios)}
    full = [s for m, run in runs if m == "full" for s in run
            if s["probe_us"] is not None and s["period_ms"]]  # fmt: skip
    out["own_work_us"] = out["own_work_share"] = None
    if full:
        out["own_work_us"] = statistics.fmean(s["probe_us"] for s in full)
        out["own_work_share"] = statistics.fmean(s["probe_us"] / 1e3 / s["period_ms"] for s in full)
    return out


def build_report(
    steps: list[Step], rounds: list[Round], proto: Protocol, meta: dict[str, Any]
) -> dict[str, Any]:
    """Everything the JSON report holds. The baseline is the first QPS-0 round with data; later
    QPS-0 rounds appear in the relative table too, as the noise floor."""
    per_round, stats_by_label = [], {}
    for rnd in rounds:
        in_rnd = in_round(steps, rnd)
        stats = decode_latency(in_rnd, proto)
        stats_by_label[rnd.label] = stats
        per_round.append({
            **asdict(rnd), "steps": len(in_rnd), "rx": rx_summary(in_rnd, rnd, proto),
            "decode_latency": asdict(stats) if stats else None,
        })  # fmt: skip
    base = next((r for r in rounds if r.qps == 0 and stats_by_label[r.label]), None)
    table = {}
    if base is not None:
        base_stats = stats_by_label[base.label]
        for rnd in rounds:
            stats = stats_by_label[rnd.label]
            if rnd is not base and stats is not None:
                table[rnd.label] = relative(stats, base_stats)
    quiet = [s for r in rounds if r.qps == 0 for s in in_round(steps, r)]
    return {
        "protocol": asdict(proto), "meta": meta, "rounds": per_round,
        "baseline": base.label if base else None, "relative": table,
        "probe_cost": probe_cost(quiet, proto),
    }  # fmt: skip


def _signed(value: float | None, digits: int = 7) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:+.{digits}f}"


def _round_rows(report: dict[str, Any]) -> list[str]:
    rows = []
    for r in report["rounds"]:
        d, rx = r["decode_latency"], r["rx"]
        keys = ("steps", "excluded", "min_ms", "max_ms", "avg_ms", "median_ms")
        figures = " | ".join(
            "n/a" if d is None else f"{d[k]:.3f}" if k.endswith("_ms") else str(d[k]) for k in keys
        )
        rows.append(
            f"| {r['label']} | {r['qps']:g} | {figures} | {r['sent']} | {_counts(r['prefilled'])} "
            f"| {rx['bytes']:,} | {rx['measured_bytes']:,} | {rx['mean_bps'] / 1e6:.2f} "
            f"| {', '.join(rx['sources']) or '-'} |"
        )
    return rows


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"


def _cost_lines(cost: dict[str, Any] | None) -> list[str]:
    if cost is None:
        return ["Not measured (run with --probe-ab-steps > 0; needs QPS-0 rounds)."]
    lines = [
        f"- {key}: full probe vs bare, median {_signed(c['median'] * 100, 3)}% over {c['windows']} "
        f"window pairs (middle half {_signed(c['q1'] * 100, 2)}% to {_signed(c['q3'] * 100, 2)}%)"
        for key, c in ((k, cost[k]) for k in ("period_ms", "latency_ms") if k in cost)
    ]
    if "latency_ms" not in cost:
        lines.append("- latency_ms: not compared (CUDA-event latency in full windows, host time in "
                     "bare ones)")
    share = cost["own_work_share"]
    if share is not None:
        lines.append(f"- probe's own work per step: {cost['own_work_us']:.1f} µs, "
                     f"{share * 100:.3f}% of the step period")  # fmt: skip
    return lines


def warnings(report: dict[str, Any]) -> list[str]:
    """What makes a round's figure mean less than it seems: no push traffic while it was measured,
    load requests not prefilled on P, or no measurable steps."""
    out = []
    for r in report["rounds"]:
        if r["decode_latency"] is None:
            out.append(f"{r['label']}: no step of the background batch alone in the measured contexts")
        if r["qps"] > 0 and r["rx"]["measured_bytes"] == 0:
            out.append(f"{r['label']}: no bytes arrived during the measured contexts, so this round "
                       "does not measure interference")  # fmt: skip
        others = {k: v for k, v in r["prefilled"].items() if k != "remote"}
        if others:
            out.append(f"{r['label']}: load requests not prefilled on P: {_counts(others)}")
    return out


def markdown(report: dict[str, Any]) -> str:
    """The design document's table (relative to QPS 0), the absolute figures per round, probe cost."""
    proto = report["protocol"]
    labels = list(report["relative"])
    lines = [
        "# Decode interference", "",
        f"Background batch {proto['batch']}, DecodeLatency = step latency over contexts "
        f"{proto['measure_from']}–{proto['measure_to']}; relative to {report['baseline']}. "
        "Repeated qps0 rounds show the noise floor.", "",
        "| DecodeLatency | " + " | ".join(labels) + " |", "|---" * (len(labels) + 1) + "|",
    ]  # fmt: skip
    for key in ("min", "max", "avg"):
        lines.append(f"| {key} | " + " | ".join(_signed(report["relative"][lb][key]) for lb in labels) + " |")
    caveats = warnings(report)
    if caveats:
        lines += ["", "**Caveats:**", *(f"- {c}" for c in caveats)]
    lines += [
        "", "## Rounds", "",
        "| round | QPS | steps | excluded | min ms | max ms | avg ms | median ms "
        "| load sent | load prefilled | RX bytes | RX bytes in measured steps | RX MB/s | RX source |",
        "|---" * 14 + "|", *_round_rows(report), "", "## Probe cost (A/B windows, QPS-0 rounds)", "",
        *_cost_lines(report["probe_cost"]), "",
    ]  # fmt: skip
    meta = report.get("meta") or {}
    if meta:
        lines += ["## Run", "", *(f"- {k}: {v}" for k, v in meta.items()), ""]
    return "\n".join(lines)
