"""P's worker half: WRITE each layer's newly complete blocks into D as soon as the layer is done.

`save_kv_layer` runs right after a layer's attention wrote its KV. It hands the layer's byte runs
to an `OrderedPoster` together with a CUDA event recorded on the compute stream (None on the CPU):
the transfer thread waits for the event, never the compute stream, and posts the WRITE while the
next layers compute. After every WRITE of a request completed P sends D the completion
notification; the request's blocks are released (finished_sending) only after that. No WRITE is
posted after the request's deadline: the lease D relies on before reusing its blocks.
"""

from __future__ import annotations

import base64
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from pdpush.connector.config import PdpushConfig
from pdpush.connector.kv_region import LocalKV, RemoteKV
from pdpush.connector.metadata import Notif, PrefillStepMeta, PushTarget, PushTask
from pdpush.connector.timing import WriteTimes
from pdpush.rpc.json_server import get_json
from pdpush.transfer.engine import Transfer, TransferEngine, TransferError, TransferState
from pdpush.transfer.layout import RunPlan
from pdpush.transfer.ordering import OrderedPoster
from pdpush.vllm_api import Transfers

log = logging.getLogger("vllm.pdpush.prefill")  # under vllm: shown in its log


@dataclass
class Outgoing:
    """One request's pushes: posted WRITEs, and why it stopped early if it did."""

    target: PushTarget
    peer: RemoteKV | None = None
    transfers: list[Transfer] = field(default_factory=list)
    nbytes: int = 0
    complete: bool = False  # the last task's WRITEs are all posted
    stopped: str = ""
    notified: bool = False
    times: WriteTimes = field(default_factory=lambda: WriteTimes(0.0))


@dataclass
class WriteJob:
    req_id: str
    out: Outgoing
    runs: list


