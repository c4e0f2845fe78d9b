"""Policy: local vs remote, choice by load, health from checks and outcomes (pure, no vLLM)."""

from pdpush.connector.config import PdpushConfig
from pdpush.policy import Policy

A, B = "http://p-a", "http://p-b"


def make(**kw) -> Policy:
    return Policy.for_urls(PdpushConfig(**{"remote_threshold_tokens": 100, **kw}).policy_config(), [A, B])


def test_short_prompt_stays_local():
    policy = make()
    assert policy.choose(99, now=0).url is None
    assert policy.choose(99, now=0).reason == "short"
    assert policy.choose(1, now=0, force_remote=True).url is None  # nothing worth pushing


def test_long_prompt_goes_to_least_loaded_prefill():
    policy = make()
    policy.started(A)
    assert policy.choose(100, now=0).url == B
    policy.started(B)
    policy.started(B)
    assert policy.choose(100, now=0).url == A


def test_prefill_queue_from_health_check_counts_as_load():
    policy = make()
    policy.health_checked(A, ok=True, queue=5, now=0)
    assert policy.choose(500, now=0).url == B


def test_choose_has_no_side_effects():
    policy = make()
    first = policy.choose(500, now=0)
    assert [policy.choose(500, now=0).url for _ in range(3)] == [first.url] * 3
    assert all(p.inflight == 0 for p in policy.peers.values())


def test_failed_outcome_marks_prefill_down_until_retry():
    policy = make(retry_after_s=10)
    policy.started(A)
    policy.finished(A, ok=False, now=100)
    assert policy.peers[A].inflight == 0
    assert policy.choose(500, now=101).url == B
    assert sum(p.available(101) for p in policy.peers.values()) == 1
    assert policy.peers[A].available(now=110)


def test_good_health_check_brings_prefill_back_early():
    policy = make(retry_after_s=10)
    policy.health_checked(A, ok=False, queue=0, now=0)
    policy.health_checked(B, ok=False, queue=0, now=0)
    assert policy.choose(500, now=1).reason == "no_healthy_prefill"
    policy.health_checked(A, ok=True, queue=0, now=2)
    assert policy.choose(500, now=2).url == A


def test_full_prefills_mean_local():
    policy = make(max_inflight_per_prefill=1)
    policy.started(A)
    policy.started(B)
    decision = policy.choose(500, now=0)
    assert (decision.url, decision.reason) == (None, "busy")
    policy.finished(B, ok=True, now=1)
    assert policy.choose(500, now=1).url == B
    assert policy.peers[B].completed == 1


def test_busy_queue_excludes_prefill():
    policy = make(max_prefill_queue=3)
    policy.health_checked(A, ok=True, queue=3, now=0)
    policy.health_checked(B, ok=True, queue=3, now=0)
    assert policy.choose(500, now=0).reason == "busy"
