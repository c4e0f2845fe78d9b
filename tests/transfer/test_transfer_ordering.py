"""The memory-ordering rules (docs/architecture.md, "Memory ordering") with CUDA absent: fake
events whose completion a slow "kernel" thread controls, and a fake cuda-python runtime for the
receiver's flush rule."""

import threading
import time
from types import SimpleNamespace

import pytest

from pdpush.transfer.ordering import (
    ORDERING_ALL_DEVICES,
    ORDERING_NONE,
    ORDERING_OWNER,
    LayerJob,
    OrderedPoster,
    ReceiveFence,
)


class SlowKernel:
    """Writes `value` into `buf` after `delay_s` on its own thread, like an async GPU kernel."""

    def __init__(self, buf: list, value: int, delay_s: float):
        self.finished = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(buf, value, delay_s))
        self._thread.start()

    def _run(self, buf, value, delay_s):
        time.sleep(delay_s)
        buf[:] = [value] * len(buf)
        self.finished.set()

    def event(self):
        """A recorded CUDA event: synchronize() returns once the kernel completed."""
        return SimpleNamespace(synchronize=lambda: self.finished.wait(5),
                               query=self.finished.is_set)

    def join(self):
        self._thread.join()


def push_layers(use_event: bool, layers: int = 4, threads: int = 1,
                combine=None) -> list[list[int]]:
    """Each layer: a slow write to its buffer, then a "WRITE" that snapshots the buffer."""
    bufs = [[0] * 8 for _ in range(layers)]

    def post(job):
        return (job.layer, [list(bufs[layer]) for layer in job.runs])

    poster = OrderedPoster(post, threads=threads, combine=combine)
    kernels = []
    for layer in range(layers):
        kernel = SlowKernel(bufs[layer], value=layer + 1, delay_s=0.05)
        kernels.append(kernel)
        poster.submit(kernel.event() if use_event else None, LayerJob(layer, [layer]))
    sent = poster.drain(timeout_s=10)
    poster.close()
    for kernel in kernels:
        kernel.join()
    assert len(sent) == layers
    # each layer's slot holds the WRITE that carried it; its snapshot of that layer's buffer
    return [dict(zip(runs_of(sent[i]), snaps))[i] for i, (_, snaps) in enumerate(sent)]


def runs_of(result):
    first_layer, snaps = result
    return range(first_layer, first_layer + len(snaps))


@pytest.mark.parametrize("threads,combine", [(1, None), (3, None), (1, LayerJob.merge)])
def test_event_rule_never_sends_stale_data(threads, combine):
    for _ in range(5):
        sent = push_layers(use_event=True, threads=threads, combine=combine)
        for layer, snapshot in enumerate(sent):
            assert snapshot == [layer + 1] * 8


def test_ready_jobs_are_merged_and_unready_ones_wait():
    posted = []
    poster = OrderedPoster(lambda job: posted.append(job) or job, combine=LayerJob.merge)
    gate, later = threading.Event(), threading.Event()
    poster.submit(SimpleNamespace(synchronize=gate.wait, query=gate.is_set), LayerJob(0, ["a"]))
    poster.submit(None, LayerJob(1, ["b"]))
    poster.submit(None, LayerJob(2, ["c"]))
    poster.submit(SimpleNamespace(synchronize=later.wait, query=later.is_set), LayerJob(3, ["d"]))
    poster.submit(None, LayerJob(4, ["e"]))
    gate.set()
    time.sleep(0.1)
    later.set()
    results = poster.drain(timeout_s=5)
    poster.close()
    assert [(j.layer, j.layers) for j in posted] == [(0, 3), (3, 2)]
    assert results[0] is results[1] is results[2] and results[3] is results[4]


def test_without_event_rule_stale_data_is_caught():
    """The control: posting before the kernel finished ships zeros, so the check above can fail."""
    assert any(snapshot == [0] * 8 for snapshot in push_layers(use_event=False))


def test_submit_does_not_block_the_caller():
    gate = threading.Event()
    poster = OrderedPoster(lambda job: job)
    t0 = time.perf_counter()
    poster.submit(SimpleNamespace(synchronize=gate.wait), "a")
    assert time.perf_counter() - t0 < 0.05
    with pytest.raises(TimeoutError):
        poster.drain(timeout_s=0.05)
    gate.set()
    assert poster.drain(timeout_s=5) == ["a"]
    poster.close()
    with pytest.raises(RuntimeError, match="closed"):
        poster.submit(None, "b")


def test_post_errors_reach_drain():
    def post(job):
        if job == "bad":
            raise ValueError("boom")
        return job

    poster = OrderedPoster(post)
    for job in ("a", "bad", "c"):
        poster.submit(None, job)
    with pytest.raises(ValueError, match="boom"):
        poster.drain(timeout_s=5)
    poster.submit(None, "d")  # usable after an error
    assert poster.drain(timeout_s=5) == ["d"]
    poster.close()
    with pytest.raises(ValueError):
        OrderedPoster(post, threads=0)


class FakeRuntime:
    """The slice of cuda.bindings.runtime the fence calls; records flushes."""

    OK = SimpleNamespace(value=0)

    def __init__(self, ordering: int, fail_flush: bool = False):
        self.ordering = ordering
        self.fail_flush = fail_flush
        self.calls: list[tuple] = []
        self.cudaDeviceAttr = SimpleNamespace(cudaDevAttrGPUDirectRDMAWritesOrdering="ORD")
        self.cudaFlushGPUDirectRDMAWritesTarget = SimpleNamespace(
            cudaFlushGPUDirectRDMAWritesTargetCurrentDevice="CUR")
        self.cudaFlushGPUDirectRDMAWritesScope = SimpleNamespace(
            cudaFlushGPUDirectRDMAWritesToOwner="OWNER")

    def cudaDeviceGetAttribute(self, attr, device):
        self.calls.append(("attr", attr, device))
        return self.OK, self.ordering

    def cudaSetDevice(self, device):
        self.calls.append(("set", device))
        return (self.OK,)

    def cudaDeviceFlushGPUDirectRDMAWrites(self, target, scope):
        self.calls.append(("flush", target, scope))
        return (SimpleNamespace(value=1 if self.fail_flush else 0),)


def test_flush_when_ordering_is_none():
    rt = FakeRuntime(ORDERING_NONE)
    fence = ReceiveFence(3, rt)
    assert fence.needs_flush and fence.after_writes() and fence.flushes == 1
    assert rt.calls == [("attr", "ORD", 3), ("set", 3), ("flush", "CUR", "OWNER")]


@pytest.mark.parametrize("ordering", [ORDERING_OWNER, ORDERING_ALL_DEVICES])
def test_no_flush_when_device_orders_writes(ordering):
    rt = FakeRuntime(ordering)
    fence = ReceiveFence(0, rt)
    assert not fence.needs_flush and not fence.after_writes()
    assert [c[0] for c in rt.calls] == ["attr"]


def test_cpu_fence_and_errors():
    fence = ReceiveFence.for_device(None)
    assert not fence.after_writes() and fence.flushes == 0
    with pytest.raises(ValueError):
        ReceiveFence(0, None)
    with pytest.raises(RuntimeError, match="cudaDeviceFlushGPUDirectRDMAWrites"):
        ReceiveFence(0, FakeRuntime(ORDERING_NONE, fail_flush=True)).after_writes()
