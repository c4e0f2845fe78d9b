"""Step probe: batch shape from a SchedulerOutput-shaped object, RX rates, JSON lines, lazy GPU
resolution, the A/B windows and the Prometheus endpoint. No vLLM import."""

import json
import os
import socket
import time
from types import SimpleNamespace

import httpx
import pytest

from pdpush.connector.config import ProbeConfig
from pdpush.probe import (
    ENGINE_RX,
    FLUSH_INTERVAL_S,
    BatchStats,
    CpuTimer,
    RxMeter,
    RxSource,
    StepProbe,
    batch_stats_from,
    rdma_rx_source,
)
from pdpush.vllm_api import step_view


def scheduler_output(new: dict[str, tuple[int, int]], cached: dict[str, tuple[int, int]]):
    """Shaped like vllm.v1.core.sched.output.SchedulerOutput: id -> (computed, scheduled)."""
    scheduled = {rid: n for rid, (_, n) in (new | cached).items()}
    return SimpleNamespace(
        scheduled_new_reqs=[SimpleNamespace(req_id=r, num_computed_tokens=c, block_ids=([],))
                            for r, (c, _) in new.items()],
        scheduled_cached_reqs=SimpleNamespace(
            req_ids=list(cached), num_computed_tokens=[c for c, _ in cached.values()],
            new_block_ids=[None] * len(cached), resumed_req_ids=set(),
        ),
        num_scheduled_tokens=scheduled,
        total_num_scheduled_tokens=sum(scheduled.values()),
        preempted_req_ids=set(),
    )


def test_batch_stats_counts_new_and_cached_requests_with_this_steps_tokens():
    out = scheduler_output(new={"a": (0, 1), "b": (256, 100)}, cached={"c": (1499, 1), "d": (9, 1)})
    assert batch_stats_from(step_view(out)) == BatchStats(
        num_reqs=4, num_tokens=103, ctx_min=1, ctx_max=1500, ctx_sum=1 + 356 + 1500 + 10
    )


def test_batch_stats_of_an_empty_step_is_zero():
    assert batch_stats_from(step_view(scheduler_output({}, {}))) == BatchStats(0, 0, 0, 0, 0)


def test_rx_meter_rates_and_a_counter_reset():
    meter = RxMeter(ENGINE_RX)
    assert meter.sample(1000, now=10.0).bps is None  # no previous sample yet
    rate = meter.sample(5000, now=10.5)
    assert (rate.bytes, rate.bps, rate.pps) == (4000, 8000.0, None)
    assert meter.sample(10, now=11.0).bytes is None  # went backwards: unknown, not negative
    assert meter.sample(110, now=12.0).bps == 100.0


def test_rx_meter_packets_from_a_counter_source():
    totals = iter([(0, 0), (3000, 3)])
    meter = RxMeter(RxSource("rdma", lambda: next(totals)))
    meter.sample(0, now=1.0)
    rate = meter.sample(0, now=1.25)
    assert (rate.bytes, rate.bps, rate.pps) == (3000, 12000.0, 12.0)


def read_lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_steps(probe: StepProbe, n: int, work_s: float = 0.0, rx_per_step: int = 0) -> None:
    for i in range(n):
        probe.step_begin()
        time.sleep(work_s)
        probe.step_end(BatchStats(2, 2, 10 + i, 20 + i, 30 + 2 * i), rx_bytes_total=rx_per_step * i)


def test_probe_writes_one_line_per_step_with_latency_batch_and_rx(tmp_path):
    path = tmp_path / "steps.jsonl"
    probe = StepProbe(CpuTimer(), ENGINE_RX, str(path))
    run_steps(probe, 3, work_s=0.02, rx_per_step=4096)
    assert len(read_lines(path)) == 1  # the first step flushed; the next wait for the interval
    probe.close()
    lines = read_lines(path)
    assert [r["step"] for r in lines] == [0, 1, 2]
    assert all(r["latency_ms"] >= 20 for r in lines)
    assert lines[0]["period_ms"] is None  # begin-to-begin: covers the previous step
    assert all(cur["period_ms"] >= prev["latency_ms"] for prev, cur in zip(lines, lines[1:]))
    assert [r["ctx_max"] for r in lines] == [20, 21, 22]
    assert [r["rx_bytes"] for r in lines] == [None, 4096, 4096]
    assert {r["rx_source"] for r in lines} == {"engine"} and {r["timer"] for r in lines} == {"cpu"}
    assert lines[1]["probe_us"] > 0


class InFlightTimer(CpuTimer):
    """Marks complete only up to `completed` (by number), like CUDA events still in flight."""

    name = "fake-gpu"

    def __init__(self):
        self.marks, self.completed = 0, 0

    def mark(self):
        self.marks += 1
        return self.marks, time.perf_counter()

    def elapsed_ms(self, start, end, wait=False):
        if not wait and end[0] > self.completed:
            return None
        return (end[1] - start[1]) * 1e3


def test_gpu_latencies_are_resolved_later_in_order_and_close_waits(tmp_path):
    path = tmp_path / "steps.jsonl"
    timer = InFlightTimer()
    probe = StepProbe(timer, None, str(path))
    run_steps(probe, 2)
    assert path.read_text() == ""  # both steps in flight: nothing waits, nothing written yet
    timer.completed = 2  # the first step's end mark
    time.sleep(FLUSH_INTERVAL_S)  # lines reach the file at least this often
    run_steps(probe, 1)
    assert [r["step"] for r in read_lines(path)] == [0]
    probe.close()
    assert [r["step"] for r in read_lines(path)] == [0, 1, 2]
    assert {r["timer"] for r in read_lines(path)} == {"fake-gpu"}


