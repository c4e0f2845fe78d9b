"""1P1D on vLLM CUDA engines: D decodes from the KV that P pushed exactly as from its own.

P and D are vLLM OpenAI servers on one GPU (a memory share each), started once for the module
(engine start on GPU is 1-2 min each). Every check compares, on D, the greedy tokens of a prompt
whose KV P prefilled and pushed ("remote", forced by the client) with those of the same prompt
prefilled by D itself ("local"): the only difference between the two runs is where the KV came
from. Requests carry a `cache_salt`, so a local run never reuses blocks that the remote run left
in D's prefix cache (and the prefix-cache check shares a salt on purpose).

Both servers run with VLLM_BATCH_INVARIANT=1: without it vLLM on GPU is not batch-invariant and
two runs of one prompt can differ on near-ties, which would hide or fake a transfer bug. A
mismatch is recorded with the first differing index and the top-2 logprobs there, so a near-tie
can be told from wrong KV. Skipped without a CUDA device and a CUDA build of vLLM.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from gpu_helpers import (
    BLOCK_SIZE, DECODE_ARGS, P_CHUNK_TOKENS, PREFILL_ARGS, SERVER_ENV, Recorder, cuda_skip_reason,
    first_difference, out_dir, top2, with_prefill_tokens,
)

_reason = cuda_skip_reason()
if _reason:
    pytest.skip(_reason, allow_module_level=True)

from e2e_helpers import complete, make_prompt, stats, tokens, wait_free_blocks, where  # noqa: E402

from pdpush.local.cluster import LocalCluster, free_port  # noqa: E402

MAX_TOKENS = 32
LENGTHS = [1, 17, 300, 1500, 6000]  # 6000 spans three of P's 2048-token chunks
# D recomputes a prompt's last token itself, so a 1-token prompt has nothing to push: D serves it
# locally even when the client asks for remote (pdpush.policy, "nothing_to_push").
PUSHED = [n for n in LENGTHS if n >= 2]


@pytest.fixture(scope="module")
def cluster(gpu_model, recorder: Recorder):
    from vllm import __version__ as vllm_version
    from vllm.platforms import current_platform

    d_stats, p_stats = free_port(), free_port()
    decode_opts = {"remote_threshold_tokens": 64, "side_channel_port": free_port(),
                   "stats_port": d_stats, "prefill_timeout_s": 60.0, "lease_grace_s": 5.0,
                   "health_interval_s": 1.0, "test_allow_prefill_tokens": True}
    with pytest.MonkeyPatch.context() as env:
        for name, value in SERVER_ENV.items():
            env.setenv(name, value)
        env.setenv("PDPUSH_TEST_MODE", "1")  # the must-fail control's test seam (D inherits it)
        env.setenv("CUDA_VISIBLE_DEVICES", os.environ.get("CUDA_VISIBLE_DEVICES", "0"))
        t0 = time.monotonic()
        with LocalCluster(gpu_model, 1, decode_opts=decode_opts, prefill_opts={"stats_port": p_stats},
                          decode_args=DECODE_ARGS, prefill_args=PREFILL_ARGS,
                          log_dir=out_dir() / "logs") as c:
            recorder.note(vllm=vllm_version, device=current_platform.get_device_name(0),
                          servers_up_s=round(time.monotonic() - t0, 1), server_env=SERVER_ENV,
                          prefill_args=PREFILL_ARGS, decode_args=DECODE_ARGS)
            c.d_stats, c.p_stats = d_stats, p_stats
            c.baseline = {d_stats: stats(d_stats)["free_blocks"], p_stats: stats(p_stats)["free_blocks"]}
            try:
                yield c
            finally:
                recorder.note(d_stats_end=_safe_stats(d_stats), p_stats_end=_safe_stats(p_stats))


def _safe_stats(port: int) -> Any:
    try:
        return stats(port)
    except Exception as exc:  # the report must be written even when a server is gone
        return f"unreachable: {exc}"


@pytest.fixture(autouse=True)
def blocks_back_to_baseline(cluster):
    yield
    for port, baseline in cluster.baseline.items():
        assert wait_free_blocks(port, baseline) == baseline, f"leaked blocks: {stats(port)}"


def ask(cluster, prompt: list[int], salt: str, mode: str,
        tokens_for_p: list[int] | None = None) -> tuple[dict, float]:
    """One greedy request to D; mode "remote" makes D use P whatever the prompt's length."""
    params: dict[str, Any] = {"pdpush_prefill": mode}
    if tokens_for_p is not None:
        params = with_prefill_tokens(params, tokens_for_p)
    t0 = time.monotonic()
    body = complete(cluster.decode.url, prompt, MAX_TOKENS, kv_transfer_params=params,
                    cache_salt=salt, logprobs=2, return_tokens_as_token_ids=True)
    return body, round(time.monotonic() - t0, 3)


