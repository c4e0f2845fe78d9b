"""P's push plan: which blocks each prefill step hands to the workers (no vLLM).

Requests and scheduler outputs are plain stand-ins with the fields the scheduler reads.
"""

import time
from types import SimpleNamespace as NS

from pdpush.connector.metadata import PushTarget
from pdpush.connector.prefill_scheduler import PrefillScheduler
from pdpush.vllm_api import RequestView, Transfers, step_view

BS = 16


def request(req_id: str, n: int, skip: int = 0, budget_s: float = 30.0, d_blocks=None):
    nblocks = -(-n // BS)
    t = PushTarget(req_id.upper(), "e", "h:1", tuple(d_blocks or range(100, 100 + nblocks)),
                   skip, BS, budget_s)
    return RequestView(req_id, n, n, [], t.to_params())


P_BLOCKS = list(range(10, 20))  # P's blocks 10, 11, ... of every request


def step(new=(), cached=(), preempted=()):
    """new / cached: (req_id, computed_before, scheduled) triples; new ones get P_BLOCKS."""
    return step_view(NS(
        scheduled_new_reqs=[NS(req_id=r, num_computed_tokens=c, block_ids=(P_BLOCKS,))
                            for r, c, _ in new],
        scheduled_cached_reqs=NS(req_ids=[r for r, _, _ in cached],
                                 num_computed_tokens=[c for _, c, _ in cached],
                                 new_block_ids=[None] * len(cached), resumed_req_ids=set()),
        num_scheduled_tokens={r: s for r, _, s in [*new, *cached]},
        total_num_scheduled_tokens=sum(s for _, _, s in [*new, *cached]),
        preempted_req_ids=set(preempted),
    ))


def scheduler():
    return PrefillScheduler(BS)


def test_chunked_prefill_pushes_complete_blocks_then_the_partial_tail():
    sched = scheduler()
    req = request("a", 40)  # 3 blocks: 16 + 16 + 8
    assert sched.get_num_new_matched_tokens(req, 0) == (0, False)
    first = sched.build_meta(step(new=[("a", 0, 20)])).tasks
    assert [(t.p_block_ids, t.d_block_ids, t.last) for t in first] == [([10], [100], False)]
    second = sched.build_meta(step(cached=[("a", 20, 20)])).tasks
    assert [(t.p_block_ids, t.d_block_ids, t.last) for t in second] == [([11, 12], [101, 102], True)]
    assert sched.build_meta(step(cached=[("a", 40, 1)])).tasks == []  # decoding: nothing more


def test_step_completing_no_block_plans_nothing():
    sched = scheduler()
    sched.get_num_new_matched_tokens(request("a", 64), 0)
    assert sched.build_meta(step(new=[("a", 0, 8)])).tasks == []


def test_d_prefix_hit_is_not_pushed_but_p_hit_is():
    sched = scheduler()
    sched.get_num_new_matched_tokens(request("a", 48, skip=16), 0)
    # P had 32 tokens cached itself: they are pushed too (D lacks them), D's first block is not.
    tasks = sched.build_meta(step(new=[("a", 32, 16)])).tasks
    assert [(t.p_block_ids, t.d_block_ids, t.last) for t in tasks] == [([11, 12], [101, 102], True)]


def test_bad_target_is_rejected_and_reported_in_the_response():
    sched = scheduler()
    req = request("a", 100, d_blocks=[1, 2])  # 100 tokens need 7 blocks of 16
    sched.get_num_new_matched_tokens(req, 0)
    assert sched.build_meta(step(new=[("a", 0, 100)])).tasks == []
    hold, params = sched.request_finished(req)
    assert not hold and "2 D blocks for a 100-token prompt" in params["pdpush_error"]


def test_budget_within_the_stop_margin_is_rejected():
    sched = scheduler()  # push_stop_margin_s defaults to 2 s
    req = request("a", 32, budget_s=1.0)
    sched.get_num_new_matched_tokens(req, 0)
    assert "push_stop_margin_s" in sched.request_finished(req)[1]["pdpush_error"]


def test_budget_becomes_p_monotonic_deadline_less_the_margin():
    """The duration D sent is read on P's clock at arrival; the margin comes off it."""
    sched = scheduler()
    before = time.monotonic()
    sched.get_num_new_matched_tokens(request("a", 32, budget_s=30.0), 0)
    (task,) = sched.build_meta(step(new=[("a", 0, 32)])).tasks
    assert before + 28.0 <= task.post_until <= time.monotonic() + 28.0


def test_finished_request_holds_blocks_until_sent():
    sched = scheduler()
    req = request("a", 32)
    sched.get_num_new_matched_tokens(req, 0)
    sched.build_meta(step(new=[("a", 0, 32)]))
    assert sched.request_finished(req)[0] is True
    assert sched.has_pending()
    sched.update_connector_output(Transfers(sent={"a"}))
    assert not sched.has_pending()


def test_request_ending_before_its_prompt_tells_the_workers_to_stop():
    sched = scheduler()
    req = request("a", 64)
    sched.get_num_new_matched_tokens(req, 0)
    sched.build_meta(step(new=[("a", 0, 16)]))
    assert sched.request_finished(req)[0] is True  # aborted: blocks held until WRITEs end
    meta = sched.build_meta(step())
    assert list(meta.stopped) == ["a"] and meta.tasks == []
    assert sched.build_meta(step()).stopped == {}


def test_plain_requests_are_ignored():
    sched = scheduler()
    req = RequestView("p", 10, 10, [], None)
    sched.get_num_new_matched_tokens(req, 0)
    assert sched.build_meta(step(new=[("p", 0, 10)])).tasks == []
    assert sched.request_finished(req) == (False, None)


def test_push_aborted_before_p_looked_at_it_is_still_stopped():
    sched = scheduler()
    req = request("a", 64)
    assert sched.request_finished(req)[0] is True  # held until the workers told D
    assert list(sched.build_meta(step()).stopped) == ["a"]


def test_preempted_push_is_flagged_and_resumes_where_it_left_off():
    sched = scheduler()
    sched.get_num_new_matched_tokens(request("a", 48), 0)
    sched.build_meta(step(new=[("a", 0, 16)]))
    meta = sched.build_meta(step(preempted=["a", "plain"]))
    assert meta.preempted == ["a"]  # the workers finish its WRITEs before blocks are reused
    # Recomputed from scratch later: only blocks not pushed yet are planned again.
    tasks = sched.build_meta(step(new=[("a", 0, 48)])).tasks
    assert [(t.d_block_ids, t.last) for t in tasks] == [([101, 102], True)]


def test_release_question_answers_busy_then_released_and_refuses_a_late_push():
    """D asks whether it may release what it holds for D request A (rpc/release.py)."""
    from pdpush.rpc.release import RELEASED_KEY, release_body

    def ask(sched, req_id: str) -> bool:
        q = RequestView(req_id, 1, 1, [0], release_body("A")["kv_transfer_params"])
        sched.get_num_new_matched_tokens(q, 0)
        return sched.request_finished(q)[1][RELEASED_KEY]

    sched = scheduler()
    sched.get_num_new_matched_tokens(request("a", 32), 0)  # P tracks a push of D's request A
    assert ask(sched, "q1") is False
    sched.update_connector_output(Transfers(sent={"a"}))  # pushed, notified, released
    assert ask(sched, "q2") is True
    late = request("a2", 32)
    late.kv_transfer_params["pdpush"]["d_req_id"] = "A"  # the same do_prefill arriving late
    sched.get_num_new_matched_tokens(late, 0)
    assert "released" in sched.request_finished(late)[1]["pdpush_error"]


def test_with_a_key_only_a_release_question_d_signed_is_answered(tmp_path):
    """An unsigned (or wrongly signed) question would tombstone D's request: P refuses it, and
    the push of that request is still accepted afterwards; D's signed question is answered."""
    from pdpush.connector.auth import Keys
    from pdpush.connector.config import PdpushConfig
    from pdpush.rpc.release import RELEASED_KEY, release_body, release_fields

    key_file = tmp_path / "key"
    key_file.write_text("k" * 32)
    sched = PrefillScheduler(BS, PdpushConfig(auth_key_file=str(key_file)))
    for n, sig in enumerate(["", Keys(b"o" * 32).sign(release_fields("A"))]):
        q = RequestView(f"forged{n}", 1, 1, [0], release_body("A", sig)["kv_transfer_params"])
        sched.get_num_new_matched_tokens(q, 0)
        assert "not signed" in sched.request_finished(q)[1]["pdpush_error"]
    assert sched.forbidden_requests == 2 and "A" not in sched.tombstones
    q = RequestView("q", 1, 1, [0], release_body("A", sched.keys.sign(release_fields("A")))
                    ["kv_transfer_params"])
    sched.get_num_new_matched_tokens(q, 0)
    assert sched.request_finished(q)[1] == {RELEASED_KEY: True} and "A" in sched.tombstones
