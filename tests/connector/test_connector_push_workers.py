"""P's and D's worker halves in one process with real NIXL agents and CPU tensors (no vLLM).

The caches have vLLM's CPU layout `(num_blocks, 2, block_size, heads*dim)`. P pushes layer by
layer into D's blocks as its scheduler would ask; D must see exactly P's bytes in the target
blocks, nothing elsewhere, and a completion (or failure) notification.
"""

from __future__ import annotations

import dataclasses
import socket
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


def connect(p: PrefillWorker, d: DecodeWorker, port: int, engine: str = "d-engine") -> None:
    """P connects to D in the background (peer_links.py): tests that time P's first pushes
    start from a connected P, as a P that already served that D would be."""
    t = PushTarget("warm-up", engine, f"127.0.0.1:{port}", (), 0, BS, 30.0)
    deadline = time.monotonic() + 10
    while p.links.lookup(t).pending and time.monotonic() < deadline:
        d.transfer_results(set())
    assert not p.links.lookup(t).error


def run_step(p: PrefillWorker, p_kv: dict, meta: PrefillStepMeta) -> None:
    """One P step as vLLM drives it: bind, the forward's save_kv_layer per layer, wait_for_save."""
    p.bind(meta)
    for name in LAYERS:
        p.save_kv_layer(name, p_kv[name])
    p.wait_for_save()


def settle(d: DecodeWorker, p: PrefillWorker, t: PushTarget, p_req: str) -> tuple[set, set, set]:
    """Poll both sides (as their steps would) until D reports t's request and P releases p_req:
    (received, failed, failed D blocks)."""
    req = t.d_req_id
    d.bind(DecodeStepMeta(expect={req: list(t.d_block_ids)}))
    done, failed, bad_blocks, released = set(), set(), set(), set()
    deadline = time.monotonic() + 20
    while (req not in done or p_req not in released) and time.monotonic() < deadline:
        released |= p.transfer_results({p_req}).sent
        got = d.transfer_results(set())
        done, failed, bad_blocks = (done | got.received, failed | got.failed,
                                    bad_blocks | got.failed_blocks)
    assert req in done and p_req in released, (done, released)
    return done, failed, bad_blocks


def test_chunked_push_lands_exactly_in_d_blocks(pair):
    d, p, d_kv, p_kv, port = pair
    t = target(port, "r1", [7, 8, 2])
    run_step(p, p_kv, PrefillStepMeta(tasks=[PushTask("p1", t, [0, 1], [7, 8], last=False)]))
    run_step(p, p_kv, PrefillStepMeta(tasks=[PushTask("p1", t, [5], [2], last=True)]))
    _, failed, bad_blocks = settle(d, p, t, "p1")
    assert failed == set() and bad_blocks == set()
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
    _, failed, bad_blocks = settle(d, p, t, "p2")
    assert failed == {"r2"} and bad_blocks == {10}  # blocks: how vLLM 0.26 learns of it
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
    settle(d, p, t, "p6")
    assert all(torch.equal(d_kv[n][9], p_kv[n][7]) and torch.equal(d_kv[n][6], p_kv[n][8])
               for n in LAYERS)


def test_request_stopped_midway_tells_d(pair):
    d, p, d_kv, p_kv, port = pair
    t = target(port, "r3", [4, 5])
    run_step(p, p_kv, PrefillStepMeta(tasks=[PushTask("p3", t, [6], [4], last=False)]))
    run_step(p, p_kv, PrefillStepMeta(stopped={"p3": t}))
    _, failed, bad_blocks = settle(d, p, t, "p3")
    assert failed == {"r3"} and bad_blocks == {4, 5}


def released_within(p: PrefillWorker, p_req: str, seconds: float) -> bool:
    """The connection to D is made in the background: poll P's steps' results for a while."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if p_req in p.transfer_results({p_req}).sent:
            return True
        time.sleep(0.01)
    return False


def test_unreachable_d_stops_the_push_without_crashing_p(pair):
    _, p, _, p_kv, _ = pair
    t = target(free_port(), "r4", [1])
    run_step(p, p_kv, PrefillStepMeta(tasks=[PushTask("p4", t, [2], [1], last=True)]))
    assert released_within(p, "p4", 2.0)  # nothing in flight: released once the connect failed


def test_a_silent_d_does_not_block_p_steps(pair):
    """A side channel that accepts but never answers: P's step goes on, the connect times out."""
    _, p, _, p_kv, _ = pair
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        t = target(silent.getsockname()[1], "r9", [1])
        started = time.monotonic()
        run_step(p, p_kv, PrefillStepMeta(tasks=[PushTask("p9", t, [2], [1], last=True)]))
        assert p.transfer_results({"p9"}).sent == set()  # still connecting, the step did not wait
        assert time.monotonic() - started < 1.0
        assert released_within(p, "p9", p.config.side_channel_timeout_s + 3)


