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


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for `argv`: only the chosen command's module is imported, so one command's
    dependencies never stand in the way of another (and `pdpush --help` imports none)."""
    parser = argparse.ArgumentParser(
        prog="pdpush",
        description="Decode-centric PD disaggregation for vLLM: layer-wise KV push from P into D.",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((arg for arg in argv if arg in COMMANDS), None)
    for name, (module_name, help_text) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            child.description = module.__doc__
            child.formatter_class = argparse.RawDescriptionHelpFormatter
            module.configure(child)
            child.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    # SIGTERM unwinds like Ctrl-C, so `with` blocks stop the servers a command started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
