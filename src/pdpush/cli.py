"""The `pdpush` command: `pdpush [-v|-q] COMMAND ...`.

Commands: `up` and `demo` (local tooling, pdpush.local), `rdma-stat` (pdpush.rdma.cli) and
`bench NAME`, the benchmarks (pdpush.bench: rdma, gpu, serving, interference). Each command module
exposes `configure(parser)` and `run(args) -> int`; heavy imports (vLLM, NIXL, torch) stay inside
`run`, and only the chosen command's module is imported, so `pdpush --help` is instant and one
command's dependencies never stand in the way of another.

The same contract for every command: results on stdout; progress, warnings and errors on stderr;
exit 0 on success, 2 for bad usage, 1 for a run that failed (pdpush.command), 130 on Ctrl-C.
The spellings before `bench NAME` (`bench-rdma`, `bench-gpu`) stay as hidden aliases so that the
commands written down in results/ still run.
"""

import argparse
import importlib
import signal
import sys

from pdpush.command import CommandError
from pdpush.log import setup_logging

# name -> (module, one-line help). Order is the order shown by --help.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("pdpush.local.up", "start 1 D + N P vLLM servers on this machine and keep them up"),
    "demo": ("pdpush.local.demo", "send a few requests through D: where prefilled, TTFT, TPOT"),
    "rdma-stat": ("pdpush.rdma.cli", "read RDMA hardware counters (netlink or sysfs)"),
}
BENCHES: dict[str, tuple[str, str]] = {
    "rdma": ("pdpush.bench.rdma", "µs per RDMA counter sample over netlink"),
    "gpu": ("pdpush.bench.gpu.cli", "GPU data plane: push correctness, ordering, bandwidth, decode interference"),
    "serving": ("pdpush.bench.serving", "TTFT of a long prompt: pdpush vs local vs vLLM NIXL pull/push"),
    "interference": ("pdpush.bench.interference.cli", "does P's KV push slow D's decode? step latency per QPS"),
    "wire": ("pdpush.bench.wire", "JSON work per do_prefill on D and P's guard: msgspec vs json"),
}
# Old command words -> today's; accepted, never shown.
ALIASES: dict[str, list[str]] = {"bench-rdma": ["bench", "rdma"], "bench-gpu": ["bench", "gpu"]}


def _first_word(argv: list[str]) -> int | None:
    """Index of the first word that is not an option (no option before a command takes a value)."""
    return next((i for i, arg in enumerate(argv) if not arg.startswith("-")), None)


def expand_aliases(argv: list[str]) -> list[str]:
    i = _first_word(argv)
    if i is None or argv[i] not in ALIASES:
        return argv
    return [*argv[:i], *ALIASES[argv[i]], *argv[i + 1 :]]


def _add_commands(parser: argparse.ArgumentParser, table: dict, argv: list[str], metavar: str):
    """One subparser per entry of `table`; only the one `argv` chooses imports its module."""
    sub = parser.add_subparsers(dest=metavar.lower(), metavar=metavar, required=True)
    i = _first_word(argv)
    chosen = argv[i] if i is not None else None
    for name, (module_name, help_text) in table.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = importlib.import_module(module_name)
            child.description = module.__doc__
            child.formatter_class = argparse.RawDescriptionHelpFormatter
            module.configure(child)
            child.set_defaults(_run=module.run, _prog=child.prog)
    return sub


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """The parser for `argv` (aliases already expanded)."""
    benches = "\n".join(f"  {name:<14}{help_text}" for name, (_, help_text) in BENCHES.items())
    parser = argparse.ArgumentParser(
        prog="pdpush",
        description="Decode-centric PD disaggregation for vLLM: layer-wise KV push from P into D.",
        epilog=f"benchmarks (pdpush bench NAME):\n{benches}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="more logging: -v adds library INFO lines and pdpush DEBUG, -vv everything")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = _add_commands(parser, COMMANDS, argv, "COMMAND")
    bench = sub.add_parser("bench", help=f"benchmarks: {', '.join(BENCHES)}",
                           description="Benchmarks; `pdpush bench NAME --help` explains each.")
    i = _first_word(argv)
    _add_commands(bench, BENCHES, argv[i + 1 :] if i is not None and argv[i] == "bench" else [], "BENCH")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = expand_aliases(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    setup_logging(-1 if args.quiet else args.verbose)
    # SIGTERM unwinds like Ctrl-C, so `with` blocks stop the servers a command started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return int(args._run(args) or 0)
    except CommandError as exc:
        print(f"{args._prog}: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
