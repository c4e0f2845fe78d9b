"""D's quarantine: blocks whose push state is unknown at the lease's end are held until P's
notification arrives on every rank or P's process is known to have ended (no vLLM, no network)."""

from __future__ import annotations

import time

import pytest
from connector_fakes import FakeClient
from connector_pool import RefPool
from test_connector_decode_lease import P, go_remote, request

from pdpush.connector.config import PdpushConfig
from pdpush.connector.decode_scheduler import DecodeScheduler
from pdpush.rpc.prefill_client import HealthReport, PrefillResult
from pdpush.vllm_api import Transfers

BLOCKS = (1, 2, 3, 4, 5, 6, 7)


def scheduler(ranks: int = 1) -> tuple[DecodeScheduler, RefPool]:
    cfg = PdpushConfig(prefill_urls=(P,), remote_threshold_tokens=64, prefill_timeout_s=10.0)
    sched = DecodeScheduler(cfg, block_size=16, engine_id="d0", client=FakeClient(), ranks=ranks)
    pool = RefPool(16)
    sched.bind_blocks(pool)
    return sched, pool


def lease_ends(sched, monkeypatch, computed: int = 0) -> RefPool:
    """r goes remote (D's prefix hit: `computed` tokens), the lease passes, vLLM frees r."""
    pool = sched.quarantine.blocks
    pool.alloc(BLOCKS)
    go_remote(sched, request("r", 100), computed=computed, block_ids=BLOCKS)
    lease_end = sched._requests["r"].lease_end
    monkeypatch.setattr(time, "monotonic", lambda: lease_end + 0.1)
    assert sched.build_meta(None).give_up == ["r"]
    sched.update_connector_output(Transfers(received={"r"}, failed={"r"}))
    pool.free(BLOCKS)
    return pool


def test_unknown_push_state_holds_the_blocks_p_may_write(monkeypatch):
    sched, _ = scheduler()
    pool = lease_ends(sched, monkeypatch, computed=32)  # blocks 1, 2: D's own hit, never pushed
    assert pool.free_ids()[:3] == [0, 1, 2] and not set(BLOCKS[2:]) & set(pool.free_ids())
    stats = sched.stats()
    assert (stats["held_requests"], stats["held_blocks"], stats["held_total"]) == (1, 5, 1)


def test_notification_on_every_rank_releases(monkeypatch):
    sched, _ = scheduler(ranks=2)
    pool = lease_ends(sched, monkeypatch)
    sched.update_connector_output(Transfers(notified={"r": 1}))
    assert sched.stats()["held_blocks"] == 7  # one rank of two: P may still write the other
    sched.update_connector_output(Transfers(notified={"r": 1}))
    assert sched.stats()["held_blocks"] == 0 and pool.free_ids() == list(range(16))


@pytest.mark.parametrize("refused, released", [(False, False), (True, True)],
                         ids=["unreachable-keeps", "process-ended-releases"])
def test_only_a_p_known_gone_releases_without_its_word(monkeypatch, refused, released):
    sched, _ = scheduler()
    pool = lease_ends(sched, monkeypatch)
    sched.client.health.append(HealthReport(P, ok=False, refused=refused, at=time.monotonic() + 1))
    sched.build_meta(None)
    assert (sched.stats()["held_requests"] == 0) is released
    assert (pool.free_ids() == list(range(16))) is released


def test_refusal_seen_before_the_hold_does_not_release(monkeypatch):
    sched, _ = scheduler()
    lease_ends(sched, monkeypatch)
    sched.client.health.append(HealthReport(P, ok=False, refused=True, at=time.monotonic() - 5))
    sched.build_meta(None)
    assert sched.stats()["held_requests"] == 1


def test_p_gone_gives_up_at_once_without_holding():
    sched, pool = scheduler()
    pool.alloc(BLOCKS)
    go_remote(sched, request("r", 100), block_ids=BLOCKS)
    sched.client.results.append(PrefillResult("r", P, False, error="reset", p_gone=True))
    assert sched.build_meta(None).give_up == ["r"]  # well before the lease's end
    assert sched.stats()["held_total"] == 0
    assert sched.stats()["prefills"][P]["breaker_open"]  # no next request goes to the dead P


def test_notification_seen_before_the_lease_end_means_nothing_to_hold(monkeypatch):
    """vLLM may build the next step before it hands over the last one's output: P's notification
    can reach the scheduler after the give-up was decided, or before it."""
    sched, pool = scheduler()
    pool.alloc(BLOCKS)
    go_remote(sched, request("r", 100), block_ids=BLOCKS)
    sched.update_connector_output(Transfers(notified={"r": 1}))
    lease_end = sched._requests["r"].lease_end
    monkeypatch.setattr(time, "monotonic", lambda: lease_end + 0.1)
    sched.build_meta(None)
    assert sched.stats()["held_total"] == 0


def test_p_answer_to_the_release_question_releases(monkeypatch):
    from pdpush.rpc.prefill_client import ReleaseAnswer

    sched, _ = scheduler()
    pool = lease_ends(sched, monkeypatch)
    assert sched.client.asked == [(P, "r")] and sched.has_pending()  # D keeps stepping
    sched.build_meta(None)
    assert sched.client.asked == [(P, "r")]  # asked once per health interval
    sched.client.results.append(ReleaseAnswer("r", P, released=False))  # a push still outstanding
    sched.build_meta(None)
    assert sched.stats()["held_requests"] == 1
    sched.client.results.append(ReleaseAnswer("r", P, released=True))
    sched.build_meta(None)
    assert sched.stats()["held_released_answered"] == 1 and pool.free_ids() == list(range(16))
    assert not sched.has_pending()


def test_p_gone_ends_the_wait_of_an_aborted_request():
    sched, pool = scheduler()
    pool.alloc(BLOCKS)
    req = request("r", 100)
    go_remote(sched, req, block_ids=BLOCKS)
    assert sched.request_finished(req) == (True, None)  # client abort: blocks kept, call cancelled
    sched.client.health.append(HealthReport(P, ok=False, refused=False))
    assert sched.build_meta(None).give_up == []  # unreachable is not gone
    sched.client.health.append(HealthReport(P, ok=False, refused=True))
    assert sched.build_meta(None).give_up == ["r"]
    assert sched.stats()["held_total"] == 0
