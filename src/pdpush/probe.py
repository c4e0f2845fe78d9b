"""Per-step decode probe: latency, batch shape and inbound (RX) traffic of every forward step on D.

D's worker half (connector/decode_worker.py) calls `step_begin()` from `bind` (vLLM's
`bind_connector_metadata`, before the forward) and `step_end()` from `wait_for_save` (after it), so
the probe needs no vLLM patch. GPU latency comes from CUDA events that are resolved a step or more
later (never a synchronize on the hot path); on the CPU it is perf_counter. Output: one JSON line per
step and/or Prometheus metrics, first TP rank only, off unless `kv_connector_extra_config` asks for
it. The settings (`probe_log`, `probe_metrics`, `probe_rx`, `probe_timer`, `probe_ab_steps`, or the
same names inside a `probe` object) are parsed by pdpush.connector.config.ProbeConfig.
"""

from __future__ import annotations

import json
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pdpush.connector.config import ConfigError, ProbeConfig
from pdpush.vllm_api import StepView

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075,
                     0.1, 0.2, 0.5, 1.0)  # fmt: skip


@dataclass(frozen=True)
class BatchStats:
    """Shape of one step's batch; context = tokens of a request once this step's tokens are in."""

    num_reqs: int
    num_tokens: int
    ctx_min: int
    ctx_max: int
    ctx_sum: int


def batch_stats_from(step: StepView) -> BatchStats:
    """Batch shape of one scheduler step."""
    contexts = [computed + scheduled for computed, scheduled in step.scheduled.values()]
    if not contexts:
        return BatchStats(0, 0, 0, 0, 0)
    return BatchStats(len(contexts), step.total_tokens, min(contexts), max(contexts), sum(contexts))


@dataclass(frozen=True)
class RxTotals:
    """Cumulative received bytes/packets; packets is None where the source cannot count them."""

    bytes: int
    packets: int | None


@dataclass(frozen=True)
class RxSource:
    """Where RX totals come from: `read()` gives cumulative (bytes, packets or None) of RDMA
    counters; without it, the transfer engine's own received-bytes count passed to step_end."""

    name: str
    read: Callable[[], tuple[int, int | None]] | None = None
    close: Callable[[], None] | None = None

    def totals(self, engine_rx_bytes: int) -> RxTotals:
        if self.read is None:
            return RxTotals(engine_rx_bytes, None)
        rx_bytes, rx_packets = self.read()
        return RxTotals(int(rx_bytes), None if rx_packets is None else int(rx_packets))


ENGINE_RX = RxSource("engine")


@dataclass(frozen=True)
class RxRate:
    bytes: int | None
    bps: float | None
    pps: float | None


class RxMeter:
    """Turns cumulative totals into per-interval deltas; a counter that went backwards (reset,
    reader restart) yields an unknown interval rather than a negative rate."""

    def __init__(self, source: RxSource) -> None:
        self.source = source
        self._last: tuple[float, RxTotals] | None = None

    def sample(self, engine_rx_bytes: int, now: float) -> RxRate:
        totals = self.source.totals(engine_rx_bytes)
        last, self._last = self._last, (now, totals)
        if last is None or now <= last[0] or totals.bytes < last[1].bytes:
            return RxRate(None, None, None)
        dt = now - last[0]
        dbytes = totals.bytes - last[1].bytes
        pps = None
        if totals.packets is not None and last[1].packets is not None:
            pps = max(totals.packets - last[1].packets, 0) / dt
        return RxRate(dbytes, dbytes / dt, pps)


def rdma_rx_source(make_reader: Callable[[], Any] | None = None) -> RxSource | None:
    """RDMA hardware counters summed over D's ports when some port has an RX byte counter, else
    None (no device, no kernel support): the caller then counts the transfer engine's bytes."""
    try:
        if make_reader is None:
            from pdpush.rdma import RdmaCounterReader as make_reader
        reader = make_reader()
        usable = bool(reader.ports()) and reader.rx_tx_totals()["rx_bytes"] is not None
    except Exception as exc:  # noqa: BLE001 - any failure means "no usable RDMA counters"
        log.info("probe: no RDMA counters (%s)", exc)
        return None
    if not usable:
        reader.close()
        log.info("probe: no RDMA port with an RX byte counter")
        return None

    def read() -> tuple[int, int | None]:
        totals = reader.rx_tx_totals()
        return totals["rx_bytes"] or 0, totals["rx_packets"]

    return RxSource(f"rdma-{reader.source}", read, reader.close)


