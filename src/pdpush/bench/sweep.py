"""The serving benchmark under load: `vllm bench serve` per path and QPS, side by side.

For each (input, output) length pair and each QPS, every path gets the same random-token prompts
(vLLM's random dataset, seeded per point so no point hits another's prefix cache) arriving as a
Poisson process, with ignore_eos so every request decodes its full output. vLLM's generator
reports TTFT, TPOT, ITL and end-to-end latency percentiles, throughput, and goodput under the SLOs
(`--goodput ttft:MS tpot:MS`). The points are measured one after the other (never two paths at
once: they share the GPU). For pdpush the D's counters say how many requests were prefilled
remotely vs locally (its policy falls back to a local prefill when P is busy).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

log = logging.getLogger(__name__)

METRICS = ("ttft", "tpot", "itl", "e2el")
PERCENTILES = ("50", "90", "99")
KEPT = ("request_rate", "completed", "failed", "duration", "request_throughput", "request_goodput",
        "output_throughput", "total_token_throughput", "max_concurrent_requests")


@dataclass(frozen=True)
class Load:
    input_len: int
    output_len: int
    qps: float
    duration_s: float
    slo_ttft_ms: float
    slo_tpot_ms: float
    seed: int = 0

    @property
    def num_prompts(self) -> int:
        return max(4, round(self.qps * self.duration_s))

    def args(self, url: str, tokenizer: Path) -> list[str]:
        return [
            "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions",
            "--model", "pdpush", "--tokenizer", str(tokenizer),
            "--dataset-name", "random", "--random-input-len", str(self.input_len),
            "--random-output-len", str(self.output_len), "--random-range-ratio", "0",
            "--num-prompts", str(self.num_prompts), "--request-rate", str(self.qps),
            "--seed", str(self.seed), "--ignore-eos", "--temperature", "0",
            "--percentile-metrics", ",".join(METRICS), "--metric-percentiles", ",".join(PERCENTILES),
            "--goodput", f"ttft:{self.slo_ttft_ms:g}", f"tpot:{self.slo_tpot_ms:g}",
            "--disable-tqdm",
        ]


def run_point(url: str, tokenizer: Path, load: Load, bench_log: Path) -> dict[str, Any]:
    """One `vllm bench serve` run; its summary (no per-request arrays), or {"error": ...}."""
    from pdpush.bench.vllm_bench import serve

    try:
        raw = serve(load.args(url, tokenizer), bench_log)
    except Exception as exc:  # noqa: BLE001 - one point failing must not lose the others
        log.debug("vllm bench serve failed", exc_info=True)
        return {"error": f"vllm bench serve failed: {type(exc).__name__}: {exc}"[:300]}
    return summarize(raw)


def summarize(raw: dict[str, Any]) -> dict[str, Any]:
    out = {k: raw.get(k) for k in KEPT}
    for metric in METRICS:
        for stat in ("mean", "median", *(f"p{p}" for p in PERCENTILES)):
            key = f"{stat}_{metric}_ms"
            if key in raw:
                out[key] = raw[key]
    return out


def pdpush_counts(stats_url: str | None) -> dict[str, int]:
    """D's placement counters (local, remote_ok, fallback) now, for per-point differences."""
    if stats_url is None:
        return {}
    try:
        stats = httpx.get(stats_url, timeout=10.0).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return {k: stats.get(k, 0) for k in ("local", "remote_ok", "fallback")}


def sweep(paths: dict, tokenizer: Path, loads: list[Load], bench_log: Path,
          rows: list[dict], on_row=lambda: None) -> list[dict]:
    """Every load point on every path, in that order (a point's paths measured back to back),
    appended to `rows`; `on_row` after each, so a run cut short keeps what it measured."""
    for load in loads:
        for name, path in paths.items():
            before = pdpush_counts(path.stats_url)
            row = {"path": name, "input_len": load.input_len, "output_len": load.output_len,
                   "qps": load.qps, **run_point(path.url, tokenizer, load, bench_log)}
            after = pdpush_counts(path.stats_url)
            if before and after:
                row["placed"] = {k: after[k] - before[k] for k in after}
            rows.append(row)
            on_row()
    return rows


def markdown(rows: list[dict], slo: str) -> str:
    cols = ["path", "qps", "req/s", "goodput", "out tok/s",
            *[f"{m} p{p}" for m in ("ttft", "tpot", "itl") for p in PERCENTILES]]
    lines = []
    for (i, o) in sorted({(r["input_len"], r["output_len"]) for r in rows}):
        lines += [f"### input {i} / output {o} tokens (ms; goodput under {slo})", "",
                  "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for r in [r for r in rows if (r["input_len"], r["output_len"]) == (i, o)]:
            if "error" in r:
                lines.append(f"| {r['path']} | {r['qps']:g} | {r['error']} |")
                continue
            cells = [r["path"], f"{r['qps']:g}", _f(r.get("request_throughput"), 2),
                     _f(r.get("request_goodput"), 2), _f(r.get("output_throughput"), 0),
                     *[_f(r.get(f"p{p}_{m}_ms"), 1) for m in ("ttft", "tpot", "itl") for p in PERCENTILES]]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], out_dir: Path) -> list[Path]:
    """One figure per length pair: each metric against QPS, one line per path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("p50_ttft_ms", "TTFT p50 (ms)"), ("p99_ttft_ms", "TTFT p99 (ms)"),
              ("p50_tpot_ms", "TPOT p50 (ms)"), ("p99_tpot_ms", "TPOT p99 (ms)"),
              ("p99_itl_ms", "ITL p99 (ms)"), ("output_throughput", "output tok/s"),
              ("request_throughput", "requests/s"), ("request_goodput", "goodput (req/s)")]
    files = []
    for (i, o) in sorted({(r["input_len"], r["output_len"]) for r in rows}):
        fig, axes = plt.subplots(2, 4, figsize=(16, 7))
        for ax, (key, title) in zip(axes.flat, panels):
            for name in dict.fromkeys(r["path"] for r in rows):
                pts = [(r["qps"], r[key]) for r in rows if r["path"] == name and r.get(key) is not None
                       and (r["input_len"], r["output_len"]) == (i, o)]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=name)
            ax.set_title(title)
            ax.set_xlabel("QPS (Poisson)")
            ax.grid(alpha=0.3)
        axes.flat[0].legend()
        fig.suptitle(f"input {i} / output {o} tokens")
        fig.tight_layout()
        path = out_dir / f"serving-{i}x{o}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
    return files


def _f(value: Any, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"
