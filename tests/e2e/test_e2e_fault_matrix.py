"""The fault matrix (issue 10) on real vLLM CPU engines, through the fault seam (connector/faults.py).

One P (fault hooks on) and one D. Cells:
- P stopped past the lease at each point of a request's life on P (SIGSTOP of the process that
  reaches the point, SIGCONT after D's lease ended);
- the client aborting while P is stopped at each point;
- P killed at `between_layers`, then restarted on the same URL.
Per cell: outcome (the aggregated engine's greedy tokens, or a clean error for the abort), time
to completion, blocks leaked on P and D (free blocks back to their baseline, /stats), blocks D
still holds, and late bytes seen as wrong tokens of requests sent right after P resumed (they
run in the blocks D reused). Not covered here: two P with one dying (tests/e2e/test_e2e_failures.py
kills one of two), D prefix-cache hits. The table is written to results/faults/<date>/ with the
command that made it.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from e2e_helpers import LOG_DIR, complete, make_prompt, reference_outputs, stats, tokens, where

from pdpush.connector.config import decode_kv_config, prefill_kv_config
from pdpush.connector.faults import FAULT_HOOKS_ENV, POINTS, FaultHooks
from pdpush.local.cluster import VllmServer, free_port

pytestmark = pytest.mark.e2e
MAX_TOKENS = 4
TIMEOUT_S, GRACE_S = 4.0, 1.0
PROMPTS = {f"{kind}-{p}": make_prompt(700, 400 + 10 * i + j)
           for j, kind in enumerate(("stop", "abort")) for i, p in enumerate(POINTS)}
PROMPTS.update({"kill": make_prompt(700, 500), "after-restart": make_prompt(700, 501)},
               **{f"follow{i}": make_prompt(300, 600 + i) for i in range(len(POINTS) * 2 + 1)})
REMOTE = {"kv_transfer_params": {"pdpush_prefill": "remote"}}
ROWS: list[dict] = []


@pytest.fixture(scope="module")
def reference(tiny_model: Path) -> dict[str, list[int]]:
    return reference_outputs(tiny_model, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def rig(tiny_model: Path, reference, tmp_path_factory):
    os.environ[FAULT_HOOKS_ENV] = "1"  # the test process validates P's config too
    hooks = FaultHooks(str(tmp_path_factory.mktemp("faults")))
    ports = {"P": free_port(), "D": free_port()}
    p = VllmServer("matrix-P", tiny_model, cpu_core=1, log_dir=LOG_DIR, env={FAULT_HOOKS_ENV: "1"},
                   extra_args=["--max-num-batched-tokens", "256"],
                   kv_transfer_config=prefill_kv_config(stats_port=ports["P"],
                                                        fault_hooks_dir=str(hooks.dir)))
    d = VllmServer("matrix-D", tiny_model, cpu_core=0, log_dir=LOG_DIR, kv_transfer_config=decode_kv_config(
        [p.url], remote_threshold_tokens=64, side_channel_port=free_port(), stats_port=ports["D"],
        prefill_timeout_s=TIMEOUT_S, lease_grace_s=GRACE_S, health_interval_s=1.0, retry_after_s=2.0))
    try:
        p.start().wait_healthy(300)
        d.start().wait_healthy(300)
        baseline = {name: stats(port)["free_blocks"] for name, port in ports.items()}
        yield {"P": p, "D": d, "hooks": hooks, "ports": ports, "baseline": baseline,
               "follow": iter(k for k in PROMPTS if k.startswith("follow"))}
    finally:
        for server in (d, p):
            server._signal_group(signal.SIGCONT)
            server.stop()
        write_report()


def settle(rig, reference) -> dict:
    """After a cell: leaks on P and D once things settled, held blocks, a follow-up request."""
    end = time.monotonic() + 30
    while time.monotonic() < end:
        now = {name: stats(port) for name, port in rig["ports"].items()}
        if all(now[n]["free_blocks"] == rig["baseline"][n] for n in now):
            break
        time.sleep(0.5)
    follow = next(rig["follow"])
    ok = tokens(complete(rig["D"].url, PROMPTS[follow], MAX_TOKENS, **REMOTE)) == reference[follow]
    return {"leaked_P": rig["baseline"]["P"] - now["P"]["free_blocks"],
            "leaked_D": rig["baseline"]["D"] - now["D"]["free_blocks"],
            "held_D": now["D"].get("held_requests"), "held_total_D": now["D"].get("held_total"),
            "follow_up_correct": ok}


def run_stopped(rig, name: str, point: str, client_timeout: float) -> tuple[dict | None, str, float, int]:
    """Send `name` through D with P armed to stop at `point`; resume P after the lease."""
    rig["hooks"].arm(point, "stop")
    box: dict = {}

    def call() -> None:
        try:
            box["body"] = complete(rig["D"].url, PROMPTS[name], MAX_TOKENS, timeout=client_timeout,
                                   **REMOTE)
        except httpx.HTTPError as exc:
            box["error"] = repr(exc)
        box["seconds"] = time.monotonic() - start  # the client's own time to its answer

    start = time.monotonic()
    caller = threading.Thread(target=call)
    caller.start()
    try:
        pid = rig["hooks"].wait_hit(point, timeout_s=60)
        time.sleep(max(0.0, start + TIMEOUT_S + GRACE_S + 1.0 - time.monotonic()))
    finally:
        rig["P"]._signal_group(signal.SIGCONT)
        rig["hooks"].release(point)
    caller.join(120)
    return box.get("body"), box.get("error", ""), box["seconds"], pid


@pytest.mark.parametrize("point", POINTS)
def test_p_stopped_past_the_lease(rig, reference, point):
    name = f"stop-{point}"
    body, error, elapsed, _ = run_stopped(rig, name, point, client_timeout=120)
    correct = body is not None and tokens(body) == reference[name]
    row = {"cell": f"P stopped past the lease at {point}", "outcome": "correct" if correct else
           f"WRONG {error}", "prefill": where(body).get("prefill") if body else None,
           "seconds": round(elapsed, 1), **settle(rig, reference)}
    ROWS.append(row)
    assert correct and row["leaked_P"] == 0 and row["leaked_D"] == 0 and row["follow_up_correct"], row


@pytest.mark.parametrize("point", POINTS)
def test_client_abort_while_p_stopped(rig, reference, point):
    body, error, elapsed, _ = run_stopped(rig, f"abort-{point}", point, client_timeout=2.0)
    clean = body is None and "Timeout" in error or body is not None
    row = {"cell": f"client abort, P stopped at {point}", "outcome": "clean error" if clean else
           f"UNCLEAN {error}", "prefill": None, "seconds": round(elapsed, 1), **settle(rig, reference)}
    ROWS.append(row)
    assert clean and row["leaked_P"] == 0 and row["leaked_D"] == 0 and row["follow_up_correct"], row


def test_p_killed_between_layers_then_restarted(rig, reference):
    rig["hooks"].arm("between_layers", "block")
    start = time.monotonic()
    with_p = threading.Thread(target=lambda: rig.update(
        kill_body=complete(rig["D"].url, PROMPTS["kill"], MAX_TOKENS, **REMOTE)))
    with_p.start()
    rig["hooks"].wait_hit("between_layers", timeout_s=60)
    rig["P"].kill()
    with_p.join(120)
    elapsed = time.monotonic() - start
    rig["hooks"].release("between_layers")
    rig["P"].stop()
    rig["P"].start().wait_healthy(300)  # same URL, a new process
    time.sleep(3.0)  # D's health checks bring it back (retry_after_s 2)
    body = rig["kill_body"]
    again = complete(rig["D"].url, PROMPTS["after-restart"], MAX_TOKENS, **REMOTE)
    rig["baseline"]["P"] = stats(rig["ports"]["P"])["free_blocks"]  # a fresh P
    row = {"cell": "P killed between layers, restarted on the same URL",
           "outcome": "correct" if tokens(body) == reference["kill"] else "WRONG",
           "prefill": where(body).get("prefill"), "seconds": round(elapsed, 1),
           "after_restart": where(again).get("prefill"), **settle(rig, reference)}
    ROWS.append(row)
    # Recovered by "P gone" rather than by the lease; the 2 s of slack are for a loaded 2-core
    # machine (5.1 s seen here with another engine test beside it, 0.6 s alone).
    assert row["outcome"] == "correct" and elapsed < TIMEOUT_S + GRACE_S + 2.0, row
    assert tokens(again) == reference["after-restart"] and row["leaked_D"] == 0, row


def write_report() -> None:
    if not ROWS:
        return
    out = Path("results/faults") / datetime.date.today().isoformat()
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(json.dumps(ROWS, indent=1) + "\n")
    keys = list(dict.fromkeys(k for row in ROWS for k in row))
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in ROWS]
    command = "flock /tmp/pdpush-engines.lock env PYTHONPATH=src .venv/bin/python -m pytest " \
              "tests/e2e/test_e2e_fault_matrix.py -q"
    (out / "README.md").write_text(
        f"# Fault matrix ({datetime.date.today()})\n\nCommand: `{command}`\n"
        f"(Python {sys.version.split()[0]}; lease {TIMEOUT_S} s + grace {GRACE_S} s; see the "
        f"module docstring for what each column means and what is not covered.)\n\n"
        + "\n".join(lines) + "\n")
