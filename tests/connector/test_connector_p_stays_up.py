"""A failure in P's push path fails that request's push (D is told and recomputes) and P serves
on: no exception reaches vLLM's forward, no busy wait (issue 10, item 7)."""

from __future__ import annotations

import dataclasses
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("nixl")

from test_connector_lease_canary import rig  # noqa: E402,F401  (the fixture)
from test_connector_push_workers import run_step, settle  # noqa: E402

from pdpush.connector.metadata import PrefillStepMeta, PushTarget, PushTask  # noqa: E402


def task(rig, req: str, d_block: int) -> PushTask:
    port = rig.d_cfg.side_channel_port
    target = PushTarget(req.upper(), "d-engine", f"127.0.0.1:{port}", (d_block,), 0, 4, 30.0)
    return PushTask(req, target, [d_block], [d_block], last=True)


def test_unexpected_error_posting_fails_only_that_push(rig, monkeypatch):
    real_write = rig.p.engine.write
    monkeypatch.setattr(rig.p.engine, "write", lambda *a, **k: 1 / 0)
    run_step(rig.p, rig.p_kv, PrefillStepMeta(tasks=[ta := task(rig, "a", 1)]))  # does not raise
    assert settle(rig.d, rig.p, ta.target, "a")[1] == {"A"}  # D hears: recompute
    monkeypatch.setattr(rig.p.engine, "write", real_write)
    run_step(rig.p, rig.p_kv, PrefillStepMeta(tasks=[tb := task(rig, "b", 2)]))
    assert settle(rig.d, rig.p, tb.target, "b")[1] == set()  # and the next push works


def test_stuck_transfer_thread_times_out_the_step_not_the_engine(rig):
    rig.p.config = dataclasses.replace(rig.p.config, prefill_timeout_s=0.5)
    rig.faults.arm("accepted")  # the transfer thread blocks before posting
    start, cpu = time.monotonic(), time.process_time()
    run_step(rig.p, rig.p_kv, PrefillStepMeta(tasks=[tc := task(rig, "c", 3)]))  # returns, no raise
    assert 0.5 <= time.monotonic() - start < 5
    rig.p.finish_writes(["c"])  # a preempted request whose job is still queued: waits, sleeping
    assert time.process_time() - cpu < 0.5 * (time.monotonic() - start)  # no busy spin
    assert rig.p.transfer_results({"c"}).sent == set()  # a job still queued: no notification yet
    rig.faults.release("accepted")
    assert settle(rig.d, rig.p, tc.target, "c")[1] == {"C"}
