"""Where TTFT goes: the stage timings D returns and shows in /stats (no vLLM, no network)."""

from __future__ import annotations

import time

from connector_fakes import FakeClient
from test_connector_decode_lease import P, go_remote, request
from test_connector_prefill_plan import request as p_request
from test_connector_prefill_plan import scheduler as p_scheduler
from test_connector_prefill_plan import step

from pdpush.connector.config import PdpushConfig
from pdpush.connector.decode_scheduler import RECENT_TIMINGS, DecodeScheduler
from pdpush.connector.metadata import Notif
from pdpush.connector.timing import P_WORKER_STAGES, WriteTimes
from pdpush.rpc.prefill_client import PrefillResult
from pdpush.vllm_api import StepView, Transfers


def d_sched() -> DecodeScheduler:
    cfg = PdpushConfig(prefill_urls=(P,), remote_threshold_tokens=64, prefill_timeout_s=10.0)
    return DecodeScheduler(cfg, block_size=16, engine_id="d0", client=FakeClient())


def scheduled(*req_ids: str) -> StepView:
    return StepView({r: (0, 1) for r in req_ids}, len(req_ids))


def test_remote_request_reports_every_stage_in_order_with_p_offsets():
    sched = d_sched()
    req = request("a", 100)
    go_remote(sched, req)
    sent = time.monotonic()
    sched.client.results.append(PrefillResult("a", P, True, first_token=7, sent_at=sent,
                                              p_ms={"prefill_start": 0.5, "first_token": 9.0}))
    sched.build_meta(scheduled())  # P's answer collected
    p_worker = (1.0, 8.0, 9.5, 9.6)
    sched.update_connector_output(Transfers(received={"a"}, arrivals={"a": (time.monotonic(), p_worker)}))
    sched.build_meta(scheduled())  # not scheduled yet: no first step
    sched.build_meta(scheduled("a"))
    sched.build_meta(scheduled("a"))  # later steps do not move it
    req.output_token_ids = [7]
    _, params = sched.request_finished(req)
    timing = params["pdpush"]["timing"]
    d_ms = timing["d_ms"]
    assert list(d_ms) == ["sent", "answered", "kv_notif", "kv_seen", "first_step"]
    assert all(a <= b for a, b in zip(d_ms.values(), list(d_ms.values())[1:]))
    assert timing["p_ms"] == {"prefill_start": 0.5, "first_token": 9.0,
                              **dict(zip(P_WORKER_STAGES, p_worker))}
    assert sched.stats()["recent"] == [{"prefill": "remote", **timing}]


def test_local_request_has_its_first_step_and_recent_is_bounded():
    sched = d_sched()
    for i in range(RECENT_TIMINGS + 5):
        req = request(f"l{i}", 10)
        sched.get_num_new_matched_tokens(req, 0)
        sched.build_meta(scheduled(f"l{i}"))
        req.output_token_ids = [1]
        _, params = sched.request_finished(req)
        assert list(params["pdpush"]["timing"]["d_ms"]) == ["first_step"]
    assert len(sched.stats()["recent"]) == RECENT_TIMINGS
    assert not sched._before_first_step  # nothing left once the requests finished


def test_p_answer_carries_its_scheduler_stages_and_tasks_its_admit_time():
    sched = p_scheduler()
    req = p_request("a", 40)
    sched.get_num_new_matched_tokens(req, 0)
    (task,) = sched.build_meta(step(new=[("a", 0, 40)])).tasks
    assert task.admitted > 0
    _, params = sched.request_finished(req)
    p_ms = params["pdpush"]["p_ms"]
    assert set(p_ms) == {"prefill_start", "last_chunk", "first_token"}
    assert 0 <= p_ms["prefill_start"] <= p_ms["last_chunk"] <= p_ms["first_token"]


def test_write_times_travel_in_the_notification():
    times = WriteTimes(admitted=100.0)
    times.posted(100.001)
    times.posted(100.004)
    times.last_done, times.notified = 100.005, 100.006
    offsets = times.offsets()
    assert offsets == (1.0, 4.0, 5.0, 6.0)
    notif = Notif.decode(Notif("a", True, 10, "", times=offsets).encode())
    assert notif is not None and notif.times == offsets
    assert WriteTimes(0.0).offsets() == ()  # no admit time known: nothing to report
    old = b'{"d_req_id":"a","ok":true,"nbytes":1,"reason":""}'  # a P from before timings
    assert Notif.decode(old) == Notif("a", True, 1, "")


def test_p_queue_read_from_metrics_by_scan_equals_the_full_parse():
    from pdpush.vllm_api import WAITING_REQUESTS, metric_sum, parse_metrics

    text = "\n".join([
        f"# HELP {WAITING_REQUESTS} Requests waiting.", f"# TYPE {WAITING_REQUESTS} gauge",
        f'{WAITING_REQUESTS}{{engine="0",model_name="a b}}"}} 3.0',  # a brace inside a label value
        f'{WAITING_REQUESTS}{{engine="1",model_name="pdpush"}} 2.0',
        "# TYPE vllm:num_requests_waiting_by_reason gauge",
        'vllm:num_requests_waiting_by_reason{reason="x"} 100.0',  # a longer name: not counted
        'vllm:other 7.0', "",
    ])
    assert metric_sum(text, WAITING_REQUESTS) == parse_metrics(text)[WAITING_REQUESTS] == 5.0
    assert metric_sum(text, "vllm:other") == 7.0 and metric_sum(text, "vllm:absent") == 0.0


def test_p_answer_after_d_finished_still_reaches_stats():
    sched = d_sched()
    req = request("a", 100)
    go_remote(sched, req)
    sched.update_connector_output(Transfers(received={"a"}))
    sched.build_meta(scheduled("a"))
    req.output_token_ids = [7]
    _, params = sched.request_finished(req)  # P's answer still to come: AWAITING_P_ANSWER
    assert "sent" not in params["pdpush"]["timing"]["d_ms"]
    assert sched.has_pending()  # an idle D keeps stepping until the answer is in
    sched.client.results.append(PrefillResult("a", P, True, first_token=7, sent_at=time.monotonic(),
                                              p_ms={"first_token": 3.0}))
    sched.build_meta(scheduled())
    (entry,) = sched.stats()["recent"]
    assert "sent" in entry["d_ms"] and entry["p_ms"] == {"first_token": 3.0}
    assert sched.counters.first_token_checked == 1 and not sched._requests
    assert not sched.has_pending()


def test_a_finished_request_stops_waiting_for_p_answer_at_its_lease_end():
    sched = d_sched()
    req = request("a", 100, temperature=0.7)  # not greedy: waits only for P's stage times
    go_remote(sched, req)
    sched.update_connector_output(Transfers(received={"a"}))
    sched.build_meta(scheduled("a"))
    req.output_token_ids = [7]
    sched.request_finished(req)
    assert sched.has_pending()
    sched._requests["a"].lease_end = time.monotonic() - 1  # the lease ran out, no answer
    sched.build_meta(scheduled())
    assert not sched.has_pending() and not sched._requests
