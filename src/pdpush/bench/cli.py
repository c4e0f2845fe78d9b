"""Benchmarks: `pdpush bench NAME`. Each benchmark module exposes `configure(parser)` and
`run(args) -> int` like a top-level command and is imported only when the CLI is built."""

import argparse
import importlib

# name -> (module, one-line help)
BENCHES: dict[str, tuple[str, str]] = {
    "interference": ("pdpush.bench.interference", "does P's KV push slow D's decode? (seed's protocol)"),
    "serving": ("pdpush.bench.serving", "TTFT of a long prompt: pdpush vs local vs vLLM NIXL pull/push"),
}


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name, (module_name, help_text) in BENCHES.items():
        module = importlib.import_module(module_name)
        child = sub.add_parser(name, help=help_text, description=module.__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
        module.configure(child)
        child.set_defaults(_bench_run=module.run)


def run(args: argparse.Namespace) -> int:
    return int(args._bench_run(args) or 0)
