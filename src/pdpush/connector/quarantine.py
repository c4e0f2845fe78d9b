"""D's quarantine: blocks whose push state was unknown when the lease ended.

When a request's lease ends without P's notification, a WRITE of P's may still be in flight (P
paused after posting, or between deciding to post and posting). D then gives the request up
(vLLM recomputes it in new blocks, or fails it: on_failure) but first takes one more reference
on the blocks P could write (`BlockAccess.hold`), so vLLM freeing the request leaves them out of
the free pool. They are released only when
- P's notification for that request arrived on every rank (P sends it only once none of the
  request's WRITEs is queued or in flight; ranks that saw it before the hold count too), or
- P answered D's release question (rpc/release.py): no push of it is outstanding, and P
  refuses one that reaches it later (D asks every `interval` seconds while it holds), or
- P is known gone: its process ended (a health check refused the connection after the hold:
  nothing listens on P's port, and vLLM's engine processes end with their API server).
A P that is only unreachable (timeouts, a stopped process, a partition) keeps them held: it could
still land bytes. The rule is written up in docs/architecture.md, "Lease and quarantine".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("vllm.pdpush.decode")


@dataclass
class Held:
    url: str
    block_ids: list[int]
    since: float  # time.monotonic() when held
    confirmed: int = 0  # ranks whose notification arrived
    asked: float = 0.0  # time.monotonic() of the last release question to P


@dataclass
class Quarantine:
    ranks: int = 1
    blocks: Any = None  # pdpush.vllm_api.BlockAccess once vLLM bound its cache manager
    _held: dict[str, Held] = field(default_factory=dict)
    held_total: int = 0  # requests ever held
    released_confirmed: int = 0  # released on P's notification
    released_answered: int = 0  # released on P's answer to D's question
    released_gone: int = 0  # released because P's process ended

    def hold(self, req_id: str, url: str, block_ids: list[int], now: float,
             confirmed: int = 0) -> None:
        """`confirmed`: ranks whose notification for the request already arrived."""
        if req_id in self._held or not block_ids or confirmed >= self.ranks:
            return
        if self.blocks is not None:
            self.blocks.hold(block_ids)
        self._held[req_id] = Held(url, list(block_ids), now, confirmed)
        self.held_total += 1
        log.warning("pdpush: %s: push state unknown at lease end: %d blocks held until %s "
                    "confirms or is gone", req_id, len(block_ids), url)

    def confirmed(self, notified: dict[str, int]) -> None:
        """P's notifications that arrived this step, by request and number of ranks."""
        for req_id, n in notified.items():
            held = self._held.get(req_id)
            if held is None:
                continue
            held.confirmed += n
            if held.confirmed >= self.ranks:
                self._release(req_id)
                self.released_confirmed += 1

    def to_ask(self, now: float, interval: float) -> list[tuple[str, str]]:
        """(request, P) pairs whose release question is due (one per `interval`)."""
        due = [(req_id, h) for req_id, h in self._held.items() if now - h.asked >= interval]
        for _, held in due:
            held.asked = now
        return [(req_id, held.url) for req_id, held in due]

    def answered(self, req_id: str, released: bool) -> None:
        if released and req_id in self._held:
            self._release(req_id)
            self.released_answered += 1

    def p_gone(self, url: str, checked_at: float) -> None:
        """P's process ended (as seen at `checked_at`): what it held before cannot land now."""
        for req_id in [r for r, h in self._held.items() if h.url == url and h.since < checked_at]:
            self._release(req_id)
            self.released_gone += 1

    def _release(self, req_id: str) -> None:
        held = self._held.pop(req_id)
        if self.blocks is not None:
            self.blocks.release(held.block_ids)
        log.info("pdpush: %s: %d held blocks released", req_id, len(held.block_ids))

    def stats(self) -> dict[str, int]:
        return {"held_requests": len(self._held),
                "held_blocks": sum(len(h.block_ids) for h in self._held.values()),
                "held_total": self.held_total, "held_released_confirmed": self.released_confirmed,
                "held_released_answered": self.released_answered,
                "held_released_p_gone": self.released_gone}

    def close(self) -> None:
        """The engine is going away: nothing to keep (vLLM frees the whole pool)."""
        self._held.clear()
