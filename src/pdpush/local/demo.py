"""Send a few requests through D and show, per request, where it was prefilled, TTFT, TPOT, tokens.

Starts its own 1P1D (see `pdpush up`) unless --d-url is given. "Prefilled on" is read from each P's
own `vllm:prompt_tokens_total` counter, before and after the request, so it reports what P did,
not what D meant to do.
"""

from __future__ import annotations

import argparse
import time

from pdpush.command import RunError, positive_int
from pdpush.local.up import add_cluster_args, start_cluster


def demo_prompts(threshold: int) -> list[tuple[str, str]]:
    """(label, prompt) pairs: one per path through D's policy. One byte = one token (tiny model)."""
    long_text = "".join(f"{i} " for i in range(400))[: threshold * 3]
    return [
        ("short (local)", "Hi"),
        ("long (remote)", long_text),
        ("long, shared prefix", long_text + " and a different tail " * 4),
        ("multi-chunk", ("pdpush pushes KV layer by layer. " * 60)[:2000]),
    ]


def configure(parser: argparse.ArgumentParser) -> None:
    add_cluster_args(parser)
    parser.add_argument("--d-url", help="use a running D instead of starting a cluster")
    parser.add_argument("--p-url", action="append", default=[], help="with --d-url: a P to attribute prefills to")
    parser.add_argument("--max-tokens", type=positive_int, default=16, help="output tokens per request (default 16)")


def run(args: argparse.Namespace) -> int:
    import httpx
    from rich.console import Console

    from pdpush.local.cluster import ServerError

    cluster = None
    try:
        if args.d_url:
            d_url, p_urls = args.d_url.rstrip("/"), [u.rstrip("/") for u in args.p_url]
        else:
            cluster = start_cluster(args)
            d_url, p_urls = cluster.decode.url, [p.url for p in cluster.prefills]
        prompts = demo_prompts(args.threshold)
        Console(stderr=True).print(f"sending {len(prompts)} requests to D at {d_url}")
        with httpx.Client() as client:
            rows = [_one(client, d_url, p_urls, label, prompt, args.max_tokens) for label, prompt in prompts]
        _print_table(rows)
        return 0
    except (ServerError, httpx.HTTPError, RuntimeError) as exc:
        raise RunError(str(exc)) from exc
    finally:
        if cluster:
            cluster.stop()


def _one(client, d_url: str, p_urls: list[str], label: str, prompt: str, max_tokens: int) -> dict:
    from pdpush.local.client import complete

    before = _prefill_counts(client, p_urls)
    result = complete(client, d_url, prompt, max_tokens=max_tokens)
    return {"request": label, "prompt": len(prompt), "where": _prefilled_on(client, p_urls, before),
            "ttft_ms": result.ttft_s * 1e3, "tpot_ms": result.tpot_s * 1e3, "tokens": result.num_tokens}


def _prefill_counts(client, p_urls: list[str]) -> list[float]:
    from pdpush.local.client import prompt_tokens_served

    return [prompt_tokens_served(client, u) for u in p_urls]


def _prefilled_on(client, p_urls: list[str], before: list[float], settle_s: float = 2.0) -> str:
    """The P whose prompt-token counter moved. P updates it after answering do_prefill, which can
    be after D already streamed the request to its end, so give it `settle_s` to show up."""
    deadline = time.monotonic() + settle_s
    while True:
        after = _prefill_counts(client, p_urls)
        moved = [f"P{i} :{u.rsplit(':', 1)[-1]}" for i, (u, b, a) in enumerate(zip(p_urls, before, after)) if a > b]
        if moved or time.monotonic() > deadline:
            return ", ".join(moved) or "D (local)"
        time.sleep(0.1)


def _print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="requests through D")
    for col in ("request", "prompt tokens", "prefilled on", "TTFT ms", "TPOT ms", "tokens"):
        table.add_column(col, justify="left" if col in ("request", "prefilled on") else "right")
    for r in rows:
        table.add_row(r["request"], str(r["prompt"]), r["where"], f"{r['ttft_ms']:.1f}",
                      f"{r['tpot_ms']:.1f}", str(r["tokens"]))
    Console().print(table)
