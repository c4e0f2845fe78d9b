"""What travels between the connector's halves and between D and P, as plain dataclasses.

- `PushTarget`: D → P inside `kv_transfer_params` of the do_prefill request (validated on P).
- `PushTask` / `PrefillStepMeta`: P's scheduler → P's workers, one step's blocks to WRITE.
- `DecodeStepMeta`: D's scheduler → D's workers: which requests to expect, which to give up on.
- `Notif`: P worker → D worker over NIXL after the last WRITE (or instead of it, on failure).

No vLLM import, so all of it is unit-tested in milliseconds; the facade wraps the step metas in
vLLM's KVConnectorMetadata (pdpush.vllm_api.StepMeta).
"""

from __future__ import annotations

import hmac
import json
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pdpush.connector.auth import SIGNATURE_KEY, Keys, ReplayGuard

PARAMS_KEY = "pdpush"  # kv_transfer_params[PARAMS_KEY] carries the PushTarget
CLIENT_MODE_KEY = "pdpush_prefill"  # client → D: "auto" (default), "local" or "remote"
CLIENT_MODES = ("auto", "local", "remote")
# Test-only seam: client → D, token ids sent to P instead of the prompt. The must-fail control
# uses it to prove that D really decodes from the pushed KV (B's prompt with A's KV gives A's
# text). Honoured only when D's config has test_allow_prefill_tokens (which needs
# PDPUSH_TEST_MODE=1); otherwise the request is served locally with a pdpush_error.
CLIENT_TOKENS_KEY = "pdpush_prefill_tokens"


# A budget is a duration, so a replayed target carries a full one: P remembers each nonce at
# least this long (and at most auth.NonceMemory's count), docs/architecture.md "Trust model".
REPLAY_MEMORY_S = 600.0


class ParamsError(ValueError):
    """Malformed kv_transfer_params; the message says which field and why."""


class Forbidden(ParamsError):
    """A push target that D did not sign (or signed for another request): P writes nothing."""


