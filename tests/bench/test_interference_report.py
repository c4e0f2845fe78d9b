"""Report math of the interference experiment on synthetic probe records."""

import json

import pytest

from pdpush.bench.interference.report import (
    Protocol,
    Round,
    build_report,
    decode_latency,
    load_steps,
    markdown,
    probe_cost,
    relative,
)

PROTO = Protocol(batch=4, measure_from=15, measure_to=20)


def background_round(t0: float, slowdown: float = 0.0, rx_per_step: int = 0, first_step: int = 0):
    """Contexts 2..20 of a batch of 4; latency grows with context, scaled by 1 + slowdown."""
    steps = []
    for i, ctx in enumerate(range(2, 21)):
        steps.append({
            "step": first_step + i, "t": t0 + i * 0.01, "mode": "full", "timer": "cpu",
            "latency_ms": (5.0 + 0.1 * ctx) * (1 + slowdown), "period_ms": 6.0,
            "num_reqs": 4, "num_tokens": 4, "ctx_min": ctx, "ctx_max": ctx, "ctx_sum": 4 * ctx,
            "rx_source": "engine", "rx_bytes": rx_per_step, "rx_bps": None, "rx_pps": None,
            "probe_us": 30.0,
        })  # fmt: skip
    return steps


def window(label, qps, steps):
    return Round(label, qps, steps[0]["t"], steps[-1]["t"], sent=3, prefilled={"remote": 3})


def test_decode_latency_counts_the_measured_contexts_of_the_background_batch_only():
    steps = background_round(0.0)
    steps[15]["num_reqs"], steps[15]["num_tokens"] = 5, 5  # an extra request joined this step
    stats = decode_latency(steps, PROTO)
    # contexts 15..20 are 6 steps, one of them excluded
    assert (stats.steps, stats.excluded) == (5, 1)
    assert stats.min_ms == pytest.approx(5.0 + 0.1 * 15)
    assert stats.max_ms == pytest.approx(5.0 + 0.1 * 20)
    assert stats.avg_ms == pytest.approx(5.0 + 0.1 * (15 + 16 + 18 + 19 + 20) / 5)


def test_relative_change_is_against_the_baseline():
    base = decode_latency(background_round(0.0), PROTO)
    slower = decode_latency(background_round(0.0, slowdown=0.01), PROTO)
    rel = relative(slower, base)
    assert rel == pytest.approx({"min": 0.01, "max": 0.01, "avg": 0.01})


def test_report_uses_the_first_qps0_as_baseline_and_shows_the_repeat_as_noise_floor():
    r0 = background_round(0.0, first_step=0)
    r1 = background_round(10.0, slowdown=0.02, rx_per_step=1000, first_step=100)
    r0b = background_round(20.0, slowdown=-0.001, first_step=200)
    rounds = [window("qps0", 0, r0), window("qps1", 1, r1), window("qps0#2", 0, r0b)]
    report = build_report(r0 + r1 + r0b, rounds, PROTO, {"model": "tiny"})
    assert report["baseline"] == "qps0"
    assert list(report["relative"]) == ["qps1", "qps0#2"]
    assert report["relative"]["qps1"]["avg"] == pytest.approx(0.02)
    assert report["relative"]["qps0#2"]["max"] == pytest.approx(-0.001)
    rx = report["rounds"][1]["rx"]
    assert rx["bytes"] == 19 * 1000 and rx["sources"] == ["engine"]
    assert rx["measured_bytes"] == 6 * 1000  # contexts 15..20
    assert rx["mean_bps"] == pytest.approx(19000 / 0.18)
    text = markdown(report)
    assert "| DecodeLatency | qps1 | qps0#2 |" in text
    assert "| avg | +0.0200000 | -0.0010000 |" in text
    assert "| 3 | remote 3 | 19,000 | 6,000 |" in text
    assert json.loads(json.dumps(report)) == report  # JSON-able as is


def test_caveats_name_rounds_without_traffic_in_the_measured_contexts_or_with_local_prefills():
    r0, r1 = background_round(0.0), background_round(10.0, rx_per_step=0, first_step=100)
    r1[0]["rx_bytes"] = 5000  # traffic early in the round only
    rounds = [window("qps0", 0, r0), Round("qps1", 1, r1[0]["t"], r1[-1]["t"], 4, {"remote": 3, "fallback": 1})]
    text = markdown(build_report(r0 + r1, rounds, PROTO, {}))
    assert "qps1: no bytes arrived during the measured contexts" in text
    assert "qps1: load requests not prefilled on P: fallback 1" in text
    assert "qps0:" not in text.split("**Caveats:**")[1].split("## Rounds")[0]


def test_report_without_a_quiet_round_has_no_baseline():
    r1 = background_round(0.0)
    report = build_report(r1, [window("qps1", 1, r1)], PROTO, {})
    assert report["baseline"] is None and report["relative"] == {}
    assert "not measured" in markdown(report).lower()


def ab_steps(n_windows: int, size: int, full_cost: float):
    """Alternating full/bare windows; period drifts up linearly, full steps cost `full_cost` more;
    the first step of each window carries a big switch cost that must be ignored."""
    steps = []
    for i in range(n_windows * size):
        mode = "full" if (i // size) % 2 == 0 else "bare"
        period = (10.0 + 0.01 * i) * (1 + full_cost if mode == "full" else 1.0)
        if i % size == 0:
            period += 50.0
        steps.append({"step": i, "t": float(i), "mode": mode, "latency_ms": period - 1.0,
                      "period_ms": period, "num_reqs": 4, "num_tokens": 4,
                      "probe_us": 100.0 if mode == "full" else None})  # fmt: skip
    return steps


def test_probe_cost_compares_bare_windows_with_the_full_windows_around_them():
    steps = ab_steps(n_windows=9, size=8, full_cost=0.02)
    cost = probe_cost(steps, PROTO)
    assert cost["period_ms"]["windows"] == 4
    assert cost["period_ms"]["median"] == pytest.approx(0.02, abs=1e-9)
    assert cost["period_ms"]["q1"] == pytest.approx(0.02) == cost["period_ms"]["q3"]
    assert cost["latency_ms"]["median"] > 0.015
    steady_full = [s for s in steps if s["mode"] == "full" and s["step"] % 8]
    expected = sum(0.1 / s["period_ms"] for s in steady_full) / len(steady_full)
    assert cost["own_work_share"] == pytest.approx(expected)
    assert cost["own_work_us"] == 100.0


def test_probe_cost_shrugs_off_one_disturbed_window():
    steps = ab_steps(n_windows=17, size=8, full_cost=0.02)
    for s in steps[24:32]:  # the second bare window: something else took the machine
        s["period_ms"] *= 5
    assert probe_cost(steps, PROTO)["period_ms"]["median"] == pytest.approx(0.02, abs=0.001)


def test_probe_cost_is_none_without_ab_windows():
    assert probe_cost(background_round(0.0), PROTO) is None


def test_load_steps_skips_a_line_cut_short(tmp_path):
    path = tmp_path / "steps.jsonl"
    path.write_text('{"step": 0}\n{"step": 1}\n{"step": 2, "t"')
    assert load_steps(path) == [{"step": 0}, {"step": 1}]
