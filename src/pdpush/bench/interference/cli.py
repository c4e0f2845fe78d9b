"""Does P's push into D slow D's decode? The interference experiment of the design document the
project came from (docs/architecture.md, "Origin"), per QPS; the defaults are its settings.

A background batch of B one-token requests (prefilled on D) decodes to --max-tokens with
ignore_eos; once it reaches context --load-from, requests of --prompt-tokens tokens and
--load-output output tokens arrive at a fixed QPS. D's policy prefills them on P, which writes
their KV into D; D keeps them parked while the background batch runs (see
pdpush.bench.interference.scheduler), so only the inbound writes touch D. DecodeLatency is D's step
latency over contexts --measure-from..--measure-to, from D's step probe; the report gives min, max
and avg relative to QPS 0, a repeat of QPS 0 as the noise floor, RX traffic, and the probe's own
cost. Starts its own 1P1D (tiny model unless --model) or uses --d-url with --probe-log; such
a D needs the pdpush connector with `probe_log` (and `probe_ab_steps` for the cost figure) in its
kv_connector_extra_config, and `--scheduler-cls pdpush.bench.interference.scheduler.HoldScheduler
--additional-config '{"pdpush_hold_running": B}'` with --max-num-seqs above B.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

from pdpush.bench.interference.load import Completions, LogTail, RoundSpec, random_prompt, run_round
from pdpush.bench.interference.report import Protocol, Round, build_report, load_steps, markdown
from pdpush.command import RunError, UsageError, renamed
from pdpush.local.up import add_placement_args, placement

log = logging.getLogger(__name__)
SCHEDULER = "pdpush.bench.interference.scheduler.HoldScheduler"


def configure(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument
    p("--qps", default="0,1,2,3", help="comma-separated load rates, one round each (default 0,1,2,3)")
    p("--repeat-baseline", type=int, default=1, help="extra QPS-0 rounds at the end: noise floor")
    p("--batch", type=int, default=64, help="background batch size B (default 64)")
    p("--max-tokens", type=int, default=2000, help="background output length (default 2000)")
    p("--load-from", type=int, default=500, help="context at which the load starts (default 500)")
    p("--measure-from", type=int, default=1500, help="first measured context (default 1500)")
    p("--measure-to", type=int, default=2000, help="last measured context (default 2000)")
    renamed(parser, "--prompt-tokens", "--prompt-len", type=int, default=2000,
            help="load request prompt tokens (default 2000)")
    p("--load-output", type=int, default=7, help="load request output tokens (default 7)")
    p("--probe-ab-steps", type=int, default=32,
      help="probe A/B window in steps, for the probe-cost figure; 0 = probe always on (default 32)")
    p("--out", type=Path, default=Path("out/interference"), help="report folder (default out/interference)")
    p("--model", type=Path, help="local model folder (default: the tiny built-in model)")
    p("--kv-cache-gib", type=float,
      help="D's KV cache in GiB (CPU default 2; GPU default: vLLM's profiling, else --kv-cache-memory-bytes)")
    p("--engine-args", default="", metavar="ARGS",
      help="extra vLLM arguments for P and D, one string, e.g. '--dtype bfloat16 --load-format dummy'")
    p("--prefill-batched-tokens", type=int, default=2048,
      help="P's max_num_batched_tokens: the chunk P prefills and pushes per step (default 2048)")
    renamed(parser, "--d-url", "--decode-url",
            help="use this running D instead of starting 1P1D (needs --probe-log)")
    p("--probe-log", type=Path, help="with --d-url: D's probe_log file, readable here")
    p("--seed", type=int, default=0, help="seed of the load prompts")
    add_placement_args(parser)
    p("--reanalyse", action="store_true",
      help="no engines: redo the reports and plots in --out from its report.json rounds and "
           "steps.jsonl (or --probe-log), with this run's --batch and --measure-* (--reanalyse only)")


def check_args(args: argparse.Namespace) -> list[float]:
    """The QPS list; ValueError with one line for anything inconsistent."""
    try:
        qps = [float(q) for q in args.qps.split(",")]
    except ValueError:
        raise ValueError(f"--qps must be comma-separated numbers, got {args.qps!r}") from None
    if any(q < 0 for q in qps) or 0 not in qps and not args.repeat_baseline:
        raise ValueError("--qps needs non-negative rates and a 0 (or --repeat-baseline) as baseline")
    rules = [
        (args.batch >= 1, "--batch must be >= 1"),
        (args.repeat_baseline >= 0, "--repeat-baseline must be >= 0"),
        (1 <= args.load_from < args.measure_from < args.measure_to <= args.max_tokens + 1,
         "need 1 <= --load-from < --measure-from < --measure-to <= --max-tokens + 1"),
        (args.prompt_tokens >= 2 and args.load_output >= 1, "need --prompt-tokens >= 2, --load-output >= 1"),
        (args.probe_ab_steps >= 0, "--probe-ab-steps must be >= 0"),
        ((args.kv_cache_gib or 1) >= 1 and args.prefill_batched_tokens >= 1, "sizes must be >= 1"),
        (bool(args.d_url) == bool(args.probe_log) or args.reanalyse,
         "--d-url and --probe-log go together"),
    ]  # fmt: skip
    for ok, message in rules:
        if not ok:
            raise ValueError(message)
    return qps


def round_plan(qps: list[float], repeat_baseline: int) -> list[tuple[str, float]]:
    """(label, qps) per round: the list as given, then the repeated QPS-0 rounds."""
    plan = [(f"qps{q:g}", q) for q in qps]
    plan += [(f"qps0#{i + 2}", 0.0) for i in range(repeat_baseline)]
    return plan


@contextlib.contextmanager
def one_p_one_d(args: argparse.Namespace, probe_log: Path) -> Iterator[str]:
    """Start P and D (one CPU core each, or the GPUs of the placement options), yield D's URL,
    stop both however the block ends. On CPU both start at once (start-up is the slow part); on a
    GPU one after the other, since vLLM sizes its KV cache from the memory it finds free."""
    import shlex

    from pdpush.connector.config import decode_kv_config, prefill_kv_config
    from pdpush.local.cluster import free_port, kv_cache_settings, placed_server
    from pdpush.local.tinymodel import ensure_tiny_model

    gpus = placement(args)
    model = args.model or ensure_tiny_model()
    max_len = max(args.max_tokens + 1, args.prompt_tokens + args.load_output) + 16
    logs = args.out / "logs"
    engine = shlex.split(args.engine_args)
    chunk = ["--max-num-batched-tokens", str(args.prefill_batched_tokens)]
    prefill = placed_server("prefill", model, gpus, 0, kv_transfer_config=prefill_kv_config(),
                            log_dir=logs, max_model_len=max_len, extra_args=[*engine, *chunk])
    kv_env, kv_args = kv_cache_settings(args.kv_cache_gib or (2 if gpus is None else None), gpus)
    probe = {"probe_log": str(probe_log), "probe_ab_steps": args.probe_ab_steps}
    # The protocol sends every long prompt to P: no "P busy" fallback to a local prefill on D.
    d_config = decode_kv_config([prefill.url], remote_threshold_tokens=min(256, args.prompt_tokens),
                                max_inflight_per_prefill=10**6, max_prefill_queue=10**6,
                                side_channel_port=free_port(), **probe)  # fmt: skip
    decode = placed_server(
        "decode", model, gpus, None, kv_transfer_config=d_config, log_dir=logs, max_model_len=max_len,
        env=kv_env,
        extra_args=[*engine, *kv_args, "--scheduler-cls", SCHEDULER,
                    "--additional-config", json.dumps({"pdpush_hold_running": args.batch}),
                    "--max-num-seqs", str(args.batch + 64),
                    "--max-num-batched-tokens", str(max(2048, 2 * args.batch))],
    )  # fmt: skip
    servers = (prefill, decode)
    try:
        for server in servers:
            server.start()
            if gpus is not None:
                server.wait_healthy(600)
        for server in servers:
            server.wait_healthy(600)
        yield decode.url
    finally:
        for server in servers:
            server.stop()


async def warm_up(api: Completions, spec: RoundSpec, timeout_s: float = 60.0) -> None:
    """A local and a remote prefill before any round, so first-use costs stay out of the data;
    retried until D reports the long prompt prefilled on P (D learns P's health periodically)."""
    await api.complete([65], 4)
    deadline, where, attempt = time.monotonic() + timeout_s, "", 0
    while time.monotonic() < deadline:
        attempt += 1
        prompt = random_prompt(random.Random(f"warm-up {attempt}"), spec.prompt_len)
        where = await api.complete(prompt, 2)
        if where == "remote":
            await api.complete([65], 2)  # a step that books the warm-up's RX before round one
            return
        await asyncio.sleep(2.0)
    raise RuntimeError(f"D never prefilled a {spec.prompt_len}-token prompt on P (last: {where})")


async def run_rounds(url: str, probe_log: Path, spec: RoundSpec, plan, seed: int) -> list[Round]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    api = Completions(url, "pdpush")
    tail = LogTail(probe_log)
    rounds = []
    columns = (TextColumn("{task.description:>8}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("context  load sent {task.fields[sent]}"), TimeElapsedColumn())  # fmt: skip
    try:
        await warm_up(api, spec)
        with Progress(*columns) as bar:
            for i, (label, qps) in enumerate(plan):
                task = bar.add_task(label, total=spec.max_tokens, sent=0)

                def progress(ctx: int, sent: int, task=task) -> None:
                    bar.update(task, completed=min(ctx, spec.max_tokens), sent=sent)

                rounds.append(await run_round(api, tail, spec, label, qps, seed + i, progress))
    finally:
        await api.aclose()
    return rounds


def write_outputs(out: Path, probe_log: Path, rounds: list[Round], proto: Protocol, meta: dict) -> dict:
    from pdpush.bench.interference.plot import plot_latency, plot_rx

    steps = load_steps(probe_log)
    report = build_report(steps, rounds, proto, meta)
    (out / "report.json").write_text(json.dumps(report, indent=2))
    (out / "report.md").write_text(markdown(report))
    plot_latency(steps, rounds, proto, out / "latency_vs_context.png")
    plot_rx(steps, rounds, out / "rx_over_time.png")
    return report


def reanalyse(out: Path, probe_log: Path, proto: Protocol) -> int:
    """Recompute an earlier run's outputs (other contexts, a changed report) without engines."""
    try:
        earlier = json.loads((out / "report.json").read_text())
        fields = Round.__dataclass_fields__
        rounds = [Round(**{k: r[k] for k in fields}) for r in earlier["rounds"]]
        report = write_outputs(out, probe_log, rounds, proto, earlier.get("meta") or {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"cannot reanalyse {out}: {exc}") from None
    print(markdown(report))
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        qps = check_args(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not (args.d_url or args.reanalyse):
        placement(args)  # a GPU that is not there is a usage error, before anything starts
    spec = RoundSpec(args.batch, args.max_tokens, args.load_from, args.prompt_tokens, args.load_output)
    proto = Protocol(args.batch, args.measure_from, args.measure_to)
    if args.reanalyse:
        return reanalyse(args.out, args.probe_log or args.out / "steps.jsonl", proto)
    args.out.mkdir(parents=True, exist_ok=True)
    probe_log = args.probe_log or args.out / "steps.jsonl"
    if not args.d_url:
        probe_log.unlink(missing_ok=True)
    plan = round_plan(qps, args.repeat_baseline)
    options = {k: str(v) for k, v in vars(args).items() if not k.startswith("_")}
    meta = {"options": options, "cpus": os.cpu_count(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "spec": asdict(spec)}
    servers = contextlib.nullcontext(args.d_url) if args.d_url else one_p_one_d(args, probe_log)
    try:
        with servers as url:
            rounds = asyncio.run(run_rounds(url, probe_log, spec, plan, args.seed))
    except Exception as exc:  # noqa: BLE001 - one line for the user, the details with -v
        log.debug("interference run failed", exc_info=True)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunError(f"{first} (server logs: {args.out / 'logs'})") from exc
    report = write_outputs(args.out, probe_log, rounds, proto, meta)
    print(markdown(report))
    print(f"reports and plots in {args.out}/")
    return 0