def blocks_for_tokens(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


@dataclass(frozen=True)
class PushTarget:
    """Where P writes one request's KV: D's blocks for the whole prompt, from `skip_tokens` on."""

    d_req_id: str  # D's engine request id; P echoes it in the completion notification
    d_engine_id: str
    side_channel: str  # "host:port" of D's rank-0 metadata server; rank r is port + r
    d_block_ids: tuple[int, ...]
    skip_tokens: int  # D's prefix-cache hit, block aligned: those blocks are not pushed
    block_size: int
    # Seconds P may push for, measured from D's send. A duration, not a time: each side reads
    # its own monotonic clock (P from the request's arrival, docs/architecture.md "Lease and
    # quarantine"), so clock steps and skew between hosts do not move the lease.
    budget_s: float
    nonce: str = ""  # per request, random: P accepts it once; P's notification carries it back
    d_instance_id: str = ""  # D's per-start id; P checks it against D's metadata server
    # D's monotonic clock when it signed: P cannot read it as a time, but it can compare the
    # targets of one D start with each other (auth.ReplayGuard: a target's age, to refuse a
    # replay after its nonce was forgotten).
    issued_s: float = field(default_factory=time.monotonic)

    def to_params(self, keys: Keys | None = None) -> dict[str, Any]:
        """The target as kv_transfer_params, signed over all of its fields when there is a key."""
        fields = {**asdict(self), "d_block_ids": list(self.d_block_ids)}
        if keys is not None:
            fields[SIGNATURE_KEY] = keys.sign(fields)
        return {PARAMS_KEY: fields}

    @classmethod
    def from_params(cls, params: dict[str, Any] | None,
                    keys: Keys | None = None) -> "PushTarget | None":
        """None when the request is not a pdpush prefill; ParamsError when it is but is broken;
        Forbidden (with a key) when its signature does not verify."""
        if not params or PARAMS_KEY not in params:
            return None
        raw = params[PARAMS_KEY]
        if not isinstance(raw, dict):
            raise ParamsError(f"kv_transfer_params.{PARAMS_KEY} must be an object")
        if keys is not None:
            check_signature(raw, keys)
        expected = {"d_req_id": str, "d_engine_id": str, "side_channel": str,
                    "d_block_ids": list, "skip_tokens": int, "block_size": int,
                    "budget_s": (int, float)}
        for name, kind in expected.items():
            if name not in raw:
                raise ParamsError(f"kv_transfer_params.{PARAMS_KEY}.{name} is missing")
            if not isinstance(raw[name], kind) or isinstance(raw[name], bool):
                raise ParamsError(f"kv_transfer_params.{PARAMS_KEY}.{name} has the wrong type")
        if not all(isinstance(b, int) and b >= 0 for b in raw["d_block_ids"]):
            raise ParamsError(f"kv_transfer_params.{PARAMS_KEY}.d_block_ids must be block ids")
        if raw["block_size"] <= 0 or raw["skip_tokens"] < 0 or raw["skip_tokens"] % raw["block_size"]:
            raise ParamsError(
                f"kv_transfer_params.{PARAMS_KEY}: skip_tokens must be a multiple of block_size"
            )
        if raw["budget_s"] <= 0:
            raise ParamsError(f"kv_transfer_params.{PARAMS_KEY}.budget_s must be > 0")
        host, _, port = raw["side_channel"].rpartition(":")
        if not host or not port.isdigit():
            raise ParamsError(f"kv_transfer_params.{PARAMS_KEY}.side_channel must be host:port")
        optional = {k: str(raw[k]) for k in ("nonce", "d_instance_id") if k in raw}
        issued = raw.get("issued_s", 0.0)
        if not isinstance(issued, (int, float)) or isinstance(issued, bool):
            raise ParamsError(f"kv_transfer_params.{PARAMS_KEY}.issued_s has the wrong type")
        return cls(**{**{k: raw[k] for k in expected}, **optional, "issued_s": float(issued),
                      "d_block_ids": tuple(raw["d_block_ids"])})

    def replay_window_s(self) -> float:
        """How long P must remember this target's nonce: until it is refused as expired."""
        return max(self.budget_s, REPLAY_MEMORY_S)

    def replay_refusal(self, guard: ReplayGuard, req_id: str) -> str:
        """Why P must not take this (signed) target again, or "" (auth.ReplayGuard)."""
        return guard.refusal(self.nonce, req_id, f"{self.d_engine_id}/{self.d_instance_id}",
                             self.issued_s, self.budget_s, self.replay_window_s())

    def check_prompt(self, num_prompt_tokens: int, block_size: int) -> None:
        """P's own geometry must match: same block size, enough D blocks for the prompt."""
        if block_size != self.block_size:
            raise ParamsError(f"block size differs: P {block_size}, D {self.block_size}")
        need = blocks_for_tokens(num_prompt_tokens, block_size)
        if len(self.d_block_ids) != need:
            raise ParamsError(
                f"{len(self.d_block_ids)} D blocks for a {num_prompt_tokens}-token prompt "
                f"(block size {block_size}) but {need} are needed"
            )


def check_signature(raw: dict[str, Any], keys: Keys) -> None:
    """Every field D sent, as sent, must be what D signed, with a nonce; else Forbidden."""
    fields = {k: v for k, v in raw.items() if k != SIGNATURE_KEY}
    if SIGNATURE_KEY not in raw:
        raise Forbidden(f"kv_transfer_params.{PARAMS_KEY} is not signed")
    if not keys.verify(fields, raw[SIGNATURE_KEY]):
        raise Forbidden(f"kv_transfer_params.{PARAMS_KEY}: the signature does not verify")
    if not isinstance(fields.get("nonce"), str) or not fields["nonce"]:
        raise Forbidden(f"kv_transfer_params.{PARAMS_KEY} has no nonce")


def client_mode(params: dict[str, Any] | None,
                allow_tokens: bool = False) -> tuple[str, list[int] | None]:
    """The client's optional routing hint on D: (mode, tokens for P); ParamsError if bad.

    Tokens for P (the test seam, CLIENT_TOKENS_KEY) are refused unless `allow_tokens`."""
    params = params or {}
    mode = params.get(CLIENT_MODE_KEY, "auto")
    if mode not in CLIENT_MODES:
        raise ParamsError(f"kv_transfer_params.{CLIENT_MODE_KEY} must be one of {CLIENT_MODES}, got {mode!r}")
    tokens = params.get(CLIENT_TOKENS_KEY)
    if tokens is None:
        return mode, None
    if not allow_tokens:
        raise ParamsError(f"kv_transfer_params.{CLIENT_TOKENS_KEY} is a test-only setting, off "
                          f"on this server (test_allow_prefill_tokens)")
    if not (isinstance(tokens, list) and tokens and all(isinstance(t, int) for t in tokens)):
        raise ParamsError(f"kv_transfer_params.{CLIENT_TOKENS_KEY} must be a list of token ids")
    return mode, tokens


@dataclass
class PushTask:
    """Blocks of one request to WRITE after each layer of this step (same order P and D)."""

    req_id: str  # P's engine request id
    target: PushTarget
    p_block_ids: list[int]
    d_block_ids: list[int]
    last: bool  # the prompt completes this step: send the notification after these WRITEs
    admitted: float = 0.0  # P's monotonic clock when its scheduler took the request (timing)
    post_until: float = float("inf")  # time.monotonic() on P after which no WRITE is posted


@dataclass
class PrefillStepMeta:
    tasks: list[PushTask] = field(default_factory=list)
    # P requests that ended before their last push (abort, error): stop and tell D.
    stopped: dict[str, PushTarget] = field(default_factory=dict)
    # P requests preempted this step: their blocks may be reused by this very forward, so
    # their in-flight WRITEs must complete first.
    preempted: list[str] = field(default_factory=list)


@dataclass
class DecodeStepMeta:
    # D requests whose KV is now on its way: match their notifications. Value: the D blocks P
    # is to fill (from skip_tokens on), reported as load errors if it fails (vLLM 0.26's way).
    expect: dict[str, list[int]] = field(default_factory=dict)
    # D requests whose remote prefill is over without KV (P error, lease ended): report failed.
    give_up: list[str] = field(default_factory=list)
    # The nonce of each request in `expect`: only a notification carrying it is P's word.
    nonces: dict[str, str] = field(default_factory=dict)
    batch_stats: Any = None  # pdpush.probe.BatchStats when the step probe is on


@dataclass(frozen=True)
class Notif:
    """P's last word on one request: ok after every WRITE completed, else why it stopped.

    It carries the request's nonce (only the P that D sent the signed target to knows it) and
    the sending agent's name; with a key, `mac` signs both with the outcome (`signed`)."""

    d_req_id: str
    ok: bool
    nbytes: int = 0
    reason: str = ""
    nonce: str = ""
    agent: str = ""  # the sender's NIXL agent name; D compares it with NIXL's
    mac: str = ""
    # P worker's stage offsets in ms (pdpush.connector.timing.P_WORKER_STAGES); () if unknown
    times: tuple[float, ...] = ()

    def _signed_fields(self) -> dict[str, Any]:
        return {"d_req_id": self.d_req_id, "nonce": self.nonce, "ok": self.ok,
                "nbytes": self.nbytes, "agent": self.agent}

    def signed(self, keys: Keys | None) -> "Notif":
        return self if keys is None else replace(self, mac=keys.sign(self._signed_fields()))

    def refusal(self, sender: str, nonce: str | None, keys: Keys | None) -> str:
        """Why D must ignore this notification ("" when it is the chosen P's word); with
        `nonce` None only the sender and the HMAC are checked."""
        if sender != self.agent:
            return f"sent by NIXL agent {sender!r} but names {self.agent!r}"
        if nonce is not None and not hmac.compare_digest(self.nonce, nonce):
            return "wrong nonce"
        if keys is not None and not keys.verify(self._signed_fields(), self.mac):
            return "bad signature"
        return ""

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> "Notif | None":
        """None for anything that is not one of ours (NIXL peers may send other notifs)."""
        try:
            raw = json.loads(data)
            times = tuple(float(t) for t in raw.get("times", ()))
            return cls(str(raw["d_req_id"]), bool(raw["ok"]), int(raw["nbytes"]), str(raw["reason"]),
                       str(raw.get("nonce", "")), str(raw.get("agent", "")),
                       str(raw.get("mac", "")), times)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None
