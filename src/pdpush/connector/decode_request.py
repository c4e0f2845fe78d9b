"""One record per request on D: its status and its placement, moved along by the D scheduler.

    get_num_new_matched_tokens: remote → CHOSEN, local → LOCAL
    update_state_after_alloc:   CHOSEN → WAITING_FOR_KV (do_prefill sent, blocks under the lease)
    update_connector_output:    WAITING_FOR_KV → READY (KV in) or FALLBACK (failed, recomputed)
    request_finished:           → DONE, or AWAITING_P_ANSWER (READY, P's answer still to come:
                                   its first token to compare, its stage times), which becomes
                                   DONE when P's answer arrives or the lease ends
    abort while WAITING_FOR_KV: → DONE once the workers report the blocks free

A record is dropped from `DecodeScheduler` when it becomes DONE, on every path.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass
from typing import Any

from pdpush.connector.timing import DecodeTimes


class Status(enum.Enum):
    CHOSEN = "chosen"  # the policy picked a P; vLLM has not allocated blocks yet
    WAITING_FOR_KV = "waiting_for_kv"  # do_prefill sent; D's blocks held under the lease
    READY = "ready"  # P's KV arrived; the request decodes on D
    LOCAL = "local"  # prefilled on D from the start
    FALLBACK = "fallback"  # the remote prefill failed; recomputed on D (or failed: on_failure)
    AWAITING_P_ANSWER = "awaiting_p_answer"  # finished on D; P's answer (token, times) to come
    DONE = "done"  # gone from the scheduler


@dataclass
class Placement:
    """Where a request's prefill ran: D's answer in `kv_transfer_params.pdpush`."""

    prefill: str  # local | remote | fallback
    reason: str | None = None  # why local (policy decision)
    url: str | None = None  # the P
    skip_tokens: int | None = None  # D's own prefix-cache hit, not pushed
    p_first_token: int | None = None
    error: str | None = None  # why the remote prefill failed
    first_token_mismatch: bool | None = None  # greedy: P's first token differs from D's
    pdpush_error: str | None = None  # the client's kv_transfer_params were malformed
    timing: dict[str, Any] | None = None  # stage offsets (pdpush.connector.timing.DecodeTimes)

    def to_params(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class DecodeRequest:
    req_id: str
    status: Status
    placement: Placement | None = None
    url: str | None = None  # the chosen P
    lease_end: float = 0.0  # time.monotonic(): past it without P's word, the blocks are held
    push_blocks: tuple[int, ...] = ()  # D's blocks that P writes (after D's own prefix hit)
    notified: int = 0  # D ranks that saw P's notification
    plain_greedy: bool = False  # greedy, no logits-shaping option: P's first token must equal D's
    foreign_kv: bool = False  # test seam: P computes other tokens; the blocks are never cached
    give_up: bool = False  # the workers were told to stop waiting for KV
    aborted: bool = False  # the client went away while waiting for KV
    p_answered: bool = False  # P's do_prefill outcome arrived
    d_first_token: int | None = None
    times: DecodeTimes | None = None
    recent: dict[str, Any] | None = None  # its entry in /stats `recent`, once finished
