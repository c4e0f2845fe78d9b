"""D's worker half: own the NIXL agent P writes into, serve its metadata, report arrivals.

Per step it does no per-request work for requests still waiting for KV: it only drains the
agent's notifications. A request is reported received after P's completion notification (sent
after P saw every WRITE complete) and after the receive fence (flush rule, transfer/ordering.py);
it is reported failed when P says so or when the scheduler gives it up (lease ended). Every
notification of P's, also one that comes after the give-up, is reported (`Transfers.notified`):
it is what frees blocks the scheduler held at the lease's end (connector/quarantine.py).
A notification counts only if it is the chosen P's: it carries the request's nonce (which only
that P received, in its signed target), names the NIXL agent that sent it and, with a key, is
signed (Notif.refusal); anything else is counted (`notifs_refused` in /stats) and ignored.
The failed ones come with the D blocks P was to fill (vLLM 0.26 learns of a failure only
from those blocks).
When each notification arrived (and P's WRITE timings it carries) goes back to the scheduler
with the step's output (`arrivals`, pdpush.connector.timing).
On the first rank it also runs the step probe (pdpush.probe) around each forward, when
configured: `bind` opens the step, `wait_for_save` closes it (steps without a forward are not
opened: vLLM 0.26 calls no wait_for_save for them).
"""

from __future__ import annotations

import base64
import logging
import time
from typing import Any

from pdpush.connector.compat import describe as describe_identity
from pdpush.connector.config import PdpushConfig
from pdpush.connector.kv_region import LocalKV
from pdpush.connector.metadata import DecodeStepMeta, Notif
from pdpush.probe import StepProbe
from pdpush.rpc.json_server import JsonServer
from pdpush.transfer.engine import TransferEngine
from pdpush.transfer.ordering import ReceiveFence
from pdpush.vllm_api import Transfers

log = logging.getLogger("vllm.pdpush.decode")  # under vllm: shown in its log
EARLY_NOTIF_TTL_S = 600.0  # a notification may beat the scheduler's "expect": keep it a while
EARLY_NOTIF_MAX = 4096  # ... but not without bound: anyone reaching D's agent can send some
EARLY_PER_REQUEST = 8


