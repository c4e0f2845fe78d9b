"""The P and D processes of the GPU harness. Each runs a command loop on a pipe; the suite
(`suite.py`) drives both. All data moves through `pdpush.transfer` (the connector's code).

P (`PushSide`) owns a KV cache, writes each layer's KV on its compute stream, and pushes it into
D's blocks layer by layer; D (`ReceiveSide`) owns the target KV cache, waits for P's
notification, applies the receive fence and compares every pushed byte; D also runs the decode
workload for the interference curve while P streams writes into other blocks.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections import deque
from typing import Any

import torch

from pdpush.bench.gpu.decode import QWEN2_7B, TINY, DecodeModel, StepTimer
from pdpush.bench.gpu.shapes import SHAPES, KVCaches, layer_content
from pdpush.transfer.engine import (DRAM, VRAM, EngineConfig, MemRegion, TransferEngine,
                                    TransferState)
from pdpush.transfer.layout import RunPlan, byte_runs, merge_adjacent
from pdpush.transfer.ordering import LayerJob, OrderedPoster, ReceiveFence, delay_stream

log = logging.getLogger("pdpush.bench.gpu")


def worker_main(role: str, conn: Any, gpu: int | None, engine_config: EngineConfig,
                post_threads: int = 1, batch_layers: bool = True) -> None:
    """Process entry: serve (command, kwargs) messages until None; reply ("ok"|"err", value)."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s {role} %(message)s")
    if role == "P":
        side: Side = PushSide(conn, gpu, engine_config, post_threads, batch_layers)
    else:
        side = ReceiveSide(conn, gpu, engine_config)
    try:
        while (msg := _next_message(conn, side.engine)) is not None:
            name, kwargs = msg
            try:
                conn.send(("ok", getattr(side, "cmd_" + name)(**kwargs)))
            except Exception:
                conn.send(("err", traceback.format_exc()))
    finally:
        side.close()


def _next_message(conn: Any, engine: TransferEngine) -> Any:
    """Wait for the next command, driving the engine meanwhile: with no progress thread an
    idle owner must still progress, or its last notification may never leave."""
    while not conn.poll(0.0005):
        engine.progress()
    return conn.recv()


def _unique(posted: list) -> list:
    """One entry per WRITE: the poster repeats a merged WRITE's result for each layer in it."""
    return list({id(x): (x, t) for x, t in posted}.values())


class Side:
    """What P and D share: device, engine, the KV cache of the current model shape."""

    role = "?"

    def __init__(self, conn: Any, gpu: int | None, engine_config: EngineConfig):
        self.conn = conn
        if gpu is None:
            self.device, self.place = torch.device("cpu"), DRAM
        else:
            torch.cuda.set_device(gpu)
            self.device, self.place = torch.device("cuda", gpu), VRAM(gpu)
        self.remote_device = self.device  # P: D's device once connected (for torch peer copies)
        self.engine = TransferEngine(f"pdpush-bench-{self.role}", engine_config)
        self.caches: KVCaches | None = None
        self._reg = None

    def cmd_setup(self, shape: str, num_blocks: int) -> dict:
        """Allocate and register this shape's KV cache (dropping the previous one)."""
        self._drop_caches()
        self.caches = KVCaches(SHAPES[shape], num_blocks, self.device)
        self._reg = self.engine.register([MemRegion(*self.caches.region(), self.place)])
        return {"metadata": self.engine.metadata()}

    def _drop_caches(self) -> None:
        if self._reg is not None:
            self.engine.deregister(self._reg)
            self._reg = None
        self.caches = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            if self.remote_device != self.device:
                torch.cuda.synchronize(self.remote_device)

    def close(self) -> None:
        self.engine.close()


