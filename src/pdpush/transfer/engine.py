"""A thin NIXL wrapper: register memory, exchange agent metadata, WRITE byte runs, notifications.

Public API (the connector and the GPU harness use this, nothing NIXL-specific leaks out):

    eng = TransferEngine("d-rank0")                      # UCX, no progress thread (see below)
    reg = eng.register([MemRegion(addr, nbytes, DRAM)])  # or VRAM(device) for CUDA memory
    meta = eng.metadata()                                # bytes: send to the peer
    peer = eng.add_peer(peer_meta)                       # the peer's agent name
    xfer = eng.write(peer, runs, notif=b"req-1:L3", local=VRAM(0), remote=VRAM(0))
    xfer.poll()                 # TransferState.PROC / DONE (never blocks); ERR raises TransferError
    eng.notifications()         # {peer_name: [bytes, ...]} received since the last call
    eng.notify(peer, b"done")   # a message with no data, e.g. after every WRITE reported DONE
    eng.bytes_written(peer)     # bytes of this engine's WRITEs to peer that completed
    eng.release(xfer); eng.deregister(reg); eng.remove_peer(peer); eng.close()  # or `with`

`runs` are `layout.ByteRun`s (src = local address, dst = the peer's address): one NIXL
descriptor each, so coalesce first (`layout.byte_runs`). A WRITE's notification reaches the peer
only after that WRITE's data. The engine is single-owner but thread-safe (NIXL strict sync), so a
transfer thread may post while another thread polls notifications.

Progress: with no progress thread, an engine advances only inside its own calls. On transports
where the target takes part (TCP / shared memory, i.e. CPU-to-CPU here) the receiving engine must
be polled too (`progress()` or `notifications()`, e.g. once per step), or WRITEs stay in flight;
GPU cuda_ipc and RDMA need no target polling.

Why no progress thread by default: NIXL's UCX progress thread busy-polls a core per agent (an
idle agent measured ~99% of a core with it on, <0.01% with it off), and progress is made anyway
whenever the owner polls `poll()` / `notifications()`. Pass `EngineConfig(progress_thread=True)` to override.
Prepared descriptor lists are not used: measured on the H200 they were no faster than
`initialize_xfer` (7-10 us per descriptor either way); coalescing is what cuts the cost.
On a GPU host, `EngineConfig(num_threads=4, backend_params=(("split_batch_size", "8"),))`
roughly doubled a merged WRITE's rate on the H200 (results/gpu/2026-11-29/README.md); it starts
NIXL's UCX posting threads, so the default leaves it off.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from pdpush.transfer.layout import ByteRun

log = logging.getLogger(__name__)


class TransferError(RuntimeError):
    """A NIXL call or a posted WRITE failed."""


class TransferState(str, Enum):
    PROC = "PROC"
    DONE = "DONE"


@dataclass(frozen=True)
class Placement:
    """Which memory an address lives in: host DRAM or the VRAM of one CUDA device."""

    kind: str  # "DRAM" or "VRAM"
    device: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("DRAM", "VRAM"):
            raise ValueError(f"memory kind must be DRAM or VRAM, not {self.kind!r}")


DRAM = Placement("DRAM", 0)


def VRAM(device: int) -> Placement:  # noqa: N802 - reads like the constant DRAM
    """Placement of memory on CUDA device `device`."""
    return Placement("VRAM", device)


@dataclass(frozen=True)
class MemRegion:
    """A range to register; a WRITE's runs must each lie inside one registered region."""

    addr: int
    nbytes: int
    placement: Placement = DRAM


@dataclass(frozen=True)
class EngineConfig:
    """`num_threads` > 0 gives NIXL's UCX backend a thread pool that posts one WRITE's
    descriptors in parallel (split in batches of `backend_params["split_batch_size"]`); on the
    H200's cuda_ipc path the host cost per descriptor is what limits a fragmented push."""

    backends: tuple[str, ...] = ("UCX",)
    progress_thread: bool = False
    num_threads: int = 0  # 0 = NIXL's default (post from the calling thread)
    thread_safe: bool = True
    backend_params: tuple[tuple[str, str], ...] = ()  # extra init params, e.g. num_workers


