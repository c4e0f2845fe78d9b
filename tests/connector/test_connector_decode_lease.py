"""D's scheduler half: decisions, do_prefill, leases and fallbacks (no engine, no network).

Requests are stand-ins with the fields the scheduler reads; the rpc client is a recorder whose
results the test injects, so every failure path runs in milliseconds.
"""

from __future__ import annotations

import time

import pytest
from connector_fakes import FakeClient, request

from pdpush.connector.config import PdpushConfig
from pdpush.connector.decode_scheduler import DecodeScheduler
from pdpush.rpc.prefill_client import PrefillResult
from pdpush.vllm_api import Transfers

P = "http://p0"


def blocks(ids):
    return list(ids)


@pytest.fixture
def sched():
    cfg = PdpushConfig(prefill_urls=(P,), remote_threshold_tokens=64, prefill_timeout_s=10.0,
                       lease_grace_s=2.0, breaker_failures=1)
    return DecodeScheduler(cfg, block_size=16, engine_id="d0", client=FakeClient())


def go_remote(sched, req, computed=0, block_ids=(1, 2, 3, 4, 5, 6, 7)):
    n, wait = sched.get_num_new_matched_tokens(req, computed)
    assert (n, wait) == (req.num_prompt_tokens - computed, True)
    sched.update_state_after_alloc(req, blocks(block_ids), n)


def test_short_prompt_is_local_and_answers_where(sched):
    req = request("a", 10)
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    req.output_token_ids = [3]
    assert sched.request_finished(req) == (False, {"pdpush": {"prefill": "local", "reason": "short"}})
    assert sched.counters.local == 1


def test_remote_sends_do_prefill_with_d_blocks_and_expects_kv(sched):
    req = request("a", 100)
    go_remote(sched, req, computed=32)
    (job,) = sched.client.jobs
    target = job.kv_transfer_params["pdpush"]
    assert target["d_block_ids"] == [1, 2, 3, 4, 5, 6, 7] and target["skip_tokens"] == 32
    assert job.url == P and job.prompt_token_ids == list(range(100))
    assert sched.build_meta(None).expect == {"a": [3, 4, 5, 6, 7]}  # from skip on
    assert sched.build_meta(None).expect == {}  # told once
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # asked again: no second call


def test_kv_arrival_then_greedy_first_token_check(sched):
    req = request("a", 100)
    go_remote(sched, req)
    sched.client.results.append(PrefillResult("a", P, True, first_token=7))
    sched.build_meta(None)
    sched.update_connector_output(Transfers(received={"a"}))
    req.output_token_ids = [8]  # differs from P's 7: suspected corruption
    hold, params = sched.request_finished(req)
    assert not hold and params["pdpush"]["first_token_mismatch"] is True
    assert (sched.counters.first_token_checked, sched.counters.first_token_mismatch) == (1, 1)


def test_p_answer_after_d_finished_is_still_checked(sched):
    req = request("a", 100)
    go_remote(sched, req)
    sched.update_connector_output(Transfers(received={"a"}))
    req.output_token_ids = [7]
    sched.request_finished(req)
    sched.client.results.append(PrefillResult("a", P, True, first_token=7))
    sched.build_meta(None)
    assert (sched.counters.first_token_checked, sched.counters.first_token_mismatch) == (1, 0)


def test_p_that_wrote_nothing_is_given_up_at_once_and_recomputed_locally(sched):
    req = request("a", 100)
    go_remote(sched, req)
    sched.client.results.append(PrefillResult("a", P, False, error="refused", may_have_written=False))
    assert sched.build_meta(None).give_up == ["a"]
    sched.update_connector_output(Transfers(received={"a"}, failed={"a"}))  # the worker reported it failed
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)  # vLLM's retry is local
    assert sched.request_finished(req)[1]["pdpush"]["prefill"] == "fallback"
    assert sched.counters.fallback == 1
    assert not sched.policy.peers[P].available(time.monotonic())  # and P is avoided for a while


def test_p_that_may_have_written_keeps_blocks_until_the_lease_ends(sched, monkeypatch):
    req = request("a", 100)
    go_remote(sched, req)
    sched.client.results.append(PrefillResult("a", P, False, error="timeout"))
    assert sched.build_meta(None).give_up == []
    lease_end = sched._requests["a"].lease_end
    monkeypatch.setattr(time, "monotonic", lambda: lease_end + 0.1)  # D's own clock
    assert sched.build_meta(None).give_up == ["a"]


def test_abort_while_waiting_cancels_and_holds_blocks(sched):
    req = request("a", 100)
    go_remote(sched, req)
    assert sched.request_finished(req) == (True, None)  # blocks stay: P may still write
    assert sched.client.cancelled == ["a"]
    assert sched.counters.aborted_waiting == 1
    sched.update_connector_output(Transfers(received={"a"}, failed={"a"}))  # P confirmed it stopped (or lease ended)
    assert sched.stats()["waiting_for_kv"] == 0
    assert sched._requests == {}


def test_bad_client_hint_is_reported_and_served_locally(sched):
    req = request("a", 100, params={"pdpush_prefill": "both"})
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    assert "must be one of" in sched.request_finished(req)[1]["pdpush"]["pdpush_error"]


def test_client_can_force_remote_below_threshold(sched):
    req = request("a", 10, params={"pdpush_prefill": "remote"})
    assert sched.get_num_new_matched_tokens(req, 0) == (10, True)


def test_health_reports_reach_the_policy_at_the_next_step(sched):
    from pdpush.rpc.prefill_client import HealthReport

    sched.client.health.append(HealthReport(P, ok=False))
    sched.build_meta(None)
    assert sched.get_num_new_matched_tokens(request("a", 100), 0) == (0, False)
    assert sched.stats()["prefills"][P]["healthy"] is False


def test_resumed_request_with_output_is_recomputed_locally(sched):
    req = request("a", 100)
    req.num_tokens = 105  # preempted after 5 output tokens
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)


def test_outcomes_apply_at_the_time_they_were_known(sched):
    """A failure drained late opens P's breaker from its own time: one known long ago (more
    than retry_after_s) leaves P half-open, i.e. usable for a trial; a recent one does not.
    A good health check in between does not close the breaker."""
    from pdpush.rpc.prefill_client import HealthReport

    go_remote(sched, request("a", 100))
    t = time.monotonic()
    sched.client.results = [PrefillResult("a", P, False, error="deadline", at=t - 20.0)]
    sched.build_meta(None)
    assert sched.get_num_new_matched_tokens(request("b", 100), 0) == (100, True)
    assert sched.stats()["prefills"][P]["breaker_open"] is True  # open, retry time passed

    sched.update_state_after_alloc(request("b", 100), blocks(range(7)), 100)  # the trial
    sched.client.health = [HealthReport(P, True, at=t + 0.5)]
    sched.client.results = [PrefillResult("b", P, False, error="deadline", at=t)]
    sched.build_meta(None)
    assert sched.get_num_new_matched_tokens(request("d", 100), 0) == (0, False)
