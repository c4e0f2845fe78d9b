"""The TTFT benchmark's pure parts: prompts, the summary ratios, and option checks."""

import math

from pdpush.bench.serving import make_prompts, summarize
from pdpush.cli import main


def test_prompts_distinct_reproducible_and_decodable():
    prompts = make_prompts(3, 50, seed=1)
    assert [len(p) for p in prompts] == [50, 50, 50]
    assert len({tuple(p) for p in prompts}) == 3  # no prefix-cache help between repetitions
    assert prompts == make_prompts(3, 50, seed=1)
    assert all(32 <= t < 127 for p in prompts for t in p)  # printable byte tokens


def test_summary_is_median_based_and_relative_to_local():
    summary = summarize({"local": [0.2, 0.1, 0.3], "pdpush": [0.4, 0.5, 0.9]})
    assert summary["local"]["median_ms"] == 200.0
    assert summary["pdpush"]["median_ms"] == 500.0
    assert summary["pdpush"]["min_ms"] == 400.0
    assert summary["pdpush"]["vs_local"] == 2.5
    assert summary["local"]["vs_local"] == 1.0


def test_summary_without_local_has_no_ratio():
    assert math.isnan(summarize({"pdpush": [0.1]})["pdpush"]["vs_local"])


def test_unknown_path_is_rejected_before_starting_anything(capsys):
    assert main(["bench", "serving", "--paths", "pdpush,teleport"]) == 2
    assert "teleport" in capsys.readouterr().err
