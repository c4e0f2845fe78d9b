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
    policy.health_checked(A, ok=True, queue=5, at=0)
    assert policy.choose(500, now=0).url == B


def test_choose_has_no_side_effects():
    policy = make()
    first = policy.choose(500, now=0)
    assert [policy.choose(500, now=0).url for _ in range(3)] == [first.url] * 3
    assert all(p.inflight == 0 for p in policy.peers.values())


def test_consecutive_failures_open_the_breaker_until_retry():
    policy = make(retry_after_s=10, breaker_failures=2)
    policy.started(A)
    policy.finished(A, ok=False, at=100)
    assert policy.peers[A].inflight == 0
    assert policy.peers[A].available(101)  # one failure of two: still a candidate
    policy.health_checked(A, ok=False, queue=0, at=102)  # a failed check counts too
    assert policy.choose(500, now=103).url == B
    assert sum(p.available(103) for p in policy.peers.values()) == 1
    assert not policy.peers[A].available(now=111.9)
    assert policy.peers[A].available(now=112)  # half-open: retry_after_s after the last failure


def test_a_success_resets_the_count_of_consecutive_failures():
    policy = make(breaker_failures=2)
    for t in range(5):
        policy.finished(A, ok=False, at=t)
        policy.finished(A, ok=True, at=t + 0.5)
    assert policy.peers[A].state == "closed" and policy.peers[A].available(6)


def test_half_open_breaker_admits_one_trial_and_its_success_closes_it():
    policy = make(retry_after_s=10, breaker_failures=1)
    policy.finished(A, ok=False, at=0)
    policy.health_checked(B, ok=False, queue=0, at=0)
    assert policy.choose(500, now=1).reason == "no_healthy_prefill"
    assert policy.choose(500, now=10).url in (A, B)
    assert policy.choose(500, now=10).url == policy.choose(500, now=10).url  # choose is pure
    policy.started(A)  # the trial
    assert not policy.peers[A].available(11)  # only one trial at a time
    policy.finished(A, ok=True, at=12)
    assert policy.peers[A].state == "closed" and policy.peers[A].available(12)


def test_failed_trial_reopens_the_breaker():
    policy = make(retry_after_s=10, breaker_failures=1)
    policy.finished(A, ok=False, at=0)
    policy.started(A)
    policy.finished(A, ok=False, at=11)
    assert not policy.peers[A].available(20) and policy.peers[A].available(21)


def test_good_health_check_does_not_close_an_open_breaker():
    """A P that answers /health but keeps failing prefills stays out until a trial succeeds."""
    policy = make(retry_after_s=10, breaker_failures=1)
    policy.finished(A, ok=False, at=0)
    policy.health_checked(A, ok=True, queue=0, at=1)
    assert not policy.peers[A].available(2)
    assert policy.choose(500, now=2).url == B


def test_cancelled_call_is_no_verdict_and_frees_the_trial_slot():
    policy = make(retry_after_s=10, breaker_failures=1)
    policy.started(B)
    policy.cancelled(B)  # a client abort: P did nothing wrong
    assert policy.peers[B].state == "closed" and policy.peers[B].inflight == 0
    policy.finished(A, ok=False, at=0)
    policy.started(A)
    policy.cancelled(A)
    assert policy.peers[A].available(10)  # another trial may go


def test_full_prefills_mean_local():
    policy = make(max_inflight_per_prefill=1)
    policy.started(A)
    policy.started(B)
    decision = policy.choose(500, now=0)
    assert (decision.url, decision.reason) == (None, "busy")
    policy.finished(B, ok=True, at=1)
    assert policy.choose(500, now=1).url == B
    assert policy.peers[B].completed == 1


def test_busy_queue_excludes_prefill():
    policy = make(max_prefill_queue=3)
    policy.health_checked(A, ok=True, queue=3, at=0)
    policy.health_checked(B, ok=True, queue=3, at=0)
    assert policy.choose(500, now=0).reason == "busy"


def test_a_p_known_gone_is_out_at_once_and_readmitted_by_a_trial():
    policy = make(retry_after_s=10, breaker_failures=3)
    policy.gone(A, at=100)  # one refused connection, not three failures
    assert [policy.choose(500, now=t).url for t in (100, 105, 109.9)] == [B] * 3
    assert policy.peers[A].available(110)  # started again on its URL: one trial request
    policy.started(A)
    policy.finished(A, ok=True, at=111)
    assert policy.peers[A].state == "closed"


def test_a_p_whose_health_check_was_refused_is_not_chosen():
    """`refusing` comes from the rpc layer before D applied the report (an idle D)."""
    policy = make()
    policy.started(B)
    assert policy.choose(500, now=0).url == A  # control: the least loaded P
    assert policy.choose(500, now=0, refusing=frozenset({A})).url == B
    assert policy.choose(500, now=0, refusing=frozenset({A, B})).reason == "no_healthy_prefill"
    assert policy.peers[A].state == "closed"  # choose changed nothing: the report applies later
