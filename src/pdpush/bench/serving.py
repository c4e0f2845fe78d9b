"""TTFT of a long prompt through four serving paths, measured side by side in one run.

1. pdpush 1P1D: the client sends to D only; D has P prefill and push the KV layer by layer.
2. local: the same prompt prefilled on a D-shaped engine with no connector (aggregated vLLM).
3. vLLM NixlConnector (pull): the client plays vLLM's proxy — P with max_tokens 1, then D with P's
   kv_transfer_params; D reads the KV from P.
4. vLLM NixlPushConnector: the same proxy flow; P writes the KV into D.

Every path gets the same prompts (distinct per repetition so no prefix-cache hit helps), one
warm-up request first, and the same cores (D on core 0, P on the other). Ratios are to `local`.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pdpush.command import UsageError, positive_int

PATHS = ("pdpush", "local", "nixl-pull", "nixl-push")
# A request that takes longer has hung on this tiny model; the path is reported failed.
REQUEST_TIMEOUT_S = 120.0


def make_prompts(count: int, length: int, seed: int = 0) -> list[list[int]]:
    """Token-id prompts over the byte tokens every model folder here can decode."""
    rng = random.Random(seed)
    return [[rng.randrange(32, 127) for _ in range(length)] for _ in range(count)]


@contextmanager
def pdpush_path(model: Path, log_dir: Path) -> Iterator[Callable]:
    from pdpush.local.client import complete
    from pdpush.local.cluster import LocalCluster

    with LocalCluster(model, log_dir=log_dir / "pdpush") as cluster, _client() as client:
        yield lambda prompt: complete(client, cluster.decode.url, prompt, max_tokens=2, timeout_s=REQUEST_TIMEOUT_S).ttft_s


@contextmanager
def local_path(model: Path, log_dir: Path) -> Iterator[Callable]:
    from pdpush.local.client import complete
    from pdpush.local.cluster import VllmServer

    with VllmServer("local", model, cpu_core=0, log_dir=log_dir) as server, _client() as client:
        yield lambda prompt: complete(client, server.url, prompt, max_tokens=2, timeout_s=REQUEST_TIMEOUT_S).ttft_s


def nixl_path(connector: str) -> Callable:
    """A path through one of vLLM's own NIXL connectors, with the client as the proxy."""

    @contextmanager
    def path(model: Path, log_dir: Path) -> Iterator[Callable]:
        from pdpush.local.client import complete
        from pdpush.local.cluster import VllmServer, free_port

        def server(name: str, role: str, core: int, extra: list[str]) -> VllmServer:
            config = {"kv_connector": connector, "kv_role": role, "kv_buffer_device": "cpu"}
            env = {"VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1", "VLLM_NIXL_SIDE_CHANNEL_PORT": str(free_port())}
            return VllmServer(name, model, kv_transfer_config=config, cpu_core=core, env=env,
                              extra_args=extra, log_dir=log_dir / connector)

        p_server = server("P", "kv_producer", 1, ["--max-num-batched-tokens", "512"])
        with p_server as p, server("D", "kv_consumer", 0, []) as d, _client() as client:
            def ttft(prompt: list[int]) -> float:
                start = time.perf_counter()
                params = _prefill_on(client, p.url, prompt)
                prefill_s = time.perf_counter() - start
                first = complete(client, d.url, prompt, max_tokens=2, timeout_s=REQUEST_TIMEOUT_S,
                                 extra={"kv_transfer_params": params})
                return prefill_s + first.ttft_s

            yield ttft

    return path


def _prefill_on(client, p_url: str, prompt: list[int]) -> dict:
    body = {"model": "pdpush", "prompt": prompt, "max_tokens": 1, "temperature": 0.0,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False}}
    resp = client.post(f"{p_url}/v1/completions", json=body, timeout=REQUEST_TIMEOUT_S)
    resp.raise_for_status()
    return resp.json()["kv_transfer_params"]


@contextmanager
def _client():
    import httpx

    with httpx.Client() as client:
        yield client


PATH_STARTERS = {"pdpush": pdpush_path, "local": local_path,
                 "nixl-pull": nixl_path("NixlConnector"), "nixl-push": nixl_path("NixlPushConnector")}


def measure(path: str, model: Path, prompts: list[list[int]], warmup: list[int], log_dir: Path) -> list[float]:
    """TTFT (s) of each prompt through one path, after one warm-up request."""
    with PATH_STARTERS[path](model, log_dir) as ttft:
        ttft(warmup)
        return [ttft(p) for p in prompts]


def summarize(ttfts: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """Median, min and the ratio of medians to `local` (when measured) per path."""
    medians = {k: statistics.median(v) for k, v in ttfts.items()}
    base = medians.get("local")
    return {k: {"median_ms": medians[k] * 1e3, "min_ms": min(v) * 1e3,
                "vs_local": (medians[k] / base) if base else float("nan")}
            for k, v in ttfts.items()}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, help="local model folder (default: the tiny built-in model)")
    parser.add_argument("--paths", default=",".join(PATHS), help=f"comma list from {','.join(PATHS)}")
    parser.add_argument("--prompt-tokens", type=int, default=2000, help="prompt length (default 2000)")
    parser.add_argument("--repeats", type=positive_int, default=5, help="timed prompts per path (default 5)")
    parser.add_argument("--out", type=Path, default=Path("out/bench-serving"), help="JSON report and logs")


def run(args: argparse.Namespace) -> int:
    import httpx
    from rich.console import Console
    from rich.table import Table

    from pdpush.local.cluster import ServerError
    from pdpush.local.tinymodel import ensure_tiny_model

    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    bad = [p for p in paths if p not in PATHS]
    if bad:
        raise UsageError(f"unknown --paths {', '.join(bad)}; choose from {', '.join(PATHS)}")
    if args.prompt_tokens < 2:
        raise UsageError("--prompt-tokens must be at least 2")
    model = args.model or ensure_tiny_model()
    warmup, *prompts = make_prompts(args.repeats + 1, args.prompt_tokens)
    console, ttfts, failed = Console(stderr=True), {}, {}
    for path in paths:
        with console.status(f"{path}: starting servers and timing {args.repeats} prompts…"):
            try:
                ttfts[path] = measure(path, model, prompts, warmup, args.out / "logs")
            except (ServerError, httpx.HTTPError) as exc:
                failed[path] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                console.print(f"[red]{path} failed[/]: {failed[path]} (logs in {args.out / 'logs'})")
    summary = summarize(ttfts)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
              "ttft_s": ttfts, "summary": summary, "failed": failed}
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    table = Table(title=f"TTFT of a {args.prompt_tokens}-token prompt (median of {args.repeats})")
    for col in ("path", "median ms", "min ms", "× local"):
        table.add_column(col, justify="left" if col == "path" else "right")
    for path, row in summary.items():
        table.add_row(path, f"{row['median_ms']:.1f}", f"{row['min_ms']:.1f}", f"{row['vs_local']:.2f}")
    for path, error in failed.items():
        table.add_row(path, "failed", "", "")
        console.print(f"{path}: {error}")
    Console().print(table)
    return 0 if len(ttfts) == len(paths) else 1
