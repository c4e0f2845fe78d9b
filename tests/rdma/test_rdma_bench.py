"""`pdpush bench rdma` runs end to end (a smoke test: it checks the replies, not the timings)."""

import json

from pdpush.bench.rdma import kernel_reply
from pdpush.cli import main
from pdpush.rdma.messages import NldevMessage, hw_counters


def test_served_reply_decodes_to_the_encoded_counters():
    msg = NldevMessage(bytes(kernel_reply(3)))
    msg.decode()
    assert hw_counters(msg) == {f"hw_counter_{i}_cnt": 2**40 + i for i in range(3)}


def test_bench_runs_every_path(capsys):
    assert main(["bench", "rdma", "--samples", "20", "--counters", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["counters"] == 3
    assert len(report["results"]) == 5
    assert all(r["p50_us"] > 0 for r in report["results"].values())
