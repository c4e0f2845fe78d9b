"""P's sender ordering rule on real vLLM engines (issue 14): with the per-layer event wait skipped
and the KV write delayed, D's blocks get stale bytes; with the wait on, none.

Run by scripts/gpu_ordering.sh (one H200); `--cpu-dry-run` runs the same flow on vLLM CPU engines
with the tiny model (no GPU delay there: CPU tensors have no event and no stream, so both Ps must
come out clean; it checks the plumbing, not the race).

Three vLLM servers on one device, started one after the other (an engine starting while another
allocates skews vLLM's memory profiling):
- P "skip": `debug_skip_layer_event` + `debug_delay_layer_us` (connector/config.py; the GPU sleep
  enqueued after each layer's event holds back the next layer's KV write, prefill_worker.py
  `_layer_event` says why that makes a premature WRITE likely);
- P "wait": the same delay, the event wait on (production's rule): the control;
- D: both Ps in prefill_urls, `debug_kv_compare` (connector/debug_kv.py).
P piecewise CUDA graphs, D full ones (as in production), VLLM_BATCH_INVARIANT=1 on all three.

A trial is one new prompt sent to D "remote" (D's policy alternates its two Ps for one-at-a-time
requests; the response names the P) and then "local" (D's own prefill), each with its own cache
salt so neither reuses the other's blocks. D then compares, layer by layer, the blocks P pushed in
full with the blocks of D's own prefill (same positions of the same prompt): a block is wrong when
it differs by more than TOLERANCE of its largest value (rounding between two engines stays far
below; a block P shipped before its KV was written is zeros or another prompt's KV). The greedy
tokens and their logprobs are compared too, as a weaker signal.
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
    BLOCK_SIZE, DECODE_ARGS, GPU_SPEC, PREFILL_ARGS, SERVER_ENV, model_dir,
)

from pdpush.connector.config import TEST_MODE_ENV, decode_kv_config, prefill_kv_config  # noqa: E402
from pdpush.connector.debug_kv import BLOCK_IDS_KEY, ROUTE  # noqa: E402
from pdpush.local.cluster import VllmServer, free_port  # noqa: E402
from pdpush.local.tinymodel import TinySpec, ensure_tiny_model  # noqa: E402
from pdpush.rpc.json_server import get_json  # noqa: E402

TOLERANCE = 0.1  # a block differs "for real" beyond 10 % of its largest magnitude
MODES = ("skip", "wait")
MAX_TOKENS = 8


def setup(cpu: bool) -> dict[str, Any]:
    """Model, block size, prompt length and server flags for the GPU run or the CPU dry run."""
    if cpu:  # the CPU attention backend needs blocks of 32; one core for D, one for the Ps
        args = ["--block-size", "32"]
        return {"spec": TinySpec(), "model": None, "block": 32, "prompt": 300, "env": {},
                "p_args": [*args, "--max-num-batched-tokens", "512"], "d_args": args,
                "cores": {"P-skip": 1, "P-wait": 1, "D": 0}}
    share = ["--gpu-memory-utilization", "0.25"]  # three engines on one GPU (argparse: last wins)
    return {"spec": GPU_SPEC, "model": model_dir(), "block": BLOCK_SIZE, "prompt": 1000,
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
    d_kv = decode_kv_config([skip.url, wait.url], debug_kv_compare=True, side_channel_port=side_port,
                            remote_threshold_tokens=64, prefill_timeout_s=60.0,
                            health_interval_s=1.0, retry_after_s=1.0)
    return [skip, wait, server("D", d_kv, cfg["d_args"])]


def ask(d: VllmServer, prompt: list[int], salt: str, mode: str) -> tuple[dict, float]:
    t0 = time.monotonic()
    body = complete(d.url, prompt, MAX_TOKENS, kv_transfer_params={"pdpush_prefill": mode},
                    cache_salt=salt, logprobs=1)
    return body, round(time.monotonic() - t0, 3)


def block_ids(body: dict) -> list[int]:
    ids = (body.get("kv_transfer_params") or {}).get(BLOCK_IDS_KEY)
    if not ids:
        raise RuntimeError(f"D's response has no {BLOCK_IDS_KEY}: {body.get('kv_transfer_params')}")
    return ids


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


def trial(d: VllmServer, side_port: int, prompt: list[int], t: int, block: int) -> dict | None:
    """One prompt remote then local; D's comparison of the pushed blocks (None: not remote)."""
    remote, remote_s = ask(d, prompt, f"remote-{t}", "remote")
    local, local_s = ask(d, prompt, f"local-{t}", "local")
    placed = where(remote)
    if placed.get("prefill") != "remote":
        return {"trial": t, "not_remote": placed}
    first, end = placed.get("skip_tokens", 0) // block, (len(prompt) - 1) // block  # P's full blocks
    a, b = block_ids(remote)[first:end], block_ids(local)[first:end]
    cmp = get_json(f"http://127.0.0.1:{side_port}{ROUTE}?a={','.join(map(str, a))}"
                   f"&b={','.join(map(str, b))}", 60)
    layers = cmp["layers"]
    wrong = [sum(diff > TOLERANCE * scale for diff, scale in zip(v["max_abs_diff"], v["max_abs"]))
             for v in layers.values()]
    return {"trial": t, "p": placed["url"], "blocks": len(a), "wrong_per_layer": wrong,
            "wrong_blocks": sum(wrong),
            "unequal_blocks": sum(not e for v in layers.values() for e in v["equal"]),
            "max_abs_diff": max(max(v["max_abs_diff"]) for v in layers.values()),
            "tokens_equal": tokens(remote) == tokens(local),
            "logprob_gap": logprob_gap(remote, local), "remote_s": remote_s, "local_s": local_s}


