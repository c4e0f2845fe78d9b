"""Serving paths side by side, started once and kept up: pdpush 1P1D, aggregated vLLM (`local`),
and vLLM's NixlConnector / NixlPushConnector 1P1D behind vLLM's proxy flow (pdpush.bench.paths).

Three measurements, any of them in one run (the servers stay up across them):
- TTFT (the default when neither of the others is asked for): one long prompt at a time,
  --repeats per path, median and ratio to `local`.
- --breakdown LENGTHS: where pdpush's TTFT goes, stage by stage, remote vs a local prefill on
  the same idle D (pdpush.bench.breakdown; needs the pdpush path).
- --qps RATES: the serving benchmark under load: `vllm bench serve` (random prompts of --lengths,
  Poisson arrivals) per path and QPS; TTFT/TPOT/ITL p50/p90/p99, throughput and goodput under
  --slo-ttft-ms / --slo-tpot-ms, as JSON, a markdown table and plots (pdpush.bench.sweep).

Placement (--device, --p-gpu, --d-gpu, --gpu-share) is `pdpush up`'s; every P runs where pdpush's
P does and every D or aggregated server where pdpush's D does, so the paths share one GPU share.
Prompts are distinct per request, so no prefix-cache hit helps any path.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
from pathlib import Path

from pdpush.bench.paths import PATHS
from pdpush.command import RunError, UsageError, positive_int
from pdpush.local.up import add_placement_args, placement

# A request that takes longer has hung; the path is reported failed.
REQUEST_TIMEOUT_S = 300.0
CPU_PREFILL_ARGS = "--max-num-batched-tokens 512"  # P prefills (and pushes) in several chunks
# Every token counts when it arrives, also one that ends inside a UTF-8 character (empty text).
TOKEN_IDS = {"return_token_ids": True}


def make_prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts over the byte tokens every model folder here can decode."""
    rng = random.Random(seed)
    return [[rng.randrange(32, 127) for _ in range(length)] for _ in range(count)]


