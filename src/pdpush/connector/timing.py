"""Where TTFT goes: the stage timestamps of one request, each side on its own monotonic clock.

No clock is shared between hosts, so each side reports offsets from its own first stage:

- D (offsets from `decided`, D's scheduler choosing where to prefill): `sent` (do_prefill leaves
  the rpc thread), `answered` (P's HTTP answer back), `kv_notif` (D's worker saw P's completion
  notification), `kv_seen` (D's scheduler learned it), `first_step` (the first D step that runs
  the request). A local prefill has only `decided` and `first_step`.
- P's scheduler (offsets from `admitted`, P's scheduler first seeing the request):
  `prefill_start` (first step scheduled), `last_chunk` (the step with the prompt's end),
  `first_token` (P's request finished). They come back in the do_prefill answer.
- P's worker (offsets from the same `admitted`, same host so same clock): `first_post`,
  `last_post` (first and last layer WRITE posted, over all chunks), `last_done` (the last WRITE
  seen complete, at the worker's per-step poll), `notified`. They travel in the completion
  notification, since P's answer may leave before the last WRITE completes.

The per-layer cost is one `time.monotonic()` and two float stores per posted WRITE job.
`d_ms`/`p_ms` go to the client in `kv_transfer_params.pdpush.timing` and into D's /stats
(`recent`, bounded); `t0_mono` (D's clock at `decided`) lets a client on D's host place its own
send and first-token times on the same axis (pdpush.bench.ttft).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

P_WORKER_STAGES = ("first_post", "last_post", "last_done", "notified")
D_STAGES = ("sent", "answered", "kv_notif", "kv_seen", "first_step")


def ms(t: float, t0: float) -> float:
    return round((t - t0) * 1e3, 3)


@dataclass(slots=True)
class PushTimes:
    """P's timestamps of one pushed request (scheduler stages; the worker keeps its own)."""

    admitted: float
    prefill_start: float = 0.0
    last_chunk: float = 0.0

    def to_params(self, first_token: float) -> dict[str, float]:
        stages = {"prefill_start": self.prefill_start, "last_chunk": self.last_chunk,
                  "first_token": first_token}
        return {k: ms(v, self.admitted) for k, v in stages.items() if v}


@dataclass(slots=True)
class WriteTimes:
    """P worker's timestamps of one request's WRITEs; set on the hot path, so plain floats."""

    admitted: float
    first_post: float = 0.0
    last_post: float = 0.0
    last_done: float = 0.0
    notified: float = 0.0

    def posted(self, now: float) -> None:
        if not self.first_post:
            self.first_post = now
        self.last_post = now

    def offsets(self) -> tuple[float, ...]:
        """For the notification: P_WORKER_STAGES in order, ms from `admitted` (0 = never)."""
        if not self.admitted:
            return ()
        return tuple(ms(t, self.admitted) if t else 0.0
                     for t in (self.first_post, self.last_post, self.last_done, self.notified))


@dataclass(slots=True)
class DecodeTimes:
    """D's timestamps of one request, plus what P reported (already offsets, in ms)."""

    decided: float
    sent: float = 0.0
    answered: float = 0.0
    kv_notif: float = 0.0
    kv_seen: float = 0.0
    first_step: float = 0.0
    p_sched: dict[str, float] | None = None
    p_worker: tuple[float, ...] = ()

    def to_params(self) -> dict[str, Any]:
        d_ms = {name: ms(getattr(self, name), self.decided)
                for name in D_STAGES if getattr(self, name)}
        p_ms = dict(self.p_sched or {})
        p_ms.update((k, v) for k, v in zip(P_WORKER_STAGES, self.p_worker) if v)
        out: dict[str, Any] = {"t0_mono": self.decided, "d_ms": d_ms}
        if p_ms:
            out["p_ms"] = p_ms
        return out
