"""D's decisions and how it reads outcomes (issue 10, items 2, 5, 6, 8, 10): no engine, no network.

Requests carry vLLM's own SamplingParams; the rpc client and the KV cache manager are recorders.
"""

from __future__ import annotations

import copy
import time

import pytest
from connector_fakes import FakeBlocks, FakeClient, request

from pdpush.connector.config import ConfigError, PdpushConfig
from pdpush.connector.decode_request import Status
from pdpush.connector.decode_scheduler import DecodeScheduler
from pdpush.rpc.prefill_client import HealthReport, PrefillResult
from pdpush.vllm_api import Transfers

P = "http://p0"
BLOCKS = list(range(10, 17))  # 7 blocks of 16 for a 100-token prompt


def make(**opts) -> DecodeScheduler:
    cfg = PdpushConfig(prefill_urls=(P,), remote_threshold_tokens=64, breaker_failures=1, **opts)
    sched = DecodeScheduler(cfg, block_size=16, engine_id="d0", client=FakeClient())
    sched.blocks = FakeBlocks()
    return sched


def remote(sched, req, computed=0):
    n, wait = sched.get_num_new_matched_tokens(req, computed)
    assert wait, sched.request_finished(req)
    sched.update_state_after_alloc(req, BLOCKS, n)


def arrived(sched, req_id, first_token=7):
    sched.client.results.append(PrefillResult(req_id, P, True, first_token=first_token))
    sched.build_meta(None)
    sched.update_connector_output(Transfers(received={req_id}))


def finish(sched, req, d_token):
    req.output_token_ids = [d_token]
    placement = sched.request_finished(req)[1]["pdpush"]
    placement.pop("timing")  # stage timings (connector/timing.py): not what these tests check
    return placement


# -- item 10: get_num_new_matched_tokens may be called twice -----------------------------------
def state(sched) -> dict:
    return copy.deepcopy({"requests": sched._requests, "peers": sched.policy.peers,
                          "counters": sched.counters, "jobs": sched.client.jobs,
                          "results": sched.client.results, "health": sched.client.health,
                          "expect": sched._expect})


@pytest.mark.parametrize("n", [10, 100])
def test_matching_twice_changes_nothing_a_second_call_would_repeat(n):
    sched = make()
    remote(sched, request("old", 100))
    sched.client.results.append(PrefillResult("old", P, False, error="deadline"))
    sched.client.health.append(HealthReport(P, False))
    before = state(sched)
    req = request("a", n)
    first = sched.get_num_new_matched_tokens(req, 0)
    after_first = state(sched)
    assert sched.get_num_new_matched_tokens(req, 0) == first
    assert state(sched) == after_first
    # Only the new record differs from before: nothing was drained, no policy state moved.
    del after_first["requests"]["a"]
    assert after_first == before


# -- item 5: inputs P cannot reproduce from token ids ------------------------------------------
@pytest.mark.parametrize("fields, reason", [
    ({"lora_request": object()}, "lora"),
    ({"mm_features": [object()]}, "multimodal"),
    ({"prompt_embeds": object(), "prompt_token_ids": None}, "prompt_embeds"),
])
def test_requests_beyond_token_ids_are_prefilled_locally(fields, reason):
    sched = make()
    req = request("a", 100, params={"pdpush_prefill": "remote"}, **fields)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    sched.update_state_after_alloc(req, BLOCKS, 0)
    assert sched.client.jobs == []
    assert finish(sched, req, 3) == {"prefill": "local", "reason": reason}


# -- item 2: the test-only seam that gives P other tokens --------------------------------------
def test_tokens_for_p_are_refused_on_a_served_config():
    sched = make()
    req = request("a", 100, params={"pdpush_prefill_tokens": [5] * 100}, cache_salt="s")
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert "test-only" in finish(sched, req, 3)["pdpush_error"]