class DecodeWorker:
    def __init__(self, config: PdpushConfig, engine_id: str, rank: int, num_blocks: int,
                 instance_id: str = "", identity: dict[str, Any] | None = None) -> None:
        self.config = config
        self.rank = rank
        self.num_blocks = num_blocks
        self.engine_id, self.instance_id = engine_id, instance_id
        self.keys = config.keys()
        self.identity = describe_identity(identity or {}, self.keys is not None)
        self.probe = StepProbe.from_config(config.probe, rank)
        self._batch_stats: Any = None  # this step's, for the probe
        self.agent_name = f"pdpush-d-{engine_id}-{rank}"
        self.engine: TransferEngine | None = None
        self.fence: ReceiveFence | None = None
        self.server: JsonServer | None = None
        self.kv: LocalKV | None = None
        self.digest: Any = None  # kv_digest.KVDigest when config.debug_kv_digest
        self.rx_bytes = 0  # bytes P reported written into this rank, for the step probe
        self._expected: dict[str, list[int]] = {}  # req -> D blocks P fills
        self._nonces: dict[str, str] = {}  # expected request -> its nonce
        self._early: dict[str, list[tuple[Notif, str, float]]] = {}  # with sender and arrival
        self._counts = {"notifs_refused": 0}
        self._done: set[str] = set()
        self._failed: set[str] = set()
        self._notified: set[str] = set()  # verified notifications, for the quarantine
        self._failed_blocks: set[int] = set()
        self._arrivals: dict[str, tuple[float, tuple[float, ...]]] = {}

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self.kv = LocalKV.from_caches(kv_caches, self.num_blocks)
        self.engine = TransferEngine(self.agent_name)
        self.kv.register(self.engine)
        device = self.kv.placement.device if self.kv.placement.kind == "VRAM" else None
        self.fence = ReceiveFence.for_device(device)
        port = self.config.side_channel_port + self.rank
        routes = {"/meta": self.describe}
        if self.config.debug_kv_digest:
            from pdpush.connector.kv_digest import KVDigest

            self.digest = KVDigest(kv_caches, self.num_blocks)
            routes["/kv_digest"] = self.digest.changed
        self.server = JsonServer(self.config.side_channel_host, port, routes)
        log.info("pdpush D rank %d: %d layers registered, metadata on %s:%d (fence ordering %d)",
                 self.rank, len(self.kv.layer_names), self.config.side_channel_host, port,
                 self.fence.ordering)

    def describe(self) -> dict[str, Any]:
        assert self.engine is not None and self.kv is not None
        return {"agent": self.agent_name, "engine_id": self.engine_id,
                "instance_id": self.instance_id, "identity": self.identity,
                "metadata": base64.b64encode(self.engine.metadata()).decode(),
                **self.kv.describe()}

    def bind(self, meta: DecodeStepMeta) -> None:
        """Before the forward: which requests to expect or give up on; the probe's step opens."""
        self._batch_stats = meta.batch_stats
        if self.probe is not None and meta.batch_stats is not None and meta.batch_stats.num_reqs:
            self.probe.step_begin()
        self._expected.update(meta.expect)
        if self.digest is not None:
            self.digest.expected.update(meta.expect)
        for req_id in meta.expect:
            self._nonces[req_id] = meta.nonces.get(req_id, "")
            for notif, sender, arrived in self._early.pop(req_id, []):
                if req_id in self._expected:
                    self._receive(notif, sender, arrived)
        for req_id in meta.give_up:
            if req_id in self._expected:
                self._fail(req_id)

    def handle_preemptions(self, meta: DecodeStepMeta) -> None:
        return  # D writes nothing a preempted request could race with

    def save_kv_layer(self, layer_name: str, kv_layer: Any) -> None:
        return  # D's KV arrives by WRITE from P

    def wait_for_save(self) -> None:
        """After the forward: the probe's step closes."""
        if self.probe is not None:
            self.probe.step_end(self._batch_stats, self.rx_bytes)

    def transfer_results(self, finished_req_ids: set[str]) -> Transfers:
        """Received and failed since the last call; failed ones are received too (vLLM's rule)."""
        self._poll()
        result = Transfers(received=self._done, failed=self._failed,
                           notified=dict.fromkeys(self._notified, 1),
                           failed_blocks=self._failed_blocks)
        self._done, self._failed, self._notified, self._failed_blocks = set(), set(), set(), set()
        return result

    def take_arrivals(self) -> dict[str, tuple[float, tuple[float, ...]]]:
        """Notifications settled since the last call: (D's monotonic arrival, P's offsets)."""
        arrivals, self._arrivals = self._arrivals, {}
        return arrivals

    def _poll(self) -> None:
        if self.engine is None:
            return
        now = time.monotonic()
        for sender, messages in self.engine.notifications().items():
            for raw in messages:
                notif = Notif.decode(raw)
                if notif is None:
                    continue
                if notif.d_req_id in self._expected:
                    self._receive(notif, sender, now)
                else:
                    self._late(notif, sender)  # after the give-up: it may free held blocks
                    early = self._early.setdefault(notif.d_req_id, [])
                    early[:] = [*early[1 - EARLY_PER_REQUEST:], (notif, sender, now)]
        for req_id in [r for r, got in self._early.items() if now - got[0][2] > EARLY_NOTIF_TTL_S]:
            del self._early[req_id]
        for req_id in list(self._early)[:max(0, len(self._early) - EARLY_NOTIF_MAX)]:
            del self._early[req_id]  # the oldest first

    def _late(self, notif: Notif, sender: str) -> None:
        """A notification for a request this worker does not expect (given up, or not yet
        expected): reported for the quarantine only if its sender and (with a key) its HMAC
        verify; the request's nonce is no longer (or not yet) known here."""
        if not notif.refusal(sender, None, self.keys):
            self._notified.add(notif.d_req_id)

    def _receive(self, notif: Notif, sender: str, arrived: float) -> None:
        """Settle the request on its chosen P's word; count and ignore anyone else's."""
        refusal = notif.refusal(sender, self._nonces[notif.d_req_id], self.keys)
        if refusal:
            self._counts["notifs_refused"] += 1
            log.warning("pdpush: %s: ignored a notification: %s", notif.d_req_id, refusal)
            return
        self._settle(notif, arrived)

    def take_counts(self) -> dict[str, int]:
        counts, self._counts = self._counts, dict.fromkeys(self._counts, 0)
        return counts

    def _settle(self, notif: Notif, arrived: float) -> None:
        self._notified.add(notif.d_req_id)
        self._arrivals[notif.d_req_id] = (arrived, notif.times)
        self.rx_bytes += notif.nbytes
        if notif.ok:
            del self._expected[notif.d_req_id], self._nonces[notif.d_req_id]
            self._done.add(notif.d_req_id)
            assert self.fence is not None
            self.fence.after_writes()
        else:
            log.warning("pdpush: %s: P stopped pushing: %s", notif.d_req_id, notif.reason)
            self._fail(notif.d_req_id)

    def _fail(self, req_id: str) -> None:
        """Received without usable KV: the request and the blocks P was to fill."""
        self._failed_blocks.update(self._expected.pop(req_id))
        del self._nonces[req_id]
        self._done.add(req_id)
        self._failed.add(req_id)

    def close(self) -> None:
        if self.probe is not None:
            self.probe.close()
        if self.server is not None:
            self.server.close()
        if self.engine is not None:
            self.engine.close()
