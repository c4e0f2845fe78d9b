"""A WRITE in flight when D's lease ends must never land in a block D handed to someone else.

P's worker and D's scheduler + worker in one process, real NIXL agents, CPU tensors. P is
stopped by the fault seam (connector/faults.py) on its transfer thread with a WRITE decided but
not yet posted; D's lease passes; D gives the request up and reuses every block it may (a canary
pattern written into each); P resumes and its late WRITE goes out. The canary must be intact.
The control runs the same with D's block hold turned off (how D behaved before the quarantine):
there the late WRITE overwrites the canary, which shows the test catches the fault.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace as NS

import pytest
from connector_fakes import FakeClient, request
from connector_pool import RefPool

torch = pytest.importorskip("torch")
pytest.importorskip("nixl")

from test_connector_push_workers import BLOCKS, BS, LAYERS, caches, connect, run_step  # noqa: E402

from pdpush.connector.config import PdpushConfig  # noqa: E402
from pdpush.connector.decode_scheduler import DecodeScheduler  # noqa: E402
from pdpush.connector.decode_worker import DecodeWorker  # noqa: E402
from pdpush.connector.faults import FaultHooks  # noqa: E402
from pdpush.connector.metadata import PrefillStepMeta, PushTarget, PushTask  # noqa: E402
from pdpush.connector.prefill_worker import PrefillWorker  # noqa: E402
from pdpush.local.cluster import free_port  # noqa: E402

CANARY = 7.0
D_BLOCKS = [1, 2, 3]


@pytest.fixture
def rig(tmp_path, monkeypatch):
    monkeypatch.setenv("PDPUSH_FAULT_HOOKS", "1")
    port = free_port()
    d_cfg = PdpushConfig(side_channel_port=port, prefill_urls=("http://p",),
                         remote_threshold_tokens=1, prefill_timeout_s=1.0, lease_grace_s=0.0)
    # P's own prefill_timeout_s bounds how long its step waits for the transfer thread.
    p_cfg = PdpushConfig(side_channel_port=port, push_stop_margin_s=0.5,
                         fault_hooks_dir=str(tmp_path))
    d = DecodeWorker(d_cfg, "d-engine", rank=0, num_blocks=BLOCKS)
    p = PrefillWorker(p_cfg, "p-engine", rank=0, num_blocks=BLOCKS)
    d_kv, p_kv = caches(False), caches(True)
    d.register_kv_caches(d_kv)
    p.register_kv_caches(p_kv)
    connect(p, d, port)
    yield NS(d=d, p=p, d_kv=d_kv, p_kv=p_kv, d_cfg=d_cfg, faults=FaultHooks(str(tmp_path)))
    p.close()
    d.close()


def remote_request(sched: DecodeScheduler, pool: RefPool) -> PushTarget:
    n = len(D_BLOCKS) * BS
    req = request("r", n)
    assert sched.get_num_new_matched_tokens(req, 0) == (n, True)
    pool.alloc(D_BLOCKS)
    sched.update_state_after_alloc(req, D_BLOCKS, n)
    return PushTarget.from_params(sched.client.jobs[0].kv_transfer_params)


def d_step(rig, sched: DecodeScheduler):
    rig.d.bind(sched.build_meta(None))
    transfers = rig.d.transfer_results(set())
    sched.update_connector_output(transfers)
    return transfers


@pytest.mark.parametrize("quarantine", [True, False], ids=["held", "control-no-hold"])
def test_late_write_never_lands_in_a_reused_block(rig, quarantine):
    pool = RefPool(BLOCKS, quarantine)
    sched = DecodeScheduler(rig.d_cfg, BS, "d-engine", client=FakeClient())
    sched.bind_blocks(pool)
    target = remote_request(sched, pool)
    task = PushTask("p1", target, [0, 1, 2], D_BLOCKS, last=True,
                    post_until=time.monotonic() + target.budget_s - 0.5)
    rig.faults.arm("between_layers")  # layer 0 goes out; P stops before posting layer 1
    p_step = threading.Thread(target=run_step, args=(rig.p, rig.p_kv, PrefillStepMeta(tasks=[task])))
    p_step.start()
    rig.faults.wait_hit("between_layers", timeout_s=10)

    d_step(rig, sched)  # the workers expect r
    time.sleep(target.budget_s + 0.1)  # D's lease (budget + grace 0) passes without P's word
    assert "r" in d_step(rig, sched).failed  # given up: vLLM recomputes r in new blocks
    pool.free(D_BLOCKS)  # ... and frees r's blocks
    reused = pool.free_ids()
    pool.alloc(reused)  # D hands every block it may to other requests, which fill them
    for name in LAYERS:
        rig.d_kv[name][reused] = CANARY

    rig.faults.release("between_layers")  # P resumes: its decided WRITE goes out now
    p_step.join(timeout=30)
    end = time.monotonic() + 20
    while sched.quarantine.stats()["held_requests"] and time.monotonic() < end:
        rig.p.transfer_results({"p1"})
        d_step(rig, sched)
    late = [(n, b) for n in LAYERS for b in reused if not (rig.d_kv[n][b] == CANARY).all()]
    if quarantine:
        assert not set(D_BLOCKS) & set(reused)
        assert late == []  # the canary: every reused block unchanged after P resumed
        assert sched.quarantine.stats() == {**sched.quarantine.stats(), "held_requests": 0,
                                            "held_total": 1, "held_released_confirmed": 1}
        pool.free(reused)
        assert pool.free_ids() == list(range(BLOCKS))  # nothing leaked once P confirmed
    else:
        assert set(D_BLOCKS) <= set(reused)
        assert late, "the late WRITE did not land: the test could not catch the fault"