def test_steps_without_requests_are_not_recorded(tmp_path):
    path = tmp_path / "steps.jsonl"
    probe = StepProbe(CpuTimer(), ENGINE_RX, str(path))
    run_steps(probe, 1, rx_per_step=0)
    probe.step_begin()
    probe.step_end(BatchStats(0, 0, 0, 0, 0), rx_bytes_total=500)  # stepping for transfers only
    probe.step_begin()
    probe.step_end(BatchStats(1, 1, 5, 5, 5), rx_bytes_total=700)
    probe.close()
    lines = read_lines(path)
    assert [(r["step"], r["num_reqs"], r["rx_bytes"]) for r in lines] == [(0, 2, None), (1, 1, 700)]


def test_ab_windows_alternate_full_and_bare_steps(tmp_path):
    path = tmp_path / "steps.jsonl"
    probe = StepProbe(CpuTimer(), ENGINE_RX, str(path), ab_steps=2)
    run_steps(probe, 6, rx_per_step=100)
    probe.close()
    lines = read_lines(path)
    assert [r["mode"] for r in lines] == ["full", "full", "bare", "bare", "full", "full"]
    assert [r["rx_source"] for r in lines] == ["engine", "engine", None, None, "engine", "engine"]
    assert lines[4]["rx_bytes"] == 300  # the full step after a bare window covers that window
    assert all(r["latency_ms"] is not None for r in lines)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_from_config_serves_prometheus_metrics(tmp_path):
    port = free_port()
    probe = StepProbe.from_config(
        ProbeConfig.from_extra({"probe_metrics": port, "probe_rx": "engine", "probe_timer": "cpu"}), rank=0
    )
    try:
        run_steps(probe, 3, rx_per_step=1000)
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert 'pdpush_probe_step_latency_seconds_count{timer="cpu"} 3.0' in text
        assert 'pdpush_probe_rx_bytes_per_second{source="engine"}' in text
        assert "pdpush_probe_batch_requests 2.0" in text
    finally:
        probe.close()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/metrics")


def test_from_config_is_off_by_default_and_on_first_rank_only(tmp_path):
    assert StepProbe.from_config(ProbeConfig.from_extra({}), rank=0) is None
    assert StepProbe.from_config(ProbeConfig.from_extra({"probe_log": str(tmp_path / "x")}), rank=1) is None
    probe = StepProbe.from_config(ProbeConfig.from_extra({"probe_log": str(tmp_path / "x"), "probe_timer": "cpu"}), rank=0)
    assert probe is not None and probe.timer.name == "cpu"
    probe.close()


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"probe_log": "x", "probe_lgo": 1}, "unknown probe setting"),
        ({"probe_metrics": "host:port"}, "probe_metrics must be"),
        ({"probe_metrics": 70000}, "probe_metrics must be"),
        ({"probe_log": "x", "probe_rx": "wifi"}, "probe_rx must be one of"),
        ({"probe_log": "x", "probe_timer": "tsc"}, "probe_timer must be one of"),
        ({"probe_log": "x", "probe_ab_steps": -1}, "probe_ab_steps must be"),
    ],
)
def test_from_config_rejects_bad_settings(config, message):
    with pytest.raises(ValueError, match=message):
        StepProbe.from_config(ProbeConfig.from_extra(config), rank=0)


def fake_sysfs(root, rcv_words: int, packets: int):
    """ROOT/class/infiniband/mlx5_0/ports/1/counters as the kernel lays it out."""
    counters = root / "class" / "infiniband" / "mlx5_0" / "ports" / "1" / "counters"
    counters.mkdir(parents=True, exist_ok=True)
    (counters / "port_rcv_data").write_text(f"{rcv_words}\n")  # 4-byte words
    (counters / "port_rcv_packets").write_text(f"{packets}\n")


def sysfs_reader(root):
    from pdpush.rdma import RdmaCounterReader

    return lambda: RdmaCounterReader(source="sysfs", sysfs_root=str(root))


def test_rdma_counters_are_the_rx_source_when_a_port_exists(tmp_path):
    fake_sysfs(tmp_path, rcv_words=1000, packets=10)
    source = rdma_rx_source(sysfs_reader(tmp_path))
    assert source is not None and source.name == "rdma-sysfs"
    meter = RxMeter(source)
    meter.sample(0, now=1.0)
    fake_sysfs(tmp_path, rcv_words=1000 + 2048, packets=14)
    rate = meter.sample(0, now=2.0)
    assert (rate.bytes, rate.bps, rate.pps) == (8192, 8192.0, 4.0)
    source.close()


def test_no_rdma_port_means_no_rdma_source(tmp_path):
    assert rdma_rx_source(sysfs_reader(tmp_path)) is None


HAS_RDMA_PORTS = os.path.isdir("/sys/class/infiniband") and bool(os.listdir("/sys/class/infiniband"))


@pytest.mark.skipif(HAS_RDMA_PORTS, reason="this machine has RDMA devices")
def test_without_rdma_devices_auto_counts_engine_bytes_and_rdma_is_an_error(tmp_path):
    probe = StepProbe.from_config(ProbeConfig.from_extra({"probe_log": str(tmp_path / "x"), "probe_timer": "cpu"}), rank=0)
    assert probe.meter.source.name == "engine"
    probe.close()
    with pytest.raises(ValueError, match="no RDMA device counters"):
        StepProbe.from_config(ProbeConfig.from_extra({"probe_log": str(tmp_path / "x"), "probe_rx": "rdma"}), rank=0)
