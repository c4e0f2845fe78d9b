"""Memory ordering around a GPU-Direct WRITE, following the rules of NVIDIA's GPUDirect RDMA
documentation, section "Synchronization and Memory Ordering".

Sender rule: the NIC (or cuda_ipc copy) may read a layer's KV only after the kernel that wrote
it finished. Record a CUDA event on the compute stream right after the layer's KV write and hand
it to an `OrderedPoster`; its transfer thread waits on that event (never on the compute stream)
and only then posts the WRITE. Compute runs on; posting overlaps it.

    poster = OrderedPoster(lambda job: engine.write(peer, job.runs, local=..., remote=...),
                           combine=LayerJob.merge)      # layers already ready: one WRITE
    ev = torch.cuda.Event(); ev.record()              # after layer l's KV write, compute stream
    poster.submit(ev, LayerJob(l, runs))              # event None where there is no GPU (CPU)
    transfers = poster.drain(timeout_s=30)            # the posted Transfers, in submit order
    poster.close()

Receiver rule: a kernel may read written blocks only after the WRITE completed and, where the
device attribute `cudaDevAttrGPUDirectRDMAWritesOrdering` is NONE (0), after
`cudaDeviceFlushGPUDirectRDMAWrites(CurrentDevice, ToOwner)`. OWNER (100; the H200 reads this)
and ALL_DEVICES (200) already order the writes for the owning device: the flush is skipped.

    fence = ReceiveFence.for_device(d)     # reads the attribute once (cuda.bindings.runtime)
    fence.after_writes()                   # call once the WRITE / its notification arrived
    fence.ordering, fence.needs_flush      # what was read and decided, for logs and reports

`delay_stream(us)` enqueues a GPU sleep on the current stream: tests of the sender rule use it to
keep a layer's KV write pending while its WRITE could already be posted.

`ReceiveFence.for_device(None)` is the CPU fence (no GPU, nothing to flush). Both classes take
their CUDA objects as arguments so the logic is tested without CUDA.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generic, Protocol, TypeVar

ORDERING_NONE = 0
ORDERING_OWNER = 100
ORDERING_ALL_DEVICES = 200

# torch.cuda._sleep counts SM clock cycles: 1980 per µs at the H200's 1.98 GHz boost clock (a
# lower clock sleeps longer, which only makes a delay meant to expose a race longer).
SLEEP_CYCLES_PER_US = 1980

_NOTHING = object()  # "no item carried over" (None is the stop sentinel)

J = TypeVar("J")
R = TypeVar("R")


class Event(Protocol):
    """What the poster needs from a CUDA event (torch.cuda.Event fits)."""

    def synchronize(self) -> None: ...
    def query(self) -> bool: ...


class CudaRuntime(Protocol):
    """The slice of `cuda.bindings.runtime` the fence uses (calls return (err, *values))."""

    cudaDeviceAttr: Any
    cudaFlushGPUDirectRDMAWritesTarget: Any
    cudaFlushGPUDirectRDMAWritesScope: Any

    def cudaDeviceGetAttribute(self, attr: Any, device: int) -> tuple[Any, int]: ...
    def cudaSetDevice(self, device: int) -> tuple[Any]: ...
    def cudaDeviceFlushGPUDirectRDMAWrites(self, target: Any, scope: Any) -> tuple[Any]: ...


@dataclass(frozen=True)
class LayerJob:
    """A layer's byte runs waiting for their event (a convenient job type for the poster)."""

    layer: int
    runs: list
    layers: int = 1  # how many layers a merged job carries

    @staticmethod
    def merge(jobs: list[LayerJob]) -> LayerJob:
        """One job for several ready layers: one WRITE instead of one per layer."""
        runs = [r for job in jobs for r in job.runs]
        return LayerJob(jobs[0].layer, runs, sum(job.layers for job in jobs))