def summarize(ttfts: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median, min and the ratio of medians to `local` (when measured) per path."""
    medians = {k: statistics.median(v) for k, v in ttfts.items()}
    base = medians.get("local")
    return {k: {"median_ms": medians[k] * 1e3, "min_ms": min(v) * 1e3,
                "vs_local": (medians[k] / base) if base else float("nan")}
            for k, v in ttfts.items()}


def configure(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument
    p("--model", type=Path, help="local model folder (default: the tiny built-in model)")
    p("--paths", default=",".join(PATHS), help=f"comma list from {','.join(PATHS)} (default all)")
    p("--out", type=Path, default=Path("out/bench-serving"), help="report, plots and logs")
    p("--prompt-tokens", type=int, default=2000, help="TTFT mode: prompt length (default 2000)")
    p("--repeats", type=positive_int, default=5, help="TTFT and breakdown: timed prompts per path/mode (default 5)")
    p("--breakdown", metavar="LENGTHS", help="comma list of prompt lengths for the pdpush TTFT breakdown, e.g. 2000,8000")
    p("--qps", metavar="RATES", help="comma list of request rates for the load sweep, e.g. 1,2,4")
    p("--lengths", default="2000/200,8000/100", metavar="IN/OUT,...",
      help="load sweep: input/output token pairs (default 2000/200,8000/100)")
    p("--duration-s", type=float, default=60.0, help="load sweep: seconds of arrivals per point (default 60)")
    p("--slo-ttft-ms", type=float, default=2000.0, help="goodput SLO on TTFT (default 2000)")
    p("--slo-tpot-ms", type=float, default=50.0, help="goodput SLO on TPOT (default 50)")
    p("--engine-args", default="", metavar="ARGS",
      help="extra vLLM arguments for every server, one string, e.g. '--dtype bfloat16 --load-format dummy'")
    p("--prefill-args", metavar="ARGS",
      help=f"extra vLLM arguments for every P (default on CPU: '{CPU_PREFILL_ARGS}'; on GPU none)")
    p("--kv-cache-gib", type=float, help="fixed KV cache per server in GiB (GPU: --kv-cache-memory-bytes)")
    p("--parallel-start", action="store_true",
      help="start every server at once (GPU: needs --kv-cache-gib, which skips memory profiling)")
    p("--max-model-len", type=positive_int, default=4096, metavar="TOKENS",
      help="context limit of every server (default %(default)s)")
    add_placement_args(parser)


def check(args: argparse.Namespace) -> tuple[list[str], list[int], list[float], list[tuple[int, int]]]:
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad or not paths:
        raise UsageError(f"unknown --paths {', '.join(bad)}; choose from {', '.join(PATHS)}")
    if args.prompt_tokens < 2:
        raise UsageError("--prompt-tokens must be at least 2")
    try:
        breakdown = [int(x) for x in args.breakdown.split(",")] if args.breakdown else []
        qps = [float(x) for x in args.qps.split(",")] if args.qps else []
        lengths = [tuple(int(n) for n in pair.split("/")) for pair in args.lengths.split(",")]
    except ValueError:
        raise UsageError("--breakdown, --qps and --lengths take comma lists of numbers "
                         "(--lengths as IN/OUT pairs)") from None
    if any(len(p) != 2 or min(p) < 1 for p in lengths) or any(q <= 0 for q in qps) or \
            any(n < 2 for n in breakdown):
        raise UsageError("--lengths needs IN/OUT >= 1, --qps rates > 0, --breakdown lengths >= 2")
    if breakdown and "pdpush" not in paths:
        raise UsageError("--breakdown measures the pdpush path: include it in --paths")
    return paths, breakdown, qps, lengths  # type: ignore[return-value]


def run(args: argparse.Namespace) -> int:
    import httpx
    from rich.console import Console

    from pdpush.bench import paths as serving_paths
    from pdpush.local.cluster import ServerError
    from pdpush.local.tinymodel import ensure_tiny_model

    names, breakdown, qps, lengths = check(args)
    gpus = placement(args)
    if args.parallel_start and gpus is not None and not args.kv_cache_gib:
        raise UsageError("--parallel-start on GPU needs --kv-cache-gib (no memory profiling then)")
    model = args.model or ensure_tiny_model()
    prefill_args = args.prefill_args if args.prefill_args is not None else \
        (CPU_PREFILL_ARGS if gpus is None else "")
    setup = serving_paths.Setup(model, args.out / "logs", gpus, shlex.split(args.engine_args),
                                shlex.split(prefill_args), args.kv_cache_gib, args.max_model_len,
                                args.parallel_start)
    args.out.mkdir(parents=True, exist_ok=True)
    setup.log_dir.mkdir(parents=True, exist_ok=True)
    console = Console(stderr=True)
    report: dict = {"paths": names, "model": str(model), "engine_args": args.engine_args,
                    "placement": None if gpus is None else gpus.__dict__}
    console.print(f"starting {', '.join(names)} (logs in {setup.log_dir}/)")
    try:
        with serving_paths.started(names, setup) as running:
            _measure(args, running, model, breakdown, qps, lengths, report, console)
    except (ServerError, httpx.HTTPError, RuntimeError) as exc:  # RuntimeError: a tokenless stream
        report["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        _write(args.out, report)
        raise RunError(f"{report['error']} (logs in {setup.log_dir})") from exc
    _write(args.out, report)
    Console().print((args.out / "report.md").read_text())
    return 0 if not report.get("failed") else 1


def _measure(args, running, model, breakdown, qps, lengths, report, console) -> None:
    import httpx

    from pdpush.bench import breakdown as stages
    from pdpush.bench import sweep
    from pdpush.local.client import complete

    with httpx.Client(trust_env=False) as client:
        if not breakdown and not qps:
            report["ttft"] = _ttft_mode(args, running, client, complete, console)
        if breakdown:
            pd = running["pdpush"]
            with console.status(f"TTFT breakdown at {breakdown} tokens…"):
                report["breakdown"] = stages.measure(client, pd.url, pd.stats_url, breakdown,
                                                     args.repeats, make_prompts, REQUEST_TIMEOUT_S)
            _write(args.out, report)  # kept if the sweep is cut short
    if qps:
        loads = [sweep.Load(i, o, q, args.duration_s, args.slo_ttft_ms, args.slo_tpot_ms, seed=n)
                 for n, (q, (i, o)) in enumerate((q, pair) for pair in lengths for q in qps)]
        report["slo"] = {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms}
        report["sweep"] = []
        with httpx.Client(trust_env=False) as client:
            for path in running.values():  # first requests (connections, NIXL handshakes) untimed
                for prompt in make_prompts(2, lengths[0][0], seed=-1):
                    complete(client, path.url, prompt, max_tokens=2, timeout_s=REQUEST_TIMEOUT_S,
                             extra=TOKEN_IDS)
        with console.status(f"load sweep: {len(loads)} points × {len(running)} paths…"):
            sweep.sweep(running, model, loads, args.out / "logs" / "vllm-bench.log", report["sweep"],
                        on_row=lambda: _write(args.out, report))
        report["failed"] = [f"{r['path']}@{r['qps']}" for r in report["sweep"] if "error" in r]


def _ttft_mode(args, running, client, complete, console) -> dict:
    """TTFT (s) of --repeats prompts per path, after one warm-up request each."""
    warmup, *prompts = make_prompts(args.repeats + 1, args.prompt_tokens)
    ttfts = {}
    for name, path in running.items():
        with console.status(f"{name}: timing {args.repeats} prompts…"):
            def one(prompt):
                return complete(client, path.url, prompt, max_tokens=2, timeout_s=REQUEST_TIMEOUT_S,
                                extra=TOKEN_IDS).ttft_s
            one(warmup)
            ttfts[name] = [one(p) for p in prompts]
    return {"prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "ttft_s": ttfts,
            "summary": summarize(ttfts)}


def _write(out: Path, report: dict) -> None:
    from pdpush.bench import breakdown, sweep

    (out / "report.json").write_text(json.dumps(report, indent=1))
    parts = [f"# pdpush bench serving\n\npaths: {', '.join(report['paths'])}; model {report['model']}; "
             f"engine args `{report['engine_args']}`; placement {report['placement']}\n"]
    if "error" in report:
        parts.append(f"**failed**: {report['error']}\n")
    if "ttft" in report:
        t = report["ttft"]
        parts += [f"## TTFT of a {t['prompt_tokens']}-token prompt (median of {t['repeats']})\n",
                  "| path | median ms | min ms | × local |", "|---|---:|---:|---:|"]
        parts += [f"| {k} | {v['median_ms']:.1f} | {v['min_ms']:.1f} | {v['vs_local']:.2f} |"
                  for k, v in t["summary"].items()]
    if "breakdown" in report:
        parts += ["\n## Where TTFT goes (pdpush, one request at a time)\n", breakdown.markdown(report["breakdown"])]
    if "sweep" in report:
        slo = f"TTFT ≤ {report['slo']['ttft_ms']:g} ms, TPOT ≤ {report['slo']['tpot_ms']:g} ms"
        parts += ["\n## Serving under load (vllm bench serve, Poisson arrivals)\n", sweep.markdown(report["sweep"], slo)]
        sweep.plot([r for r in report["sweep"] if "error" not in r], out)
    (out / "report.md").write_text("\n".join(parts) + "\n")
