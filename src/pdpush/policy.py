"""Where a prefill runs: on D, or on which P. Pure logic, no vLLM, no I/O, no clock of its own.

D's scheduler asks `choose()` once per request (vLLM may ask again: `choose` changes nothing);
the rpc layer reports what happened (`started`, `finished`, `cancelled`, `health_checked`), each
with the time the outcome was known, so an old outcome applied late does not undo a newer one.

Each P has a circuit breaker:
- closed: a candidate. `breaker_failures` consecutive failures (failed do_prefills or failed
  health checks) open it.
- open: not a candidate until `retry_after_s` after the failure that opened it.
- half-open (open, retry time passed): a candidate for exactly one trial request at a time.
  The trial's success closes the breaker, its failure opens it again for `retry_after_s`.
A good health check only refreshes the P's queue length: it neither closes an open breaker nor
resets the failure count, so a P that answers /health but keeps failing prefills stays out.
A do_prefill that D cancelled (the client went away) says nothing about P: it only frees its slot.
A P known gone (its process ended: connection refused) opens its breaker at once (`gone`).
Reports reach the policy when D steps; a P whose last health check was refused can be named
to `choose` as `refusing` before that (an idle D applies nothing until its next request's step).
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
    breaker_failures: int = 3


@dataclass
class PrefillPeer:
    """What D knows about one P: its load as D sees it and its circuit breaker."""

    url: str
    inflight: int = 0  # do_prefill calls from this D not yet answered
    queue: int = 0  # P's own waiting requests, from its last health check
    failures: int = 0  # consecutive failures (do_prefill or health)
    open_until: float | None = None  # breaker open (None: closed); half-open from this time
    trial: bool = False  # the half-open breaker's one trial request is in flight
    completed: int = 0
    failed: int = 0

    @property
    def state(self) -> str:
        return "closed" if self.open_until is None else "half_open" if self.trial else "open"

    def available(self, now: float) -> bool:
        """A candidate now: closed, or half-open with its trial slot free."""
        if self.open_until is None:
            return True
        return now >= self.open_until and not self.trial

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

    def choose(self, uncached_tokens: int, now: float, force_remote: bool = False,
               refusing: frozenset[str] = frozenset()) -> Decision:
        """Remote iff the uncached prompt reaches the threshold (or the client asks for remote)
        and a healthy P not in `refusing` has room. No side effects: vLLM may ask again for the
        same request."""
        if uncached_tokens < 2:
            return Decision(None, "nothing_to_push")
        if uncached_tokens < self.config.remote_threshold_tokens and not force_remote:
            return Decision(None, "short")
        healthy = [p for p in self.peers.values() if p.available(now) and p.url not in refusing]
        candidates = [p for p in healthy if p.inflight < self.config.max_inflight_per_prefill
                      and p.queue < self.config.max_prefill_queue]
        if not candidates:
            return Decision(None, "busy" if healthy else "no_healthy_prefill")
        best = min(candidates, key=lambda p: (p.load, p.completed + p.failed, p.url))
        return Decision(best.url, "remote")

    def started(self, url: str) -> None:
        """A do_prefill was sent; to a P whose breaker is not closed, it is the trial."""
        peer = self.peers[url]
        peer.inflight += 1
        if peer.open_until is not None:
            peer.trial = True

    def finished(self, url: str, ok: bool, at: float) -> None:
        """Outcome of one do_prefill, known at `at`."""
        peer = self.peers[url]
        peer.inflight = max(0, peer.inflight - 1)
        if ok:
            peer.completed += 1
            peer.failures, peer.open_until, peer.trial = 0, None, False
        else:
            peer.failed += 1
            self._failure(peer, at)

    def cancelled(self, url: str) -> None:
        """D abandoned the call (client abort): no verdict on P; a trial slot is freed."""
        peer = self.peers[url]
        peer.inflight = max(0, peer.inflight - 1)
        peer.trial = False

    def failed(self, url: str, at: float) -> None:
        """A fault of P found outside a do_prefill's outcome (its first token was wrong)."""
        self._failure(self.peers[url], at)

    def health_checked(self, url: str, ok: bool, queue: int, at: float) -> None:
        """Periodic check: a failure counts like a failed do_prefill; a success refreshes the
        queue length only (only a request that succeeds closes the breaker)."""
        peer = self.peers[url]
        if ok:
            peer.queue = queue
        else:
            self._failure(peer, at)

    def gone(self, url: str, at: float) -> None:
        """P's process ended (a refused connection): every request sent there now would fail,
        so its breaker opens at once instead of after `breaker_failures` failures. A P started
        again on that URL is re-admitted as any open breaker is, by a trial request."""
        peer = self.peers[url]
        peer.failures = max(peer.failures, self.config.breaker_failures)
        self._open(peer, at)

    def _failure(self, peer: PrefillPeer, at: float) -> None:
        peer.failures += 1
        if peer.trial or peer.failures >= self.config.breaker_failures:
            self._open(peer, at)

    def _open(self, peer: PrefillPeer, at: float) -> None:
        peer.trial = False
        peer.open_until = max(peer.open_until or 0.0, at + self.config.retry_after_s)
