"""One request's pushes on P: what was posted, what is in flight, why it stopped.

Kept apart from the worker (connector/prefill_worker.py) that moves them: these records say
what D is owed, and `unwritten` is the check behind P's "ok" (every layer of every block D
expects from P was written, docs/architecture.md "Trust model").
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pdpush.connector.kv_region import RemoteKV
from pdpush.connector.metadata import PushTarget, PushTask
from pdpush.connector.peer_links import Link
from pdpush.connector.timing import WriteTimes
from pdpush.transfer.engine import Transfer


@dataclass
class Outgoing:
    """One request's pushes: posted WRITEs, and why it stopped early if it did."""

    target: PushTarget
    post_until: float = float("inf")  # time.monotonic(): no WRITE posted after it
    peer: RemoteKV | None = None
    transfers: list[Transfer] = field(default_factory=list)
    queued: int = 0  # WRITE jobs handed to the transfer thread whose result is not back yet
    posted: int = 0  # WRITE jobs the transfer thread took (posted or refused)
    nbytes: int = 0
    complete: bool = False  # the last task's WRITEs are all posted
    stopped: str = ""
    notified: bool = False
    times: WriteTimes = field(default_factory=lambda: WriteTimes(0.0))
    link: Link | None = None  # the connection to D, once asked for
    deferred: list[PushTask] = field(default_factory=list)  # computed before D was connected
    # first D block of a task -> [the task's D blocks, layers posted]: counted per task on the
    # step's path, spread over blocks only once, when the notification is built (unwritten)
    layer_writes: dict[int, list] = field(default_factory=dict)
    flush_until: float = 0.0  # keep polling the engine until then: the notification goes out

    def unwritten(self, layers: int) -> str:
        """"" when each of the `layers` of every block D expects from P was written, else what
        was not (e.g. a layer whose save_kv_layer never ran)."""
        t = self.target
        posted: dict[int, int] = {}
        for blocks, n in self.layer_writes.values():
            for block in blocks:
                posted[block] = posted.get(block, 0) + n
        for block in t.d_block_ids[t.skip_tokens // t.block_size:]:
            if posted.get(block, 0) != layers:
                return (f"D block {block} got {posted.get(block, 0)} of {layers} "
                        "layers: not every layer was pushed")
        return ""


@dataclass
class WriteJob:
    req_id: str
    out: Outgoing
    runs: list
    d_blocks: list[int]  # the D blocks this layer's runs fill (counted once posted)
