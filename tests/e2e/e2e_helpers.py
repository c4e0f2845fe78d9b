"""Helpers for the end-to-end tests: requests, stats and a reference aggregated engine.

Engines take ~30 s to start, so clusters are module-scoped and shared by a module's tests.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import httpx

from pdpush.local.cluster import VllmServer

LOG_DIR = Path("out/logs/e2e")


def make_prompt(n: int, seed: int) -> list[int]:
    """A reproducible prompt of n token ids (the tiny vocabulary is 1024; avoid specials)."""
    rng = random.Random(seed)
    return [rng.randrange(10, 1000) for _ in range(n)]


def complete(url: str, prompt: list[int], max_tokens: int = 8, timeout: float = 120.0,
             **extra) -> dict:
    """Greedy completion through an OpenAI server; returns the JSON body (asserts HTTP 200)."""
    body = {"prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
            "return_token_ids": True, **extra}
    resp = httpx.post(f"{url}/v1/completions", json=body, timeout=timeout)
    assert resp.status_code == 200, resp.text
    return resp.json()


def tokens(body: dict) -> list[int]:
    return body["choices"][0]["token_ids"]


def where(body: dict) -> dict:
    return (body.get("kv_transfer_params") or {}).get("pdpush", {})


def placement(body: dict) -> dict:
    """Where the prefill ran and why, without the stage timings (tests/connector/test_connector_timing.py)."""
    return {k: v for k, v in where(body).items() if k != "timing"}


def stats(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/stats", timeout=5).json()


def wait_free_blocks(port: int, baseline: int, timeout_s: float = 30.0) -> int:
    """Poll until the free block count is back at its baseline; return the last count seen."""
    deadline = time.monotonic() + timeout_s
    free = stats(port)["free_blocks"]
    while free != baseline and time.monotonic() < deadline:
        time.sleep(0.2)
        free = stats(port)["free_blocks"]
    return free


def wait_refusing(port: int, url: str, timeout_s: float = 30.0) -> None:
    """Until the D on `port` has had a health check of P `url` refused (its process ended and
    its port closed): from then on D chooses another P, even while idle (pdpush.policy)."""
    deadline = time.monotonic() + timeout_s
    while not stats(port)["prefills"][url]["refusing"]:
        assert time.monotonic() < deadline, f"D did not see {url} refuse within {timeout_s} s"
        time.sleep(0.2)


def reference_outputs(model: Path, prompts: dict[str, list[int]], max_tokens: int) -> dict:
    """Greedy tokens of each prompt from one plain aggregated vLLM engine (no connector)."""
    server = VllmServer("aggregated", model, log_dir=LOG_DIR, cpu_core=0).start()
    try:
        server.wait_healthy(480)  # start-up is slow when the 2 cores are shared
        return {name: tokens(complete(server.url, p, max_tokens)) for name, p in prompts.items()}
    finally:
        server.stop()