def test_test_seam_needs_test_mode_in_the_environment(monkeypatch):
    monkeypatch.delenv("PDPUSH_TEST_MODE", raising=False)
    with pytest.raises(ConfigError, match="PDPUSH_TEST_MODE=1"):
        PdpushConfig.from_extra_config({"prefill_urls": [P], "test_allow_prefill_tokens": True},
                                       "kv_consumer")
    monkeypatch.setenv("PDPUSH_TEST_MODE", "1")
    assert PdpushConfig.from_extra_config({"prefill_urls": [P], "test_allow_prefill_tokens": True},
                                          "kv_consumer").test_allow_prefill_tokens


@pytest.fixture
def test_mode(monkeypatch):
    monkeypatch.setenv("PDPUSH_TEST_MODE", "1")
    return make(test_allow_prefill_tokens=True)


def test_foreign_kv_needs_a_cache_salt(test_mode):
    req = request("a", 100, params={"pdpush_prefill_tokens": [5] * 100})
    assert test_mode.get_num_new_matched_tokens(req, 0) == (0, False)
    assert "cache_salt" in finish(test_mode, req, 3)["pdpush_error"]


def test_foreign_kv_is_kept_out_of_the_prefix_cache_every_step_and_at_the_end(test_mode):
    req = request("a", 100, params={"pdpush_prefill_tokens": [5] * 100}, cache_salt="s")
    remote(test_mode, req, computed=32)
    assert test_mode.client.jobs[0].prompt_token_ids == [5] * 100
    test_mode.build_meta(None)
    assert test_mode.blocks.evicted == []  # nothing arrived, nothing cached yet
    arrived(test_mode, "a")
    test_mode.build_meta(None)
    test_mode.build_meta(None)
    finish(test_mode, req, 7)
    assert test_mode.blocks.evicted == [tuple(BLOCKS[2:])] * 3  # D's own 2-block hit is kept


def test_plain_request_blocks_stay_cached(test_mode):
    req = request("a", 100, cache_salt="s")
    remote(test_mode, req)
    arrived(test_mode, "a")
    test_mode.build_meta(None)
    finish(test_mode, req, 7)
    assert test_mode.blocks.evicted == []


# -- item 8: the first-token check -------------------------------------------------------------
@pytest.mark.parametrize("sampling", [
    {"repetition_penalty": 1.3}, {"presence_penalty": 0.5}, {"frequency_penalty": 0.5},
    {"logit_bias": {7: 5.0}}, {"min_tokens": 3}, {"allowed_token_ids": [3, 7]},
    {"bad_words": ["no"]}, "structured",
])
def test_first_token_not_compared_when_options_reshape_the_logits(sampling):
    if sampling == "structured":
        from vllm.sampling_params import StructuredOutputsParams

        sampling = {"structured_outputs": StructuredOutputsParams(choice=["yes", "no"])}
    sched = make()
    req = request("a", 100, sampling=sampling)
    remote(sched, req)
    arrived(sched, "a", first_token=7)
    assert "first_token_mismatch" not in finish(sched, req, 3)
    assert sched.counters.first_token_checked == 0 and sched._requests == {}


def test_plain_greedy_is_compared():
    sched = make()
    req = request("a", 100)
    remote(sched, req)
    arrived(sched, "a", first_token=7)
    assert finish(sched, req, 3)["first_token_mismatch"] is True
    assert sched.blocks.evicted == []  # on_first_token_mismatch="log": only logged


def test_fallback_is_not_compared():
    sched = make()
    req = request("a", 100)
    remote(sched, req)
    sched.client.results.append(PrefillResult("a", P, False, first_token=7, error="late"))
    sched.build_meta(None)
    sched.update_connector_output(Transfers(received={"a"}, failed={"a"}))
    assert "first_token_mismatch" not in finish(sched, req, 3)
    assert sched.counters.first_token_checked == 0