def make_rx_source(kind: str) -> RxSource | None:
    if kind == "none":
        return None
    if kind == "engine":
        return ENGINE_RX
    rdma = rdma_rx_source()
    if kind == "rdma" and rdma is None:
        raise ConfigError("pdpush: probe_rx=rdma but no RDMA device counters are readable here")
    return rdma or ENGINE_RX


class CpuTimer:
    name = "cpu"  # perf_counter marks, resolved at once

    def mark(self) -> float:
        return time.perf_counter()

    def elapsed_ms(self, start: float, end: float, wait: bool = False) -> float | None:
        return (end - start) * 1e3


class CudaTimer:
    """Events recorded on the current stream; `elapsed_ms` answers None until `end` completed,
    so the hot path never waits for the GPU. Resolved events are reused (creating them costs)."""

    name = "cuda"

    def __init__(self) -> None:
        import torch

        self._new = lambda: torch.cuda.Event(enable_timing=True)
        self._free: list[Any] = []

    def mark(self) -> Any:
        event = self._free.pop() if self._free else self._new()
        event.record()
        return event

    def elapsed_ms(self, start: Any, end: Any, wait: bool = False) -> float | None:
        if wait:
            end.synchronize()
        elif not end.query():
            return None
        elapsed = float(start.elapsed_time(end))
        self._free += (start, end)
        return elapsed


_BARE_TIMER = CpuTimer()


def make_timer(kind: str) -> CpuTimer | CudaTimer:
    if kind == "cpu":
        return CpuTimer()
    import torch

    if torch.cuda.is_available():
        return CudaTimer()
    if kind == "cuda":
        raise ConfigError("pdpush: probe_timer=cuda but torch sees no CUDA device")
    return CpuTimer()


