"""P's and D's worker halves in one process with real NIXL agents and CPU tensors (no vLLM).

The caches have vLLM's CPU layout `(num_blocks, 2, block_size, heads*dim)`. P pushes layer by
layer into D's blocks as its scheduler would ask; D must see exactly P's bytes in the target
blocks, nothing elsewhere, and a completion (or failure) notification.
"""

from __future__ import annotations

import threading
import time

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nixl")

from pdpush.local.cluster import free_port  # noqa: E402
from pdpush.connector.config import PdpushConfig  # noqa: E402
from pdpush.connector.decode_worker import DecodeWorker  # noqa: E402
from pdpush.connector.metadata import (  # noqa: E402
    DecodeStepMeta, PrefillStepMeta, PushTarget, PushTask,
)
from pdpush.connector.prefill_worker import PrefillWorker  # noqa: E402

BLOCKS, BS, WIDTH, LAYERS = 12, 4, 8, ["l0", "l1", "l2"]


def caches(fill: bool) -> dict:
    gen = torch.Generator().manual_seed(1)
    return {name: (torch.randn(BLOCKS, 2, BS, WIDTH, generator=gen) if fill
                   else torch.zeros(BLOCKS, 2, BS, WIDTH)) for name in LAYERS}


@pytest.fixture(scope="module")
def pair():
    port = free_port()
    config = PdpushConfig(side_channel_port=port, prefill_urls=("http://p",))
    d = DecodeWorker(config, "d-engine", rank=0, num_blocks=BLOCKS)
    p = PrefillWorker(config, "p-engine", rank=0, num_blocks=BLOCKS)
    d_kv, p_kv = caches(False), caches(True)
    d.register_kv_caches(d_kv)
    p.register_kv_caches(p_kv)
    yield d, p, d_kv, p_kv, port
    p.close()
    d.close()


def target(port: int, req: str, d_blocks) -> PushTarget:
    return PushTarget(req, "d-engine", f"127.0.0.1:{port}", tuple(d_blocks), 0, BS, 30.0)


def run_step(p: PrefillWorker, p_kv: dict, meta: PrefillStepMeta) -> None:
    """One P step as vLLM drives it: bind, the forward's save_kv_layer per layer, wait_for_save."""
    p.bind(meta)
    for name in LAYERS:
        p.save_kv_layer(name, p_kv[name])
    p.wait_for_save()


def settle(d: DecodeWorker, p: PrefillWorker, req: str, p_req: str) -> tuple[set, set]:
    """Poll both sides (as their steps would) until D reports req and P releases p_req."""
    d.bind(DecodeStepMeta(expect=[req]))
    done, failed, released = set(), set(), set()
    deadline = time.monotonic() + 20
    while (req not in done or p_req not in released) and time.monotonic() < deadline:
        released |= p.transfer_results({p_req}).sent
        got = d.transfer_results(set())
        got, bad = got.received, got.failed
        done, failed = done | got, failed | bad
    assert req in done and p_req in released, (done, released)
    return done, failed


def test_chunked_push_lands_exactly_in_d_blocks(pair):
    d, p, d_kv, p_kv, port = pair
    t = target(port, "r1", [7, 8, 2])
    run_step(p, p_kv, PrefillStepMeta(tasks=[PushTask("p1", t, [0, 1], [7, 8], last=False)]))
    run_step(p, p_kv, PrefillStepMeta(tasks=[PushTask("p1", t, [5], [2], last=True)]))
    _, failed = settle(d, p, "r1", "p1")
    assert failed == set()
    for name in LAYERS:
        for src, dst in [(0, 7), (1, 8), (5, 2)]:
            assert torch.equal(d_kv[name][dst], p_kv[name][src]), (name, src, dst)
        untouched = [b for b in range(BLOCKS) if b not in (7, 8, 2)]
        assert not d_kv[name][untouched].any()
    assert d.rx_bytes == 3 * len(LAYERS) * 2 * BS * WIDTH * 4


def test_no_write_after_the_deadline_and_d_hears_it(pair):
    d, p, d_kv, p_kv, port = pair
    t = target(port, "r2", [10])
    spent = time.monotonic() - 1  # P's own clock says the budget is spent
    run_step(p, p_kv, PrefillStepMeta(tasks=[PushTask("p2", t, [3], [10], last=True, post_until=spent)]))
    _, failed = settle(d, p, "r2", "p2")
    assert failed == {"r2"}
    assert not any(d_kv[name][10].any() for name in LAYERS)


def test_preempted_request_has_no_write_in_flight_before_the_forward(pair):
    d, p, d_kv, p_kv, port = pair
    t = target(port, "r6", [9, 6])
    run_step(p, p_kv, PrefillStepMeta(tasks=[PushTask("p6", t, [7], [9], last=False)]))
    # D's engine steps (and so progresses its agent) while it waits for KV; here a thread does.
    stop = threading.Event()
    progress = threading.Thread(target=lambda: [d.engine.notifications() for _ in iter(
        lambda: stop.is_set(), True)])
    progress.start()
    try:
        p.finish_writes(["p6"])
    finally:
        stop.set()
        progress.join()
    assert p._out["p6"].transfers == []
    run_step(p, p_kv, PrefillStepMeta(tasks=[PushTask("p6", t, [8], [6], last=True)]))
    settle(d, p, "r6", "p6")
    assert all(torch.equal(d_kv[n][9], p_kv[n][7]) and torch.equal(d_kv[n][6], p_kv[n][8])
               for n in LAYERS)


def test_request_stopped_midway_tells_d(pair):
    d, p, d_kv, p_kv, port = pair
    t = target(port, "r3", [4, 5])
    run_step(p, p_kv, PrefillStepMeta(tasks=[PushTask("p3", t, [6], [4], last=False)]))
    run_step(p, p_kv, PrefillStepMeta(stopped={"p3": t}))
    _, failed = settle(d, p, "r3", "p3")
    assert failed == {"r3"}


def test_unreachable_d_stops_the_push_without_crashing_p(pair):
    _, p, _, p_kv, _ = pair
    t = target(free_port(), "r4", [1])
    run_step(p, p_kv, PrefillStepMeta(tasks=[PushTask("p4", t, [2], [1], last=True)]))
    assert p.transfer_results({"p4"}).sent == {"p4"}  # nothing in flight: released at once


class FakeCudaEvent:
    """Stands in for torch.cuda.Event: the sender rule is record on compute, wait before post."""

    made: list["FakeCudaEvent"] = []

    def __init__(self) -> None:
        self.recorded = self.synchronized = False
        FakeCudaEvent.made.append(self)

    def record(self) -> None:
        self.recorded = True

    def synchronize(self) -> None:
        assert self.recorded, "waited on an event that was never recorded"
        self.synchronized = True


def test_cuda_layers_are_posted_only_after_their_event(pair, monkeypatch):
    d, p, d_kv, p_kv, port = pair
    monkeypatch.setattr(torch.cuda, "Event", FakeCudaEvent)
    t = target(port, "r5", [11])
    p.bind(PrefillStepMeta(tasks=[PushTask("p5", t, [4], [11], last=True)]))
    for name in LAYERS:  # a CUDA layer as the connector sees it: only is_cuda matters here
        p.save_kv_layer(name, type("CudaLayer", (), {"is_cuda": True})())
    p.wait_for_save()
    settle(d, p, "r5", "p5")
    assert len(FakeCudaEvent.made) == len(LAYERS)
    assert all(e.recorded and e.synchronized for e in FakeCudaEvent.made)
    assert all(torch.equal(d_kv[name][11], p_kv[name][4]) for name in LAYERS)