@dataclass
class Registration:
    """Handle of one `register` call; give it back to `deregister`."""

    regions: tuple[MemRegion, ...]
    _descs: Any = field(repr=False, default=None)


class Transfer:
    """One posted WRITE. Poll it; release it (or let the engine release it on close)."""

    def __init__(self, engine: TransferEngine, handle: Any, peer: str, nbytes: int, ndesc: int):
        self._engine = engine
        self._handle = handle
        self.peer = peer
        self.nbytes = nbytes
        self.ndesc = ndesc
        self.done_at: float | None = None

    @property
    def done(self) -> bool:
        return self.done_at is not None

    def poll(self) -> TransferState:
        """Advance and report progress; raises TransferError when the WRITE failed."""
        if self.done_at is not None:
            return TransferState.DONE
        state = self._engine._agent.check_xfer_state(self._handle)
        if state == "ERR":
            raise TransferError(f"WRITE of {self.nbytes} bytes to {self.peer} failed")
        if state == "DONE":
            self.done_at = time.perf_counter()
            self._engine._count(self.peer, self.nbytes)
            return TransferState.DONE
        return TransferState.PROC


class TransferEngine:
    """One NIXL agent. `agent_factory(name, config)` exists so tests can substitute the agent."""

    def __init__(
        self,
        name: str,
        config: EngineConfig | None = None,
        agent_factory: Callable[[str, EngineConfig], Any] | None = None,
    ):
        self.name = name
        self.config = config or EngineConfig()
        self._agent = (agent_factory or _nixl_agent)(name, self.config)
        self._registrations: list[Registration] = []
        self._peers: set[str] = set()
        self._transfers: set[Transfer] = set()
        self._written: dict[str, int] = {}
        self._inbox: dict[str, list[bytes]] = {}
        self._closed = False

    # -- memory and peers ------------------------------------------------------------------
    def register(self, regions: Sequence[MemRegion]) -> Registration:
        """Register regions (all of one placement kind) with the backend."""
        if not regions:
            raise ValueError("nothing to register")
        kinds = {r.placement.kind for r in regions}
        if len(kinds) != 1:
            raise ValueError(f"register one memory kind per call, got {sorted(kinds)}")
        rows = [(r.addr, r.nbytes, r.placement.device, "") for r in regions]
        descs = self._call("register_memory", rows, kinds.pop())
        reg = Registration(tuple(regions), descs)
        self._registrations.append(reg)
        return reg

    def deregister(self, reg: Registration) -> None:
        if reg in self._registrations:
            self._registrations.remove(reg)
            self._call("deregister_memory", reg._descs)

    def metadata(self) -> bytes:
        """This agent's metadata (after registering): what a peer passes to `add_peer`."""
        return bytes(self._call("get_agent_metadata"))

    def add_peer(self, metadata: bytes) -> str:
        peer = self._call("add_remote_agent", metadata)
        peer = peer.decode() if isinstance(peer, bytes) else str(peer)
        self._peers.add(peer)
        return peer

    def connect(self, peer: str) -> None:
        """Set up the connection to `peer` now (off the hot path) rather than at the first
        WRITE or notification; a notification to a peer never written to goes out at once."""
        self._call("make_connection", peer)

    def remove_peer(self, peer: str) -> None:
        if peer in self._peers:
            self._peers.discard(peer)
            self._call("remove_remote_agent", peer)

    # -- data ------------------------------------------------------------------------------
    def write(
        self,
        peer: str,
        runs: Sequence[ByteRun],
        notif: bytes = b"",
        local: Placement = DRAM,
        remote: Placement = DRAM,
    ) -> Transfer:
        """Post one WRITE of `runs` (one descriptor each) to `peer`; returns without waiting."""
        if peer not in self._peers:
            raise ValueError(f"unknown peer {peer!r}: add_peer first")
        if not runs:
            raise ValueError("a WRITE needs at least one byte run")
        agent = self._agent
        table = np.asarray(runs, dtype=np.uint64).reshape(-1, 3)
        src = agent.get_xfer_descs(_desc_rows(table[:, 0], table[:, 2], local), local.kind)
        dst = agent.get_xfer_descs(_desc_rows(table[:, 1], table[:, 2], remote), remote.kind)
        handle = self._call("initialize_xfer", "WRITE", src, dst, peer, notif)
        xfer = Transfer(self, handle, peer, int(table[:, 2].sum()), len(runs))
        self._transfers.add(xfer)
        if agent.transfer(handle) == "ERR":
            self.release(xfer)
            raise TransferError(f"posting a WRITE of {len(runs)} runs to {peer} failed")
        return xfer

    def release(self, xfer: Transfer) -> None:
        """Free a transfer's handle (NIXL cancels it if still in flight)."""
        if xfer in self._transfers:
            self._transfers.discard(xfer)
            self._agent.release_xfer_handle(xfer._handle)

    def wait(
        self,
        xfers: Iterable[Transfer],
        timeout_s: float = 30.0,
        also_progress: Sequence[TransferEngine] = (),
    ) -> None:
        """Poll until every transfer is DONE (for tools and tests; a serving loop polls).

        `also_progress`: engines in this process to drive meanwhile (a CPU-transport target).
        """
        pending = list(xfers)
        deadline = time.monotonic() + timeout_s
        while pending:
            for other in also_progress:
                other.progress()
            pending = [x for x in pending if x.poll() is TransferState.PROC]
            if pending and time.monotonic() > deadline:
                raise TransferError(f"{len(pending)} WRITEs still in flight after {timeout_s}s")

    def notify(self, peer: str, msg: bytes) -> None:
        """Send a notification with no data (ordered after completed WRITEs to that peer)."""
        self._call("send_notif", peer, msg)

    def progress(self) -> None:
        """Drive the backend once; notifications that arrive are kept for `notifications`."""
        for peer, msgs in self._call("get_new_notifs").items():
            if msgs:
                self._inbox.setdefault(peer, []).extend(msgs)

    def notifications(self) -> dict[str, list[bytes]]:
        """Notifications received since the last call, by sending agent name."""
        self.progress()
        got, self._inbox = self._inbox, {}
        return got

    def bytes_written(self, peer: str | None = None) -> int:
        """Bytes of completed WRITEs to `peer` (all peers when None)."""
        if peer is None:
            return sum(self._written.values())
        return self._written.get(peer, 0)

    def _count(self, peer: str, nbytes: int) -> None:
        self._written[peer] = self._written.get(peer, 0) + nbytes

    # -- teardown --------------------------------------------------------------------------
    def close(self) -> None:
        """Release transfers, deregister memory, forget peers. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        for xfer in list(self._transfers):
            _quietly(self.release, xfer)
        for reg in list(self._registrations):
            _quietly(self.deregister, reg)
        for peer in list(self._peers):
            _quietly(self.remove_peer, peer)

    def __enter__(self) -> TransferEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, *args: Any) -> Any:
        """Call the agent, turning NIXL's exceptions into one TransferError type."""
        try:
            return getattr(self._agent, method)(*args)
        except Exception as exc:  # NIXL raises its own binding errors
            raise TransferError(f"NIXL {method} failed: {exc}") from exc


def _desc_rows(addrs: np.ndarray, sizes: np.ndarray, where: Placement) -> np.ndarray:
    """NIXL's (addr, len, device) Nx3 table: building it in numpy keeps posting cheap."""
    return np.stack([addrs, sizes, np.full_like(addrs, where.device)], axis=1)


def _quietly(fn: Callable[..., None], *args: Any) -> None:
    try:
        fn(*args)
    except Exception as exc:
        log.warning("cleanup: %s", exc)


def _nixl_agent(name: str, config: EngineConfig) -> Any:
    """Create the real NIXL agent (imported here: NIXL is heavy and needs torch)."""
    from nixl._api import nixl_agent, nixl_agent_config, nixl_thread_sync_t

    sync = (nixl_thread_sync_t.NIXL_THREAD_SYNC_STRICT if config.thread_safe
            else nixl_thread_sync_t.NIXL_THREAD_SYNC_NONE)
    conf = nixl_agent_config(
        enable_prog_thread=config.progress_thread, backends=[], sync_mode=sync,
    )
    agent = nixl_agent(name, conf)
    params = dict(config.backend_params)
    if config.num_threads:
        params["num_threads"] = str(config.num_threads)
    for backend in config.backends:
        agent.create_backend(backend, params)
    return agent