class OrderedPoster(Generic[J, R]):
    """Transfer thread(s) that call `post(job)` for each job only after the job's event fired.

    With one thread (the default) jobs are posted in submit order; with `threads` > 1 several
    jobs may be posted at once (NIXL releases the GIL while posting), still each only after its
    own event. `drain` returns results in submit order and re-raises the first exception.
    An event of None means "already complete" (CPU, or data written earlier).

    `combine` (e.g. `LayerJob.merge`): when jobs queue up behind a post because layers finish
    faster than WRITEs are posted, a thread takes every queued job whose event already fired
    (up to `max_batch`) and posts them as one; each merged job's result slot gets that one
    result. Layers that arrive slower than posting are still posted one by one, so batching adds
    no latency; it only removes the per-WRITE overhead once posting is the bottleneck.
    """

    def __init__(self, post: Callable[[J], R], name: str = "pdpush-post", threads: int = 1,
                 combine: Callable[[list[J]], J] | None = None, max_batch: int = 16):
        if threads < 1 or max_batch < 1:
            raise ValueError("a poster needs at least one thread and a batch of at least one")
        self._post = post
        self._combine = combine
        self._max_batch = max_batch if combine else 1
        self._jobs: queue.Queue[tuple[int, Event | None, J] | None] = queue.Queue()
        self._results: dict[int, R] = {}
        self._error: BaseException | None = None
        self._submitted = self._finished = 0
        self._cv = threading.Condition()
        self._threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                         for i in range(threads)]
        for t in self._threads:
            t.start()

    def submit(self, event: Event | None, job: J) -> None:
        """Queue `job`; it is posted once `event` completed. Never blocks the caller."""
        if not self._threads[0].is_alive():
            raise RuntimeError("poster is closed")
        with self._cv:
            seq = self._submitted
            self._submitted += 1
        self._jobs.put((seq, event, job))

    def drain(self, timeout_s: float = 30.0) -> list[R]:
        """Wait until every submitted job was posted; return and forget their results."""
        deadline = time.monotonic() + timeout_s
        with self._cv:
            while self._finished < self._submitted:
                left = deadline - time.monotonic()
                if left <= 0:
                    pending = self._submitted - self._finished
                    raise TimeoutError(f"{pending} jobs not posted after {timeout_s}s")
                self._cv.wait(left)
            out = [self._results[k] for k in sorted(self._results)]
            self._results = {}
            if self._error is not None:
                err, self._error = self._error, None
                raise err
            return out

    def close(self) -> None:
        """Stop the threads after the jobs already queued."""
        if self._threads[0].is_alive():
            for _ in self._threads:
                self._jobs.put(None)
            for t in self._threads:
                t.join()

    def _loop(self) -> None:
        carried: Any = _NOTHING
        while (item := self._jobs.get() if carried is _NOTHING else carried) is not None:
            carried = _NOTHING
            seq, event, job = item
            seqs, jobs = [seq], [job]
            try:
                if event is not None:
                    event.synchronize()  # this thread waits; the compute stream does not
                carried = self._take_ready(seqs, jobs)
                result = self._post(self._combine(jobs) if len(jobs) > 1 else job)
            except BaseException as exc:  # reported to the caller through drain()
                with self._cv:
                    self._error = self._error or exc
                    self._finished += len(seqs)
                    self._cv.notify_all()
                continue
            with self._cv:
                for k in seqs:
                    self._results[k] = result
                self._finished += len(seqs)
                self._cv.notify_all()

    def _take_ready(self, seqs: list[int], jobs: list) -> Any:
        """Add queued jobs whose events already fired; return the first item taken but not
        ready (a job, or the stop sentinel None) for the caller to handle next, else _NOTHING."""
        while len(jobs) < self._max_batch:
            try:
                item = self._jobs.get_nowait()
            except queue.Empty:
                return _NOTHING
            if item is None or (item[1] is not None and not item[1].query()):
                return item
            seqs.append(item[0])
            jobs.append(item[2])
        return _NOTHING


def delay_stream(us: float) -> None:
    """Enqueue a kernel that spins about `us` µs on the current CUDA stream, so that every kernel
    enqueued after it on that stream (e.g. the next layer's KV write) starts that much later."""
    import torch

    torch.cuda._sleep(int(us * SLEEP_CYCLES_PER_US))


class ReceiveFence:
    """D-side rule: flush inbound GPU-Direct writes only where the device does not order them."""

    def __init__(self, device: int | None, runtime: CudaRuntime | None):
        if (device is None) != (runtime is None):
            raise ValueError("give both a device and a CUDA runtime, or neither (CPU)")
        self.device = device
        self._rt = runtime
        self.ordering = ORDERING_ALL_DEVICES if runtime is None else self._read_ordering()
        self.flushes = 0

    @classmethod
    def for_device(cls, device: int | None) -> ReceiveFence:
        """The fence for CUDA device `device` (None: CPU), using cuda-python's runtime."""
        if device is None:
            return cls(None, None)
        from cuda.bindings import runtime

        return cls(device, runtime)

    @property
    def needs_flush(self) -> bool:
        """Flush iff the device's ordering scope is smaller than the owner's (i.e. NONE)."""
        return self.ordering < ORDERING_OWNER

    def after_writes(self) -> bool:
        """Make completed writes visible to kernels on the device; True when it flushed."""
        if not self.needs_flush:
            return False
        rt = self._rt
        _check(rt.cudaSetDevice(self.device), "cudaSetDevice")
        _check(
            rt.cudaDeviceFlushGPUDirectRDMAWrites(
                rt.cudaFlushGPUDirectRDMAWritesTarget.cudaFlushGPUDirectRDMAWritesTargetCurrentDevice,
                rt.cudaFlushGPUDirectRDMAWritesScope.cudaFlushGPUDirectRDMAWritesToOwner,
            ),
            "cudaDeviceFlushGPUDirectRDMAWrites",
        )
        self.flushes += 1
        return True

    def _read_ordering(self) -> int:
        rt = self._rt
        attr = rt.cudaDeviceAttr.cudaDevAttrGPUDirectRDMAWritesOrdering
        return int(_check(rt.cudaDeviceGetAttribute(attr, self.device), "cudaDeviceGetAttribute"))


def _check(result: tuple, what: str) -> Any:
    """cuda-python returns (err, *values); raise on a non-zero error, return the value."""
    err, *values = result
    if getattr(err, "value", err) != 0:
        raise RuntimeError(f"{what} failed: {err}")
    return values[0] if values else None
