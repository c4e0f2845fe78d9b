"""1P1D on real vLLM CPU engines: greedy outputs equal one aggregated engine, KV really moves.

One P and one D (tiny model) are shared by the module; a plain engine without connector is run
first for the reference outputs. After every test the free KV block counts of P and D must be
back at their baseline (read from the connector's /stats endpoint). D runs in test mode
(PDPUSH_TEST_MODE=1, test_allow_prefill_tokens) for the must-fail control, accepts prompt
embeddings and serves the model under a second name.
"""

from __future__ import annotations

import base64
import io
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from e2e_helpers import (
    LOG_DIR, complete, make_prompt, reference_outputs, stats, tokens, wait_free_blocks, where,
    placement,
)

from pdpush.connector.auth import Keys
from pdpush.connector.metadata import PushTarget
from pdpush.local.cluster import LocalCluster, free_port

pytestmark = pytest.mark.e2e
MAX_TOKENS = 8
THRESHOLD = 64

LONG = make_prompt(300, 2)
MULTI_CHUNK = make_prompt(1200, 3)  # P's token budget is 512: three prefill chunks
SHARED = MULTI_CHUNK[:640] + make_prompt(200, 4)  # D has 5 blocks of it cached after MULTI_CHUNK
CONTROL_A = make_prompt(300, 5)
CONTROL_B = make_prompt(299, 6) + CONTROL_A[-1:]  # same length and last token as A
VICTIM = make_prompt(600, 8)  # issue 10's example: a 600-token prompt others try to poison
POISON = make_prompt(599, 9) + VICTIM[-1:]
ALIASED = make_prompt(400, 10)
PROMPTS = {"one_token": [42], "short": make_prompt(8, 1), "long": LONG,
           "multi_chunk": MULTI_CHUNK, "shared": SHARED, "control_a": CONTROL_A,
           "control_b": CONTROL_B, "victim": VICTIM, "poison": POISON, "aliased": ALIASED}


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[str, list[int]]:
    return reference_outputs(tiny_model, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def cluster(tiny_model: Path, reference):
    d_stats, p_stats = free_port(), free_port()
    decode_opts = {"remote_threshold_tokens": THRESHOLD, "side_channel_port": free_port(),
                   "stats_port": d_stats, "prefill_timeout_s": 20.0, "lease_grace_s": 1.0,
                   "health_interval_s": 1.0, "test_allow_prefill_tokens": True}
    decode_args = ["--enable-prompt-embeds", "--served-model-name", "pdpush", "alias"]
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PDPUSH_TEST_MODE", "1")  # D inherits it: the test seam is accepted
        with LocalCluster(tiny_model, 1, decode_opts=decode_opts, decode_args=decode_args,
                          prefill_opts={"stats_port": p_stats}, log_dir=LOG_DIR) as c:
            c.d_stats, c.p_stats = d_stats, p_stats
            c.baseline = {d_stats: stats(d_stats)["free_blocks"],
                          p_stats: stats(p_stats)["free_blocks"]}
            c.model = tiny_model
            yield c


@pytest.fixture(autouse=True)
def blocks_back_to_baseline(cluster):
    yield
    for port, baseline in cluster.baseline.items():
        assert wait_free_blocks(port, baseline) == baseline, f"leaked blocks: {stats(port)}"


def test_greedy_outputs_equal_aggregated_engine(cluster, reference):
    d = cluster.decode.url
    for name, expected_place in [("one_token", "local"), ("short", "local"), ("long", "remote"),
                                 ("multi_chunk", "remote"), ("shared", "remote")]:
        body = complete(d, PROMPTS[name], MAX_TOKENS)
        assert where(body).get("prefill") == expected_place, (name, where(body))
        assert tokens(body) == reference[name], name
    assert where(body)["skip_tokens"] == 640  # D's own prefix-cache hit was not pushed again
    complete(d, [42], 1)  # P's answers may land after D finished: one more step collects them
    d_stats = stats(cluster.d_stats)
    assert d_stats["first_token_checked"] >= 3
    assert d_stats["first_token_mismatch"] == 0
    assert d_stats["fallback"] == 0


def test_multi_chunk_prompt_is_pushed_chunk_by_chunk(cluster):
    before = stats(cluster.p_stats)["planned_tasks"]
    complete(cluster.decode.url, make_prompt(1100, 7), MAX_TOKENS)
    assert stats(cluster.p_stats)["planned_tasks"] - before == 3  # 512 + 512 + 76 tokens


def test_control_wrong_kv_gives_the_other_prompts_continuation(cluster, reference):
    """D decodes from the pushed KV: B's prompt with A's KV continues A, not B."""
    assert reference["control_a"] != reference["control_b"]
    body = complete(cluster.decode.url, CONTROL_B, MAX_TOKENS, cache_salt="control",
                    kv_transfer_params={"pdpush_prefill_tokens": CONTROL_A})
    assert where(body)["prefill"] == "remote"
    assert tokens(body) == reference["control_a"]


def test_a_request_cannot_poison_a_later_one(cluster, reference):
    """The test seam's KV never serves another request: not one without its cache_salt (vLLM's
    hashes differ), not even one with it (D takes the blocks out of its prefix cache)."""
    d = cluster.decode.url
    assert reference["victim"] != reference["poison"]
    poisoned = complete(d, VICTIM, MAX_TOKENS, cache_salt="attacker",
                        kv_transfer_params={"pdpush_prefill_tokens": POISON})
    assert tokens(poisoned) == reference["poison"]  # D did decode from the foreign KV
    same_salt = complete(d, VICTIM, MAX_TOKENS, cache_salt="attacker")
    assert tokens(same_salt) == reference["victim"]
    assert where(same_salt)["skip_tokens"] == 0  # no block of the poisoned request matched
    assert tokens(complete(d, VICTIM, MAX_TOKENS)) == reference["victim"]
    unsalted = complete(d, VICTIM, MAX_TOKENS, kv_transfer_params={"pdpush_prefill_tokens": POISON})
    assert "cache_salt" in where(unsalted)["pdpush_error"]
    assert tokens(unsalted) == reference["victim"]


def test_prompt_embeds_are_prefilled_locally(cluster, reference):
    """P is sent token ids only, so D keeps a prompt given as embeddings (vLLM raised a
    TypeError in D's engine core before)."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(cluster.model / "model.safetensors"))
    embeds = weights["model.embed_tokens.weight"][torch.tensor(LONG)]
    buf = io.BytesIO()
    torch.save(embeds, buf)
    body = complete(cluster.decode.url, None, MAX_TOKENS,
                    prompt_embeds=base64.b64encode(buf.getvalue()).decode(),
                    kv_transfer_params={"pdpush_prefill": "remote"})
    assert placement(body) == {"prefill": "local", "reason": "prompt_embeds"}
    assert tokens(body) == reference["long"]


def test_a_served_model_alias_is_pushed_and_correct(cluster, reference):
    body = complete(cluster.decode.url, ALIASED, MAX_TOKENS, model="alias")
    assert where(body)["prefill"] == "remote"
    assert tokens(body) == reference["aliased"]


def test_bad_client_params_are_reported(cluster, reference):
    body = complete(cluster.decode.url, PROMPTS["long"], MAX_TOKENS,
                    kv_transfer_params={"pdpush_prefill": "sideways"})
    assert "pdpush_prefill must be one of" in where(body)["pdpush_error"]
    assert tokens(body) == reference["long"]  # served locally, correctly


def cluster_keys(cluster) -> Keys:
    return Keys.parse(cluster.key_file.read_text(), "the cluster's key file")


def test_bad_push_target_is_rejected_by_p(cluster):
    """Signed with the cluster's key but malformed: P's scheduler names the field."""
    raw = {"d_req_id": "x", "d_block_ids": [1], "nonce": "n" * 32}
    raw["signature"] = cluster_keys(cluster).sign(raw)
    body = complete(cluster.prefills[0].url, LONG, 1, kv_transfer_params={"pdpush": raw})
    assert "is missing" in body["kv_transfer_params"]["pdpush_error"]


def test_forged_do_prefill_straight_to_p_is_refused_with_403(cluster):
    """Anyone reaching P's port: a target naming D's real side channel and blocks, unsigned or
    signed with another key, or a replayed one, never reaches P's engine."""
    side_channel = f"127.0.0.1:{cluster.decode_opts['side_channel_port']}"
    d_meta = httpx.get(f"http://{side_channel}/meta", timeout=5).json()  # anyone can read it
    forged = PushTarget("victim", d_meta["engine_id"], side_channel, (1, 2, 3), 0, 16,
                        30.0, "f" * 32, d_meta["instance_id"])
    # The control: signed with the cluster's key, it passes the signature check and fails the
    # next one (no D there), so nothing is written into the real D by this test.
    dead = replace(forged, side_channel=f"127.0.0.1:{free_port()}", nonce="c" * 32)
    signed = dead.to_params(cluster_keys(cluster))
    attempts = [(signed, 503, "pdpush_d_unreachable"), (forged.to_params(), 403, "pdpush_forbidden"),
                (forged.to_params(Keys(b"not-the-cluster-key")), 403, "pdpush_forbidden"),
                (signed, 403, "pdpush_forbidden")]  # replayed
    before = stats(cluster.p_stats)
    for params, status, kind in attempts:
        resp = httpx.post(f"{cluster.prefills[0].url}/v1/completions", timeout=60,
                          json={"prompt": LONG[:40], "max_tokens": 1, "kv_transfer_params": params})
        assert (resp.status_code, resp.json()["error"]["type"]) == (status, kind), resp.text
    after = stats(cluster.p_stats)
    for name in ("pushed_requests", "rejected_requests", "tracked_requests"):
        assert after[name] == before[name], name  # the engine never saw any of them


def test_client_can_force_local_prefill(cluster, reference):
    body = complete(cluster.decode.url, MULTI_CHUNK, MAX_TOKENS,
                    kv_transfer_params={"pdpush_prefill": "local"})
    assert placement(body) == {"prefill": "local", "reason": "client_asked_local"}
    assert tokens(body) == reference["multi_chunk"]


def test_d_stats_endpoint_answers_json_and_prometheus(cluster):
    resp = httpx.get(f"http://127.0.0.1:{cluster.d_stats}/stats", timeout=5)
    assert resp.json()["role"] == "D"
    assert cluster.prefills[0].url in resp.json()["prefills"]
    metrics = httpx.get(f"http://127.0.0.1:{cluster.d_stats}/metrics", timeout=5).text
    assert "pdpush_first_token_mismatch 0.0" in metrics
    assert f'pdpush_prefill_healthy{{url="{cluster.prefills[0].url}"}} 1.0' in metrics
