"""D's question to P about blocks it holds: "may I release request X?" (the explicit answer).

D asks with an ordinary one-token completion whose `kv_transfer_params` carry RELEASE_KEY = D's
request id (vLLM's API server has no room for a custom endpoint; P's connector sees every
request in its scheduler). P answers in the response's `kv_transfer_params[RELEASED_KEY]`:
True when it tracks no push of X, and from then on refuses any push of X that reaches it later
(a tombstone: the do_prefill may still be on its way, or queued in P's server); False while a
push of X is still outstanding (D asks again later; P's notification will come).
With a shared key D signs the question (`release_fields`) and P answers only a signed one: a
tombstone makes P refuse that request's push, which nobody but D may ask for.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

RELEASE_KEY = "pdpush_release"
RELEASED_KEY = "pdpush_released"
RELEASE_SIGNATURE_KEY = "pdpush_release_signature"
TOMBSTONE_TTL_S = 3600.0  # far longer than any do_prefill can stay in flight


def release_query(params: dict[str, Any] | None) -> tuple[str, Any] | None:
    """(D's request id, the question's signature or None) when this completion is D's release
    question, else None."""
    value = (params or {}).get(RELEASE_KEY)
    if not isinstance(value, str) or not value:
        return None
    return value, (params or {}).get(RELEASE_SIGNATURE_KEY)


def release_fields(d_req_id: str) -> dict[str, Any]:
    """What D signs for a release question (connector/auth.py Keys.sign)."""
    return {"release": d_req_id}


def release_body(d_req_id: str, signature: str = "") -> dict[str, Any]:
    """The completion D sends to ask (one prompt token, one output token)."""
    params: dict[str, Any] = {RELEASE_KEY: d_req_id}
    if signature:
        params[RELEASE_SIGNATURE_KEY] = signature
    return {"prompt": [0], "max_tokens": 1, "temperature": 0.0, "kv_transfer_params": params}


@dataclass
class Tombstones:
    """D requests P answered "released" for: a push of them arriving later is refused."""

    _until: dict[str, float] = field(default_factory=dict)

    def add(self, d_req_id: str) -> None:
        now = time.monotonic()
        self._until = {k: t for k, t in self._until.items() if t > now}
        self._until[d_req_id] = now + TOMBSTONE_TTL_S

    def __contains__(self, d_req_id: str) -> bool:
        return self._until.get(d_req_id, 0.0) > time.monotonic()
