"""The interference command's argument checks, round plan, log tail and plots (no engines)."""

import json

import pytest

from pdpush.bench.interference.cli import check_args, round_plan
from pdpush.bench.interference.load import LogTail
from pdpush.bench.interference.plot import plot_latency, plot_rx, rx_per_second
from pdpush.bench.interference.report import Protocol, Round
from pdpush.cli import build_parser, main


def parse(*argv):
    argv = ["bench", "interference", *argv]
    return build_parser(argv).parse_args(argv)


def test_defaults_are_the_design_documents_protocol():
    args = parse()
    assert check_args(args) == [0.0, 1.0, 2.0, 3.0]
    assert (args.batch, args.max_tokens, args.load_from) == (64, 2000, 500)
    assert (args.measure_from, args.measure_to, args.prompt_tokens, args.load_output) == (1500, 2000, 2000, 7)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--qps", "1,x"], "--qps must be comma-separated numbers"),
        (["--qps", "1,2", "--repeat-baseline", "0"], "baseline"),
        (["--measure-from", "100"], "--load-from < --measure-from"),
        (["--measure-to", "2002"], "--measure-to <= --max-tokens + 1"),
        (["--batch", "0"], "--batch must be >= 1"),
        (["--decode-url", "http://127.0.0.1:1"], "go together"),
    ],
)
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    with pytest.raises(ValueError, match=message.replace("+", r"\+")):
        check_args(parse(*argv))
    assert main(["bench", "interference", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_reanalyse_rewrites_the_reports_from_an_earlier_run(tmp_path, capsys):
    from test_interference_report import background_round, window

    from pdpush.bench.interference.cli import write_outputs

    steps = background_round(0.0) + background_round(10.0, slowdown=0.05, first_step=100)
    (tmp_path / "steps.jsonl").write_text("".join(json.dumps(s) + "\n" for s in steps))
    rounds = [window("qps0", 0, steps[:19]), window("qps1", 1, steps[19:])]
    write_outputs(tmp_path, tmp_path / "steps.jsonl", rounds, Protocol(4, 2, 20), {"run": "first"})
    argv = ["--reanalyse", "--batch", "4", "--measure-from", "15", "--measure-to", "20",
            "--max-tokens", "20", "--load-from", "5", "--out", str(tmp_path)]  # fmt: skip
    assert main(["bench", "interference", *argv]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["protocol"] == {"batch": 4, "measure_from": 15, "measure_to": 20}
    assert report["relative"]["qps1"]["avg"] == pytest.approx(0.05) and report["meta"] == {"run": "first"}
    assert "| DecodeLatency | qps1 |" in capsys.readouterr().out
    assert main(["bench", "interference", "--reanalyse", "--out", str(tmp_path / "nothing")]) == 2


def test_round_plan_repeats_the_baseline_at_the_end():
    assert round_plan([0, 1.5], 2) == [("qps0", 0), ("qps1.5", 1.5), ("qps0#2", 0.0), ("qps0#3", 0.0)]


def test_log_tail_returns_only_complete_new_lines(tmp_path):
    path = tmp_path / "steps.jsonl"
    tail = LogTail(path)
    assert tail.read() == []  # not there yet
    path.write_text('{"step": 0}\n{"step": 1')
    assert tail.read() == [{"step": 0}]
    with open(path, "a") as f:
        f.write('}\n{"step": 2}\n')
    assert tail.read() == [{"step": 1}, {"step": 2}]
    assert tail.read() == []


def test_plots_are_written(tmp_path):
    steps = [{"step": i, "t": float(i), "mode": "full", "latency_ms": 5 + i / 100, "num_reqs": 2,
              "num_tokens": 2, "ctx_max": i + 2, "rx_bps": 1e6 * (i % 3), "rx_source": "engine"}
             for i in range(50)]  # fmt: skip
    rounds = [Round("qps0", 0, 0.0, 24.0), Round("qps1", 1, 25.0, 49.0)]
    for path in (plot_latency(steps, rounds, Protocol(2, 10, 40), tmp_path / "lat.png"),
                 plot_rx(steps, rounds, tmp_path / "rx.png")):  # fmt: skip
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rx_is_binned_per_second_of_the_round():
    steps = [{"t": 10.2, "rx_bytes": 2_000_000}, {"t": 10.7, "rx_bytes": 1_000_000},
             {"t": 12.5, "rx_bytes": 500_000}, {"t": 12.6, "rx_bytes": None}]  # fmt: skip
    assert rx_per_second(steps, Round("qps1", 1, 10.0, 12.9)) == [(0.0, 3.0), (1.0, 0.0), (2.0, 0.5)]


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_servers_are_placed_on_cpu_cores_or_the_gpu(device, tmp_path, monkeypatch):
    from pdpush.bench.interference import cli as icli
    from pdpush.local.cluster import VllmServer

    started = []
    monkeypatch.setattr(VllmServer, "start", lambda self: started.append(self) or self)
    monkeypatch.setattr(VllmServer, "wait_healthy", lambda self, timeout_s=0: None)
    monkeypatch.setattr(VllmServer, "stop", lambda self, grace_s=0: None)
    monkeypatch.setattr("pdpush.local.up.cuda_device_count", lambda: 1)
    argv = ["bench", "interference", "--device", device, "--kv-cache-gib", "8", "--model", str(tmp_path),
            "--engine-args", "--dtype bfloat16", "--out", str(tmp_path)]
    with icli.one_p_one_d(build_parser(argv).parse_args(argv), tmp_path / "steps.jsonl"):
        pass
    prefill, decode = started
    assert "--dtype" in decode.command() and "--dtype" in prefill.command()
    if device == "cuda":
        assert (prefill.gpu, decode.gpu) == (0, 0) and "VLLM_CPU_KVCACHE_SPACE" not in decode.env
        assert str(8 * 2**30) in decode.command()  # fixed KV cache: --kv-cache-memory-bytes
    else:
        assert (prefill.cpu_core, decode.cpu_core) == (1, 0) and decode.env["VLLM_CPU_KVCACHE_SPACE"] == "8"
