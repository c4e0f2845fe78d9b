"""GPU data-plane suite: P and D processes push a 2000-token prompt's KV layer by layer through
pdpush.transfer (NIXL/UCX, cuda_ipc on one GPU), check every byte on D, test the memory-ordering
rule, compare layer-wise vs merged vs torch-copy bandwidth, and measure a Qwen2-7B-shaped decode's
slowdown under inbound writes. Writes results.json, report.md and interference.png to --out.

`--device cpu` runs the same code on host memory with tiny shapes (for debugging without a GPU).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from pdpush.command import RunError, UsageError, renamed

PHASES = ("correctness", "ordering", "bandwidth", "pipeline", "interference")
SHAPE_NAMES = ("qwen2-7b", "qwen2-72b-tp4", "tiny")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cuda: the real run; cpu: tiny shapes on host memory (default cuda)")
    parser.add_argument("--p-gpu", type=int, default=0, help="GPU index of P (default 0)")
    parser.add_argument("--d-gpu", type=int, default=0, help="GPU index of D (default 0)")
    parser.add_argument("--out", type=Path, default=Path("out/gpu"),
                        help="folder for results.json, report.md, interference.png")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help=f"comma-separated subset of {','.join(PHASES)}")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated KV shapes (default: qwen2-7b,qwen2-72b-tp4 on "
                             "cuda, tiny on cpu)")
    parser.add_argument("--trials", type=int, default=None, help="verified pushes per shape")
    renamed(parser, "--repeats", "--reps", type=int, default=None,
            help="repetitions of the interference sweep (run-to-run spread)")
    parser.add_argument("--steps", type=int, default=None, help="timed decode steps per window")
    parser.add_argument("--mean-run", type=float, default=6.0,
                        help="mean length of consecutive-block stretches in block tables")
    parser.add_argument("--seed", type=int, default=0, help="seed of the block tables")
    parser.add_argument("--layer-ms", type=float, default=2.0,
                        help="simulated prefill GPU time per layer in the pipeline phase "
                             "(default 2.0: ~60%% of the H200's bf16 rate for 2000 tokens)")
    parser.add_argument("--ucx-threads", type=int, default=0,
                        help="NIXL UCX thread pool posting each WRITE's descriptors (default 0)")
    parser.add_argument("--post-threads", type=int, default=1,
                        help="P's transfer threads posting layer WRITEs (default 1)")
    parser.add_argument("--no-batch", action="store_true",
                        help="post every layer as its own WRITE even when several are ready")
    parser.add_argument("--ucx-param", action="append", default=[], metavar="KEY=VALUE",
                        help="extra NIXL UCX backend init parameter (repeatable), "
                             "e.g. split_batch_size=16 or num_workers=2")


def build_config(args: argparse.Namespace):
    """Defaults per device, then the flags the user gave."""
    from pdpush.bench.gpu.suite import SuiteConfig

    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    bad = [p for p in phases if p not in PHASES]
    if bad:
        raise ValueError(f"unknown phase(s) {bad}; choose from {PHASES}")
    if args.device == "cpu":
        cfg = SuiteConfig(device="cpu", shapes=["tiny"], p_blocks=300, d_blocks=400, trials=2,
                          bw_iters=2, interference_shape="tiny", batch=4, ctx_lo=60, ctx_hi=80,
                          steps=10, warmup=2, reps=1, qps_ladder=[10.0])
    else:
        cfg = SuiteConfig(p_gpu=args.p_gpu, d_gpu=args.d_gpu)
    if args.shapes:
        cfg.shapes = [s.strip() for s in args.shapes.split(",")]
        unknown = [s for s in cfg.shapes if s not in SHAPE_NAMES]
        if unknown:
            raise ValueError(f"unknown shape(s) {unknown}; choose from {SHAPE_NAMES}")
    for option, field in (("trials", "trials"), ("repeats", "reps"), ("steps", "steps")):
        if getattr(args, option) is not None:
            if getattr(args, option) < 1:
                raise ValueError(f"--{option} must be at least 1")
            setattr(cfg, field, getattr(args, option))
    cfg.phases, cfg.mean_run, cfg.seed = phases, args.mean_run, args.seed
    bad = [kv for kv in args.ucx_param if "=" not in kv]
    if bad or args.ucx_threads < 0 or args.layer_ms < 0 or args.post_threads < 1:
        raise ValueError(f"--ucx-param needs KEY=VALUE (got {bad}); --ucx-threads and "
                         "--layer-ms must not be negative, --post-threads at least 1")
    cfg.post_threads, cfg.batch_layers = args.post_threads, not args.no_batch
    cfg.layer_ms, cfg.ucx_threads, cfg.ucx_params = args.layer_ms, args.ucx_threads, args.ucx_param
    return cfg


def run(args: argparse.Namespace) -> int:
    try:
        cfg = build_config(args)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise UsageError("no CUDA device here; use --device cpu for the host-memory run")
        count = torch.cuda.device_count()
        if max(cfg.p_gpu, cfg.d_gpu) >= count:
            raise UsageError(f"--p-gpu/--d-gpu must be below the {count} visible GPU(s)")
    from pdpush.bench.gpu.report import markdown
    from pdpush.bench.gpu.suite import WorkerError, run_suite

    try:
        results = run_suite(cfg, args.out)
    except WorkerError as exc:
        raise RunError(str(exc)) from exc
    print(markdown(results["summary"]))
    logging.getLogger("pdpush.bench.gpu").info("results in %s", args.out)
    return 0
