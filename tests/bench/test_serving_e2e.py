"""`pdpush bench serving` end to end at toy size on CPU engines: pdpush 1P1D and an aggregated
vLLM server, both kept up for the TTFT breakdown and one load point of `vllm bench serve`. (vLLM's
NixlConnector path is left to the benchmark itself: on two shared cores its own zmq handshake
timed out and killed its engine, a failure of the peer, not of this plumbing.) The subset of
scripts/gpu_serving.sh that runs here; it checks the plumbing (stages present and consistent,
every request served, the report and plot written), not figures."""

import json

import pytest

from pdpush.cli import main

pytestmark = pytest.mark.e2e

ARGS = ["--paths", "pdpush,local", "--breakdown", "300", "--repeats", "2", "--qps", "2",
        "--lengths", "64/4", "--duration-s", "4", "--max-model-len", "1024", "--device", "cpu"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("serving")
    assert main(["-q", "bench", "serving", *ARGS, "--out", str(out)]) == 0
    return out, json.loads((out / "report.json").read_text())


def test_breakdown_has_every_stage_of_a_remote_prefill_and_a_local_one(run):
    _, report = run
    row = report["breakdown"]["300"]
    assert row["placed"] == {"remote": 2, "local": 2}
    remote, local = row["remote"], row["local"]
    for stage in ("decide_to_sent", "p_queue", "p_first_write", "p_last_write_posted", "p_notified",
                  "overhead", "d_notif_to_sched", "d_kv_to_first_step", "d_first_step_to_token", "ttft"):
        assert stage in remote, stage
    assert remote["p_first_write"] <= remote["p_last_write_posted"] <= remote["p_notified"]
    assert 0 < remote["ttft"] < 60_000 and 0 < local["ttft"] < 60_000
    assert "d_decide_to_first_step" in local and "overhead" not in local


def test_load_point_served_every_request_on_both_paths(run):
    out, report = run
    rows = {r["path"]: r for r in report["sweep"]}
    assert set(rows) == {"pdpush", "local"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["completed"] == 8 and row["failed"] == 0
        assert row["p50_ttft_ms"] > 0 and row["request_goodput"] is not None
    assert sum(rows["pdpush"]["placed"].values()) == 8  # D counted where each was prefilled
    assert (out / "serving-64x4.png").stat().st_size > 1000
    assert "| local | 2 |" in (out / "report.md").read_text()
