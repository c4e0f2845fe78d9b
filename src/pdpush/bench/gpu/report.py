"""Turn the suite's raw results into its figures: a summary (GB/s, ratios, posting overhead,
ordering counts), the DecodeLatency table in the form of the design document the project came from
(docs/architecture.md, "Origin"), and the slowdown plot.

Bandwidth modes (all move the same bytes of one 2000-token prompt, fragmented block tables):
  layerwise         the layers through P's transfer thread, as `push` posts them: coalesced
                    runs, one WRITE per layer, except that layers already ready when the
                    thread gets to them go out as one WRITE (all are ready here: the upper bound)
  layerwise_each    one WRITE per layer, all layers in flight, posted from one thread
  layerwise_serial  the same, but each layer waits for the previous one (no concurrency)
  merged            one WRITE carrying every layer's coalesced runs
  contiguous        one WRITE per layer of the same bytes as a single run (no fragmentation)
  uncoalesced       one WRITE per layer, one descriptor per block (no coalescing)
  torch indexed     torch index_select/index_copy of the same blocks from P's cache into a
                    D-shaped cache on D's GPU (a peer copy over NVLink when the GPUs differ)
  torch flat        torch copy of the same number of bytes, one flat buffer, P's GPU to D's
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

MODES = ("layerwise", "layerwise_each", "layerwise_serial", "merged", "contiguous", "uncoalesced")


def _gbps(nbytes: int, runs: list[dict]) -> float:
    return nbytes / statistics.median(r["seconds"] for r in runs) / 1e9


def bandwidth_summary(bw: dict, blocks: int) -> dict:
    out: dict[str, Any] = {"blocks_per_layer": blocks}
    out |= {f"{m}_gbps": _gbps(bw["bytes"], bw[m]) for m in MODES}
    out["torch_indexed_gbps"] = bw["bytes"] / statistics.median(bw["torch_copy"]["indexed"]) / 1e9
    out["torch_flat_gbps"] = bw["bytes"] / statistics.median(bw["torch_copy"]["flat"]) / 1e9
    out["layerwise_over_merged"] = out["layerwise_gbps"] / out["merged_gbps"]
    out["layerwise_each_over_merged"] = out["layerwise_each_gbps"] / out["merged_gbps"]
    out["layerwise_writes"] = statistics.fmean(r["writes"] for r in bw["layerwise"])
    out["layerwise_over_contiguous"] = out["layerwise_gbps"] / out["contiguous_gbps"]
    out["post_us_per_write"] = statistics.fmean(r["post_us_mean"] for r in bw["layerwise"])
    out["post_us_per_layer_each"] = statistics.fmean(
        r["post_us_mean"] for r in bw["layerwise_each"])
    out["post_us_per_layer_uncoalesced"] = statistics.fmean(
        r["post_us_mean"] for r in bw["uncoalesced"])
    out["descriptors_per_layer"] = statistics.fmean(bw["descriptors_per_layer"])
    return out


def shape_summary(name: str, res: dict) -> dict:
    from pdpush.bench.gpu.shapes import SHAPES

    out: dict[str, Any] = {"fence": res["fence"]}
    if "correctness" in res:
        pushes = res["correctness"]
        out["correctness"] = {
            "pushes": len(pushes),
            "bad_blocks": sum(p["check"]["bad_blocks"] + p["check"]["stray_blocks"]
                              for p in pushes),
            "checked_bytes": sum(p["check"]["checked_bytes"] for p in pushes),
            "push_gbps_with_compute": statistics.median(
                p["push"]["bytes"] / p["push"]["seconds"] / 1e9 for p in pushes),
            "post_us_per_write": statistics.fmean(
                statistics.fmean(p["push"]["post_us"]) for p in pushes),
            "writes_per_push": statistics.fmean(p["push"]["writes"] for p in pushes),
            "byte_runs_us_per_layer": statistics.fmean(p["push"]["runs_us"] for p in pushes),
        }
    if "ordering" in res:
        out["ordering"] = {
            k: {"trials": len(v), "trials_with_stale_data": sum(c["bad_blocks"] > 0 for c in v),
                "stale_blocks": sum(c["bad_blocks"] for c in v)}
            for k, v in res["ordering"].items()}
    if "pipeline" in res:
        pipe = res["pipeline"]
        out["pipeline"] = {
            "compute_ms": statistics.median(r["compute_s"] for r in pipe) * 1e3,
            "push_ms": statistics.median(r["push_s"] for r in pipe) * 1e3,
            "exposed_ms": statistics.median(r["push_s"] - r["compute_s"] for r in pipe) * 1e3,
            "post_us_per_write": statistics.fmean(statistics.fmean(r["post_us"]) for r in pipe),
            "writes_per_push": statistics.fmean(len(r["post_us"]) for r in pipe),
            "bad_blocks": sum(r["bad_blocks"] for r in pipe)}
    if "bandwidth" in res:
        out["bandwidth"] = bandwidth_summary(res["bandwidth"], SHAPES[name].prompt_blocks())
    return out


def _rel(value: float, base: float) -> float:
    return (value - base) / base


def interference_table(inter: dict) -> list[dict]:
    """Per QPS: min/max/avg step latency relative to QPS 0 of the same repetition, with the
    spread (lowest, highest) of the avg over repetitions, and the inbound GB/s."""
    runs = inter["runs"]
    base = {r["rep"]: r for r in runs if r["qps"] == 0}
    rows = []
    for qps in dict.fromkeys(r["qps"] for r in runs if r["qps"] != 0):
        mine = [r for r in runs if r["qps"] == qps]
        rel = {k: [_rel(r[f"{k}_ms"], base[r["rep"]][f"{k}_ms"]) for r in mine]
               for k in ("min", "max", "mean")}
        rows.append({"qps": qps, "gbps": statistics.fmean(r["gbps"] for r in mine),
                     "min": statistics.fmean(rel["min"]), "max": statistics.fmean(rel["max"]),
                     "avg": statistics.fmean(rel["mean"]),
                     "avg_lo": min(rel["mean"]), "avg_hi": max(rel["mean"])})
    return rows


def summarize(results: dict) -> dict:
    out = {name: shape_summary(name, res) for name, res in results.get("shapes", {}).items()}
    if "interference" in results:
        inter = results["interference"]
        base = [r["mean_ms"] for r in inter["runs"] if r["qps"] == 0]
        out["interference"] = {"qps0_mean_ms": statistics.fmean(base),
                               "rows": interference_table(inter)}
    return out


def markdown(summary: dict) -> str:
    lines = []
    for name, s in summary.items():
        if name == "interference":
            continue
        lines.append(f"## {name}\n\nfence: {s['fence']}\n")
        for key in ("correctness", "ordering", "bandwidth", "pipeline"):
            if key in s:
                lines.append(f"**{key}**\n")
                lines += [f"- {k}: {_fmt(v)}" for k, v in s[key].items()]
                lines.append("")
    if "interference" in summary:
        inter = summary["interference"]
        lines.append(f"## interference (QPS 0 step: {inter['qps0_mean_ms']:.3f} ms)\n")
        rows = inter["rows"]
        lines.append("| DecodeLatency | " + " | ".join(f"qps{_q(r['qps'])}" for r in rows) + " |")
        lines.append("|---" * (len(rows) + 1) + "|")
        for k in ("min", "max", "avg"):
            lines.append(f"| {k} | " + " | ".join(f"{r[k]:.7f}" for r in rows) + " |")
        lines.append("| avg spread over reps | " +
                     " | ".join(f"{r['avg_lo']:.4f}..{r['avg_hi']:.4f}" for r in rows) + " |")
        lines.append("| inbound GB/s | " + " | ".join(f"{r['gbps']:.3f}" for r in rows) + " |")
    return "\n".join(lines) + "\n"


def _q(qps: Any) -> str:
    return "max" if qps == "max" or (isinstance(qps, float) and math.isinf(qps)) else f"{qps:g}"


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def plot(results: dict, path: Path) -> None:
    """Decode slowdown (%) against inbound GB/s: every run, and the mean per rate with the
    spread over repetitions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["interference"]["runs"]
    base = {r["rep"]: r["mean_ms"] for r in runs if r["qps"] == 0}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    xs = [max(r["gbps"], 1e-3) for r in runs]
    ys = [100 * _rel(r["mean_ms"], base[r["rep"]]) for r in runs]
    ax.scatter(xs, ys, s=12, alpha=0.5, label="one run (mean step over the window)")
    rows = interference_table(results["interference"])
    ax.errorbar([max(r["gbps"], 1e-3) for r in rows], [100 * r["avg"] for r in rows],
                yerr=[[100 * (r["avg"] - r["avg_lo"]) for r in rows],
                      [100 * (r["avg_hi"] - r["avg"]) for r in rows]],
                fmt="o-", color="C3", capsize=3, label="mean over repetitions (min..max)")
    for r in rows:
        ax.annotate(f"qps {_q(r['qps'])}", (max(r["gbps"], 1e-3), 100 * r["avg"]),
                    fontsize=7, xytext=(3, 4), textcoords="offset points")
    ax.set_xscale("log")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("inbound KV writes into D (GB/s)")
    ax.set_ylabel("decode step latency vs no writes (%)")
    cfg, dec = results["config"], results["interference"]["decoder"]["shape"]
    ax.set_title(f"Decode ({dec['layers']} layers, hidden {dec['hidden']}, batch {cfg['batch']}, "
                 f"ctx {cfg['ctx_lo']}-{cfg['ctx_hi']}) under P's pushes", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(results: dict, out: Path) -> None:
    (out / "report.md").write_text(markdown(results["summary"]))
    if "interference" in results:
        plot(results, out / "interference.png")
