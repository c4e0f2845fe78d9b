"""The probe's CUDA-event timer on a real GPU: latencies resolve later without a synchronize on
the hot path, and agree with events recorded around the same work. Skipped without CUDA."""

import json

import pytest

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

from pdpush.connector.config import ProbeConfig  # noqa: E402
from pdpush.probe import BatchStats, StepProbe  # noqa: E402

STATS = BatchStats(8, 8, 100, 100, 800)


def gpu_work(n: int = 8192, repeat: int = 20) -> None:
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(repeat):
        a = a @ a
        a = a / a.norm()


def test_auto_timer_is_cuda_and_lines_wait_for_the_gpu(tmp_path):
    path = tmp_path / "steps.jsonl"
    probe = StepProbe.from_config(ProbeConfig.from_extra({"probe_log": str(path), "probe_rx": "engine"}), rank=0)
    assert probe.timer.name == "cuda"
    torch.cuda.synchronize()
    ref_start, ref_end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    probe.step_begin()
    ref_start.record()
    gpu_work()
    ref_end.record()
    probe.step_end(STATS, rx_bytes_total=0)
    assert not ref_end.query()  # the GPU is still busy: step_end did not wait for it
    probe.close()  # close waits for what is pending
    (line,) = [json.loads(x) for x in path.read_text().splitlines()]
    reference = ref_start.elapsed_time(ref_end)
    assert line["timer"] == "cuda" and line["num_reqs"] == 8
    assert line["latency_ms"] == pytest.approx(reference, rel=0.05, abs=0.05)


def test_in_flight_steps_are_written_in_order_once_done(tmp_path):
    path = tmp_path / "steps.jsonl"
    probe = StepProbe.from_config(ProbeConfig.from_extra({"probe_log": str(path), "probe_timer": "cuda"}), rank=0)
    for _ in range(3):
        probe.step_begin()
        gpu_work(repeat=5)
        probe.step_end(STATS)
    torch.cuda.synchronize()
    probe.step_begin()
    probe.step_end(STATS)  # a later step finds the earlier ones done and writes them
    probe.close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [0, 1, 2, 3]
