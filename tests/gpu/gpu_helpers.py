"""Helpers for the GPU suite: when to skip, the model, the servers' flags, and the report.

The suite runs P and D as vLLM OpenAI servers on one CUDA device (see test_gpu_pd.py for what it
checks). Everything it measures goes to `PDPUSH_GPU_OUT` (default out/gpu): results.json,
results.md and the servers' logs, so a run on a machine that is given back afterwards still leaves
its evidence behind.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pdpush.local.tinymodel import TinySpec

# A random-weight bf16 Qwen2 big enough to keep a GPU busy and to give attention real work:
# head_dim 64, GQA 16:4, 8 layers, a 32000-token vocabulary (byte-level tokenizer plus filler).
# Weights are seeded (tinymodel's scheme), so P and D load the same model and greedy outputs
# depend on the prompt.
GPU_SPEC = TinySpec(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                    num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                    max_position_embeddings=8192, seed=0)
BLOCK_SIZE = 16  # given explicitly to both servers: the prefix-cache check computes the hit from it
MAX_MODEL_LEN = 8192
P_CHUNK_TOKENS = 2048  # P's token budget: a 6000-token prompt is prefilled (and pushed) in 3 chunks

# Both servers: bf16, one memory share each on the same GPU, graphs and torch.compile left to vLLM
# (P gets piecewise graphs from the connector, D keeps full ones). max-num-seqs only bounds how
# many batch sizes vLLM captures graphs for, which keeps start-up short.
COMMON_ARGS = ["--dtype", "bfloat16", "--gpu-memory-utilization", "0.3",
               "--max-model-len", str(MAX_MODEL_LEN), "--block-size", str(BLOCK_SIZE),
               "--max-num-seqs", "32"]
PREFILL_ARGS = [*COMMON_ARGS, "--max-num-batched-tokens", str(P_CHUNK_TOKENS)]
DECODE_ARGS = [*COMMON_ARGS, "--max-num-batched-tokens", str(MAX_MODEL_LEN)]

# Both servers: greedy equality between two serving paths needs batch invariance on GPU (without
# it one engine gave different tokens for the same prompt twice); flashinfer is not installed.
SERVER_ENV = {"VLLM_BATCH_INVARIANT": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0"}


def cuda_skip_reason() -> str | None:
    """Why this machine cannot run the suite, or None when it can (CUDA device + CUDA vLLM)."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    try:
        from vllm.platforms import current_platform
    except ImportError as exc:
        return f"vLLM does not import: {exc}"
    if not current_platform.is_cuda():
        return f"vLLM is not a CUDA build (platform {current_platform.device_name})"
    return None


def out_dir() -> Path:
    path = Path(os.environ.get("PDPUSH_GPU_OUT", "out/gpu"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_dir() -> Path:
    """Where the model is made (once per machine: tinymodel reuses a folder made from the same spec)."""
    return Path(os.environ.get("PDPUSH_GPU_MODEL", Path(tempfile.gettempdir()) / "pdpush-gpu-qwen2"))


def with_prefill_tokens(params: dict[str, Any], tokens: list[int]) -> dict[str, Any]:
    """kv_transfer_params that make D send `tokens` to P instead of the prompt.

    The only use of the connector's test seam (metadata.CLIENT_TOKENS_KEY): the must-fail control
    gives D one prompt and P another, so D decodes from KV that does not belong to its prompt.
    D honours it only in test mode (test_allow_prefill_tokens, PDPUSH_TEST_MODE=1) and for a
    request with a cache_salt (`ask` always sends one).
    """
    return {**params, "pdpush_prefill_tokens": tokens}


def first_difference(a: list[int], b: list[int]) -> int | None:
    """Index of the first token where two outputs differ (None if equal)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def top2(body: dict, index: int) -> dict[str, float] | None:
    """The two best logprobs at one output position (token "token_id:N" -> logprob), if returned."""
    logprobs = body["choices"][0].get("logprobs") or {}
    tops = logprobs.get("top_logprobs") or []
    return tops[index] if index < len(tops) else None


class Recorder:
    """Collects one entry per check and rewrites results.json / results.md after each one, so a
    run cut short (time limit, crash) still reports what it measured."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started = time.time()
        self.meta: dict[str, Any] = {}
        self.checks: list[dict[str, Any]] = []

    def note(self, **meta: Any) -> None:
        self.meta.update(meta)
        self.flush()

    def check(self, name: str, ok: bool, **details: Any) -> None:
        self.checks.append({"name": name, "ok": ok, **details})
        self.flush()

    def flush(self) -> None:
        elapsed = round(time.time() - self.started, 1)
        doc = {"elapsed_s": elapsed, **self.meta, "checks": self.checks}
        (self.folder / "results.json").write_text(json.dumps(doc, indent=1))
        lines = [f"# pdpush GPU suite ({elapsed} s)", ""]
        lines += [f"- {k}: {v}" for k, v in self.meta.items()]
        lines += ["", "| check | ok | prompt tokens | where | first diff | remote s | local s |",
                  "|---|---|---|---|---|---|---|"]
        for c in self.checks:
            w = c.get("where") or {}
            place = w.get("prefill", "")
            if "skip_tokens" in w:
                place += f" skip={w['skip_tokens']}"
            lines.append(f"| {c['name']} | {'yes' if c['ok'] else 'NO'} | {c.get('prompt_tokens', '')} "
                         f"| {place} | {c.get('first_diff', '')} "
                         f"| {c.get('remote_s', '')} | {c.get('local_s', '')} |")
        (self.folder / "results.md").write_text("\n".join(lines) + "\n")
