"""The fault matrix (issue 10) on real vLLM CPU engines, through the fault seam (connector/faults.py).

Two P (fault hooks on, one trigger directory) and one D (lease 4 s + grace 1 s, the KV digest on).
A cell arms a point of a request's life on P (before_accept, accepted, between_layers,
after_last_write, after_notify); the first request to reach it, on whichever P, stops there
(SIGSTOP of that process), and then:
- P stopped past the lease: P is resumed once the client's answer came (it must not need P) and
  the lease is over. A canary (fault_rig.Canary, D's /kv_digest) checks that no byte P writes after
  it resumed lands outside the blocks D held at the lease's end, i.e. in a block D may reuse;
- client abort: the same with a client that gives up after 2 s;
- P killed: P's whole process group gets SIGKILL while stopped at the point (no timer); the
  request must complete within seconds, not the lease; the next remote request must go to the
  other P at once; the dead P is restarted on its URL and must serve remote prefills again;
- two P with one killed: four requests spread over both P, one P killed at `between_layers`;
  every request completes, later ones go to the survivor (last cell: the dead P stays dead);
- prefix hits on D: a prompt whose blocks D holds fully (sent before) or partly (a prompt sharing
  its first 384 tokens with one sent before), forced remote: correct, no hang.
Every cell records outcome, time, leaks on P and D, held blocks, canary columns, hang and a
follow-up request (fault_rig.COLUMNS says what each means); the assertions are the matrix's
target: correct or clean, 0 leaked, 0 late bytes, no hang.

By default (the test suite) a representative subset runs: one point per fault kind. The whole
matrix runs with `PDPUSH_FAULT_MATRIX=full` (13-15 min on 2 cores) and writes its table to
results/faults/<date>/; the subset writes to out/faults/<date>/.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from e2e_helpers import make_prompt, reference_outputs, tokens, where
from fault_rig import (
    FULL, HANG_SLACK_S, LEASE_S, MAX_TOKENS, Call, Canary, FaultRig, write_report,
)

from pdpush.connector.config import TEST_MODE_ENV
from pdpush.connector.faults import FAULT_HOOKS_ENV, POINTS

pytestmark = pytest.mark.e2e
STOP_POINTS = POINTS if FULL else ("before_accept",)
ABORT_POINTS = POINTS if FULL else ("between_layers",)
KILL_POINTS = POINTS if FULL else ("between_layers",)
TWO_P = [f"two-p{i}" for i in range(4)]
N_FOLLOW = 8 + len(STOP_POINTS) + len(ABORT_POINTS) + 9 * len(KILL_POINTS)
PROMPTS = {f"{kind}-{p}": make_prompt(700, 400 + 10 * i + j)
           for j, kind in enumerate(("stop", "abort", "kill")) for i, p in enumerate(POINTS)}
PROMPTS.update({name: make_prompt(700, 470 + i) for i, name in enumerate(TWO_P)})
PROMPTS.update({"prefix-full": make_prompt(700, 480), "prefix-base": make_prompt(700, 481)})
PROMPTS["prefix-partial"] = PROMPTS["prefix-base"][:384] + make_prompt(316, 482)
FOLLOW = {f"follow{i}": make_prompt(300, 600 + i) for i in range(N_FOLLOW)}
ROWS: list[dict] = []


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[str, list[int]]:
    return reference_outputs(tiny_model, {**PROMPTS, **FOLLOW}, MAX_TOKENS)


@pytest.fixture(scope="module")
def rig(tiny_model: Path, reference, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        for key in (FAULT_HOOKS_ENV, TEST_MODE_ENV):  # this process validates the configs too
            env.setenv(key, "1")
        follow = [(FOLLOW[k], reference[k]) for k in FOLLOW]
        rig = FaultRig(tiny_model, tmp_path_factory.mktemp("faults"), follow)
        try:
            yield rig.start()
        finally:
            rig.stop()
            write_report(ROWS)


def outcome(body: dict | None, expected: list[int], error: str = "") -> str:
    if body is None:
        return f"WRONG no answer {error}"
    return "correct" if tokens(body) == expected else "WRONG tokens"


def prefill_of(call: Call) -> str | None:
    return where(call.body).get("prefill") if call.body else None


def record(row: dict) -> dict:
    ROWS.append(row)
    return row


def assert_target(row: dict) -> None:
    assert row["outcome"] in ("correct", "clean error"), row
    assert row["leaked_P"] == 0 and row["leaked_D"] == 0 and row["held_D"] == 0, row
    assert row.get("late_bytes", 0) == 0 and not row["hang"], row
    assert row["follow_up"].startswith("correct"), row


def run_stopped(rig: FaultRig, name: str, point: str, client_timeout: float) -> tuple[Call, dict]:
    """Send `name` with P armed to stop at `point`; resume P once the answer came (or should
    have) and the lease is over. Returns the call and the canary and hang columns."""
    canary = Canary(rig)
    canary.before()
    rig.hooks.arm(point, "stop")
    call = Call(rig.d.url, PROMPTS[name], timeout=client_timeout)
    try:
        rig.hooks.wait_hit(point, timeout_s=60)
        answered = call.join(LEASE_S + HANG_SLACK_S)  # the answer must not wait for P
        time.sleep(max(0.0, call.start + LEASE_S + 0.5 - time.monotonic()))  # lease surely over
        waiting = rig.stats("D")["waiting_for_kv"]
        canary.at_lease_end()
    finally:
        rig.resume()
        rig.hooks.release(point)
    call.join(120)
    released = rig.held_released()
    columns = canary.after_resume()
    return call, {**columns, "hang": not answered or waiting > 0 or not released}


@pytest.mark.parametrize("kind", ["full", "partial"])
def test_prefix_hit_on_d(rig, reference, kind):
    seed = "prefix-full" if kind == "full" else "prefix-base"
    name = "prefix-full" if kind == "full" else "prefix-partial"
    first = Call(rig.d.url, PROMPTS[seed])
    assert first.join(120) and outcome(first.body, reference[seed]) == "correct", first
    call = Call(rig.d.url, PROMPTS[name])
    answered = call.join(LEASE_S + HANG_SLACK_S)
    call.join(120)
    place = where(call.body) if call.body else {}
    prefill = f"{place.get('prefill')} (D hit {place.get('skip_tokens', place.get('reason'))})"
    row = record({"cell": f"{kind} prefix hit on D", "outcome": outcome(call.body, reference[name]),
                  "prefill": prefill, "seconds": call.seconds, "hang": not answered,
                  **rig.settle()})
    assert_target(row)
    if kind == "partial":
        assert place.get("prefill") == "remote" and place.get("skip_tokens", 0) > 0, place


@pytest.mark.parametrize("point", STOP_POINTS)
def test_p_stopped_past_the_lease(rig, reference, point):
    name = f"stop-{point}"
    call, columns = run_stopped(rig, name, point, client_timeout=120)
    row = record({"cell": f"P stopped past the lease at {point}",
                  "outcome": outcome(call.body, reference[name], call.error),
                  "prefill": prefill_of(call),
                  "seconds": call.seconds, **columns, **rig.settle()})
    assert_target(row)


@pytest.mark.parametrize("point", ABORT_POINTS)
def test_client_abort_while_p_stopped(rig, reference, point):
    name = f"abort-{point}"
    call, columns = run_stopped(rig, name, point, client_timeout=2.0)
    clean = "clean error" if call.body is None and "Timeout" in call.error else \
        outcome(call.body, reference[name], call.error)
    row = record({"cell": f"client abort (2 s), P stopped at {point}", "outcome": clean,
                  "prefill": prefill_of(call), "seconds": call.seconds, **columns, **rig.settle()})
    assert_target(row)


def kill_at(rig: FaultRig, point: str, names: list[str]) -> tuple[str, dict[str, Call]]:
    """Send `names` at once; SIGKILL the P that stops at `point` (its whole process group)."""
    rig.hooks.arm(point, "stop")
    calls = {name: Call(rig.d.url, PROMPTS[name]) for name in names}
    victim = rig.owner(rig.hooks.wait_hit(point, timeout_s=60))
    rig.p[victim].kill()
    for call in calls.values():
        call.join(120)
    rig.hooks.release(point)
    return victim, calls


@pytest.mark.parametrize("point", KILL_POINTS)
def test_p_killed(rig, reference, point):
    name = f"kill-{point}"
    victim, calls = kill_at(rig, point, [name])
    call = calls[name]
    next_ones, avoided = rig.avoided(victim)
    restarted, serving = rig.restart(victim)
    row = record({"cell": f"P killed at {point}", "outcome": outcome(call.body, reference[name],
                                                                    call.error),
                  "prefill": prefill_of(call),
                  "seconds": call.seconds, "hang": call.seconds is None or call.seconds > LEASE_S,
                  "after": f"{next_ones}; {restarted}", **rig.settle()})
    assert_target(row)
    # Recovered because P is gone, not by the lease: the 2 s of slack are for a loaded 2-core
    # machine (5.1 s seen with another engine test beside it, 0.6 s alone).
    assert call.seconds < LEASE_S + 2.0 and avoided and serving, row


def test_two_p_one_killed(rig, reference):
    """Last cell: the killed P is not restarted."""
    victim, calls = kill_at(rig, "between_layers", TWO_P)
    places = [f"{where(c.body).get('prefill')} {rig.name_of(where(c.body).get('url'))}"
              if c.body else "none" for c in calls.values()]
    wrong = [n for n, c in calls.items() if outcome(c.body, reference[n], c.error) != "correct"]
    next_ones, avoided = rig.avoided(victim)
    slowest = max((c.seconds or 1e9) for c in calls.values())
    row = record({"cell": f"two P, {victim} killed between layers (4 requests)",
                  "outcome": f"WRONG {wrong}" if wrong else "correct",
                  "prefill": ", ".join(sorted(places)), "seconds": slowest,
                  "hang": slowest > LEASE_S + HANG_SLACK_S, "after": next_ones, **rig.settle()})
    assert_target(row)
    assert avoided, row
