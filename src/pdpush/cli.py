"""The `pdpush` command. Each subcommand lives in its own module exposing
`configure(parser)` and `run(args) -> int`; heavy imports (vLLM, NIXL, torch) stay inside `run`
so that `pdpush --help` is instant."""

import argparse
import importlib
import signal
import sys

from pdpush.log import setup_logging

# name -> (module, one-line help). Order is the order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("pdpush.up", "start 1 D + N P vLLM servers on this machine and keep them up"),
    "demo": ("pdpush.demo", "send a few requests through D: where prefilled, TTFT, TPOT"),
    "rdma-stat": ("pdpush.rdma.cli", "read RDMA hardware counters (netlink or sysfs)"),
    "bench-rdma": ("pdpush.bench.rdma_sample", "benchmark: µs per RDMA counter sample over netlink"),
    "bench": ("pdpush.bench.cli", "benchmarks: interference (decode latency under P's KV push)"),
    "bench-gpu": ("pdpush.bench.gpu.cli", "GPU data plane: push correctness, ordering, bandwidth, decode interference"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pdpush",
        description="Decode-centric PD disaggregation for vLLM: layer-wise KV push from P into D.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        child = sub.add_parser(name, help=help_text, description=module.__doc__)
        module.configure(child)
        child.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    # SIGTERM unwinds like Ctrl-C, so `with` blocks stop the servers a command started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
