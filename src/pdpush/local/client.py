"""A streaming OpenAI-completions client that measures what a user of D sees per request.

TTFT is the time to the first streamed token, TPOT the mean gap between later tokens (0 when the
server delivered them all in the first chunk). Prompts are
sent as text or token ids; `ignore_eos` and greedy sampling are vLLM extensions the server accepts.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import httpx


@dataclass(frozen=True)
class Completion:
    text: str
    num_tokens: int
    ttft_s: float
    tpot_s: float
    e2e_s: float


def complete(
    client: httpx.Client,
    base_url: str,
    prompt: str | list[int],
    max_tokens: int = 16,
    ignore_eos: bool = True,
    timeout_s: float = 300.0,
    extra: dict | None = None,
) -> Completion:
    """Send one greedy completion and time its stream; raise httpx.HTTPStatusError on an error reply."""
    body = {
        "model": "pdpush", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
        "ignore_eos": ignore_eos, "stream": True, "stream_options": {"include_usage": True},
        **(extra or {}),
    }
    start = time.perf_counter()
    token_times: list[float] = []
    text, usage_tokens = [], None
    with client.stream("POST", f"{base_url}/v1/completions", json=body, timeout=timeout_s) as resp:
        if resp.status_code != 200:
            resp.read()
            resp.raise_for_status()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage_tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                # A token that ends inside a UTF-8 character streams as empty text; with
                # `return_token_ids` its chunk still carries the token.
                if choice.get("text") or choice.get("token_ids"):
                    token_times.append(time.perf_counter())
                    text.append(choice.get("text") or "")
    end = time.perf_counter()
    if not token_times:
        raise RuntimeError(f"{base_url}: the stream ended without a token")
    # The server may merge several tokens into one chunk when it falls behind: count tokens, not chunks.
    num_tokens = usage_tokens if usage_tokens is not None else len(token_times)
    return Completion(
        text="".join(text),
        num_tokens=num_tokens,
        ttft_s=token_times[0] - start,
        tpot_s=(token_times[-1] - token_times[0]) / (num_tokens - 1) if num_tokens > 1 else 0.0,
        e2e_s=end - start,
    )


def prompt_tokens_served(client: httpx.Client, base_url: str) -> float:
    """vLLM's `vllm:prompt_tokens_total` counter of a server (summed over its label sets)."""
    from pdpush.vllm_api import PROMPT_TOKENS_TOTAL, parse_metrics

    return parse_metrics(client.get(f"{base_url}/metrics", timeout=10.0).text).get(PROMPT_TOKENS_TOTAL, 0.0)
