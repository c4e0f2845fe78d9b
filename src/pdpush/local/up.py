"""Start one D and N P vLLM servers on this machine with the pdpush connector and keep them up.

With no --model, a tiny random-weight Qwen2 model is created locally (no download). Prints D's
OpenAI endpoint — clients talk to D only — and runs until Ctrl-C, then stops every server.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pdpush.command import RunError, UsageError, positive_int
from pdpush.connector.config import PdpushConfig


def add_cluster_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by every command that starts a local cluster."""
    parser.add_argument("--model", type=Path, help="local model folder (default: the tiny built-in model)")
    parser.add_argument("--prefills", type=positive_int, default=1, metavar="N", help="number of P instances (default 1)")
    parser.add_argument("--threshold", type=int, default=PdpushConfig.remote_threshold_tokens, metavar="TOKENS",
                        help="prefill remotely when at least this many prompt tokens miss D's cache (default %(default)s)")
    parser.add_argument("--log-dir", type=Path, default=Path("out/logs"), help="server logs (default out/logs)")


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
    cluster = LocalCluster(model, num_prefill=args.prefills, log_dir=args.log_dir,
                           decode_opts={"remote_threshold_tokens": args.threshold})
    started = time.monotonic()
    console.print(f"starting {args.prefills} P + 1 D (vLLM logs in {args.log_dir}/)")
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
