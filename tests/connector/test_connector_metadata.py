"""Metadata: the D -> P push target, client hints and notifications (no vLLM)."""

import pytest

from pdpush.connector.metadata import (
    Notif, ParamsError, PushTarget, blocks_for_tokens, client_mode,
)


def target(**kw) -> PushTarget:
    base = dict(d_req_id="r1", d_engine_id="e", side_channel="127.0.0.1:5600",
                d_block_ids=(4, 5, 9), skip_tokens=128, block_size=128, budget_s=30.0)
    return PushTarget(**{**base, **kw})


def test_push_target_round_trips_through_params():
    t = target()
    assert PushTarget.from_params(t.to_params()) == t


def test_requests_without_push_target_are_plain():
    assert PushTarget.from_params(None) is None
    assert PushTarget.from_params({"other": 1}) is None


@pytest.mark.parametrize("change, message", [
    ({"d_block_ids": "1,2"}, "d_block_ids has the wrong type"),
    ({"d_block_ids": [1, -2]}, "must be block ids"),
    ({"skip_tokens": 100}, "multiple of block_size"),
    ({"side_channel": "nohost"}, "must be host:port"),
    ({"budget_s": "soon"}, "budget_s has the wrong type"),
    ({"budget_s": 0}, "budget_s must be > 0"),
    ({"skip_tokens": True}, "skip_tokens has the wrong type"),
])
def test_malformed_push_target_is_rejected_clearly(change, message):
    params = target().to_params()
    params["pdpush"].update(change)
    with pytest.raises(ParamsError, match=message):
        PushTarget.from_params(params)


def test_missing_field_is_named():
    params = target().to_params()
    del params["pdpush"]["d_engine_id"]
    with pytest.raises(ParamsError, match="d_engine_id is missing"):
        PushTarget.from_params(params)


def test_prompt_geometry_is_checked_on_p():
    t = target()
    t.check_prompt(300, 128)  # 3 blocks
    with pytest.raises(ParamsError, match="3 D blocks for a 500-token prompt"):
        t.check_prompt(500, 128)
    with pytest.raises(ParamsError, match="block size differs"):
        t.check_prompt(300, 16)


def test_blocks_for_tokens_rounds_up():
    assert [blocks_for_tokens(n, 128) for n in (1, 128, 129, 256)] == [1, 1, 2, 2]


def test_client_mode_defaults_and_validation():
    assert client_mode(None) == ("auto", None)
    assert client_mode({"pdpush_prefill": "local"}) == ("local", None)
    assert client_mode({"pdpush_prefill_tokens": [1, 2]}, allow_tokens=True) == ("auto", [1, 2])
    with pytest.raises(ParamsError, match="must be one of"):
        client_mode({"pdpush_prefill": "fast"})
    with pytest.raises(ParamsError, match="list of token ids"):
        client_mode({"pdpush_prefill_tokens": "abc"}, allow_tokens=True)


def test_tokens_for_p_are_refused_unless_the_test_seam_is_on():
    with pytest.raises(ParamsError, match="test-only setting"):
        client_mode({"pdpush_prefill_tokens": [1, 2]})


def test_notif_round_trip_and_foreign_messages():
    n = Notif("r1", ok=False, nbytes=42, reason="deadline")
    assert Notif.decode(n.encode()) == n
    assert Notif.decode(b"not json") is None
    assert Notif.decode(b'{"x": 1}') is None


def test_stats_render_as_prometheus_text():
    from pdpush.connector.stats import prometheus_text

    text = prometheus_text({"role": "D", "first_token_mismatch": 2,
                            "prefills": {"http://p": {"inflight": 1, "healthy": True}}})
    assert "pdpush_first_token_mismatch 2.0" in text
    assert 'pdpush_prefill_healthy{url="http://p"} 1.0' in text
    assert "role" not in text
