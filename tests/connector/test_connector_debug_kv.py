"""D's test-only KV comparison (connector/debug_kv.py): blocks compared pairwise, served on the
side channel only when `debug_kv_compare` is set."""

from __future__ import annotations

import urllib.error

import pytest

torch = pytest.importorskip("torch")

from pdpush.connector.config import PdpushConfig  # noqa: E402
from pdpush.connector.debug_kv import ROUTE, BlockComparer  # noqa: E402
from pdpush.local.cluster import free_port  # noqa: E402
from pdpush.rpc.json_server import get_json  # noqa: E402

BLOCKS = 6


def caches() -> dict:
    """Two layers in two layouts: block dimension first (CPU) and second (FlashAttention's)."""
    gen = torch.Generator().manual_seed(3)
    return {"l0": torch.randn(BLOCKS, 2, 4, 8, generator=gen).to(torch.bfloat16),
            "l1": torch.randn(2, BLOCKS, 4, 8, generator=gen).to(torch.bfloat16)}


def test_equal_copied_and_stale_blocks_are_told_apart():
    kv = caches()
    kv["l0"][3] = kv["l0"][1]
    kv["l1"][:, 3] = kv["l1"][:, 1]
    kv["l1"][1, 3, 0, 0] += 1.0  # one value of layer 1's V differs
    kv["l0"][4] = 0  # a block never written: what a premature WRITE ships from a fresh cache
    result = BlockComparer(kv, BLOCKS).compare(a="3,4", b="1,2")
    assert result["blocks"] == 2
    l0, l1 = result["layers"]["l0"], result["layers"]["l1"]
    assert l0["equal"] == [True, False] and l0["max_abs_diff"][0] == 0.0
    assert l0["max_abs_diff"][1] == pytest.approx(l0["max_abs"][1])  # zeros: off by everything
    assert l1["equal"] == [False, False]
    assert 0.9 < l1["max_abs_diff"][0] < 1.1


@pytest.mark.parametrize("a, b, message", [
    ("1,2", "3", "as many blocks"),
    ("1,x", "3,4", "comma-separated block ids"),
    ("1", str(BLOCKS), "must name blocks in"),
    ("", "", "must name blocks in"),
])
def test_bad_block_lists_are_refused(a, b, message):
    with pytest.raises(ValueError, match=message):
        BlockComparer(caches(), BLOCKS).compare(a=a, b=b)


@pytest.mark.parametrize("debug", [False, True])
def test_d_serves_the_comparison_only_when_asked(debug, monkeypatch):
    pytest.importorskip("nixl")
    from pdpush.connector.decode_worker import DecodeWorker

    monkeypatch.setenv("PDPUSH_TEST_MODE", "1")
    port = free_port()
    config = PdpushConfig.from_extra_config(
        {"prefill_urls": ["http://p"], "side_channel_port": port, "debug_kv_compare": debug},
        "kv_consumer")
    d = DecodeWorker(config, "d-debug", rank=0, num_blocks=BLOCKS)
    try:
        d.register_kv_caches(caches())
        url = f"http://127.0.0.1:{port}{ROUTE}?a=0,5&b=0,1"
        if not debug:
            with pytest.raises(urllib.error.HTTPError, match="404"):
                get_json(url, 5)
            return
        result = get_json(url, 5)
        assert result["layers"]["l0"]["equal"] == [True, False]
        with pytest.raises(urllib.error.HTTPError, match="500"):  # the error, not a dead server
            get_json(f"http://127.0.0.1:{port}{ROUTE}?a=0", 5)
        assert get_json(f"http://127.0.0.1:{port}/meta", 5)["agent"] == d.agent_name
    finally:
        d.close()
