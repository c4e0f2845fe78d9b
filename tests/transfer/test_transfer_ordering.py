"""ARCHITECTURE section 3 ordering logic with CUDA absent: fake events whose completion a slow
"kernel" thread controls, and a fake cuda-python runtime for the receiver's flush rule."""

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
        return SimpleNamespace(synchronize=lambda: self.finished.wait(5))

    def join(self):
        self._thread.join()


def push_layers(use_event: bool, layers: int = 4, threads: int = 1) -> list[list[int]]:
    """Each layer: a slow write to its buffer, then a "WRITE" that snapshots the buffer."""
    bufs = [[0] * 8 for _ in range(layers)]
    poster = OrderedPoster(lambda job: (job.layer, list(bufs[job.layer])), threads=threads)
    kernels = []
    for layer in range(layers):
        kernel = SlowKernel(bufs[layer], value=layer + 1, delay_s=0.05)
        kernels.append(kernel)
        poster.submit(kernel.event() if use_event else None, LayerJob(layer, []))
    sent = poster.drain(timeout_s=10)
    poster.close()
    for kernel in kernels:
        kernel.join()
    assert [layer for layer, _ in sent] == list(range(layers))  # returned in submit order
    return [snapshot for _, snapshot in sent]


@pytest.mark.parametrize("threads", [1, 3])
def test_event_rule_never_sends_stale_data(threads):
    for _ in range(5):
        for layer, snapshot in enumerate(push_layers(use_event=True, threads=threads)):
            assert snapshot == [layer + 1] * 8


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