class PrefillWorker:
    def __init__(self, config: PdpushConfig, engine_id: str, rank: int, num_blocks: int) -> None:
        self.config = config
        self.rank = rank
        self.num_blocks = num_blocks
        self.agent_name = f"pdpush-p-{engine_id}-{rank}"
        self.engine: TransferEngine | None = None
        self.kv: LocalKV | None = None
        self._layouts: dict[str, Any] = {}
        self._peers: dict[tuple[str, str], RemoteKV] = {}
        self._out: dict[str, Outgoing] = {}
        self._tasks: list[PushTask] = []
        self._plans: list[tuple[PushTask, RunPlan]] = []  # this step's, built once in bind()
        self._layer_index: dict[str, int] = {}
        self._finished: set[str] = set()  # finished in vLLM, WRITEs maybe still in flight
        self._poster: OrderedPoster[WriteJob, tuple[WriteJob, Transfer | None, str]] = (
            OrderedPoster(self._post, name=f"pdpush-post-{rank}"))

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.kv = LocalKV.from_caches(kv_caches, self.num_blocks)
        self._layouts = dict(zip(self.kv.layer_names, self.kv.layouts))
        self._layer_index = {name: i for i, name in enumerate(self.kv.layer_names)}
        self.engine = TransferEngine(self.agent_name)
        self.kv.register(self.engine)
        log.info("pdpush P rank %d: %d layers registered", self.rank, len(self.kv.layer_names))

    def bind(self, meta: PrefillStepMeta) -> None:
        """Before the forward: this step's tasks (connect to new D ranks first)."""
        self._tasks = []
        for task in meta.tasks:
            out = self._out.get(task.req_id)
            if out is None:
                out = self._out[task.req_id] = Outgoing(task.target, times=WriteTimes(task.admitted))
                out.peer = self._connect(task.target, out)
            if not out.stopped:
                self._tasks.append(task)
            out.complete = out.complete or task.last
        for req_id, target in meta.stopped.items():
            out = self._out.setdefault(req_id, Outgoing(target))
            if out.peer is None:  # nothing pushed yet: still tell D, so it need not wait the lease
                out.peer = self._connect(target, out)
            if not out.complete:
                out.stopped = out.stopped or "P's request ended before its prompt was computed"
        self._plans = [(task, plan) for task in self._tasks if (plan := self._plan(task)) is not None]

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
        reused must not be read by a WRITE still in flight)."""
        deadline = time.monotonic() + self.config.prefill_timeout_s
        for req_id in req_ids:
            out = self._out.get(req_id)
            while out is not None and out.transfers and time.monotonic() < deadline:
                self._settled(req_id, out)

    def save_kv_layer(self, layer_name: str, kv_layer: Any) -> None:
        if not self._plans:
            return
        event = _layer_event(kv_layer)
        index = self._layer_index[layer_name]
        for task, plan in self._plans:
            out = self._out[task.req_id]
            if out.stopped:
                continue
            try:
                runs = plan.layer(index)
            except ValueError as exc:  # a layer shaped unlike layer 0 that D cannot take
                self._stop_mapping(task.req_id, out, f"cannot map layer {layer_name} onto D: {exc}")
                continue
            self._poster.submit(event, WriteJob(task.req_id, out, runs))

    def wait_for_save(self) -> None:
        """Collect the handles of this step's WRITEs (posting waits only on layer events)."""
        if not self._tasks:
            return
        for job, xfer, error in self._poster.drain(timeout_s=self.config.prefill_timeout_s):
            if xfer is not None:
                job.out.transfers.append(xfer)
            elif not job.out.stopped:
                job.out.stopped = error
                log.warning("pdpush: %s: stopped pushing to D: %s", job.req_id, error)
        self._tasks, self._plans = [], []

    def transfer_results(self, finished_req_ids: set[str]) -> Transfers:
        """Requests whose WRITEs all completed and whose notification went out, once finished.
        Only pushes are tracked: a finished request that never pushed is not P's to release
        (vLLM reports a push's finish in the same step whose metadata bound it, or later)."""
        self._finished |= finished_req_ids & self._out.keys()
        released = set()
        for req_id, out in list(self._out.items()):
            if not self._settled(req_id, out):
                continue
            if req_id in self._finished:
                released.add(req_id)
                self._finished.discard(req_id)
                del self._out[req_id]
        return Transfers(sent=released)

    def take_arrivals(self) -> dict[str, tuple[float, tuple[float, ...]]]:
        return {}  # P receives no KV

    def _settled(self, req_id: str, out: Outgoing) -> bool:
        """Poll; once nothing is in flight and the request is complete or stopped, notify D."""
        pending = []
        for xfer in out.transfers:
            try:
                if xfer.poll() is TransferState.PROC:
                    pending.append(xfer)
                    continue
                out.times.last_done = time.monotonic()
                out.nbytes += xfer.nbytes
            except TransferError as exc:
                out.stopped = out.stopped or str(exc)
            assert self.engine is not None
            self.engine.release(xfer)
        out.transfers = pending
        if pending or not (out.complete or out.stopped):
            return False
        if not out.notified:
            out.notified = True
            self._notify(req_id, out)
        return True

    def _notify(self, req_id: str, out: Outgoing) -> None:
        if out.peer is None or self.engine is None:
            return
        out.times.notified = time.monotonic()
        notif = Notif(out.target.d_req_id, not out.stopped, out.nbytes, out.stopped,
                      out.times.offsets())
        try:
            self.engine.notify(out.peer.agent, notif.encode())
        except TransferError as exc:
            log.warning("pdpush: %s: could not notify D: %s", req_id, exc)

    def _connect(self, target: PushTarget, out: Outgoing) -> RemoteKV | None:
        key = (target.side_channel, target.d_engine_id)
        if key in self._peers:
            return self._peers[key]
        host, _, port = target.side_channel.rpartition(":")
        url = f"http://{host}:{int(port) + self.rank}/meta"
        try:
            desc = get_json(url, self.config.side_channel_timeout_s)
            assert self.engine is not None
            agent = self.engine.add_peer(base64.b64decode(desc["metadata"]))
            peer = RemoteKV.from_description(agent, desc)
        except (OSError, ValueError, KeyError, TransferError) as exc:
            out.stopped = f"cannot reach D's side channel {url}: {exc}"
            log.warning("pdpush: %s", out.stopped)
            return None
        self._peers[key] = peer
        return peer

    def _post(self, job: WriteJob) -> tuple[WriteJob, Transfer | None, str]:
        """On the transfer thread, after the layer's event: post unless past the lease."""
        if time.time() > job.out.target.deadline:
            return job, None, "deadline passed: no more WRITEs (D may reuse the blocks)"
        assert self.engine is not None and self.kv is not None and job.out.peer is not None
        job.out.times.posted(time.monotonic())
        try:
            xfer = self.engine.write(job.out.peer.agent, job.runs, local=self.kv.placement,
                                     remote=job.out.peer.placement)
        except TransferError as exc:
            return job, None, str(exc)
        return job, xfer, ""

    def close(self) -> None:
        self._poster.close()
        if self.engine is not None:
            self.engine.close()


def _layer_event(kv_layer: Any) -> Any:
    """A CUDA event after the layer's KV write (sender ordering rule); None on the CPU."""
    if getattr(kv_layer, "is_cuda", False):
        import torch

        event = torch.cuda.Event()
        event.record()
        return event
    return None
