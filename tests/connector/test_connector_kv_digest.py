"""D's debug KV digest (connector/kv_digest.py): what changed, per block and layer, and equality."""

import pytest
import torch

from pdpush.connector.config import ConfigError, PdpushConfig
from pdpush.connector.kv_digest import KVDigest

NB = 10


def caches():
    torch.manual_seed(0)  # FlashAttention's layout: [2 (K, V), blocks, block size, heads, dim]
    return {f"l{i}": torch.randn(2, NB, 4, 2, 8).to(torch.bfloat16) for i in range(2)}


def test_reports_changed_blocks_per_layer_and_equal_bytes_hash_equal():
    kv = caches()
    digest = KVDigest(kv, NB)
    assert digest.changed()["changed"] == {}  # the first call takes the snapshot
    kv["l1"][1, 3, 2, 0, 5] += 1  # one element of block 3's V, layer 1
    kv["l0"][:, 7] = kv["l0"][:, 2]  # block 7 becomes a copy of block 2 in layer 0
    kv["l1"][:, 7] = kv["l1"][:, 2]
    digest.expected["r"] = [7]
    got = digest.changed()
    assert set(got["changed"]) == {"3", "7"} and got["expected"] == {"r": [7]} and got["layers"] == 2
    before = KVDigest(caches(), NB).hashes()  # the same tensors as made, unchanged
    assert got["changed"]["3"][0] == f"{before[0, 3].item() & (2**64 - 1):016x}"  # layer 0 same
    assert got["changed"]["3"][1] != f"{before[1, 3].item() & (2**64 - 1):016x}"
    now = digest.hashes()
    assert torch.equal(now[:, 7], now[:, 2]) and not torch.equal(now[:, 7], now[:, 1])
    assert digest.changed() == {"layers": 2, "changed": {}, "expected": {}}


def test_debug_kv_digest_is_off_by_default_and_a_test_only_bool(monkeypatch):
    assert PdpushConfig().debug_kv_digest is False
    with pytest.raises(ConfigError, match="PDPUSH_TEST_MODE"):
        PdpushConfig.from_extra_config({"prefill_urls": ["http://p"], "debug_kv_digest": True},
                                       "kv_consumer")
    monkeypatch.setenv("PDPUSH_TEST_MODE", "1")
    extra = {"prefill_urls": ["http://p"], "debug_kv_digest": True}
    assert PdpushConfig.from_extra_config(extra, "kv_consumer").debug_kv_digest is True
    with pytest.raises(ConfigError, match="true or false"):
        PdpushConfig.from_extra_config({**extra, "debug_kv_digest": "yes"}, "kv_consumer")
