"""The shared key of a D and its Ps, and what it signs: push targets and P's notifications.

Only D may direct P's writes (docs/architecture.md, "Trust model"). D signs every push target it
sends with HMAC-SHA256 over the canonical JSON of all of the target's fields (whatever fields
PushTarget has: a field added later is covered without touching this module), including a
per-request random nonce; P refuses a target whose signature does not verify or whose nonce it
has already seen. P signs its completion/failure notification over the request's nonce, so D can
tie it to the P it sent the target to.

The secret comes from a file (`auth_key_file`) or an environment variable (`auth_key_env`), never
from a command line, a config dict or a log. It holds the current key and optionally, on a second
line, the previous one: D signs with the current; P and D accept either (rotation: give every
peer "new\\nold", then, once all have restarted, "new").
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SIGNATURE_KEY = "signature"  # next to the target's fields in kv_transfer_params.pdpush
MIN_KEY_CHARS = 16


class AuthError(ValueError):
    """A missing or unusable key (configuration), or a message that does not verify."""


def canonical(fields: dict[str, Any]) -> bytes:
    """One byte string per set of fields, whatever the order or JSON spacing they came in."""
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def new_nonce() -> str:
    return secrets.token_hex(16)


@dataclass(frozen=True)
class Keys:
    current: bytes
    previous: bytes | None = None

    def __repr__(self) -> str:  # never print the secret, even in a traceback
        return f"Keys(rotating={self.previous is not None})"

    def sign(self, fields: dict[str, Any]) -> str:
        return hmac.new(self.current, canonical(fields), hashlib.sha256).hexdigest()

    def verify(self, fields: dict[str, Any], signature: Any) -> bool:
        """True when `signature` is the HMAC of `fields` under the current or previous key."""
        if not isinstance(signature, str):
            return False
        message = canonical(fields)
        ok = False
        for key in (self.current, self.previous):
            if key is not None:
                mac = hmac.new(key, message, hashlib.sha256).hexdigest()
                ok |= hmac.compare_digest(mac, signature)
        return ok

    @classmethod
    def parse(cls, text: str, source: str) -> "Keys":
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        if not lines or len(lines) > 2:
            raise AuthError(f"pdpush: {source} must hold the current key and optionally the "
                            f"previous one, one per line (found {len(lines)} lines)")
        if any(len(line) < MIN_KEY_CHARS for line in lines):
            raise AuthError(f"pdpush: a key in {source} is shorter than {MIN_KEY_CHARS} characters")
        current, *previous = (line.encode() for line in lines)
        return cls(current, previous[0] if previous else None)


def load_keys(key_file: str, key_env: str) -> Keys | None:
    """The keys named by the config (`auth_key_file` or `auth_key_env`); None when neither is set."""
    if key_file and key_env:
        raise AuthError("pdpush: set auth_key_file or auth_key_env, not both")
    if key_file:
        try:
            text = Path(key_file).read_text()
        except OSError as exc:
            raise AuthError(f"pdpush: cannot read auth_key_file {key_file}: {exc.strerror}") from exc
        return Keys.parse(text, f"auth_key_file {key_file}")
    if key_env:
        if key_env not in os.environ:
            raise AuthError(f"pdpush: auth_key_env names ${key_env}, which is not set")
        return Keys.parse(os.environ[key_env], f"${key_env}")
    return None


def write_key_file(directory: str | os.PathLike | None = None) -> Path:
    """A fresh random key in a new file readable by its owner only (mode 0600), for one cluster."""
    fd, path = tempfile.mkstemp(prefix="pdpush-key-", dir=directory)  # created 0600
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    return Path(path)


class NonceMemory:
    """The nonces P has accepted, each until its target's lease ended; bounded by count.

    A replayed target is refused while its nonce is remembered; after that its lease has ended
    and P refuses it as expired. The same request asking again (vLLM may call the matching hook
    more than once) is not a replay: the nonce is remembered with the request id."""

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._seen: OrderedDict[str, tuple[str, float]] = OrderedDict()

    def admit(self, nonce: str, req_id: str, expires: float, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        while self._seen and next(iter(self._seen.values()))[1] < now:
            self._seen.popitem(last=False)
        seen = self._seen.get(nonce)
        if seen is not None:
            return seen[0] == req_id
        self._seen[nonce] = (req_id, expires)
        if len(self._seen) > self.max_entries:
            self._seen.popitem(last=False)
        return True

    def __len__(self) -> int:
        return len(self._seen)


# How fast two hosts' monotonic clocks may drift apart: 1000 ppm, twice NTP's largest slew and
# ten times a free-running crystal's. ReplayGuard lets its reference offset rise this fast.
CLOCK_DRIFT = 1e-3


class ReplayGuard:
    """Why a signed target must not be taken again: its nonce was seen, or it is too old.

    The nonce memory alone lets a captured target through once it forgot the nonce (after its
    window, or 100 000 targets later). A target also carries D's monotonic clock at signing
    (`issued_s`); P never shares that clock, but the offset (P's now - issued_s) of each
    target of one D start is transit time plus the clocks' difference. The smallest offset seen
    stands for that difference, so a target's age is its offset minus the smallest one: a
    replay is as old as the capture. The two clocks may run at slightly different rates, so the
    reference rises by CLOCK_DRIFT per second since it was seen (a D up for weeks is not refused
    for its P's clock running fast; a replay needs days of silence from that D start to gain
    the 10 minutes the nonce memory covers). A target older than its own budget is refused: D's
    lease for it has ended, or nearly, whatever it is. Targets without a clock reading too."""

    def __init__(self, max_nonces: int = 100_000, max_sources: int = 4096) -> None:
        self.nonces = NonceMemory(max_nonces)
        self.max_sources = max_sources
        # per D start: (smallest offset, P's time when seen); most recently used last
        self._ref: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def refusal(self, nonce: str, req_id: str, source: str, issued_s: float, budget_s: float,
                remember_s: float, now: float | None = None) -> str:
        now = time.monotonic() if now is None else now
        if issued_s <= 0:
            return "the target has no issue time"
        age = self._age(source, now - issued_s, now)
        if age > budget_s:
            return f"the target was signed {age:.1f} s ago, beyond its {budget_s:g} s budget (a replay?)"
        if not self.nonces.admit(nonce, req_id, now + remember_s, now):
            return "this nonce was already used (replay)"
        return ""

    def _age(self, source: str, offset: float, now: float) -> float:
        best, seen = self._ref.pop(source, (offset, now))
        reference = best + CLOCK_DRIFT * (now - seen)
        self._ref[source] = (offset, now) if offset < reference else (best, seen)
        if len(self._ref) > self.max_sources:
            self._ref.popitem(last=False)
        return offset - reference