class PushSide(Side):
    role = "P"

    def __init__(self, conn: Any, gpu: int | None, engine_config: EngineConfig,
                 post_threads: int, batch_layers: bool):
        super().__init__(conn, gpu, engine_config)
        self.peer: str | None = None
        self.remote = self.place
        self.poster: OrderedPoster = OrderedPoster(
            self._post, threads=post_threads, combine=LayerJob.merge if batch_layers else None)

    def cmd_connect(self, metadata: bytes, remote_gpu: int | None) -> str:
        """Load D's agent metadata (again after D registered new memory)."""
        if self.peer is not None:
            self.engine.remove_peer(self.peer)
        self.peer = self.engine.add_peer(metadata)
        self.remote = DRAM if remote_gpu is None else VRAM(remote_gpu)
        self.remote_device = self.device if remote_gpu is None else torch.device("cuda", remote_gpu)
        return self.peer

    def _post(self, job: LayerJob) -> tuple[Any, float]:
        """Runs on the transfer thread once the layer's event fired: post the WRITE."""
        t0 = time.perf_counter()
        xfer = self.engine.write(self.peer, job.runs, local=self.place, remote=self.remote)
        return xfer, time.perf_counter() - t0

    def _runs(self, d_layouts: list, src_ids: list[int], dst_ids: list[int]) -> list[list]:
        """Per-layer coalesced byte runs from P's layouts into D's (D's addresses given)."""
        plan = RunPlan(self.caches.layouts, d_layouts, src_ids, dst_ids)
        return [plan.layer(i) for i in range(len(plan))]

    def cmd_push(self, d_layouts: list, src_ids: list[int], dst_ids: list[int], seed: int,
                 tag: bytes, use_events: bool = True, slow_ms: float = 0.0,
                 stale_seed: int | None = None) -> dict:
        """"Compute" each layer (write its KV on the compute stream, optionally behind a slow
        kernel), gate its WRITE on a CUDA event (or not, for the control), then notify D."""
        shape, caches, n = self.caches.shape, self.caches, len(src_ids)
        index = torch.tensor(src_ids, device=self.device)
        if stale_seed is not None:  # old contents that a too-early WRITE would ship
            for layer in range(shape.layers):
                self._compute_layer(layer, index, stale_seed, 0.0)
            self._sync()
        cuda = self.device.type == "cuda"
        t0 = time.perf_counter()
        plan = RunPlan(caches.layouts, d_layouts, src_ids, dst_ids)
        runs, runs_s = [], time.perf_counter() - t0
        for layer in range(shape.layers):
            self._compute_layer(layer, index, seed, slow_ms)
            event = None
            if cuda and use_events:
                event = torch.cuda.Event()
                event.record()
            r0 = time.perf_counter()
            runs.append(plan.layer(layer))  # what save_kv_layer computes on the forward path
            runs_s += time.perf_counter() - r0
            self.poster.submit(event, LayerJob(layer, runs[layer]))
        posted = _unique(self.poster.drain(timeout_s=60))
        xfers = [x for x, _ in posted]
        self.engine.wait(xfers, timeout_s=60)
        seconds = time.perf_counter() - t0
        self.engine.notify(self.peer, tag)
        for x in xfers:
            self.engine.release(x)
        self._sync()
        return {"seconds": seconds, "post_us": [p * 1e6 for _, p in posted], "writes": len(posted),
                "runs_us": runs_s * 1e6 / shape.layers,
                "descriptors": sum(len(r) for r in runs),
                "bytes": n * shape.layers * shape.page_bytes}

    def _compute_layer(self, layer: int, index: Any, seed: int, slow_ms: float) -> None:
        """Stand-in for a prefill layer: `slow_ms` of GPU time, then its KV written."""
        if self.device.type == "cuda" and slow_ms:
            delay_stream(slow_ms * 1000)
        shape = self.caches.shape
        self.caches.layers[layer][index] = layer_content(shape, seed, layer, len(index),
                                                         self.device)

    def cmd_compute_only(self, src_ids: list[int], seed: int, slow_ms: float) -> float:
        """Seconds for the same per-layer compute as `push`, with nothing pushed."""
        index = torch.tensor(src_ids, device=self.device)
        self._sync()
        t0 = time.perf_counter()
        for layer in range(self.caches.shape.layers):
            self._compute_layer(layer, index, seed, slow_ms)
        self._sync()
        return time.perf_counter() - t0

    def cmd_bandwidth(self, d_layouts: list, src_ids: list[int], dst_ids: list[int],
                      iters: int, tag: bytes, uncoalesced_iters: int = 1) -> dict:
        """Time the same bytes moved several ways (see report.py for what each mode means)."""
        shape, n = self.caches.shape, len(src_ids)
        runs = self._runs(d_layouts, src_ids, dst_ids)
        page = shape.page_bytes
        contiguous = [[r] for r in merge_adjacent(
            [rr for lay in self._runs(d_layouts, list(range(n)), list(range(n))) for rr in lay])]
        modes = {
            "layerwise": (lambda: self._timed_poster(runs), iters),
            "layerwise_each": (lambda: self._timed_writes(runs), iters),
            "layerwise_serial": (lambda: self._timed_writes(runs, serial=True), iters),
            "merged": (lambda: self._timed_writes([[r for lay in runs for r in lay]]), iters),
            "contiguous": (lambda: self._timed_writes(contiguous), iters),
            "uncoalesced": (lambda: self._timed_writes(self._per_block_runs(d_layouts, src_ids,
                                                                           dst_ids)),
                            uncoalesced_iters),
        }
        out: dict[str, Any] = {"bytes": n * shape.layers * page,
                               "descriptors_per_layer": [len(r) for r in runs]}
        for name, (fn, count) in modes.items():
            fn()  # warm-up: connection, registration caches
            out[name] = [fn() for _ in range(count)]
        out["torch_copy"] = self._torch_copy(d_layouts[0].num_blocks, src_ids, dst_ids, iters)
        self.engine.notify(self.peer, tag)
        return out

    def _per_block_runs(self, d_layouts: list, src_ids: list[int], dst_ids: list[int]) -> list:
        """One descriptor per block (and segment): the baseline that coalescing beats."""
        return [[r for s, d in zip(src_ids, dst_ids) for r in byte_runs(sl, dl, [s], [d])]
                for sl, dl in zip(self.caches.layouts, d_layouts)]

    def _timed_poster(self, runs: list[list]) -> dict:
        """Layer WRITEs through the transfer thread(s), as `push` posts them (data ready)."""
        t0 = time.perf_counter()
        for layer, layer_runs in enumerate(runs):
            self.poster.submit(None, LayerJob(layer, layer_runs))
        posted = _unique(self.poster.drain(timeout_s=60))
        self.engine.wait([x for x, _ in posted])
        seconds = time.perf_counter() - t0
        for x, _ in posted:
            self.engine.release(x)
        return {"seconds": seconds, "post_us_mean": 1e6 * sum(p for _, p in posted) / len(posted),
                "writes": len(posted)}

    def _timed_writes(self, groups: list[list], serial: bool = False) -> dict:
        """Post one WRITE per group (all in flight unless serial), wait; seconds and post us."""
        t0 = time.perf_counter()
        posts, xfers = [], []
        for runs in groups:
            p0 = time.perf_counter()
            xfers.append(self.engine.write(self.peer, runs, local=self.place, remote=self.remote))
            posts.append((time.perf_counter() - p0) * 1e6)
            if serial:
                self.engine.wait(xfers[-1:])
        self.engine.wait(xfers)
        seconds = time.perf_counter() - t0
        for x in xfers:
            self.engine.release(x)
        return {"seconds": seconds, "post_us_mean": sum(posts) / len(posts), "writes": len(groups)}

    def _torch_copy(self, d_blocks: int, src_ids: list[int], dst_ids: list[int],
                    iters: int) -> dict:
        """The same blocks copied by torch from P's cache into a D-shaped cache on D's device
        (a peer copy when P and D have different GPUs), per layer, and a flat copy."""
        caches, there = self.caches, self.remote_device
        local = KVCaches(caches.shape, d_blocks, there)
        si = torch.tensor(src_ids, device=self.device)
        di = torch.tensor(dst_ids, device=there)
        flat_src = torch.empty(len(src_ids) * caches.shape.layers * caches.shape.page_bytes,
                               dtype=torch.uint8, device=self.device)
        flat_dst = torch.empty_like(flat_src, device=there)

        def indexed() -> None:
            for s, d in zip(caches.layers, local.layers):
                d.index_copy_(0, di, s.index_select(0, si).to(there, non_blocking=True))

        result = {name: self._time_torch(fn, iters) for name, fn in
                  (("indexed", indexed), ("flat", lambda: flat_dst.copy_(flat_src)))}
        del local
        return result

    def _time_torch(self, fn: Any, iters: int) -> list[float]:
        fn()
        self._sync()
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            self._sync()
            times.append(time.perf_counter() - t0)
        return times

    def cmd_stream(self, d_layouts: list, src_ids: list[int], dst_ids: list[int], qps: float,
                   tag: bytes, max_inflight: int = 2) -> dict:
        """Push whole prompts layer by layer at `qps` (inf: back to back) until a stop message."""
        runs = self._runs(d_layouts, src_ids, dst_ids)
        interval = 0.0 if qps == float("inf") else (1.0 / qps if qps > 0 else None)
        inflight: deque[list] = deque()
        start_bytes, prompts = self.engine.bytes_written(self.peer), 0
        t0 = time.perf_counter()
        next_t = t0
        while not self.conn.poll():
            while inflight and all(x.poll() is TransferState.DONE for x in inflight[0]):
                for x in inflight.popleft():
                    self.engine.release(x)
            now = time.perf_counter()
            if interval is not None and now >= next_t and len(inflight) < max_inflight:
                inflight.append([self.engine.write(self.peer, r, local=self.place,
                                                   remote=self.remote) for r in runs])
                prompts += 1
                next_t = max(next_t + interval, now) if interval else now
            elif interval is None or next_t - now > 0.002:
                time.sleep(0.0005)
        for group in inflight:
            self.engine.wait(group)
            for x in group:
                self.engine.release(x)
        seconds = time.perf_counter() - t0
        self.conn.recv()  # the stop message
        self.engine.notify(self.peer, tag)
        return {"qps": qps, "prompts": prompts, "seconds": seconds,
                "bytes": self.engine.bytes_written(self.peer) - start_bytes}

    def close(self) -> None:
        self.poster.close()
        super().close()


