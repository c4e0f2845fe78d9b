"""D's scheduler for the interference experiment: the running batch is capped at B, yet requests
that arrive meanwhile still get their remote prefill (and so P's writes into D) started.

Why a subclass (loaded with `--scheduler-cls`, no patch): in vLLM 0.32 `Scheduler.schedule` asks the
connector about a waiting request (`get_num_new_matched_tokens`, where pdpush decides remote and
sends do_prefill) only inside the waiting loop, and that loop stops first when
`len(running) >= max_num_active_seqs` or when the token budget (`max_num_scheduled_tokens`) is
spent. So capping the batch with either setting (the design document the project came from,
docs/architecture.md "Origin", set max_num_scheduled_tokens = B) also stops every do_prefill.
With this class the two caps stay above B (no new request is refused a look) and the cap moves to
the one point where a request with its KV already received would join the batch: while B or more
requests run, such a request stays parked in WAITING_FOR_REMOTE_KVS and costs the worker nothing.
When the background batch finishes, the parked requests run.

It also starts the background batch together, as the design document did by adding its B requests
at once: while nothing runs and fewer than B requests wait, none is admitted (for at most
`pdpush_gather_s`, default 5 s). A CPU-starved API server otherwise hands them over one by one
and the batch never runs at full size.

Settings on D: `--scheduler-cls pdpush.bench.interference.scheduler.HoldScheduler
--additional-config '{"pdpush_hold_running": B}'` (optionally "pdpush_gather_s"), with max_num_seqs > B and
max_num_batched_tokens > B. A request the policy keeps local still joins (the probe shows it as
a step with more than B requests; the report leaves such steps out and counts them).
vLLM 0.26 names the two internals this class touches `max_num_running_reqs` and
`_try_promote_blocked_waiting_request` (0.32: `max_num_active_reqs`, `_handle_blocked_waiting_request`);
both spellings are handled here, the only place outside pdpush.vllm_api that subclasses vLLM.
"""

from __future__ import annotations

import time
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

HOLD_KEY = "pdpush_hold_running"
GATHER_KEY = "pdpush_gather_s"


class HoldScheduler(Scheduler):
    """vLLM's scheduler, except that remotely prefilled requests wait while the batch is full."""

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        # The running-request cap's attribute: 0.32's name, else 0.26's.
        self._cap = "max_num_active_reqs" if hasattr(self, "max_num_active_reqs") else "max_num_running_reqs"
        extra = vllm_config.additional_config or {}
        hold, gather_s = extra.get(HOLD_KEY), extra.get(GATHER_KEY, 5.0)
        if not isinstance(hold, int) or hold < 1:
            raise ValueError(f"HoldScheduler needs --additional-config '{{\"{HOLD_KEY}\": B}}', B >= 1")
        for name, cap in (("max_num_seqs", getattr(self, self._cap)),
                          ("max_num_batched_tokens", self.max_num_scheduled_tokens)):  # fmt: skip
            if hold >= cap:
                raise ValueError(f"{HOLD_KEY}={hold} must be below {name} ({cap})")
        if not isinstance(gather_s, (int, float)) or gather_s < 0:
            raise ValueError(f"{GATHER_KEY} must be a number of seconds >= 0, got {gather_s!r}")
        self.hold_running = hold
        self.gather_s = float(gather_s)
        self._gather_since: float | None = None

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        if not self._gathering():
            return super().schedule(*args, **kwargs)
        cap = getattr(self, self._cap)
        setattr(self, self._cap, 0)  # admit nobody this step
        try:
            return super().schedule(*args, **kwargs)
        finally:
            setattr(self, self._cap, cap)

    def _gathering(self) -> bool:
        """Idle with fewer than B requests waiting, for less than gather_s so far."""
        if self.running or not 0 < len(self.waiting) < self.hold_running:
            self._gather_since = None
            return False
        now = time.monotonic()
        if self._gather_since is None:
            self._gather_since = now
        return now - self._gather_since < self.gather_s

    def _parked(self, request: Any) -> bool:
        """Skipped this step: stays parked, KV kept, nothing on the worker."""
        return request.status == RequestStatus.WAITING_FOR_REMOTE_KVS and len(self.running) >= self.hold_running

    def _handle_blocked_waiting_request(self, request: Any) -> bool:  # vLLM 0.32
        return not self._parked(request) and super()._handle_blocked_waiting_request(request)

    def _try_promote_blocked_waiting_request(self, request: Any) -> bool:  # vLLM 0.26
        return not self._parked(request) and super()._try_promote_blocked_waiting_request(request)
