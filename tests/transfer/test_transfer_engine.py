"""Two real NIXL agents (UCX, CPU) in one process: KV-shaped torch tensors pushed through
`byte_runs` + `TransferEngine.write`, checked byte for byte, with notifications and counters."""

import random
import time

import pytest
import torch

from pdpush.transfer.engine import (
    DRAM,
    EngineConfig,
    MemRegion,
    Placement,
    TransferEngine,
    TransferError,
)
from pdpush.transfer.layout import BlockLayout, ByteRun, RunPlan, byte_runs

pytest.importorskip("nixl._api")

LAYERS, BLOCKS, BS, HEADS, DIM = 3, 32, 16, 2, 16


def kv_caches(seed: int | None) -> list[torch.Tensor]:
    """Per-layer (B, H, N, 2D) views, physical LBNHC, as vLLM 0.32's FlashAttention gets."""
    raw = torch.zeros(LAYERS, BLOCKS, BS, HEADS, 2 * DIM, dtype=torch.bfloat16)
    if seed is not None:
        raw.copy_(torch.randn(raw.shape, generator=torch.Generator().manual_seed(seed)))
    return [raw[layer].permute(0, 2, 1, 3) for layer in range(LAYERS)]


def wait_notif(engine: TransferEngine, timeout_s: float = 10.0) -> dict[str, list[bytes]]:
    deadline = time.monotonic() + timeout_s
    got: dict[str, list[bytes]] = {}
    while time.monotonic() < deadline:
        for peer, msgs in engine.notifications().items():
            got.setdefault(peer, []).extend(msgs)
        if got:
            return got
        time.sleep(0.001)
    raise AssertionError("no notification")


@pytest.fixture
def pair():
    p, d = TransferEngine("P-test"), TransferEngine("D-test")
    yield p, d
    p.close()
    d.close()


def register(engine: TransferEngine, caches: list[torch.Tensor]) -> list[BlockLayout]:
    layouts = [BlockLayout.from_tensor(c, 0) for c in caches]
    engine.register([MemRegion(*lay.region(), DRAM) for lay in layouts])
    return layouts


def test_layer_wise_push_lands_bytes_and_notifies(pair):
    p, d = pair
    src, dst = kv_caches(seed=3), kv_caches(seed=None)
    src_lay, dst_lay = register(p, src), register(d, dst)
    peer = p.add_peer(d.metadata())
    rng = random.Random(0)
    src_ids = list(range(4, 24))
    dst_ids = rng.sample(range(BLOCKS), len(src_ids))
    xfers = []
    for layer in range(LAYERS):
        runs = byte_runs(src_lay[layer], dst_lay[layer], src_ids, dst_ids)
        last = layer == LAYERS - 1
        xfers.append(p.write(peer, runs, notif=b"req-1" if last else b""))
    p.wait(xfers, also_progress=[d])
    assert wait_notif(d) == {"P-test": [b"req-1"]}
    for layer in range(LAYERS):
        for s, t in zip(src_ids, dst_ids):
            assert torch.equal(dst[layer][t], src[layer][s])
        untouched = sorted(set(range(BLOCKS)) - set(dst_ids))
        assert not dst[layer][untouched].any()
    page = HEADS * BS * 2 * DIM * 2
    assert p.bytes_written(peer) == LAYERS * len(src_ids) * page == p.bytes_written()
    assert d.bytes_written(peer) == 0


def test_notify_without_data_and_merged_write(pair):
    p, d = pair
    src, dst = kv_caches(seed=5), kv_caches(seed=None)
    src_lay, dst_lay = register(p, src), register(d, dst)
    peer = p.add_peer(d.metadata())
    ids = [1, 2, 3, 9, 10]
    runs = [r for layer in range(LAYERS) for r in byte_runs(src_lay[layer], dst_lay[layer], ids, ids)]
    xfer = p.write(peer, runs)
    assert xfer.ndesc == 2 * LAYERS
    p.wait([xfer], also_progress=[d])
    p.notify(peer, b"done")
    assert wait_notif(d) == {"P-test": [b"done"]}
    for layer in range(LAYERS):
        assert torch.equal(dst[layer][ids], src[layer][ids])


def test_errors_are_clear(pair):
    p, d = pair
    buf = torch.zeros(4096, dtype=torch.uint8)
    p.register([MemRegion(buf.data_ptr(), buf.numel())])
    with pytest.raises(ValueError, match="unknown peer"):
        p.write("nobody", [ByteRun(buf.data_ptr(), 0, 1)])
    peer = p.add_peer(d.metadata())
    with pytest.raises(ValueError, match="at least one"):
        p.write(peer, [])
    with pytest.raises(TransferError):  # destination not registered on D
        p.wait([p.write(peer, [ByteRun(buf.data_ptr(), 12345678, 64)])], 5, [d])
    with pytest.raises(ValueError, match="one memory kind"):
        p.register([MemRegion(1, 1, DRAM), MemRegion(2, 1, Placement("VRAM", 0))])


def test_close_releases_everything_and_is_idempotent():
    p, d = TransferEngine("P-close"), TransferEngine("D-close")
    a, b = torch.ones(1 << 16, dtype=torch.uint8), torch.zeros(1 << 16, dtype=torch.uint8)
    p.register([MemRegion(a.data_ptr(), a.numel())])
    d.register([MemRegion(b.data_ptr(), b.numel())])
    peer = p.add_peer(d.metadata())
    p.wait([p.write(peer, [ByteRun(a.data_ptr(), b.data_ptr(), a.numel())])], also_progress=[d])
    assert bool(b.all())
    p.close()
    p.close()
    d.close()
    assert not p._registrations and not p._peers and not p._transfers


def test_thread_pool_config_moves_the_same_bytes():
    """EngineConfig(num_threads=...) reaches NIXL's UCX thread pool; bytes still land exactly."""
    cfg = EngineConfig(num_threads=2, backend_params=(("split_batch_size", "4"),))
    p, d = TransferEngine("P-pool", cfg), TransferEngine("D-pool")
    try:
        src, dst = kv_caches(seed=9), kv_caches(seed=None)
        src_lay, dst_lay = register(p, src), register(d, dst)
        peer = p.add_peer(d.metadata())
        ids = list(range(0, 30, 2))  # nothing coalesces: 15 descriptors per layer
        plan = RunPlan(src_lay, dst_lay, ids, ids[::-1])
        p.wait([p.write(peer, plan.layer(i)) for i in range(LAYERS)], also_progress=[d])
        for layer in range(LAYERS):
            assert torch.equal(dst[layer][ids[::-1]], src[layer][ids])
    finally:
        p.close()
        d.close()