class ReceiveSide(Side):
    role = "D"

    def __init__(self, conn: Any, gpu: int | None, engine_config: EngineConfig):
        super().__init__(conn, gpu, engine_config)
        self.fence = ReceiveFence.for_device(gpu)
        self.inbox: list[bytes] = []
        self.decoder: DecodeModel | None = None

    def cmd_setup(self, shape: str, num_blocks: int) -> dict:
        out = super().cmd_setup(shape, num_blocks)
        out["layouts"] = self.caches.layouts
        out["fence"] = {"rdma_writes_ordering": self.fence.ordering,
                        "needs_flush": self.fence.needs_flush}
        return out

    def cmd_clear(self) -> None:
        self.caches.raw.zero_()
        self._sync()

    def _wait_for(self, tag: bytes, timeout_s: float) -> float:
        """Drive the engine until notification `tag` arrived; seconds waited."""
        t0 = time.perf_counter()
        while tag not in self.inbox:
            for msgs in self.engine.notifications().values():
                self.inbox.extend(msgs)
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"notification {tag!r} not received in {timeout_s}s")
        self.inbox.remove(tag)
        return time.perf_counter() - t0

    def cmd_expect(self, tag: bytes, seed: int | None = None, dst_ids: list[int] | None = None,
                   timeout_s: float = 120.0) -> dict:
        """Wait for P's notification, apply the fence, then compare every pushed byte."""
        waited = self._wait_for(tag, timeout_s)
        flushed = self.fence.after_writes()
        if seed is None:
            return {"waited_s": waited, "flushed": flushed}
        shape, n = self.caches.shape, len(dst_ids)
        index = torch.tensor(dst_ids, device=self.device)
        bad_blocks, bad_layers = 0, []
        for layer, view in enumerate(self.caches.layers):
            want = layer_content(shape, seed, layer, n, self.device).view(torch.int16)
            got = view.index_select(0, index).view(torch.int16)
            per_block = (got != want).flatten(1).any(1)
            if bool(per_block.any()):
                bad_layers.append(layer)
                bad_blocks += int(per_block.sum())
        return {"waited_s": waited, "flushed": flushed, "bad_blocks": bad_blocks,
                "bad_layers": bad_layers, "stray_blocks": self._stray_blocks(index),
                "checked_bytes": n * shape.layers * shape.page_bytes}

    def _stray_blocks(self, targets: Any) -> int:
        """Blocks not pushed to that hold non-zero bytes after the clear: writes out of place."""
        raw = self.caches.raw
        written = raw.view(torch.int16).reshape(raw.shape[0], raw.shape[1], -1).ne(0).any(2).any(0)
        written[targets] = False
        return int(written.sum())

    def cmd_decode_setup(self, batch: int, ctx_lo: int, ctx_hi: int) -> dict:
        shape = QWEN2_7B if self.device.type == "cuda" else TINY
        self.decoder = DecodeModel(shape, batch, ctx_lo, ctx_hi, self.device)
        self.decoder.capture()
        self._sync()
        return {"shape": shape.__dict__, "graph": self.decoder.graph is not None}

    def cmd_decode_window(self, steps: int, warmup: int) -> list[float]:
        """Run warmup + steps decode steps; per-step latency (ms) of the last `steps`."""
        for _ in range(warmup):
            self.decoder.step()
            self.engine.progress()
        timer = StepTimer(self.device, steps)
        for i in range(steps):
            timer.start(i)
            self.decoder.step()
            timer.stop(i)
            self.engine.progress()  # CPU transports need the target to progress
        return timer.results_ms()