class HeldEvent:
    """Stands in for torch.cuda.Event: the layer's "kernels" finish only when the test says so."""

    made: list["HeldEvent"] = []
    log: list[str] = []  # what the layer path did on the "forward stream", in order

    def __init__(self) -> None:
        self.recorded = False
        self._done = threading.Event()
        HeldEvent.made.append(self)

    def record(self) -> None:
        self.recorded = True
        HeldEvent.log.append("record")

    def query(self) -> bool:
        return self._done.is_set()

    def synchronize(self) -> None:
        assert self.recorded, "waited on an event that was never recorded"
        self._done.wait(20)

    def finish(self) -> None:
        self._done.set()


CUDA_LAYER = type("CudaLayer", (), {"is_cuda": True})()  # only is_cuda matters to the worker


@pytest.fixture
def held(pair, monkeypatch):
    """Events the test completes, the GPU delay logged instead of run, and every WRITE P posts
    recorded with how many layer events had completed at that moment."""
    p = pair[1]
    HeldEvent.made, HeldEvent.log, posted = [], [], []
    monkeypatch.setattr(torch.cuda, "Event", HeldEvent)
    monkeypatch.setattr("pdpush.connector.prefill_worker.delay_stream",
                        lambda us: HeldEvent.log.append(f"delay {us}"))
    real_write = p.engine.write

    def write(*args, **kwargs):
        posted.append(sum(e.query() for e in HeldEvent.made))
        return real_write(*args, **kwargs)

    monkeypatch.setattr(p.engine, "write", write)
    yield posted
    for event in HeldEvent.made:  # never leave P's transfer thread waiting
        event.finish()


def push_cuda_layers(pair, monkeypatch, req: str, d_block: int, **debug) -> None:
    """bind + save_kv_layer of every layer as a CUDA forward would call them (not waiting)."""
    _, p, _, _, port = pair
    monkeypatch.setattr(p, "config", dataclasses.replace(p.config, **debug))
    t = target(port, req, [d_block])
    p.bind(PrefillStepMeta(tasks=[PushTask("p" + req, t, [4], [d_block], last=True)]))
    for name in LAYERS:
        p.save_kv_layer(name, CUDA_LAYER)


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def finish_push(pair, req: str, d_block: int) -> None:
    d, p, d_kv, p_kv, _ = pair
    p.wait_for_save()
    settle(d, p, target(0, req, [d_block]), "p" + req)  # only the id and blocks are read
    assert all(torch.equal(d_kv[name][d_block], p_kv[name][4]) for name in LAYERS)


def test_cuda_layer_is_posted_only_after_its_event_completed(pair, held, monkeypatch):
    push_cuda_layers(pair, monkeypatch, "r5", 11, debug_delay_layer_us=250)
    time.sleep(0.3)  # ample time for P's transfer thread to post, were it not waiting
    assert held == [], "a WRITE was posted before its layer's kernels finished"
    for layer, event in enumerate(HeldEvent.made):
        event.finish()
        wait_for(lambda: len(held) > layer)
        time.sleep(0.02)
        assert held == list(range(1, layer + 2)), "each layer waits for its own event only"
    finish_push(pair, "r5", 11)
    # the GPU delay comes after the layer's event: it holds back the next layer, not this one
    assert HeldEvent.log == ["record", "delay 250"] * len(LAYERS)


def test_control_skipping_the_event_posts_before_the_kernels_finished(pair, held, monkeypatch):
    """The control of the test above: with the sender rule switched off (test-only setting) the
    same observation catches WRITEs posted while no layer's event had completed."""
    push_cuda_layers(pair, monkeypatch, "r7", 3, debug_skip_layer_event=True,
                     debug_delay_layer_us=250)
    wait_for(lambda: len(held) == len(LAYERS))
    assert held == [0] * len(LAYERS)
    assert len(HeldEvent.made) == len(LAYERS), "the event is still recorded, only not waited for"
    finish_push(pair, "r7", 3)
