"""P's sender ordering rule on real vLLM engines (issue 14): with the per-layer event wait skipped
and the KV write delayed, D's blocks get stale bytes; with the wait on, none.

Run by scripts/gpu_ordering.sh (one H200). With PDPUSH_GPU_DRY_RUN=1 (tests/gpu/gpu_helpers.py)
the same flow runs on vLLM CPU engines with the small model: no GPU delay there (CPU tensors have
no event and no stream), so both Ps must come out clean; it checks the plumbing, not the race.

Three vLLM servers on one device, started one after the other (an engine starting while another
allocates skews vLLM's memory profiling):
- P "skip": `debug_skip_layer_event` + `debug_delay_layer_us` (connector/config.py; the GPU sleep
  enqueued after each layer's event holds back the next layer's KV write, prefill_worker.py
  `_layer_event` says why that makes a premature WRITE likely);
- P "wait": the same delay, the event wait on (production's rule): the control;
- D: both Ps in prefill_urls, `debug_kv_digest` (connector/kv_digest.py: per-layer hashes of the
  blocks that changed since the previous call, and the D blocks of the requests D expects).
P piecewise CUDA graphs, D full ones (as in production), VLLM_BATCH_INVARIANT=1 on all three.

A trial is one new prompt sent to D "remote" (D's policy alternates its two Ps for one-at-a-time
requests; the response names the P) and then "local" (D's own prefill), each with its own cache
salt so neither reuses the other's blocks. The D blocks P filled are then matched, layer by
layer and bit for bit, against the blocks D wrote for its own prefill (gpu_helpers.compare_kv, as
the GPU suite does): a pushed block with no equal block in D's own run is wrong. This needs P's KV
to equal D's bit for bit, which batch invariance gives (the suite checks it); a block P shipped
before its KV was written is zeros or another prompt's KV. The greedy tokens and their logprobs
are compared too, as a weaker signal.
Output: OUT/results.json, OUT/results.md, OUT/logs/{P-skip,P-wait,D}.log.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "e2e")]

from e2e_helpers import complete, make_prompt, tokens, where  # noqa: E402
from gpu_helpers import (  # noqa: E402
    DECODE_ARGS, DRY_RUN, GPU_SPEC, PREFILL_ARGS, SERVER_ENV, compare_kv, model_dir,
)

from pdpush.connector.config import TEST_MODE_ENV, decode_kv_config, prefill_kv_config  # noqa: E402
from pdpush.local.cluster import VllmServer, free_port  # noqa: E402
from pdpush.local.tinymodel import ensure_tiny_model  # noqa: E402
from pdpush.rpc.json_server import get_json  # noqa: E402

MODES = ("skip", "wait")
MAX_TOKENS = 8


def setup() -> dict[str, Any]:
    """Prompt length and per-server flags for the GPU run or the CPU dry run (gpu_helpers)."""
    if DRY_RUN:  # two cores: one for D, one for the Ps
        return {"prompt": 300, "env": {}, "p_args": PREFILL_ARGS, "d_args": DECODE_ARGS,
                "cores": {"P-skip": 1, "P-wait": 1, "D": 0}}
    share = ["--gpu-memory-utilization", "0.25"]  # three engines on one GPU (argparse: last wins)
    return {"prompt": 1000,
            "env": {**SERVER_ENV, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0")},
            "p_args": [*PREFILL_ARGS, *share], "d_args": [*DECODE_ARGS, *share], "cores": {}}


def servers(cfg: dict[str, Any], model: Path, delay_us: int, logs: Path,
            side_port: int) -> list[VllmServer]:
    """P-skip, P-wait and D (in start order)."""
    def server(name: str, kv: dict, args: list[str]) -> VllmServer:
        return VllmServer(name, model, kv_transfer_config=kv, cpu_core=cfg["cores"].get(name),
                          extra_args=args, env=cfg["env"], log_dir=logs)

    skip = server("P-skip", prefill_kv_config(debug_skip_layer_event=True,
                                              debug_delay_layer_us=delay_us), cfg["p_args"])
    wait = server("P-wait", prefill_kv_config(debug_delay_layer_us=delay_us), cfg["p_args"])
    d_kv = decode_kv_config([skip.url, wait.url], debug_kv_digest=True, side_channel_port=side_port,
                            remote_threshold_tokens=64, prefill_timeout_s=60.0,
                            health_interval_s=1.0, retry_after_s=1.0)
    return [skip, wait, server("D", d_kv, cfg["d_args"])]


def ask(d: VllmServer, prompt: list[int], salt: str, mode: str) -> tuple[dict, float]:
    t0 = time.monotonic()
    body = complete(d.url, prompt, MAX_TOKENS, kv_transfer_params={"pdpush_prefill": mode},
                    cache_salt=salt, logprobs=1)
    return body, round(time.monotonic() - t0, 3)


def kv_digest(side_port: int) -> dict[str, Any]:
    """D's /kv_digest: blocks changed since the previous call, requests expected since."""
    return get_json(f"http://127.0.0.1:{side_port}/kv_digest", 60)