class ProbeMetrics:
    """Prometheus metrics in a registry of their own, served on the probe's own port (the worker
    is not the process that serves vLLM's /metrics)."""

    def __init__(self, rx_source: str) -> None:
        from prometheus_client import CollectorRegistry, Gauge, Histogram

        self.registry = CollectorRegistry()
        self._server: Any = None
        reg = {"registry": self.registry}
        self.latency = Histogram("pdpush_probe_step_latency_seconds", "Forward step latency on D",
                                 ["timer"], buckets=LATENCY_BUCKETS_S, **reg)  # fmt: skip
        self.rx_bps = Gauge("pdpush_probe_rx_bytes_per_second", "RX rate over the last step",
                            ["source"], **reg).labels(rx_source)  # fmt: skip
        self.rx_pps = Gauge("pdpush_probe_rx_packets_per_second", "RX packets/s, last step",
                            ["source"], **reg).labels(rx_source)  # fmt: skip
        self.reqs = Gauge("pdpush_probe_batch_requests", "Requests in the last step", **reg)
        self.tokens = Gauge("pdpush_probe_batch_tokens", "Tokens in the last step", **reg)

    def observe(self, rec: dict[str, Any]) -> None:
        if rec["latency_ms"] is not None:
            self.latency.labels(rec["timer"]).observe(rec["latency_ms"] / 1e3)
        for gauge, key in ((self.rx_bps, "rx_bps"), (self.rx_pps, "rx_pps")):
            if rec[key] is not None:
                gauge.set(rec[key])
        if rec["num_reqs"] is not None:
            self.reqs.set(rec["num_reqs"])
            self.tokens.set(rec["num_tokens"])

    def serve(self, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self._server, _ = start_http_server(port, addr=host, registry=self.registry)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


_NO_STATS = dict.fromkeys(BatchStats.__annotations__)
FLUSH_INTERVAL_S = 0.5  # lines reach the file at least this often; a flush per step costs more


@dataclass
class _Step:
    """A finished step whose GPU latency may still be in flight."""

    step: int
    wall: float
    mode: str
    timer: CpuTimer | CudaTimer
    marks: tuple[Any, Any]
    period_ms: float | None
    stats: BatchStats | None
    rx: RxRate
    rx_source: str | None
    probe_us: float | None

    def record(self, latency_ms: float) -> dict[str, Any]:
        stats = vars(self.stats) if self.stats else _NO_STATS
        return {
            "step": self.step, "t": round(self.wall, 6), "mode": self.mode,
            "timer": self.timer.name, "latency_ms": latency_ms, "period_ms": self.period_ms,
            **stats, "rx_source": self.rx_source, "rx_bytes": self.rx.bytes,
            "rx_bps": self.rx.bps, "rx_pps": self.rx.pps, "probe_us": self.probe_us,
        }  # fmt: skip


class StepProbe:
    """Times each forward step and writes what it saw; see the module docstring for the config.

    `period_ms` is begin-to-begin wall time, so it includes the probe's own work of the previous
    step; `probe_us` is that work (previous step_end + this step_begin)."""

    def __init__(
        self,
        timer: CpuTimer | CudaTimer,
        rx: RxSource | None = None,
        log_path: str | None = None,
        metrics: ProbeMetrics | None = None,
        ab_steps: int = 0,
    ) -> None:
        self.timer = timer
        self.meter = RxMeter(rx) if rx is not None else None
        self.metrics = metrics
        self.ab_steps = ab_steps
        self._file = open(log_path, "a", encoding="utf-8") if log_path else None  # noqa: SIM115
        self._pending: deque[_Step] = deque()
        self._step = 0
        self._open: tuple[Any, float] | None = None
        self._last_begin: float | None = None
        self._cost = 0.0
        self._flushed = 0.0

    @classmethod
    def from_config(cls, config: ProbeConfig, rank: int) -> StepProbe | None:
        """The probe `config` asks for; None when it asks for none or on any rank but the first.
        Raises ConfigError when the asked-for timer or RX source is not available here."""
        if rank != 0 or not config.enabled:
            return None
        timer = make_timer(config.timer)
        rx = make_rx_source(config.rx)
        metrics = ProbeMetrics(rx.name if rx else "none") if config.metrics else None
        if metrics and config.metrics:
            metrics.serve(*config.metrics)
        log.info("step probe on: timer=%s rx=%s log=%s metrics=%s ab_steps=%d", timer.name,
                 rx.name if rx else "none", config.log, config.metrics, config.ab_steps)  # fmt: skip
        return cls(timer, rx, config.log, metrics, config.ab_steps)

    def _mode(self, step: int) -> str:
        return "bare" if self.ab_steps and (step // self.ab_steps) % 2 else "full"

    def _timer(self, mode: str) -> CpuTimer | CudaTimer:
        return self.timer if mode == "full" else _BARE_TIMER

    def step_begin(self) -> None:
        now = time.perf_counter()
        self._open = (self._timer(self._mode(self._step)).mark(), now)
        self._cost += time.perf_counter() - now

    def step_end(self, stats: BatchStats | None, rx_bytes_total: int = 0) -> None:
        """Close the step opened by step_begin; emit every earlier step whose latency is known.
        A bare step only keeps its marks; its line is written when its window ends. A step that
        scheduled no request (vLLM stepping for KV transfers only) is not a forward: not recorded."""
        entered = time.perf_counter()
        mode = self._mode(self._step)
        if self._open is None or (stats is not None and stats.num_reqs == 0):
            self._open = None
            return
        timer = self._timer(mode)
        marks = (self._open[0], timer.mark())
        began_at = self._open[1]
        period = None if self._last_begin is None else (began_at - self._last_begin) * 1e3
        full_rx = self.meter is not None and mode == "full"
        rx = self.meter.sample(rx_bytes_total, entered) if full_rx else RxRate(None, None, None)
        rx_source = self.meter.source.name if full_rx else None
        cost_us = self._cost * 1e6 if self._last_begin is not None else None
        self._pending.append(
            _Step(self._step, time.time(), mode, timer, marks, period, stats, rx, rx_source, cost_us)
        )
        self._open, self._last_begin = None, began_at
        self._step += 1
        if mode == "full" or self._mode(self._step) != mode:
            self._drain(wait=False)
        self._cost = time.perf_counter() - entered

    def _drain(self, wait: bool) -> None:
        while self._pending:
            head = self._pending[0]
            latency = head.timer.elapsed_ms(*head.marks, wait=wait)
            if latency is None:
                break
            self._pending.popleft()
            rec = head.record(latency)
            if self._file is not None:
                self._file.write(json.dumps(rec, separators=(",", ":")) + "\n")
            if self.metrics is not None and head.mode == "full":
                self.metrics.observe(rec)
        now = time.monotonic()
        if self._file is not None and (wait or now - self._flushed >= FLUSH_INTERVAL_S):
            self._file.flush()
            self._flushed = now

    def close(self) -> None:
        """Emit what is still pending (waiting for the GPU is fine here) and release the outputs."""
        self._drain(wait=True)
        if self._file is not None:
            self._file.close()
            self._file = None
        if self.metrics is not None:
            self.metrics.close()
        if self.meter is not None and self.meter.source.close is not None:
            self.meter.source.close()
