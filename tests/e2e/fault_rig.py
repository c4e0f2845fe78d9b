"""The fault matrix's rig (tests/e2e/test_e2e_fault_matrix.py): engines, canary, settling, report.

Two P with the fault seam (connector/faults.py, one trigger directory: whichever P a request
reaches stops at the point; `owner` tells which) and one D with the KV digest
(connector/kv_digest.py, D's `/kv_digest` on its side channel), all real vLLM CPU engines.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from e2e_helpers import LOG_DIR, complete, stats, tokens, wait_refusing, where

from pdpush.connector.config import TEST_MODE_ENV, decode_kv_config, prefill_kv_config
from pdpush.connector.faults import FAULT_HOOKS_ENV, FaultHooks
from pdpush.local.cluster import VllmServer, free_port

MATRIX_ENV = "PDPUSH_FAULT_MATRIX"  # "full": every point of every fault (see the test module)
FULL = os.environ.get(MATRIX_ENV) == "full"
TIMEOUT_S, GRACE_S = 4.0, 1.0  # D's prefill_timeout_s and lease_grace_s
LEASE_S = TIMEOUT_S + GRACE_S
HANG_SLACK_S = 3.0  # past the lease: D's recompute of a 700-token prompt on a shared 2-core machine
REMOTE = {"kv_transfer_params": {"pdpush_prefill": "remote"}}
MAX_TOKENS = 4
ENGINE_ENV = {FAULT_HOOKS_ENV: "1", TEST_MODE_ENV: "1"}  # fault seam (P), debug_kv_digest (D)

COLUMNS = {
    "cell": "the fault and where in the request's life on P it struck",
    "outcome": "correct: the aggregated engine's greedy tokens; clean error: the client's own "
               "abort (its timeout), no wrong answer; WRONG otherwise",
    "prefill": "where the prefill ran, from the answer's kv_transfer_params.pdpush",
    "seconds": "the client's own time from sending to its answer (or to its abort)",
    "leaked_P": "free blocks missing on the live P (sum) once settled, against their baseline "
                "(a restarted P's baseline is its fresh start)",
    "leaked_D": "free blocks missing on D once settled (held blocks count as missing)",
    "held_D": "blocks D still held once settled (connector/quarantine.py)",
    "reused": "canary: blocks D wrote for other work (the recompute) while P was stopped past "
              "the lease, i.e. blocks D reused while a late WRITE was possible",
    "late_bytes": "canary: blocks outside those D held whose bytes changed after P resumed, D "
                  "idle (D's /kv_digest, per-layer 64-bit hashes); - where P could not resume",
    "late_into_held": "blocks P wrote after it resumed, all of them inside blocks D held",
    "hang": "an answer past the lease + slack or none, or a request still waiting for KV once "
            "the lease ended, or held blocks not released after P resumed",
    "follow_up": "a remote request right after the cell: correct tokens, and where it ran",
    "after": "killed cells: once D's /stats shows the dead P's port refusing, two follow-ups one "
             "after the other, both remote on the other P; then the P restarted on its URL and "
             "serving remote prefills again",
}

NOTES = """Reading the table:
- P stopped at `accepted` / `between_layers`: P's transfer thread stops after its push-budget
  check and posts the WRITE when resumed, past the lease: the late WRITE the stop margin cannot
  prevent (docs/architecture.md, "Lease and quarantine"). `late_into_held` shows where such
  bytes went; at `before_accept` P reads the push target only after it resumed and pushes then.
  Whether a resumed P still posts depends on where its threads stand (0 or 2 blocks seen for the
  same cell in different runs); any such bytes must be inside held blocks (`late_bytes` 0).
- P stopped at `after_notify`: P's notification arrived before it stopped, so D decodes from
  the pushed KV (remote) and answers at once; the 2 s client abort of that row never fires.
- P killed: the time is D's recovery through "P known gone" (connection reset, health check
  refused), not the lease. Once a health check of the dead P was refused, D does not choose it,
  also while idle (it applies health reports when it steps; the refusal is known before).
"""

@dataclass
class Call:
    """One client completion through D on its own thread; `seconds` is the client's time."""

    url: str
    prompt: list[int]
    timeout: float = 120.0
    body: dict | None = None
    error: str = ""
    seconds: float | None = None
    start: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.body = complete(self.url, self.prompt, MAX_TOKENS, timeout=self.timeout, **REMOTE)
        except httpx.HTTPError as exc:
            self.error = repr(exc)
        self.seconds = round(time.monotonic() - self.start, 1)

    def join(self, timeout_s: float) -> bool:
        self.thread.join(timeout_s)
        return not self.thread.is_alive()