def logprob_gap(remote: dict, local: dict) -> float | None:
    """Largest |logprob difference| of the sampled tokens while both outputs agree (None: none)."""
    pairs = zip(tokens(remote), tokens(local), *(b["choices"][0]["logprobs"]["token_logprobs"]
                                                 for b in (remote, local)))
    gaps = []
    for tok_r, tok_l, lp_r, lp_l in pairs:
        if tok_r != tok_l:
            break
        gaps.append(abs(lp_r - lp_l))
    return max(gaps) if gaps else None


def trial(d: VllmServer, side_port: int, prompt: list[int], t: int) -> dict:
    """One prompt remote then local (D idle otherwise, the digest's snapshot taken before)."""
    remote, remote_s = ask(d, prompt, f"remote-{t}", "remote")
    pushed = kv_digest(side_port)
    local, local_s = ask(d, prompt, f"local-{t}", "local")
    own = kv_digest(side_port)  # also the next trial's snapshot
    placed = where(remote)
    if placed.get("prefill") != "remote" or len(pushed["expected"]) != 1:
        return {"trial": t, "not_remote": placed, "expected": pushed["expected"]}
    cmp = compare_kv(pushed, own)
    # The last block holds the last prompt token, which D computes itself after the push (and
    # D's decoded tokens): it is D's work, not P's, and differs from D's local prefill of the
    # whole prompt (tests/gpu/test_gpu_pd.py shows why). Only the blocks before it are P's alone.
    p_only = cmp["blocks"] - 1
    unmatched = {i: same for i, same in cmp["unmatched"].items() if i < p_only}
    wrong = [sum(not same[i] for same in unmatched.values()) for i in range(pushed["layers"])]
    return {"trial": t, "p": placed["url"], "blocks": p_only, "wrong_per_layer": wrong,
            "wrong_blocks": len(unmatched), "wrong_indices": sorted(unmatched),
            "last_block_differs": p_only in cmp["unmatched"],
            "d_blocks_written": cmp["local_blocks_written"],
            "tokens_equal": tokens(remote) == tokens(local),
            "logprob_gap": logprob_gap(remote, local), "remote_s": remote_s, "local_s": local_s}


def summarize(rows: list[dict]) -> dict[str, Any]:
    n = len(rows)
    return {"trials": n,
            "trials_with_wrong_kv": sum(r["wrong_blocks"] > 0 for r in rows),
            "wrong_blocks": sum(r["wrong_blocks"] for r in rows),
            "blocks_compared": sum(r["blocks"] for r in rows),
            "wrong_by_layer": [sum(col) for col in zip(*(r["wrong_per_layer"] for r in rows))],
            "trials_last_block_differs": sum(r["last_block_differs"] for r in rows),
            "trials_tokens_differ": sum(not r["tokens_equal"] for r in rows),
            "max_logprob_gap": max((r["logprob_gap"] or 0.0 for r in rows), default=None)}


