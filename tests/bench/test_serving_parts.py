"""The serving benchmark's pure parts: stage arithmetic, the sweep's arguments and tables, the NIXL
proxy's request bodies, and GPU placement (no engines)."""

from __future__ import annotations

import argparse

import pytest

from pdpush.bench import breakdown, nixl_proxy, sweep
from pdpush.command import UsageError
from pdpush.local.cluster import GpuPlacement, VllmServer, kv_cache_settings, placed_server
from pdpush.local.up import add_placement_args, placement

TIMING = {"t0_mono": 100.0,
          "d_ms": {"sent": 0.2, "answered": 30.0, "kv_notif": 29.0, "kv_seen": 29.5, "first_step": 30.5},
          "p_ms": {"prefill_start": 1.0, "last_chunk": 1.5, "first_token": 20.0, "first_post": 2.0,
                   "last_post": 19.0, "last_done": 21.0, "notified": 21.5}}


def test_remote_stages_split_the_client_ttft():
    stages = breakdown.remote_stages(sent=99.999, first=100.0325, timing=TIMING)
    assert stages["client_to_decide"] == pytest.approx(1.0)
    assert stages["ttft"] == pytest.approx(33.5)
    assert stages["overhead"] == pytest.approx(29.0 - 0.2 - 21.5)  # not P's work, not D's
    assert stages["d_kv_to_first_step"] == pytest.approx(1.0)
    assert stages["d_first_step_to_token"] == pytest.approx(2.0)
    assert stages["p_write_tail"] == pytest.approx(2.0)


def test_missing_stages_are_left_out_and_medians_per_stage():
    partial = {"t0_mono": 100.0, "d_ms": {"first_step": 5.0}}
    assert breakdown.local_stages(99.999, 100.010, partial) == {
        "client_to_decide": 1.0, "d_decide_to_first_step": 5.0, "d_first_step_to_token": 5.0, "ttft": 11.0}
    assert "overhead" not in breakdown.remote_stages(99.999, 100.010, partial)
    assert breakdown.medians([{"a": 1.0}, {"a": 3.0, "b": 2.0}, {"a": 2.0}]) == {"a": 2.0, "b": 2.0}


def test_breakdown_table_puts_remote_and_local_side_by_side():
    result = {"2000": {"remote": {"ttft": 40.0, "overhead": 3.0}, "local": {"ttft": 30.0},
                       "placed": {"remote": 2, "local": 2}, "remote_minus_local_ms": 10.0}}
    text = breakdown.markdown(result)
    assert "| ttft | 40.0 | 30.0 |" in text and "| overhead | 3.0 |  |" in text
    assert "10.0 ms" in text


def test_sweep_point_asks_vllm_bench_for_poisson_goodput_and_percentiles():
    load = sweep.Load(2000, 200, 2.5, 40, 2000, 50, seed=3)
    args = load.args("http://h:1", "/m")
    assert load.num_prompts == 100
    pairs = dict(zip(args, args[1:]))
    assert pairs["--request-rate"] == "2.5" and pairs["--random-input-len"] == "2000"
    assert pairs["--metric-percentiles"] == "50,90,99" and pairs["--seed"] == "3"
    assert args[args.index("--goodput") + 1: args.index("--goodput") + 3] == ["ttft:2000", "tpot:50"]


def test_sweep_summary_drops_per_request_arrays_and_tables_each_length_pair():
    raw = {"request_rate": 2, "completed": 10, "ttfts": [0.1] * 10, "p99_ttft_ms": 120.0,
           "p50_tpot_ms": 12.0, "request_goodput": 1.5, "request_throughput": 2.0}
    row = sweep.summarize(raw)
    assert "ttfts" not in row and row["p99_ttft_ms"] == 120.0
    rows = [{"path": "pdpush", "input_len": 8, "output_len": 2, "qps": 2.0, **row},
            {"path": "local", "input_len": 8, "output_len": 2, "qps": 2.0, "error": "boom"}]
    text = sweep.markdown(rows, "TTFT ≤ 2000 ms")
    assert "input 8 / output 2" in text and "| pdpush | 2 | 2.00 | 1.50 |" in text and "boom" in text


def test_proxy_sends_p_one_token_and_d_the_original_with_p_params():
    body = {"prompt": "x", "max_tokens": 50, "stream": True, "stream_options": {"include_usage": True}}
    p = nixl_proxy.prefill_body(body)
    assert p["max_tokens"] == 1 and p["stream"] is False and "stream_options" not in p
    assert p["kv_transfer_params"]["do_remote_decode"] is True
    d = nixl_proxy.decode_body(body, {"kv_transfer_params": {"remote_engine_id": "e"}})
    assert d["max_tokens"] == 50 and d["stream"] is True and d["kv_transfer_params"] == {"remote_engine_id": "e"}
    assert body["max_tokens"] == 50  # the client's request is not changed in place


def test_gpu_placement_shares_a_gpu_only_when_two_servers_are_on_it():
    one = GpuPlacement((0,), 0, share=0.3)
    assert one.for_prefill(0) == (0, 0.3) and one.for_decode() == (0, 0.3)
    two = GpuPlacement((1,), 0, share=0.3, separate_share=0.85)
    assert two.for_prefill(0) == (1, 0.85) and two.for_decode() == (0, 0.85)
    assert GpuPlacement((1, 1), 0).for_prefill(1)[1] == GpuPlacement.share  # two Ps share GPU 1


def test_gpu_server_gets_cuda_device_and_share_and_no_cpu_settings(tmp_path, monkeypatch):
    server = placed_server("D", tmp_path, GpuPlacement((0,), 1), None, log_dir=tmp_path)
    cmd = server.command()
    assert cmd[cmd.index("--gpu-memory-utilization") + 1] == "0.85"
    seen = {}
    monkeypatch.setattr("subprocess.Popen", lambda cmd, env, **kw: seen.update(env) or None)
    server.start()
    assert seen["CUDA_VISIBLE_DEVICES"] == "1" and "VLLM_CPU_KVCACHE_SPACE" not in seen
    cpu = placed_server("D", tmp_path, None, None, log_dir=tmp_path)
    assert cpu.cpu_core == 0 and cpu.command()[cpu.command().index("--gpu-memory-utilization") + 1] == "0.2"
    assert isinstance(cpu, VllmServer)


def test_kv_cache_size_is_bytes_on_gpu_and_whole_gib_on_cpu():
    assert kv_cache_settings(1.5, GpuPlacement()) == ({}, ["--kv-cache-memory-bytes", str(3 * 2**29)])
    assert kv_cache_settings(2.4, None) == ({"VLLM_CPU_KVCACHE_SPACE": "2"}, [])
    assert kv_cache_settings(None, None) == ({}, [])


def test_cuda_placement_without_cuda_is_a_usage_error(monkeypatch):
    parser = argparse.ArgumentParser()
    add_placement_args(parser)
    monkeypatch.setattr("pdpush.local.up.cuda_device_count", lambda: 0)
    assert placement(parser.parse_args([])) is None  # auto: CPU
    with pytest.raises(UsageError, match="0 CUDA device"):
        placement(parser.parse_args(["--device", "cuda"]))
    monkeypatch.setattr("pdpush.local.up.cuda_device_count", lambda: 2)
    placed = placement(parser.parse_args(["--p-gpu", "1", "--gpu-share", "0.4"]))
    assert placed == GpuPlacement((1,), 0, 0.4)
    with pytest.raises(SystemExit):
        parser.parse_args(["--gpu-share", "1.5"])