def test_mismatch_excluded_from_cache():
    sched = make(on_first_token_mismatch="exclude-from-cache")
    req = request("a", 100)
    remote(sched, req)
    arrived(sched, "a", first_token=7)
    assert finish(sched, req, 3)["first_token_mismatch"] is True
    assert sched.blocks.evicted == [tuple(BLOCKS)]
    assert sched.policy.peers[P].state == "closed"


def test_mismatch_error_also_counts_against_p_and_reports_it():
    sched = make(on_first_token_mismatch="error")
    req = request("a", 100)
    remote(sched, req)
    arrived(sched, "a", first_token=7)
    placement = finish(sched, req, 3)
    assert "first token 7 != D's 3" in placement["error"]
    assert sched.blocks.evicted == [tuple(BLOCKS)]
    assert not sched.policy.peers[P].available(time.monotonic())


def test_unverified_blocks_leave_the_cache_when_p_answers_after_d_finished():
    sched = make(on_first_token_mismatch="exclude-from-cache")
    req = request("a", 100)
    remote(sched, req)
    sched.update_connector_output(Transfers(received={"a"}))  # KV in, P's answer still to come
    finish(sched, req, 3)
    assert sched.blocks.evicted == [tuple(BLOCKS)]  # D frees them now, unchecked
    sched.client.results.append(PrefillResult("a", P, True, first_token=7))
    sched.build_meta(None)
    assert sched.counters.first_token_mismatch == 1
    assert sched.blocks.evicted == [tuple(BLOCKS)]  # not again: the ids may be reused by now
    assert sched._requests == {}


def test_on_first_token_mismatch_is_validated():
    with pytest.raises(ConfigError, match="on_first_token_mismatch"):
        PdpushConfig.from_extra_config({"prefill_urls": [P], "on_first_token_mismatch": "ignore"},
                                       "kv_consumer")


# -- item 6: outcomes ----------------------------------------------------------------------------
def test_client_abort_does_not_count_against_p():
    sched = make()
    req = request("a", 100)
    remote(sched, req)
    assert sched.request_finished(req) == (True, None)
    sched.client.results.append(PrefillResult("a", P, False, error="cancelled by D", cancelled=True))
    sched.build_meta(None)
    peer = sched.policy.peers[P]
    assert (peer.state, peer.failed, peer.inflight) == ("closed", 0, 0)
    assert sched.get_num_new_matched_tokens(request("b", 100), 0) == (100, True)


def test_p_that_may_have_written_does_not_release_early():
    """vLLM answers 400 also after its engine started the request: blocks stay under the lease."""
    sched = make()
    remote(sched, request("a", 100))
    sched.client.results.append(PrefillResult("a", P, False, error="P answered 400: ..."))
    assert sched.build_meta(None).give_up == []
    assert sched._requests["a"].status is Status.WAITING_FOR_KV


def test_breaker_state_is_exported_as_prometheus_numbers():
    from pdpush.connector.stats import prometheus_text

    sched = make()
    sched.client.health.append(HealthReport(P, False))
    sched.build_meta(None)
    text = prometheus_text(sched.stats())
    assert f'pdpush_prefill_breaker_open{{url="{P}"}} 1.0' in text
    assert f'pdpush_prefill_consecutive_failures{{url="{P}"}} 1.0' in text


def test_idle_d_avoids_a_p_refusing_connections_before_it_applies_the_report():
    """D applies health reports when it steps; an idle D's next request is decided first."""
    sched = make()
    assert sched.get_num_new_matched_tokens(request("a", 100), 0) == (100, True)  # control
    sched.request_finished(request("a", 100))
    sched.client.refused = frozenset({P})
    assert sched.get_num_new_matched_tokens(request("b", 100), 0) == (0, False)
    assert sched.request_finished(request("b", 100))[1]["pdpush"]["reason"] == "no_healthy_prefill"
    assert sched.stats()["prefills"][P]["refusing"] is True
