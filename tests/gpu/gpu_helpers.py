"""Helpers for the GPU suite: when to skip, the model, the servers' flags, and the report.

The suite runs P and D as vLLM OpenAI servers on one CUDA device (see test_gpu_pd.py for what it
checks). Everything it measures goes to `PDPUSH_GPU_OUT` (default out/gpu): results.json,
results.md and the servers' logs, so a run on a machine that is given back afterwards still leaves
its evidence behind.

`PDPUSH_GPU_DRY_RUN=1` rehearses the suite on vLLM's CPU backend (the request flow, the debug
endpoints, the failure cases; not the numerics): the small CPU model, block size 32 (the CPU
backend's multiple), P chunks of 512 tokens, no GPU flags and no batch-invariance variable.
"""

from __future__ import annotations

import json
import os
import signal
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from e2e_helpers import complete, stats, tokens, where  # tests/e2e: on the path (conftest.py)

from pdpush.local.tinymodel import TinySpec

DRY_RUN = os.environ.get("PDPUSH_GPU_DRY_RUN") == "1"

# A random-weight bf16 Qwen2 big enough to keep a GPU busy and to give attention real work:
# head_dim 64, GQA 16:4, 8 layers, a 32000-token vocabulary (byte-level tokenizer plus filler).
# Weights are seeded (tinymodel's scheme), so P and D load the same model and greedy outputs
# depend on the prompt.
GPU_SPEC = TinySpec() if DRY_RUN else TinySpec(
    hidden_size=1024, intermediate_size=2816, num_hidden_layers=8, num_attention_heads=16,
    num_key_value_heads=4, vocab_size=32000, max_position_embeddings=8192, seed=0)
BLOCK_SIZE = 32 if DRY_RUN else 16  # given to both servers: the prefix-cache check uses it
MAX_MODEL_LEN = 8192
P_CHUNK_TOKENS = 512 if DRY_RUN else 2048  # a 6000-token prompt is prefilled (and pushed) in chunks

# Both servers: bf16, one memory share each on the same GPU, graphs and torch.compile left to vLLM
# (P gets piecewise graphs from the connector, D keeps full ones). max-num-seqs only bounds how
# many batch sizes vLLM captures graphs for, which keeps start-up short.
COMMON_ARGS = [*([] if DRY_RUN else ["--dtype", "bfloat16", "--gpu-memory-utilization", "0.3"]),
               "--max-model-len", str(MAX_MODEL_LEN), "--block-size", str(BLOCK_SIZE),
               "--max-num-seqs", "32"]
PREFILL_ARGS = [*COMMON_ARGS, "--max-num-batched-tokens", str(P_CHUNK_TOKENS)]
DECODE_ARGS = [*COMMON_ARGS, "--max-num-batched-tokens", str(MAX_MODEL_LEN)]

# Both servers: greedy equality between two serving paths needs batch invariance on GPU (without
# it one engine gave different tokens for the same prompt twice); flashinfer is not installed.
SERVER_ENV = {} if DRY_RUN else {"VLLM_BATCH_INVARIANT": "1", "VLLM_USE_FLASHINFER_SAMPLER": "0"}
# D's lease: short enough for the deadline checks, long enough for a first (compiling) request.
DECODE_OPTS = {"remote_threshold_tokens": 64, "prefill_timeout_s": 20.0, "lease_grace_s": 2.0,
               "health_interval_s": 1.0, "debug_kv_digest": True,
               "test_allow_prefill_tokens": True}  # the must-fail control's test seam


def cuda_skip_reason() -> str | None:
    """Why this machine cannot run the suite, or None when it can (CUDA device + CUDA vLLM)."""
    if DRY_RUN:
        return None
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


@contextmanager
def gpu_cluster(model: Path, recorder: "Recorder", server_env: dict[str, str]) -> Iterator[Any]:
    """1P1D on one device with `server_env` on both servers; the cluster gets d_stats, p_stats,
    d_side (D's rank-0 side channel: /kv_digest) and baseline (free blocks per stats port)."""
    import pytest
    from vllm import __version__ as vllm_version
    from vllm.platforms import current_platform

    from pdpush.local.cluster import LocalCluster, free_port

    d_stats, p_stats, d_side = free_port(), free_port(), free_port()
    with pytest.MonkeyPatch.context() as env:
        for name, value in server_env.items():
            env.setenv(name, value)
        env.setenv("PDPUSH_TEST_MODE", "1")  # the test-only keys above (both servers inherit it)
        env.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
        t0 = time.monotonic()
        with LocalCluster(model, 1, decode_opts={**DECODE_OPTS, "stats_port": d_stats,
                                                 "side_channel_port": d_side},
                          prefill_opts={"stats_port": p_stats}, decode_args=DECODE_ARGS,
                          prefill_args=PREFILL_ARGS, log_dir=out_dir() / "logs") as c:
            device = "cpu (dry run)" if DRY_RUN else current_platform.get_device_name(0)
            recorder.note(vllm=vllm_version, device=device, server_env=server_env,
                          servers_up_s=round(time.monotonic() - t0, 1), decode_opts=DECODE_OPTS,
                          prefill_args=PREFILL_ARGS, decode_args=DECODE_ARGS)
            c.d_stats, c.p_stats, c.d_side = d_stats, p_stats, d_side
            c.remote_runs = []  # every response D served from a push (ask)
            c.baseline = {d_stats: stats(d_stats)["free_blocks"],
                          p_stats: stats(p_stats)["free_blocks"]}
            try:
                yield c
            finally:
                recorder.note(d_stats_end=_safe_stats(d_stats), p_stats_end=_safe_stats(p_stats))