def record_pair(recorder: Recorder, name: str, prompt: list[int], remote: tuple[dict, float],
                local: tuple[dict, float], **details: Any) -> bool:
    """Compare a remote and a local run, write the comparison to the report, return equality."""
    (r_body, r_s), (l_body, l_s) = remote, local
    diff = first_difference(tokens(r_body), tokens(l_body))
    if diff is not None:
        details.update(remote_top2=top2(r_body, diff), local_top2=top2(l_body, diff),
                       remote_tokens=tokens(r_body), local_tokens=tokens(l_body))
    recorder.check(name, diff is None, prompt_tokens=len(prompt), where=where(r_body),
                   first_diff=diff, remote_s=r_s, local_s=l_s, **details)
    return diff is None


@pytest.mark.parametrize("n", LENGTHS)
def test_remote_equals_local_on_d(cluster, recorder, n):
    prompt = make_prompt(n, 100 + n)
    remote = ask(cluster, prompt, f"remote-{n}", "remote")
    local = ask(cluster, prompt, f"local-{n}", "local")
    equal = record_pair(recorder, f"remote_eq_local_{n}", prompt, remote, local,
                        p_chunks=-(-n // P_CHUNK_TOKENS))
    assert where(remote[0])["prefill"] == ("remote" if n in PUSHED else "local"), where(remote[0])
    assert where(local[0])["prefill"] == "local", where(local[0])
    assert equal, (tokens(remote[0]), tokens(local[0]))


def test_partial_prefix_hit_on_d(cluster, recorder):
    """D holds the first blocks (from an earlier push); P pushes only the rest."""
    base = make_prompt(1000, 11)
    shared = base[:600] + make_prompt(400, 12)
    ask(cluster, base, "prefix", "remote")  # D caches base's blocks as they came from P
    remote = ask(cluster, shared, "prefix", "remote")
    local = ask(cluster, shared, "prefix-local", "local")
    hit = 600 // BLOCK_SIZE * BLOCK_SIZE
    equal = record_pair(recorder, "prefix_hit_600_of_1000", shared, remote, local, expected_skip=hit)
    assert where(remote[0])["prefill"] == "remote"
    assert where(remote[0])["skip_tokens"] == hit
    assert equal, (tokens(remote[0]), tokens(local[0]))


def test_control_wrong_kv_continues_the_other_prompt(cluster, recorder):
    """Must-fail control: D given B's prompt with A's KV continues A, so the checks above compare
    outputs that really depend on the pushed KV (B ends with A's last token, which D recomputes)."""
    a = make_prompt(300, 5)
    b = make_prompt(299, 6) + a[-1:]
    local_a = ask(cluster, a, "control-a", "local")
    local_b = ask(cluster, b, "control-b", "local")
    mixed = ask(cluster, b, "control-mixed", "remote", tokens_for_p=a)
    differ = tokens(local_a[0]) != tokens(local_b[0])
    equal = record_pair(recorder, "control_b_with_a_kv_gives_a", b, mixed, local_a,
                        a_and_b_differ=differ)
    assert differ, "A and B give the same tokens: the control could not fail"
    assert where(mixed[0])["prefill"] == "remote"
    assert equal, (tokens(mixed[0]), tokens(local_a[0]), tokens(local_b[0]))


def test_first_tokens_agree_and_nothing_fell_back(cluster, recorder):
    """P's greedy first token equals D's for every remote request (checked by D's connector)."""
    complete(cluster.decode.url, [42], 1)  # P's answers may land after D finished: one more step
    d = stats(cluster.d_stats)
    ok = d["first_token_mismatch"] == 0 and d["fallback"] == 0 and d["first_token_checked"] > 0
    recorder.check("d_stats_first_token_and_fallback", ok,
                   **{k: d[k] for k in ("first_token_checked", "first_token_mismatch", "fallback")})
    assert d["first_token_checked"] >= len(PUSHED)
    assert d["first_token_mismatch"] == 0
    assert d["fallback"] == 0
