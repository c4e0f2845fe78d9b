"""Where TTFT goes: one request at a time through pdpush's D, remote vs local, stage by stage.

Each prompt is sent twice (distinct prompts, so no prefix-cache hit): once with
`pdpush_prefill: remote` (P prefills and pushes) and once with `pdpush_prefill: local` (D
prefills, D otherwise idle). The client streams, so it sees the first token; D's stage offsets
for the request are the newest entry of D's /stats `recent` (requests go one at a time). The
client and D share a host, so the client's send and first-token times are placed on D's clock
through `t0_mono` (pdpush.connector.timing). P's stages are offsets from P's own admit time:
`overhead` (do_prefill sent → KV seen on D, minus P's admit → notification) is the part of the
round trip that is neither P's compute nor its WRITEs: HTTP, P's queue before its scheduler,
the notification's delivery.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import httpx

from pdpush.local.client import complete

REMOTE_STAGES = (
    # name, what it means (computed in remote_stages / local_stages)
    ("client_to_decide", "time from the client's send to D's decision"),
    ("decide_to_sent", "D: decision to do_prefill leaving the rpc thread"),
    ("p_queue", "P: admitted to first step scheduled"),
    ("p_prefill", "P: first step to the step with the prompt's end scheduled"),
    ("p_first_write", "P: admitted to first layer WRITE posted"),
    ("p_last_write_posted", "P: admitted to last layer WRITE posted"),
    ("p_write_tail", "P: last WRITE posted to last WRITE seen complete"),
    ("p_notified", "P: admitted to completion notification sent"),
    ("overhead", "D sent to D's worker seeing KV, minus P's admitted to notified"),
    ("d_notif_to_sched", "D: worker saw the notification to the scheduler knowing it"),
    ("d_kv_to_first_step", "D: KV known to the first step running the request"),
    ("d_first_step_to_token", "D's first step to the first token at the client"),
    ("ttft", "client: send to first token"),
)
LOCAL_STAGES = (
    ("client_to_decide", "time from the client's send to D's decision"),
    ("d_decide_to_first_step", "D: decision to the first step running the request"),
    ("d_first_step_to_token", "D's first step (the prefill) to the first token at the client"),
    ("ttft", "client: send to first token"),
)


def remote_stages(sent: float, first: float, timing: dict[str, Any]) -> dict[str, float]:
    """Stage durations (ms) of one remote request; a stage whose inputs are missing is left out."""
    t0, d, p = timing["t0_mono"], timing.get("d_ms", {}), timing.get("p_ms", {})
    client = {"sent": (sent - t0) * 1e3, "first": (first - t0) * 1e3}
    rules = {
        "client_to_decide": lambda: -client["sent"],
        "decide_to_sent": lambda: d["sent"],
        "p_queue": lambda: p["prefill_start"],
        "p_prefill": lambda: p["last_chunk"] - p["prefill_start"],
        "p_first_write": lambda: p["first_post"],
        "p_last_write_posted": lambda: p["last_post"],
        "p_write_tail": lambda: p["last_done"] - p["last_post"],
        "p_notified": lambda: p["notified"],
        "overhead": lambda: d["kv_notif"] - d["sent"] - p["notified"],
        "d_notif_to_sched": lambda: d["kv_seen"] - d["kv_notif"],
        "d_kv_to_first_step": lambda: d["first_step"] - d["kv_seen"],
        "d_first_step_to_token": lambda: client["first"] - d["first_step"],
        "ttft": lambda: client["first"] - client["sent"],
    }
    return _apply(rules)


def local_stages(sent: float, first: float, timing: dict[str, Any]) -> dict[str, float]:
    t0, d = timing["t0_mono"], timing.get("d_ms", {})
    client = {"sent": (sent - t0) * 1e3, "first": (first - t0) * 1e3}
    rules = {
        "client_to_decide": lambda: -client["sent"],
        "d_decide_to_first_step": lambda: d["first_step"],
        "d_first_step_to_token": lambda: client["first"] - d["first_step"],
        "ttft": lambda: client["first"] - client["sent"],
    }
    return _apply(rules)


def _apply(rules: dict) -> dict[str, float]:
    out = {}
    for name, rule in rules.items():
        try:
            out[name] = round(rule(), 3)
        except KeyError:
            continue
    return out


def medians(rows: list[dict[str, float]]) -> dict[str, float]:
    names = {k for row in rows for k in row}
    return {k: round(statistics.median(r[k] for r in rows if k in r), 3) for k in sorted(names)}


def one(client: httpx.Client, d_url: str, stats_url: str, prompt: list[int], mode: str,
        timeout_s: float) -> tuple[dict[str, float], str]:
    """One request through D in `mode` (remote | local): its stages and where it was prefilled."""
    sent = time.monotonic()
    done = complete(client, d_url, prompt, max_tokens=2, timeout_s=timeout_s,
                    extra={"kv_transfer_params": {"pdpush_prefill": mode}, "return_token_ids": True})
    first = sent + done.ttft_s
    deadline = time.monotonic() + 2.0
    while True:  # P's answer (its stages, D's `sent`) may come just after D's last token
        entry = client.get(stats_url, timeout=10.0).json()["recent"][-1]
        if entry["prefill"] != "remote" or "sent" in entry["d_ms"] or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    stages = (remote_stages if entry["prefill"] == "remote" else local_stages)(sent, first, entry)
    return stages, entry["prefill"]


def measure(client: httpx.Client, d_url: str, stats_url: str, lengths: list[int], repeats: int,
            make_prompts, timeout_s: float) -> dict[str, Any]:
    """Per prompt length: median stages of `repeats` remote and `repeats` local requests (after one
    warm-up of each), alternating so that drift hits both alike; `placed` counts where they ran."""
    out: dict[str, Any] = {}
    for length in lengths:
        prompts = make_prompts(2 * repeats + 2, length, seed=length)
        rows: dict[str, list] = {"remote": [], "local": []}
        placed: list[str] = []
        for i, prompt in enumerate(prompts):
            mode = "remote" if i % 2 == 0 else "local"
            stages, where = one(client, d_url, stats_url, prompt, mode, timeout_s)
            if i >= 2:  # the first pair warms both paths up
                placed.append(where)
                if where == mode:  # a remote prefill that fell back is counted, not timed
                    rows[mode].append(stages)
        out[str(length)] = {
            "remote": medians(rows["remote"]), "local": medians(rows["local"]),
            "samples": rows, "placed": {w: placed.count(w) for w in set(placed)},
        }
        remote_ttft, local_ttft = out[str(length)]["remote"].get("ttft"), out[str(length)]["local"].get("ttft")
        if remote_ttft is not None and local_ttft is not None:
            out[str(length)]["remote_minus_local_ms"] = round(remote_ttft - local_ttft, 3)
    return out


def markdown(result: dict[str, Any]) -> str:
    """One table per prompt length: median ms per stage, remote and local side by side."""
    lines = []
    for length, row in result.items():
        lines += [f"### {length}-token prompt (median ms; placed: {row['placed']})", "",
                  "| stage | remote | local | meaning |", "|---|---:|---:|---|"]
        meanings = dict(REMOTE_STAGES) | dict(LOCAL_STAGES)
        for name in [*dict(REMOTE_STAGES), *[n for n, _ in LOCAL_STAGES if n not in dict(REMOTE_STAGES)]]:
            r, loc = row["remote"].get(name), row["local"].get(name)
            if r is None and loc is None:
                continue
            lines.append(f"| {name} | {_fmt(r)} | {_fmt(loc)} | {meanings[name]} |")
        if "remote_minus_local_ms" in row:
            lines.append(f"\nremote − local TTFT: **{row['remote_minus_local_ms']:.1f} ms**")
        lines.append("")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1f}"
