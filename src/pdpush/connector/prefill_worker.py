"""P's worker half: WRITE each layer's newly complete blocks into D as soon as the layer is done.

`save_kv_layer` runs right after a layer's attention wrote its KV. It hands the layer's byte runs
to an `OrderedPoster` together with a CUDA event recorded on the compute stream (None on the CPU):
the transfer thread waits for the event, never the compute stream, and posts the WRITE while the
next layers compute. After every WRITE of a request completed P sends D the completion
notification; the request's blocks are released (finished_sending) only after that. No WRITE is
posted after `post_until` (the push budget on P's monotonic clock, less the stop margin); D
holds blocks whose push state it does not know when its lease ends (docs/architecture.md,
"Lease and quarantine").

A failure in the push path fails that request's push (D is told and recomputes); it never
raises into vLLM's forward, which would take P's engine down with every other request.

The connection to D is made off the forward path (connector/peer_links.py): a request whose D is
not connected yet has its tasks deferred; once the link is up they are posted all layers at once
(their KV was computed by an earlier forward), and if it fails the request stops pushing. The
notification carries the request's nonce and this agent's name, signed with the shared key.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from pdpush.connector.config import PdpushConfig
from pdpush.connector.faults import FaultHooks
from pdpush.connector.kv_region import LocalKV
from pdpush.connector.peer_links import Link, PeerLinks
from pdpush.connector.metadata import Notif, PrefillStepMeta, PushTask
from pdpush.connector.outgoing import Outgoing, WriteJob
from pdpush.connector.timing import WriteTimes
from pdpush.transfer.engine import Transfer, TransferEngine, TransferError, TransferState
from pdpush.transfer.layout import RunPlan
from pdpush.transfer.ordering import OrderedPoster, delay_stream
from pdpush.vllm_api import Transfers

log = logging.getLogger("vllm.pdpush.prefill")  # under vllm: shown in its log
# A notification to a D that no WRITE reached yet (e.g. "stopped" before the first) needs the
# connection set up, which UCX does only while P's agent is polled: P polls this long before
# it releases the request (and may go idle).
NOTIF_FLUSH_S = 0.5


class PrefillWorker:
    def __init__(self, config: PdpushConfig, engine_id: str, rank: int, num_blocks: int,
                 identity: dict[str, Any] | None = None) -> None:
        self.config = config
        self.rank = rank
        self.num_blocks = num_blocks
        self.identity = identity or {}
        self.keys = config.keys()
        self.agent_name = f"pdpush-p-{engine_id}-{rank}"
        self.engine: TransferEngine | None = None
        self.kv: LocalKV | None = None
        self.links: PeerLinks | None = None
        self._layouts: dict[str, Any] = {}
        self._out: dict[str, Outgoing] = {}
        self._tasks: list[PushTask] = []
        self._plans: list[tuple[PushTask, RunPlan]] = []  # this step's, built once in bind()
        self._layer_index: dict[str, int] = {}
        self._finished: set[str] = set()  # finished in vLLM, WRITEs maybe still in flight
        self.faults = FaultHooks.from_dir(config.fault_hooks_dir)
        self._wired: set[str] = set()  # D agents a WRITE completed to: connection is up
        self._poster: OrderedPoster[WriteJob, tuple[WriteJob, Transfer | None, str]] = (
            OrderedPoster(self._post, name=f"pdpush-post-{rank}"))

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.kv = LocalKV.from_caches(kv_caches, self.num_blocks)
        self._layouts = dict(zip(self.kv.layer_names, self.kv.layouts))
        self._layer_index = {name: i for i, name in enumerate(self.kv.layer_names)}
        self.engine = TransferEngine(self.agent_name)
        self.kv.register(self.engine)
        self.links = PeerLinks(self.engine, self.rank, self.identity, self.keys is not None,
                               self.config.side_channel_timeout_s)
        log.info("pdpush P rank %d: %d layers registered", self.rank, len(self.kv.layer_names))

    def bind(self, meta: PrefillStepMeta) -> None:
        """Before the forward: this step's tasks; those of requests whose D is not connected
        yet wait (deferred) until `transfer_results` finds the link up."""
        self._tasks = []
        for task in meta.tasks:
            out = self._out.get(task.req_id)
            if out is None:
                out = self._out[task.req_id] = Outgoing(task.target, task.post_until,
                                                        times=WriteTimes(task.admitted))
                self._link(out)
            if out.peer is None and not out.stopped:  # connecting: posted once the link is up
                out.deferred.append(task)
            elif not out.stopped:
                self._tasks.append(task)
            out.complete = out.complete or task.last
        for req_id, target in meta.stopped.items():
            out = self._out.setdefault(req_id, Outgoing(target))
            if out.link is None:  # nothing pushed yet: still tell D, so it need not wait the lease
                self._link(out)
            if not out.complete:
                out.stopped = out.stopped or "P's request ended before its prompt was computed"
        self._plans = [(task, plan) for task in self._tasks if (plan := self._plan(task)) is not None]

    def _link(self, out: Outgoing) -> None:
        """Look up (or start) the connection to the request's D; never waits for it."""
        assert self.links is not None
        out.link = self.links.lookup(out.target)
        self._adopt(out)

    def _adopt(self, out: Outgoing) -> None:
        """The request's link has an outcome: its peer, or why P must not write."""
        assert out.link is not None
        if not out.link.pending:
            out.peer = out.link.peer
            if out.link.error:
                out.stopped = out.stopped or out.link.error

    def _resolve_links(self) -> list[PushTask]:
        """Requests whose connection was pending: the deferred tasks of those now connected."""
        late = []
        for out in self._out.values():
            if out.link is None or out.link.pending or out.peer is not None:
                continue
            self._adopt(out)  # a stopped request gets its peer too: D is told at once
            if not out.stopped:
                late += out.deferred
            out.deferred = []
        return late

    def _post_all_layers(self, tasks: list[PushTask]) -> None:
        """Deferred tasks: their KV is complete (an earlier forward wrote it), post every layer."""
        event = _stream_event(self.kv)
        for task in tasks:
            plan = self._plan(task)
            for index in range(len(self.kv.layer_names) if plan is not None else 0):
                self._out[task.req_id].queued += 1
                self._poster.submit(event, WriteJob(task.req_id, self._out[task.req_id],
                                                    plan.layer(index), task.d_block_ids))

    def _plan(self, task: PushTask) -> RunPlan | None:
        """Every layer's byte runs for one task, built before the forward so that each
        save_kv_layer only shifts them (a full mapping per layer costs ~150 µs of Python)."""
        out = self._out[task.req_id]
        if out.stopped or not task.p_block_ids or out.peer is None:
            return None
        names = self.kv.layer_names
        try:
            return RunPlan([self._layouts[n] for n in names], [out.peer.layouts[n] for n in names],
                           task.p_block_ids, task.d_block_ids)
        except (KeyError, ValueError) as exc:  # D's layout does not match: never crash P
            self._stop_mapping(task.req_id, out, f"cannot map P's layers onto D: {exc}")
            return None

    def _stop_mapping(self, req_id: str, out: Outgoing, reason: str) -> None:
        out.stopped = reason
        log.error("pdpush: %s: %s", req_id, reason)

    def handle_preemptions(self, meta: PrefillStepMeta) -> None:
        self.finish_writes(meta.preempted)

    def finish_writes(self, req_ids: list[str]) -> None:
        """Before the forward: wait out the WRITEs of preempted requests (blocks about to be
        reused must not be read by a WRITE still in flight). Polls with a growing sleep (each
        poll also progresses the transfers), never a busy spin; a push still in flight after
        prefill_timeout_s is stopped (D recomputes) and P serves on."""
        deadline = time.monotonic() + self.config.prefill_timeout_s
        pause = 0.0005
        for req_id in req_ids:
            out = self._out.get(req_id)
            while out is not None and (out.transfers or out.queued):
                self._collect(0.0)
                if self._settled(req_id, out):
                    break
                if time.monotonic() >= deadline:
                    out.stopped = out.stopped or "WRITEs of a preempted request did not complete"
                    log.error("pdpush: %s: %s", req_id, out.stopped)
                    break
                time.sleep(pause)
                pause = min(pause * 2, 0.05)

    def save_kv_layer(self, layer_name: str, kv_layer: Any) -> None:
        if not self._plans:
            return
        event = _layer_event(kv_layer)
        if self.config.debug_skip_layer_event:
            event = None  # the control of the sender rule: recorded as usual, not waited for
        index = self._layer_index[layer_name]
        for task, plan in self._plans:
            out = self._out[task.req_id]
            if out.stopped:
                continue
            try:
                runs = plan.layer(index)
            except Exception as exc:  # e.g. a layer shaped unlike layer 0 that D cannot take
                self._stop_mapping(task.req_id, out, f"cannot map layer {layer_name} onto D: {exc}")
                continue
            out.queued += 1
            self._poster.submit(event, WriteJob(task.req_id, out, runs, task.d_block_ids))
        if self.config.debug_delay_layer_us and getattr(kv_layer, "is_cuda", False):
            delay_stream(self.config.debug_delay_layer_us)  # see _layer_event

    def wait_for_save(self) -> None:
        """Collect the handles of this step's WRITEs (posting waits only on layer events)."""
        if not self._tasks:
            return
        if not self._collect(self.config.prefill_timeout_s):
            for req_id, out in self._out.items():
                if out.queued and not out.stopped:
                    out.stopped = "P's transfer thread did not post the WRITEs in time"
                    log.error("pdpush: %s: %s", req_id, out.stopped)
        self._tasks, self._plans = [], []

    def _collect(self, timeout_s: float) -> bool:
        """Take the transfer thread's results; False while it is still behind (jobs queued).
        A request's notification waits until none of its jobs is queued (`_settled`)."""
        try:
            results = self._poster.drain(timeout_s=timeout_s)
        except TimeoutError:
            return False
        except Exception as exc:  # the thread failed outside _post (e.g. waiting on an event)
            for req_id, out in self._out.items():  # their WRITEs are unknown: never notify
                if out.queued:
                    out.stopped = out.stopped or f"transfer thread failed: {exc}"
                    log.error("pdpush: %s: %s", req_id, out.stopped)
            return True
        for job, xfer, error in results:
            job.out.queued -= 1
            if xfer is not None:
                job.out.transfers.append(xfer)
                job.out.layer_writes.setdefault(job.d_blocks[0], [job.d_blocks, 0])[1] += 1
            elif not job.out.stopped:
                job.out.stopped = error
                log.warning("pdpush: %s: stopped pushing to D: %s", job.req_id, error)
        return True

    def transfer_results(self, finished_req_ids: set[str]) -> Transfers:
        """Requests whose WRITEs all completed and whose notification went out, once finished.
        Only pushes are tracked: a finished request that never pushed is not P's to release
        (vLLM reports a push's finish in the same step whose metadata bound it, or later)."""
        self._finished |= finished_req_ids & self._out.keys()
        self._collect(0.0)
        late = self._resolve_links()
        if late:
            self._post_all_layers(late)
            self._collect(self.config.prefill_timeout_s)
        if self.engine is not None:
            self.engine.progress()  # a notification on a new connection needs P's progress too
        released, flushing = set(), False
        for req_id, out in list(self._out.items()):
            if not self._settled(req_id, out):
                continue
            if out.flush_until > time.monotonic():
                flushing = True
                continue
            if req_id in self._finished:
                released.add(req_id)
                self._finished.discard(req_id)
                del self._out[req_id]
        if flushing and self.engine is not None:
            self.engine.progress()
        return Transfers(sent=released)

    def take_arrivals(self) -> dict[str, tuple[float, tuple[float, ...]]]:
        return {}  # P receives no KV
    def take_counts(self) -> dict[str, int]:
        return {}  # P's counters live in its scheduler half

    def _settled(self, req_id: str, out: Outgoing) -> bool:
        """Poll; once nothing is in flight or queued and the request is complete or stopped,
        notify D."""
        pending = []
        for xfer in out.transfers:
            try:
                if xfer.poll() is TransferState.PROC:
                    pending.append(xfer)
                    continue
                out.times.last_done = time.monotonic()
                out.nbytes += xfer.nbytes
                self._wired.add(xfer.peer)
            except TransferError as exc:
                out.stopped = out.stopped or str(exc)
            assert self.engine is not None
            self.engine.release(xfer)
        out.transfers = pending
        if out.stopped:
            out.deferred = []
        connecting = out.link is not None and out.link.pending
        if pending or out.queued or connecting or out.deferred or not (out.complete or out.stopped):
            return False
        if not out.notified:
            out.notified = True
            self._fault("after_last_write")
            self._notify(req_id, out)
            self._fault("after_notify")
        return True

    def _fault(self, point: str) -> None:
        if self.faults is not None:
            self.faults.at(point)

    def _notify(self, req_id: str, out: Outgoing) -> None:
        out.stopped = out.stopped or out.unwritten(len(self.kv.layer_names) if self.kv else 0)
        if out.peer is None or self.engine is None:
            return
        out.times.notified = time.monotonic()
        notif = Notif(out.target.d_req_id, not out.stopped, out.nbytes, out.stopped,
                      out.target.nonce, self.agent_name, times=out.times.offsets()).signed(self.keys)
        try:
            self.engine.notify(out.peer.agent, notif.encode())
            if out.peer.agent not in self._wired:
                out.flush_until = time.monotonic() + NOTIF_FLUSH_S
        except TransferError as exc:
            log.warning("pdpush: %s: could not notify D: %s", req_id, exc)

    def _post(self, job: WriteJob) -> tuple[WriteJob, Transfer | None, str]:
        """On the transfer thread, after the layer's event: post unless stopped or past
        `post_until`. Never raises: a failed post fails this request's push only."""
        out = job.out
        out.posted += 1
        if out.stopped:
            return job, None, out.stopped
        if time.monotonic() > out.post_until:
            return job, None, "push budget spent: no more WRITEs (D will recompute)"
        self._fault("accepted" if out.posted == 1 else "between_layers")
        out.times.posted(time.monotonic())
        try:
            assert self.engine is not None and self.kv is not None and out.peer is not None
            xfer = self.engine.write(out.peer.agent, job.runs, local=self.kv.placement,
                                     remote=out.peer.placement)
        except Exception as exc:  # TransferError, or anything NIXL raises
            return job, None, f"posting a WRITE failed: {exc}"
        return job, xfer, ""

    def close(self) -> None:
        self._poster.close()
        if self.links is not None:
            self.links.close()
        if self.engine is not None:
            self.engine.close()