class Report:
    """results.json + results.md, rewritten after every trial (a cut-short run still reports)."""

    def __init__(self, out: Path, meta: dict[str, Any]) -> None:
        self.out, self.started = out, time.time()
        self.doc: dict[str, Any] = {**meta, "summary": {}, "trials": {m: [] for m in MODES},
                                    "not_remote": []}

    def note(self, **items: Any) -> None:
        self.doc.update(items)
        self.flush()

    def add(self, mode: str, row: dict) -> None:
        self.doc["trials"][mode].append(row)
        self.doc["summary"][mode] = summarize(self.doc["trials"][mode])
        self.flush()

    def flush(self) -> None:
        self.doc["elapsed_s"] = round(time.time() - self.started, 1)
        (self.out / "results.json").write_text(json.dumps(self.doc, indent=1))
        lines = [f"# P's sender rule on vLLM engines ({self.doc['elapsed_s']} s)", ""]
        lines += [f"- {k}: {v}" for k, v in self.doc.items() if k not in ("summary", "trials")]
        lines += ["", "| P | event wait | trials | trials with wrong KV in D | wrong / P-only "
                  "blocks | wrong blocks by layer | trials where the last (D-computed) block differs "
                  "| trials where tokens differ | max logprob gap |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for mode, s in self.doc["summary"].items():
            lines.append(f"| {mode} | {'off' if mode == 'skip' else 'on'} | {s['trials']} "
                         f"| {s['trials_with_wrong_kv']} | {s['wrong_blocks']} / {s['blocks_compared']} "
                         f"| {s['wrong_by_layer']} | {s['trials_last_block_differs']} "
                         f"| {s['trials_tokens_differ']} "
                         f"| {s['max_logprob_gap']} |")
        (self.out / "results.md").write_text("\n".join(lines) + "\n")


def start(all_servers: list[VllmServer], report: Report) -> None:
    """One after the other: each engine profiles GPU memory alone."""
    for server in all_servers:
        t0 = time.monotonic()
        server.start()
        server.wait_healthy(300)
        report.note(**{f"{server.name}_up_s": round(time.monotonic() - t0, 1)})


def fence_ordering(d: VllmServer) -> int | None:
    """The GPUDirect RDMA write ordering D's ReceiveFence read (its start-up log line)."""
    found = re.findall(r"fence ordering (\d+)", d.log_path.read_text(errors="replace"))
    return int(found[-1]) if found else None


def run_trials(d: VllmServer, side_port: int, modes: dict[str, str], cfg: dict, n: int,
               report: Report, deadline: float) -> None:
    kv_digest(side_port)  # the first snapshot
    t = 0
    while min(len(report.doc["trials"][m]) for m in MODES) < n and t < 4 * n:
        if time.monotonic() > deadline:
            report.note(stopped="time budget spent before every trial ran")
            return
        row = trial(d, side_port, make_prompt(cfg["prompt"], 1000 + t), t)
        t += 1
        if "not_remote" in row:
            report.doc["not_remote"].append(row)
            continue
        mode = modes[row["p"]]
        if len(report.doc["trials"][mode]) < n:
            report.add(mode, row)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path, help="folder for results.json, results.md and logs/")
    ap.add_argument("--trials", type=int, default=20, help="trials per P (default 20)")
    ap.add_argument("--delay-us", type=int, default=2000, help="GPU delay before each layer's KV write")
    ap.add_argument("--budget-s", type=float, default=150.0,
                    help="no new trial this many seconds after the servers are up (default 150)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ[TEST_MODE_ENV] = "1"  # the debug_* settings: here and in the servers
    cfg = setup()
    report = Report(args.out, {"command": " ".join(sys.argv), "dry_run": DRY_RUN,
                               "delay_us": args.delay_us, "prompt_tokens": cfg["prompt"],
                               "server_env": cfg["env"], "prefill_args": cfg["p_args"],
                               "decode_args": cfg["d_args"]})
    model = ensure_tiny_model(model_dir(), GPU_SPEC)
    side_port = free_port()
    all_servers = servers(cfg, model, args.delay_us, args.out / "logs", side_port)
    skip, wait, d = all_servers
    try:
        start(all_servers, report)
        report.note(d_fence_ordering=fence_ordering(d), p_skip=skip.url, p_wait=wait.url)
        run_trials(d, side_port, {skip.url: "skip", wait.url: "wait"}, cfg, args.trials,
                   report, time.monotonic() + args.budget_s)
    finally:
        for server in reversed(all_servers):
            server.stop()
    print((args.out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