def _safe_stats(port: int) -> Any:
    try:
        return stats(port)
    except Exception as exc:  # the report must be written even when a server is gone
        return f"unreachable: {exc}"


FREEZE, THAW = signal.SIGSTOP, signal.SIGCONT


def signal_server(server: Any, sig: int) -> None:
    """FREEZE / THAW a vLLM server (its own process group: API server, engine, workers)."""
    os.killpg(server._proc.pid, sig)


def kv_digest(cluster: Any) -> dict[str, Any]:
    """D's /kv_digest: blocks changed since the previous call, expected requests since."""
    return httpx.get(f"http://127.0.0.1:{cluster.d_side}/kv_digest", timeout=60).json()


def compare_kv(remote: dict[str, Any], local: dict[str, Any]) -> dict[str, Any]:
    """P's pushed blocks (remote: one expected request, its D blocks in prompt order) against the
    blocks D wrote computing the same prompt itself (local: the changed blocks, matched by
    content). Per unmatched block index: which layers have an equal block in the local run."""
    (blocks,) = remote["expected"].values()
    local_hashes = [tuple(h) for h in local["changed"].values()]
    local_by_layer = [set(h[i] for h in local_hashes) for i in range(local["layers"])]
    unmatched = {}
    for index, block in enumerate(blocks):
        hashes = tuple(remote["changed"].get(str(block), ()))
        if hashes not in local_hashes:
            unmatched[index] = [h in local_by_layer[i] for i, h in enumerate(hashes)]
    return {"blocks": len(blocks), "local_blocks_written": len(local_hashes),
            "unmatched": unmatched}


def with_prefill_tokens(params: dict[str, Any], tokens: list[int]) -> dict[str, Any]:
    """kv_transfer_params that make D send `tokens` to P instead of the prompt.

    The only use of the connector's test seam (metadata.CLIENT_TOKENS_KEY): the must-fail control
    gives D one prompt and P another, so D decodes from KV that does not belong to its prompt.
    D honours it only in test mode (test_allow_prefill_tokens, PDPUSH_TEST_MODE=1) and for a
    request with a cache_salt (`ask` always sends one).
    """
    return {**params, "pdpush_prefill_tokens": tokens}


def ask(cluster, prompt: list[int], salt: str, mode: str, tokens_for_p: list[int] | None = None,
        max_tokens: int = 32, timeout: float = 120.0) -> tuple[dict, float]:
    """One greedy request to D; mode "remote" makes D use P whatever the prompt's length."""
    params: dict[str, Any] = {"pdpush_prefill": mode}
    if tokens_for_p is not None:
        params = with_prefill_tokens(params, tokens_for_p)
    t0 = time.monotonic()
    body = complete(cluster.decode.url, prompt, max_tokens, timeout=timeout,
                    kv_transfer_params=params, cache_salt=salt, logprobs=2,
                    return_tokens_as_token_ids=True)
    if where(body).get("prefill") == "remote":
        cluster.remote_runs.append(body)
    return body, round(time.monotonic() - t0, 3)


def record_pair(recorder: Recorder, name: str, prompt: list[int], remote: tuple[dict, float],
                local: tuple[dict, float], **details: Any) -> bool:
    """Compare a remote and a local run, write the comparison to the report, return equality."""
    (r_body, r_s), (l_body, l_s) = remote, local
    diff = first_difference(tokens(r_body), tokens(l_body))
    if diff is not None:
        r_top, l_top = top2(r_body, diff), top2(l_body, diff)
        details.update(remote_top2=r_top, local_top2=l_top, remote_margin=margin(r_top),
                       local_margin=margin(l_top), remote_tokens=tokens(r_body),
                       local_tokens=tokens(l_body))
    recorder.check(name, diff is None, prompt_tokens=len(prompt), where=where(r_body),
                   first_diff=diff, remote_s=r_s, local_s=l_s, **details)
    return diff is None


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


NEAR_TIE = 0.25  # logprob gap under which two tokens are a near-tie (bf16: a few ulps at ~-4)


def same_up_to_near_tie(a: dict, b: dict) -> bool:
    """Equal greedy tokens, or the first difference is a near-tie in both runs (the two best
    tokens within NEAR_TIE): after it the outputs continue different texts, as greedy does."""
    diff = first_difference(tokens(a), tokens(b))
    if diff is None:
        return True
    gaps = (margin(top2(a, diff)), margin(top2(b, diff)))
    return all(g is not None and g < NEAR_TIE for g in gaps)


def margin(top: dict[str, float] | None) -> float | None:
    """Logprob gap between the best and the second-best token: ~0 is a near-tie."""
    if not top or len(top) < 2:
        return None
    best, second = sorted(top.values(), reverse=True)[:2]
    return round(best - second, 4)


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