class FaultRig:
    """P0, P1 (fault seam) and D (digest); free-block baselines; follow-up prompts."""

    retry_after_s = 2.0  # D's: a P's open breaker lets a trial request through after it

    def __init__(self, model: Path, hooks_dir: Path, follow: list[tuple[list[int], list[int]]]):
        self.hooks = FaultHooks(str(hooks_dir))
        self.follow = iter(follow)  # (prompt, its reference tokens), one per use
        self.ports = {name: free_port() for name in ("P0", "P1", "D")}
        self.d_side = free_port()
        self.p = {name: VllmServer(f"matrix-{name}", model, cpu_core=1, log_dir=LOG_DIR,
                                   env=ENGINE_ENV, extra_args=["--max-num-batched-tokens", "256"],
                                   kv_transfer_config=prefill_kv_config(
                                       stats_port=self.ports[name], fault_hooks_dir=str(hooks_dir)))
                  for name in ("P0", "P1")}
        self.d = VllmServer("matrix-D", model, cpu_core=0, log_dir=LOG_DIR, env=ENGINE_ENV,
                            kv_transfer_config=decode_kv_config(
            [p.url for p in self.p.values()], remote_threshold_tokens=64, debug_kv_digest=True,
            side_channel_port=self.d_side, stats_port=self.ports["D"], prefill_timeout_s=TIMEOUT_S,
            lease_grace_s=GRACE_S, health_interval_s=1.0, retry_after_s=self.retry_after_s))
        self.baseline: dict[str, int] = {}

    def start(self) -> "FaultRig":
        for server in self.p.values():
            server.start()
        for server in self.p.values():
            server.wait_healthy(300)
        self.d.start().wait_healthy(300)
        self.baseline = {name: self.stats(name)["free_blocks"] for name in self.ports}
        return self

    def stop(self) -> None:
        for server in (self.d, *self.p.values()):
            server._signal_group(signal.SIGCONT)
            server.stop()

    def stats(self, name: str) -> dict:
        return stats(self.ports[name])

    def name_of(self, url: str | None) -> str:
        return next((n for n, p in self.p.items() if p.url == url), str(url))

    def owner(self, pid: int) -> str:
        """The P whose process group holds `pid` (a server runs in its own session)."""
        group = os.getpgid(pid)
        return next(n for n, p in self.p.items() if p._proc is not None and p._proc.pid == group)

    def resume(self) -> None:
        for server in self.p.values():
            server._signal_group(signal.SIGCONT)

    def digest(self) -> dict:
        """D's /kv_digest: blocks changed since the previous call, remote requests since."""
        return httpx.get(f"http://127.0.0.1:{self.d_side}/kv_digest", timeout=120).json()

    def held_released(self, timeout_s: float = 20.0) -> bool:
        end = time.monotonic() + timeout_s
        while self.stats("D")["held_requests"] and time.monotonic() < end:
            time.sleep(0.2)
        return not self.stats("D")["held_requests"]

    def settle(self) -> dict:
        """Leaks once things settled (live P and D back at their baselines, or 30 s), and a
        remote follow-up request."""
        live = [n for n in self.ports if n == "D" or self.p[n].alive()]
        end = time.monotonic() + 30
        while True:
            free = {n: self.stats(n)["free_blocks"] for n in live}
            if all(free[n] == self.baseline[n] for n in live) or time.monotonic() > end:
                break
            time.sleep(0.5)
        follow = self.follow_ups()[0]
        return {"leaked_P": sum(self.baseline[n] - free[n] for n in live if n != "D"),
                "leaked_D": self.baseline["D"] - free["D"], "held_D": self.stats("D")["held_blocks"],
                "follow_up": follow}

    def follow_ups(self, n: int = 1) -> list[str]:
        """`n` remote follow-up requests at once: 'correct|WRONG <prefill> <P>' each."""
        pending = [(Call(self.d.url, prompt), expected)
                   for prompt, expected in (next(self.follow) for _ in range(n))]
        seen = []
        for call, expected in pending:
            call.join(120)
            place = where(call.body) if call.body else {}
            ok = "correct" if call.body and tokens(call.body) == expected else "WRONG"
            seen.append(f"{ok} {place.get('prefill')} {self.name_of(place.get('url'))}")
        return seen

    def avoided(self, dead: str) -> tuple[str, bool]:
        """After P `dead` was killed and D saw its port refuse: two follow-ups, one after the
        other, both remote on the other P (also the first, decided while D was idle)."""
        alive = next(n for n in self.p if n != dead)
        wait_refusing(self.ports["D"], self.p[dead].url)
        first, second = self.follow_ups()[0], self.follow_ups()[0]
        ok = first == second == f"correct remote {alive}"
        return f"next: {first}; then: {second}", ok

    def restart(self, name: str) -> tuple[str, bool]:
        """Start P `name` again on its URL; then pairs of follow-ups at once (D spreads them
        over both P by load; its breaker re-admits the restarted P with one trial request) until
        one runs there, at most 3 pairs."""
        server = self.p[name]
        server.stop()
        server.start().wait_healthy(300)
        self.baseline[name] = self.stats(name)["free_blocks"]
        time.sleep(self.retry_after_s + 1.0)  # the last refused health check's breaker time
        for attempt in range(1, 4):
            seen = self.follow_ups(2)
            if f"correct remote {name}" in seen:
                return f"restarted: {' / '.join(seen)} (pair {attempt})", True
        return f"restarted: NOT USED ({' / '.join(seen)})", False


