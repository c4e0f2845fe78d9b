"""The JSON work on a do_prefill's path, side by side: D encoding the body and P's API-server
guard reading its push target, each as pdpush does it (msgspec; the guard decodes only
`kv_transfer_params`) and as the standard library would (json.dumps, a full json.loads).

The body is the one D sends (rpc/prefill_client.encode_job: random token ids, a signed push
target); the guard's function is connector/auth_middleware.params_of. Best of `--repeats`
rounds per cell, all in one process; the ratio is what to read (absolute times are this
CPU's). This is a benchmark, not a test: it prints numbers and asserts nothing about them."""

from __future__ import annotations

import argparse
import json
import random
import timeit

from pdpush.command import UsageError, positive_int
from pdpush.connector.auth import Keys, new_nonce
from pdpush.connector.auth_middleware import params_of
from pdpush.connector.metadata import PushTarget
from pdpush.rpc.prefill_client import PrefillJob, encode_job


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokens", default="2000,8000",
                        help="prompt lengths in tokens, comma-separated (default 2000,8000)")
    parser.add_argument("--repeats", type=positive_int, default=7,
                        help="timed rounds per cell, the best is reported (default 7)")
    parser.add_argument("--number", type=positive_int, default=50,
                        help="calls per round (default 50)")


def job(tokens: int) -> PrefillJob:
    rng = random.Random(tokens)
    blocks = tuple(range(-(-tokens // 16)))
    target = PushTarget("cmpl-bench-0", "d-engine", "10.0.0.2:5600", blocks, 0, 16, 30.0,
                        new_nonce(), "start-1")
    return PrefillJob("cmpl-bench-0", "http://p", [rng.randrange(150_000) for _ in range(tokens)],
                      {"temperature": 0.0}, target.to_params(Keys(b"k" * 32)), 0.0)


def cells(tokens: int) -> dict[str, tuple]:
    """name -> (pdpush's way, the standard library's way)."""
    j = job(tokens)
    body = encode_job(j)
    plain = json.loads(body)  # the same body as Python objects, for json.dumps
    return {"D encodes do_prefill": (lambda: encode_job(j), lambda: json.dumps(plain).encode()),
            "P's guard reads the target": (lambda: params_of(body),
                                           lambda: json.loads(body)["kv_transfer_params"])}


def best_ms(fn, args: argparse.Namespace) -> float:
    return min(timeit.repeat(fn, number=args.number, repeat=args.repeats)) / args.number * 1e3


def run(args: argparse.Namespace) -> int:
    try:
        lengths = [int(t) for t in args.tokens.split(",")]
    except ValueError:
        lengths = []
    if not lengths or min(lengths) < 1:
        raise UsageError(f"--tokens takes a comma list of integers >= 1, got {args.tokens!r}")
    print("| tokens | step | pdpush (ms) | json (ms) | json / pdpush |")
    print("|---:|---|---:|---:|---:|")
    for tokens in lengths:
        for name, (ours, theirs) in cells(tokens).items():
            a, b = best_ms(ours, args), best_ms(theirs, args)
            print(f"| {tokens} | {name} | {a:.3f} | {b:.3f} | {b / a:.1f}x |")
    return 0
