"""The GPU data-plane suite: spawns P and D, runs correctness, memory ordering, bandwidth and
the interference curve, and writes results.json (+ report.md and interference.png via report.py).
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pdpush.bench.gpu.shapes import SHAPES, fragmented_ids
from pdpush.transfer.engine import EngineConfig

log = logging.getLogger("pdpush.bench.gpu")

PHASES = ("correctness", "ordering", "bandwidth", "pipeline", "interference")


@dataclass
class SuiteConfig:
    device: str = "cuda"
    p_gpu: int = 0
    d_gpu: int = 0
    shapes: list[str] = field(default_factory=lambda: ["qwen2-7b", "qwen2-72b-tp4"])
    phases: list[str] = field(default_factory=lambda: list(PHASES))
    p_blocks: int = 1000
    d_blocks: int = 1500
    mean_run: float = 6.0
    trials: int = 5
    ordering_trials: int = 20
    slow_ms: float = 1.0
    bw_iters: int = 20
    interference_shape: str = "qwen2-7b"
    batch: int = 64
    ctx_lo: int = 1500
    ctx_hi: int = 2000
    steps: int = 200
    warmup: int = 20
    reps: int = 3
    settle_s: float = 0.3
    qps_ladder: list[float] = field(default_factory=lambda: [10, 30, 100, 300, 1000])
    seed: int = 0
    layer_ms: float = 2.0  # prefill GPU time per layer for the pipeline phase
    pipeline_trials: int = 3
    ucx_threads: int = 0
    post_threads: int = 1
    batch_layers: bool = True
    ucx_params: list[str] = field(default_factory=list)  # KEY=VALUE UCX backend init params

    def engine_config(self) -> EngineConfig:
        params = tuple(tuple(kv.split("=", 1)) for kv in self.ucx_params)
        return EngineConfig(num_threads=self.ucx_threads, backend_params=params)

    def gpu(self, role: str) -> int | None:
        if self.device == "cpu":
            return None
        return self.p_gpu if role == "P" else self.d_gpu


class WorkerError(RuntimeError):
    pass


class Proc:
    """One worker process (P or D) and its command pipe."""

    def __init__(self, ctx: Any, role: str, gpu: int | None, engine_config: EngineConfig,
                 post_threads: int = 1, batch_layers: bool = True):
        from pdpush.bench.gpu.workers import worker_main

        self.role = role
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main,
                                args=(role, child, gpu, engine_config, post_threads,
                                      batch_layers), daemon=True)
        self.proc.start()
        child.close()

    def send(self, name: str, **kwargs: Any) -> None:
        self.conn.send((name, kwargs))

    def result(self, timeout_s: float = 600.0) -> Any:
        if not self.conn.poll(timeout_s):
            raise WorkerError(f"{self.role}: no answer in {timeout_s}s")
        status, value = self.conn.recv()
        if status == "err":
            raise WorkerError(f"{self.role} failed:\n{value}")
        return value

    def call(self, name: str, **kwargs: Any) -> Any:
        self.send(name, **kwargs)
        return self.result()

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                self.conn.send(None)
            except OSError:
                pass
            self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


class Suite:
    def __init__(self, cfg: SuiteConfig, out: Path):
        self.cfg = cfg
        self.out = out
        self.rng = random.Random(cfg.seed)
        self.results: dict[str, Any] = {"config": asdict(cfg), "shapes": {}}
        self._tags = 0

    def tag(self, what: str) -> bytes:
        self._tags += 1
        return f"{what}-{self._tags}".encode()

    def run(self) -> dict[str, Any]:
        ctx = mp.get_context("spawn")
        engine = self.cfg.engine_config()
        self.d = Proc(ctx, "D", self.cfg.gpu("D"), engine)
        self.p = Proc(ctx, "P", self.cfg.gpu("P"), engine, self.cfg.post_threads,
                      self.cfg.batch_layers)
        t0 = time.time()
        try:
            for name in self.cfg.shapes:
                if set(self.cfg.phases) - {"interference"}:
                    self.results["shapes"][name] = self.run_shape(name)
                    self.save()
            if "interference" in self.cfg.phases:
                self.results["interference"] = self.run_interference()
        finally:
            self.p.close()
            self.d.close()
        self.results["wall_s"] = time.time() - t0
        return self.results

    def save(self) -> None:
        """Write what is measured so far (a later phase may fail or time out)."""
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))

    def connect(self, shape: str) -> dict:
        """Both sides allocate and register the shape's caches; P loads D's metadata."""
        info = self.d.call("setup", shape=shape, num_blocks=self.cfg.d_blocks)
        self.p.call("setup", shape=shape, num_blocks=self.cfg.p_blocks)
        self.p.call("connect", metadata=info["metadata"], remote_gpu=self.cfg.gpu("D"))
        return info

    def tables(self, shape: str) -> tuple[list[int], list[int]]:
        n = SHAPES[shape].prompt_blocks()
        cfg = self.cfg
        return (fragmented_ids(self.rng, n, cfg.p_blocks, cfg.mean_run),
                fragmented_ids(self.rng, n, cfg.d_blocks, cfg.mean_run))

    def push_once(self, layouts: list, shape: str, seed: int, **push_kw: Any) -> dict:
        """D zeroes its cache and waits; P pushes a prompt; D checks every byte."""
        src, dst = self.tables(shape)
        tag = self.tag("push")
        self.d.call("clear")
        self.d.send("expect", tag=tag, seed=seed, dst_ids=dst)
        pushed = self.p.call("push", d_layouts=layouts, src_ids=src, dst_ids=dst, seed=seed,
                             tag=tag, **push_kw)
        return {"push": pushed, "check": self.d.result()}

    def run_shape(self, shape: str) -> dict:
        cfg = self.cfg
        info = self.connect(shape)
        layouts = info["layouts"]
        out: dict[str, Any] = {"fence": info["fence"], "prompt_bytes": SHAPES[shape].prompt_bytes()}
        if "correctness" in cfg.phases:
            log.info("%s: correctness, %d pushes of a 2000-token prompt", shape, cfg.trials)
            out["correctness"] = [self.push_once(layouts, shape, seed=100 + t)
                                  for t in range(cfg.trials)]
        if "ordering" in cfg.phases and cfg.device == "cuda":
            out["ordering"] = {}
            for use_events in (False, True):
                log.info("%s: ordering, events=%s, %d trials", shape, use_events,
                         cfg.ordering_trials)
                out["ordering"]["with_event" if use_events else "without_event"] = [
                    self.push_once(layouts, shape, seed=200 + t, use_events=use_events,
                                   slow_ms=cfg.slow_ms, stale_seed=300 + t)["check"]
                    for t in range(cfg.ordering_trials)]
        if "bandwidth" in cfg.phases:
            log.info("%s: bandwidth", shape)
            src, dst = self.tables(shape)
            tag = self.tag("bw")
            self.d.send("expect", tag=tag)
            out["bandwidth"] = self.p.call("bandwidth", d_layouts=layouts, src_ids=src,
                                           dst_ids=dst, iters=cfg.bw_iters, tag=tag)
            self.d.result()
        if "pipeline" in cfg.phases:
            out["pipeline"] = self.run_pipeline(layouts, shape)
        return out

    def run_pipeline(self, layouts: list, shape: str) -> list[dict]:
        """Layer-wise push behind simulated prefill compute (`layer_ms` per layer): how much
        of the push is left exposed after the last layer's compute."""
        cfg = self.cfg
        log.info("%s: pipeline, %.1f ms compute per layer", shape, cfg.layer_ms)
        out = []
        for t in range(cfg.pipeline_trials):
            pushed = self.push_once(layouts, shape, seed=400 + t, slow_ms=cfg.layer_ms)
            src, _ = self.tables(shape)
            compute = self.p.call("compute_only", src_ids=src, seed=400 + t, slow_ms=cfg.layer_ms)
            out.append({"push_s": pushed["push"]["seconds"], "compute_s": compute,
                        "bad_blocks": pushed["check"]["bad_blocks"],
                        "post_us": pushed["push"]["post_us"]})
        return out

    def run_interference(self) -> dict:
        cfg = self.cfg
        shape = cfg.interference_shape
        info = self.connect(shape)
        log.info("interference: building the decode workload (batch %d)", cfg.batch)
        model = self.d.call("decode_setup", batch=cfg.batch, ctx_lo=cfg.ctx_lo, ctx_hi=cfg.ctx_hi)
        rates = [0.0, 1.0, 2.0, 3.0, *self._ladder(shape), float("inf")]
        # one window thrown away: the first one ran ~5% slow in every run (clocks, caches)
        self.d.call("decode_window", steps=cfg.steps, warmup=cfg.warmup)
        runs = []
        for rep in range(cfg.reps):
            for qps in rates:
                src, dst = self.tables(shape)
                runs.append(self.window(info["layouts"], src, dst, qps, rep))
                log.info("rep %d qps %s: %.3f GB/s in, step mean %.3f ms", rep, qps,
                         runs[-1]["gbps"], runs[-1]["mean_ms"])
        return {"decoder": model, "prompt_bytes": SHAPES[shape].prompt_bytes(), "runs": runs}

    def _ladder(self, shape: str) -> list[float]:
        """QPS steps between 3 and the path maximum measured in the bandwidth phase."""
        bw = self.results["shapes"].get(shape, {}).get("bandwidth")
        if not bw:
            return list(self.cfg.qps_ladder)
        best = bw["bytes"] / statistics.median(r["seconds"] for r in bw["layerwise"])
        max_qps = best / SHAPES[shape].prompt_bytes()
        return [q for q in self.cfg.qps_ladder if q < 0.7 * max_qps]

    def window(self, layouts: list, src: list[int], dst: list[int], qps: float, rep: int) -> dict:
        """P streams at `qps` while D times decode steps; then P stops and D drains."""
        cfg = self.cfg
        tag = self.tag("stream")
        self.p.send("stream", d_layouts=layouts, src_ids=src, dst_ids=dst, qps=qps, tag=tag,
                    max_inflight=4 if qps == float("inf") else 2)
        time.sleep(cfg.settle_s)
        lat = self.d.call("decode_window", steps=cfg.steps, warmup=cfg.warmup)
        self.d.send("expect", tag=tag)
        self.p.conn.send(("stop", {}))
        streamed = self.p.result()
        self.d.result()
        return {"rep": rep, "qps": qps if qps != float("inf") else "max",
                "gbps": streamed["bytes"] / streamed["seconds"] / 1e9,
                "prompts": streamed["prompts"], "mean_ms": statistics.fmean(lat),
                "min_ms": min(lat), "max_ms": max(lat), "p50_ms": statistics.median(lat),
                "latencies_ms": lat}


def run_suite(cfg: SuiteConfig, out: Path) -> dict[str, Any]:
    """Run the suite and write results.json, report.md and interference.png into `out`."""
    from pdpush.bench.gpu import report

    suite = Suite(cfg, out)
    results = suite.run()
    results["summary"] = report.summarize(results)
    suite.save()
    report.write(results, out)
    return results