class Canary:
    """D's KV bytes around a cell whose P was stopped past the lease (connector/kv_digest.py).

    `before` takes the snapshot; `at_lease_end` (P still stopped, the lease over) notes the
    request's own blocks, whether D holds them, and the blocks D reused meanwhile (changed, not
    the request's); `after_resume` (P resumed, D idle) finds the blocks changed since: inside the
    held blocks they are P's late WRITEs that the hold caught, anywhere else they are late bytes
    in blocks D may have given to someone else."""

    def __init__(self, rig: FaultRig) -> None:
        self.rig = rig
        self.own: set[int] = set()
        self.held: set[int] = set()
        self.reused = 0

    def before(self) -> None:
        self.rig.digest()

    def at_lease_end(self) -> None:
        seen = self.rig.digest()
        self.own = {b for blocks in seen["expected"].values() for b in blocks}
        held = self.rig.stats("D")["held_blocks"]
        assert held in (0, len(self.own)), (held, self.own)  # all or nothing of this request
        self.held = self.own if held else set()
        self.reused = len({int(b) for b in seen["changed"]} - self.own)

    def after_resume(self) -> dict:
        changed = {int(b) for b in self.rig.digest()["changed"]}
        return {"reused": self.reused, "late_bytes": len(changed - self.held),
                "late_into_held": len(changed & self.held)}


def _tree() -> str:
    """The commit the run used, "+changes" when the working tree differed from it (outside
    results/, which this report itself changes as it goes)."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                            ":!results"], capture_output=True, text=True).stdout.strip()
    return (head.stdout.strip() or "unknown") + ("+changes" if dirty else "")


def write_report(rows: list[dict]) -> Path | None:
    """JSON + markdown: results/faults/<date>/ for the full matrix, out/faults/<date>/ for the
    default subset (so a plain test run never replaces the committed table)."""
    if not rows:
        return None
    today = datetime.date.today().isoformat()
    out = Path("results/faults" if FULL else "out/faults") / today
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(json.dumps(rows, indent=1) + "\n")
    keys = [k for k in COLUMNS if any(k in row for row in rows)]
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    legend = [f"- `{k}`: {COLUMNS[k]}" for k in keys]
    env = f"{MATRIX_ENV}=full " if FULL else ""
    command = (f"{env}flock /tmp/pdpush-engines.lock env PYTHONPATH=src .venv/bin/python -m pytest "
               "tests/e2e/test_e2e_fault_matrix.py -q")
    (out / "README.md").write_text(
        f"# Fault matrix ({today}, {'full' if FULL else 'default subset'})\n\n"
        f"Command: `{command}`\n(tree {_tree()}; Python {sys.version.split()[0]}; lease {TIMEOUT_S} s + grace "
        f"{GRACE_S} s; hang slack {HANG_SLACK_S} s; what the matrix does and does not cover: "
        f"the module docstring of tests/e2e/test_e2e_fault_matrix.py.) The test suite runs one "
        f"point per fault and writes to out/faults/; `{MATRIX_ENV}=full` runs every cell and "
        f"writes here.\n\n"
        + "\n".join(table) + "\n\nColumns:\n" + "\n".join(legend) + "\n\n" + NOTES)
    return out
