"""Test-only fault seam: stop P at a named point of a request's life (the fault matrix's points).

Off unless the engine's config names `fault_hooks_dir` AND its environment has
`PDPUSH_FAULT_HOOKS=1` (config validation refuses the key otherwise, so a served config cannot
turn it on by accident). A test arms a point by writing a trigger file named after it into that
directory; the first request to reach the point takes the trigger (an atomic rename to
`<point>.hit`, which then holds the pid of the process that stopped) and:

- `stop`  (file content): the process sends itself SIGSTOP; the test resumes it with SIGCONT.
  With NIXL's progress thread off, a stopped P moves no data: its WRITEs stay where they were.
- `block` (file content, the default): the calling thread waits until the test deletes
  `<point>.hit` (threads in the same process, e.g. P's transfer thread, block alone).

Points, in the order a request meets them on P:
    before_accept     P's scheduler, before it reads the push target
    accepted          P's transfer thread, WRITEs decided, before the first is posted
    between_layers    P's transfer thread, before a later WRITE of the request is posted
    after_last_write  P's worker, every WRITE completed, before the notification to D
    after_notify      P's worker, notification sent, before the step returns (the HTTP answer)
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

FAULT_HOOKS_ENV = "PDPUSH_FAULT_HOOKS"
POINTS = ("before_accept", "accepted", "between_layers", "after_last_write", "after_notify")
ACTIONS = ("stop", "block")
POLL_S = 0.01


def fault_hooks_allowed() -> bool:
    return os.environ.get(FAULT_HOOKS_ENV) == "1"


class FaultHooks:
    """The armed-trigger directory; `at(point)` is a no-op unless a trigger file is there."""

    def __init__(self, directory: str) -> None:
        self.dir = Path(directory)

    @classmethod
    def from_dir(cls, directory: str) -> "FaultHooks | None":
        """None (no seam at all) unless configured and allowed by the environment."""
        return cls(directory) if directory and fault_hooks_allowed() else None

    def arm(self, point: str, action: str = "block") -> None:
        """The test side: the next request to reach `point` stops there."""
        if point not in POINTS or action not in ACTIONS:
            raise ValueError(f"unknown fault point or action: {point!r} {action!r}")
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / point).write_text(action)

    def hit(self, point: str) -> Path:
        return self.dir / f"{point}.hit"

    def wait_hit(self, point: str, timeout_s: float) -> int:
        """The test side: the pid that stopped at `point` (TimeoutError if none did in time)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            try:
                pid = self.hit(point).read_text()
            except OSError:
                pid = ""
            if pid:
                return int(pid)
            time.sleep(POLL_S)
        raise TimeoutError(f"no request reached fault point {point} within {timeout_s}s")

    def release(self, point: str) -> None:
        """The test side: let a `block`ed caller go on (a `stop`ped process needs SIGCONT)."""
        self.hit(point).unlink(missing_ok=True)

    def at(self, point: str) -> None:
        """P's side: take the trigger of `point` if armed, then stop or block as it says."""
        trigger, hit = self.dir / point, self.hit(point)
        taken = self.dir / f"{point}.taken.{os.getpid()}.{threading.get_ident()}"
        try:
            os.rename(trigger, taken)  # atomic: exactly one caller takes the trigger
        except OSError:
            return
        action = taken.read_text().strip() or "block"
        taken.write_text(str(os.getpid()))
        os.rename(taken, hit)  # the hit appears with the pid in it, never half-written
        if action == "stop":
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        while hit.exists():
            time.sleep(POLL_S)
