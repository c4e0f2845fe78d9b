"""The client side of one interference round: the background batch, the fixed-QPS load that starts
once the batch reaches a context, and a tail of D's probe log to know that context.

Talks to D's OpenAI endpoint only (clients never call P): 1-token prompts stay on D, long prompts
go to P by D's policy.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from pdpush.bench.interference.report import Round

BACKGROUND_TOKEN = 65  # any ordinary token: the background prompt is this one token


@dataclass(frozen=True)
class RoundSpec:
    batch: int = 64
    max_tokens: int = 2000  # background output length (ignore_eos)
    load_from: int = 500  # background context at which the load starts
    prompt_len: int = 2000  # load request prompt
    load_output: int = 7  # load request output


class LogTail:
    """New complete lines of a growing JSON-lines file, from where the last call stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self._offset += len(data)
        *lines, self._partial = (self._partial + data).split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]


class Completions:
    """POST /v1/completions with token-id prompts; no timeout (parked requests wait a round)."""

    def __init__(self, base_url: str, model: str) -> None:
        # No pool limit: B background requests plus every parked load request are open at once
        # (httpx's default of 100 connections silently queued the load behind the batch).
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
        self.client = httpx.AsyncClient(base_url=base_url, timeout=None, limits=limits)
        self.model = model

    async def complete(self, prompt: list[int], max_tokens: int) -> str:
        """Where D says the prompt was prefilled: remote, local (why), fallback, or unknown."""
        body = {"model": self.model, "prompt": prompt, "max_tokens": max_tokens,
                "ignore_eos": True, "temperature": 0.0}  # fmt: skip
        resp = await self.client.post("/v1/completions", json=body)
        if resp.status_code != 200:
            raise RuntimeError(f"D answered {resp.status_code}: {resp.text[:200]}")
        where = (resp.json().get("kv_transfer_params") or {}).get("pdpush") or {}
        reason = where.get("reason")
        return str(where.get("prefill", "unknown")) + (f" ({reason})" if reason else "")

    async def aclose(self) -> None:
        await self.client.aclose()


def random_prompt(rng: random.Random, length: int) -> list[int]:
    """Fresh token ids (10..249: valid in any vocabulary) so that D's prefix cache never hits."""
    return [rng.randrange(10, 250) for _ in range(length)]


class LoadGenerator:
    """Sends one request every 1/qps seconds (fixed interval) until stopped."""

    def __init__(self, api: Completions, spec: RoundSpec, qps: float, seed: int) -> None:
        self.api, self.spec, self.qps = api, spec, qps
        self.rng = random.Random(f"load {seed}")  # never the warm-up's prompts: no prefix hits
        self.tasks: list[asyncio.Task[str]] = []

    async def run(self, stop: asyncio.Event) -> None:
        start = time.monotonic()
        while not stop.is_set():
            prompt = random_prompt(self.rng, self.spec.prompt_len)
            self.tasks.append(asyncio.create_task(self.api.complete(prompt, self.spec.load_output)))
            next_at = start + len(self.tasks) / self.qps
            try:
                await asyncio.wait_for(stop.wait(), max(next_at - time.monotonic(), 0))
            except TimeoutError:
                pass

    async def settle(self, timeout_s: float) -> dict[str, int]:
        """Wait for every request sent (parked ones run once the batch is done); count them by
        where they were prefilled, "failed" for errors and timeouts."""
        counts: dict[str, int] = {}
        if not self.tasks:
            return counts
        done, pending = await asyncio.wait(self.tasks, timeout=timeout_s)
        for task in pending:
            task.cancel()
        for task in self.tasks:
            key = task.result() if task in done and task.exception() is None else "failed"
            counts[key] = counts.get(key, 0) + 1
        return counts


Progress = Callable[[int, int], None]  # (background context, load requests sent)


async def run_round(
    api: Completions, tail: LogTail, spec: RoundSpec, label: str, qps: float, seed: int,
    progress: Progress, settle_timeout_s: float = 600.0,
) -> Round:  # fmt: skip
    """One round: background batch to the end, load at `qps` from context `load_from` on."""
    t_start = time.time()
    tail.read()  # skip what earlier rounds left
    background = [
        asyncio.create_task(api.complete([BACKGROUND_TOKEN], spec.max_tokens)) for _ in range(spec.batch)
    ]  # fmt: skip
    load = LoadGenerator(api, spec, qps, seed)
    stop, load_task, ctx = asyncio.Event(), None, 0
    while not all(t.done() for t in background):
        for step in tail.read():
            if step.get("num_reqs") and step["t"] >= t_start:
                ctx = max(ctx, step["ctx_min"])
        if load_task is None and qps > 0 and ctx >= spec.load_from:
            load_task = asyncio.create_task(load.run(stop))
        progress(ctx, len(load.tasks))
        await asyncio.wait(background, timeout=0.2)
    t_end = time.time()
    stop.set()
    if load_task is not None:
        await load_task
    errors = [t.exception() for t in background if t.exception() is not None]
    if errors:
        for task in load.tasks:
            task.cancel()
        raise RuntimeError(f"{len(errors)} background request(s) failed: {errors[0]}")
    counts = await load.settle(settle_timeout_s)
    progress(spec.max_tokens, len(load.tasks))
    return Round(label, qps, t_start, t_end, len(load.tasks), counts)
