"""`pdpush bench interference` end to end at toy size: real P and D vLLM CPU engines with the
pdpush connector, the hold scheduler and the step probe. Checks the plumbing, not the figures."""

import json

import pytest

from pdpush.bench.interference.report import load_steps
from pdpush.cli import main

pytestmark = pytest.mark.e2e

BATCH = 4
ARGS = ["--batch", str(BATCH), "--max-tokens", "600", "--load-from", "100", "--measure-from", "300",
        "--measure-to", "600", "--prompt-len", "600", "--load-output", "3", "--qps", "0,10",
        "--repeat-baseline", "1", "--probe-ab-steps", "8"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("interference")
    assert main(["-q", "bench", "interference", *ARGS, "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_every_round_has_decode_latency_and_the_table_is_relative_to_qps0(run):
    out, report = run
    assert [r["label"] for r in report["rounds"]] == ["qps0", "qps10", "qps0#2"]
    assert all(r["decode_latency"]["steps"] > 10 for r in report["rounds"])
    assert report["baseline"] == "qps0" and set(report["relative"]) == {"qps10", "qps0#2"}
    assert report["probe_cost"]["period_ms"]["windows"] > 0
    assert "| DecodeLatency | qps10 | qps0#2 |" in (out / "report.md").read_text()
    for png in ("latency_vs_context.png", "rx_over_time.png"):
        assert (out / png).stat().st_size > 1000


def test_the_load_is_prefilled_on_p_and_its_kv_is_received_by_d(run):
    out, report = run
    loaded = report["rounds"][1]
    assert loaded["sent"] >= 1
    assert set(loaded["prefilled"]) == {"remote"}  # every long prompt went to P, none failed
    steps = load_steps(out / "steps.jsonl")
    # when the bytes land depends on a busy 2-core machine; that they land and are named does not
    assert sum(s["rx_bytes"] or 0 for s in steps if s["t"] > loaded["t_start"]) > 0
    assert {s["rx_source"] for s in steps if s["mode"] == "full"} == {"engine"}


def test_no_load_request_joins_the_background_batch_while_it_runs(run):
    out, report = run
    steps = load_steps(out / "steps.jsonl")
    for rnd in report["rounds"]:
        during = [s for s in steps if rnd["t_start"] <= s["t"] <= rnd["t_end"] and s["num_reqs"]]
        assert during and max(s["num_reqs"] for s in during if s["ctx_min"] > 1) <= BATCH
