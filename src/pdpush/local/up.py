"""Start one D and N P vLLM servers on this machine with the pdpush connector and keep them up.

With no --model, a tiny random-weight Qwen2 model is created locally (no download). Prints D's
OpenAI endpoint — clients talk to D only — and runs until Ctrl-C, then stops every server.
On a machine with CUDA GPUs the servers run on them (--device auto): P on --p-gpu, D on --d-gpu;
on one GPU both share it, each with --gpu-share of its memory.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pdpush.command import RunError, UsageError, positive_int
from pdpush.connector.config import PdpushConfig
from pdpush.local.cluster import GpuPlacement


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that starts a local cluster."""
    parser.add_argument("--model", type=Path, help="local model folder (default: the tiny built-in model)")
    parser.add_argument("--prefills", type=positive_int, default=1, metavar="N", help="number of P instances (default 1)")
    parser.add_argument("--threshold", type=int, default=PdpushConfig.remote_threshold_tokens, metavar="TOKENS",
                        help="prefill remotely when at least this many prompt tokens miss D's cache (default %(default)s)")
    parser.add_argument("--log-dir", type=Path, default=Path("out/logs"), help="server logs (default out/logs)")
    parser.add_argument("--max-model-len", type=positive_int, default=4096, metavar="TOKENS",
                        help="context limit of every server (default %(default)s)")
    add_placement_args(parser)


def add_placement_args(parser: argparse.ArgumentParser) -> None:
    """Where the servers run: CPU cores or CUDA GPUs (shared by `up` and the benchmarks)."""
    g = parser.add_argument_group("placement")
    g.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="cuda when this machine has a CUDA GPU (auto, the default), else cpu")
    g.add_argument("--p-gpu", type=_gpu_list, default=(0,), metavar="I[,J...]",
                   help="CUDA device(s) of the Ps; P n gets the n-th, round robin (default 0)")
    g.add_argument("--d-gpu", type=_gpu_index, default=0, metavar="I", help="CUDA device of D (default 0)")
    g.add_argument("--gpu-share", type=_share, default=GpuPlacement.share, metavar="F",
                   help="memory share of each engine on a GPU that several engines share "
                        "(--gpu-memory-utilization; default %(default)s)")


def placement(args: argparse.Namespace) -> GpuPlacement | None:
    """The options' GPU placement, or None for CPU (usage error: --device cuda without CUDA)."""
    device = args.device
    if device == "auto":
        device = "cuda" if cuda_device_count() else "cpu"
    if device == "cpu":
        return None
    count = cuda_device_count()
    wanted = max([*args.p_gpu, args.d_gpu])
    if wanted >= count:
        raise UsageError(f"GPU {wanted} asked for, but this machine has {count} CUDA device(s)")
    return GpuPlacement(tuple(args.p_gpu), args.d_gpu, args.gpu_share)


def cuda_device_count() -> int:
    """CUDA devices torch sees (0 without CUDA or torch); torch is imported only here."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _gpu_index(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a CUDA device index, got {text!r}")
    return int(text)


def _gpu_list(text: str) -> tuple[int, ...]:
    return tuple(_gpu_index(part.strip()) for part in text.split(","))


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1, got {text!r}")
    return value


def start_cluster(args: argparse.Namespace):
    """Start and wait for a LocalCluster from the shared options, with a live status line."""
    from rich.console import Console

    from pdpush.local.cluster import LocalCluster
    from pdpush.local.tinymodel import ensure_tiny_model

    console = Console(stderr=True)
    with console.status("preparing the model…"):
        model = args.model or ensure_tiny_model()
    if not (Path(model) / "config.json").exists():
        raise UsageError(f"{model} is not a model folder (no config.json)")
    gpus = placement(args)
    # On a GPU vLLM's defaults throughout (its own token budget on P); the CPU keeps the cluster's.
    gpu_defaults = {} if gpus is None else {"prefill_args": []}
    cluster = LocalCluster(model, num_prefill=args.prefills, log_dir=args.log_dir,
                           decode_opts={"remote_threshold_tokens": args.threshold},
                           gpus=gpus, max_model_len=args.max_model_len, **gpu_defaults)
    started = time.monotonic()
    where = "CPU" if gpus is None else f"GPU (P on {list(gpus.p_gpus)}, D on {gpus.d_gpu})"
    console.print(f"starting {args.prefills} P + 1 D on {where} (vLLM logs in {args.log_dir}/)")
    with console.status("waiting until every server answers /health…"):
        try:
            cluster.start()
            cluster.wait_healthy()
        except BaseException:
            cluster.stop()
            raise
    console.print(f"[green]cluster healthy[/] in {time.monotonic() - started:.0f} s")
    return cluster


def configure(parser: argparse.ArgumentParser) -> None:
    add_cluster_args(parser)


def run(args: argparse.Namespace) -> int:
    from pdpush.local.cluster import ServerError

    try:
        cluster = start_cluster(args)
    except ServerError as exc:
        raise RunError(str(exc)) from exc
    try:
        for p in cluster.prefills:
            print(f"P {p.name}: {p.url}  (log {p.log_path})")
        print(f"D OpenAI endpoint: {cluster.decode.url}/v1  (log {cluster.decode.log_path})")
        print(f"try: curl {cluster.decode.url}/v1/completions -H 'Content-Type: application/json' "
              """-d '{"model": "pdpush", "prompt": "hello", "max_tokens": 8}'""")
        print("Ctrl-C stops every server.")
        while all(s.alive() for s in cluster.servers):
            time.sleep(1.0)
        raise RunError("a server exited; see its log. Stopped the rest.")
    except KeyboardInterrupt:
        return 0
    finally:
        cluster.stop()