def summarize(rows: list[dict]) -> dict[str, Any]:
    n = len(rows)
    return {"trials": n,
            "trials_with_wrong_kv": sum(r["wrong_blocks"] > 0 for r in rows),
            "wrong_blocks": sum(r["wrong_blocks"] for r in rows),
            "blocks_compared": sum(r["blocks"] * len(r["wrong_per_layer"]) for r in rows),
            "wrong_by_layer": [sum(col) for col in zip(*(r["wrong_per_layer"] for r in rows))],
            "trials_with_unequal_bytes": sum(r["unequal_blocks"] > 0 for r in rows),
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
        lines += ["", "| P | event wait | trials | trials with wrong KV in D | wrong / compared "
                  "(layer, block) | wrong by layer | trials with unequal bytes | trials where "
                  "tokens differ | max logprob gap |", "|---|---|---|---|---|---|---|---|---|"]
        for mode, s in self.doc["summary"].items():
            lines.append(f"| {mode} | {'off' if mode == 'skip' else 'on'} | {s['trials']} "
                         f"| {s['trials_with_wrong_kv']} | {s['wrong_blocks']} / {s['blocks_compared']} "
                         f"| {s['wrong_by_layer']} | {s['trials_with_unequal_bytes']} "
                         f"| {s['trials_tokens_differ']} | {s['max_logprob_gap']} |")
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
    t = 0
    while min(len(report.doc["trials"][m]) for m in MODES) < n and t < 4 * n:
        if time.monotonic() > deadline:
            report.note(stopped="time budget spent before every trial ran")
            return
        row = trial(d, side_port, make_prompt(cfg["prompt"], 1000 + t), t, cfg["block"])
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
    ap.add_argument("--cpu-dry-run", action="store_true", help="vLLM CPU engines, tiny model")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ[TEST_MODE_ENV] = "1"  # the debug_* settings: here and in the servers
    cfg = setup(args.cpu_dry_run)
    report = Report(args.out, {"command": " ".join(sys.argv), "delay_us": args.delay_us,
                               "tolerance": TOLERANCE, "prompt_tokens": cfg["prompt"],
                               "block_size": cfg["block"], "server_env": cfg["env"]})
    model = ensure_tiny_model(cfg["model"], cfg["spec"])
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
