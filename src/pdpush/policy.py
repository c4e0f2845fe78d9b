"""Where a prefill runs: on D, or on which P. Pure logic, no vLLM, no I/O, no clock of its own.

D's scheduler asks `choose()` once per request; the rpc layer reports what happened
(`started`, `finished`, `health_checked`) so that health comes both from periodic checks and from
the outcome of every do_prefill. A P is skipped while it is marked down; it becomes a candidate
again after `retry_after_s`, when the next health check may confirm it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class PolicyConfig:
    """The policy's part of pdpush.connector.config.PdpushConfig (defaults and meaning there)."""

    remote_threshold_tokens: int
    max_inflight_per_prefill: int
    max_prefill_queue: int
    retry_after_s: float


@dataclass
class PrefillPeer:
    """What D knows about one P: its load as D sees it and whether it is believed healthy."""

    url: str
    inflight: int = 0  # do_prefill calls from this D not yet answered
    queue: int = 0  # P's own waiting requests, from its last health check
    down_until: float = 0.0  # not a candidate before this time
    completed: int = 0
    failed: int = 0

    def available(self, now: float) -> bool:
        return now >= self.down_until

    @property
    def load(self) -> int:
        return self.inflight + self.queue


@dataclass
class Decision:
    """`url` is None for a local prefill; `reason` says why, for logs and metrics."""

    url: str | None
    reason: str


@dataclass
class Policy:
    config: PolicyConfig
    peers: dict[str, PrefillPeer] = field(default_factory=dict)

    @classmethod
    def for_urls(cls, config: PolicyConfig, urls: list[str] | tuple[str, ...]) -> "Policy":
        return cls(config, {url: PrefillPeer(url) for url in urls})

    def choose(self, uncached_tokens: int, now: float, force_remote: bool = False) -> Decision:
        """Remote iff the uncached prompt reaches the threshold (or the client asks for remote)
        and a healthy P has room. No side effects: vLLM may ask again for the same request."""
        if uncached_tokens < 2:
            return Decision(None, "nothing_to_push")
        if uncached_tokens < self.config.remote_threshold_tokens and not force_remote:
            return Decision(None, "short")
        candidates = [
            p for p in self.peers.values()
            if p.available(now)
            and p.inflight < self.config.max_inflight_per_prefill
            and p.queue < self.config.max_prefill_queue
        ]
        if not candidates:
            healthy = any(p.available(now) for p in self.peers.values())
            return Decision(None, "busy" if healthy else "no_healthy_prefill")
        best = min(candidates, key=lambda p: (p.load, p.completed + p.failed, p.url))
        return Decision(best.url, "remote")

    def started(self, url: str) -> None:
        self.peers[url].inflight += 1

    def finished(self, url: str, ok: bool, now: float) -> None:
        """Outcome of one do_prefill: a failure marks the P down for retry_after_s."""
        peer = self.peers[url]
        peer.inflight = max(0, peer.inflight - 1)
        if ok:
            peer.completed += 1
        else:
            peer.failed += 1
            self._mark_down(peer, now)

    def health_checked(self, url: str, ok: bool, queue: int, now: float) -> None:
        """Periodic check: a failed check marks the P down; a good one brings it back."""
        peer = self.peers[url]
        if ok:
            peer.queue = queue
            peer.down_until = 0.0
        else:
            self._mark_down(peer, now)

    def _mark_down(self, peer: PrefillPeer, now: float) -> None:
        peer.down_until = now + self.config.retry_after_s