def _stream_event(kv: LocalKV | None) -> Any:
    """A CUDA event after everything queued so far (earlier forwards) on a GPU; None on the CPU."""
    if kv is None or kv.placement.kind != "VRAM":
        return None
    import torch

    event = torch.cuda.Event()
    event.record()
    return event


def _layer_event(kv_layer: Any) -> Any:
    """A CUDA event after the layer's KV write (sender ordering rule); None on the CPU.

    vLLM calls save_kv_layer(L) from the attention op once the CPU has *enqueued* layer L's KV
    write (unified_kv_cache_update) and attention; the GPU may not have run them yet (graph
    replays and launches are asynchronous). The event, recorded here on the forward stream, fires
    once they ran; the transfer thread posts L's WRITE only then.

    The test settings (config.py, `debug_*`) turn that into a control that can fail:
    `debug_skip_layer_event` records the event but does not hand it over, so the WRITE is
    posted at once;
    `debug_delay_layer_us` enqueues a GPU sleep on the forward stream after this point, i.e.
    ahead of layer L+1's kernels, KV write included. The CPU runs on to save_kv_layer(L+1) while
    that write still waits behind the sleep (and those of the layers before it), so a WRITE
    posted without the event reads L+1's blocks before they hold L+1's KV. Layer 0 is not delayed.
    """
    if getattr(kv_layer, "is_cuda", False):
        import torch

        event = torch.cuda.Event()
        event.record()
        return event
    return None
