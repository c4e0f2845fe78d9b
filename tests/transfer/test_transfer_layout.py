"""Layout -> byte runs: descriptor counts for known tables, and real byte copies through the runs
(a wrong offset, length or merge shows up as wrong bytes in the destination)."""

import random

import numpy as np
import pytest
import torch

from pdpush.transfer.layout import (
    BlockLayout,
    BlockRun,
    ByteRun,
    RunPlan,
    block_runs,
    byte_runs,
    merge_adjacent,
    total_bytes,
)

BS, HEADS, DIM = 16, 2, 8  # small but with every dim > 1


def vllm032_fa(num_blocks: int) -> torch.Tensor:
    """vLLM 0.32 FlashAttention per-layer view: logical (B, H, N, 2D), physical LBNHC."""
    phys = torch.empty(num_blocks, BS, HEADS, 2 * DIM, dtype=torch.bfloat16)
    return phys.permute(0, 2, 1, 3)


def legacy_fa(num_blocks: int) -> torch.Tensor:
    """Older FlashAttention per-layer tensor (2, num_blocks, block_size, heads, dim)."""
    return torch.empty(2, num_blocks, BS, HEADS, DIM, dtype=torch.bfloat16)


def cpu_backend(num_blocks: int) -> torch.Tensor:
    return torch.empty(num_blocks, 2, BS, HEADS * DIM, dtype=torch.bfloat16)


def block_outer(num_blocks: int, layers: int = 3, layer: int = 1) -> torch.Tensor:
    """One layer's (B, H, N, 2D) view of a BLNHC cache: a block's pages of all layers adjoin."""
    raw = torch.empty(num_blocks, layers, BS, HEADS, 2 * DIM, dtype=torch.bfloat16)
    return raw[:, layer].permute(0, 2, 1, 3)


def head_major(num_blocks: int) -> torch.Tensor:
    """vLLM 0.32 LBHNC: same logical view as vllm032_fa, heads outermost inside the page."""
    return torch.empty(num_blocks, HEADS, BS, 2 * DIM, dtype=torch.bfloat16)


LAYOUTS = {  # name -> (make, block_dim)
    "vllm032_fa": (vllm032_fa, 0),
    "legacy_fa": (legacy_fa, 1),
    "cpu": (cpu_backend, 0),
    "block_outer": (block_outer, 0),
}


def fill_random(t: torch.Tensor, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))


def storage_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's whole storage as a writable numpy byte array (no copy)."""
    return torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).numpy()


def copy_through(runs: list[ByteRun], src: torch.Tensor, dst: torch.Tensor) -> None:
    """Apply byte runs with numpy on the tensors' whole storages (addresses are absolute)."""
    s_store, d_store = storage_bytes(src), storage_bytes(dst)
    s0, d0 = src.untyped_storage().data_ptr(), dst.untyped_storage().data_ptr()
    for r in runs:
        d_store[r.dst - d0 : r.dst - d0 + r.nbytes] = s_store[r.src - s0 : r.src - s0 + r.nbytes]


def block(t: torch.Tensor, block_dim: int, b: int) -> torch.Tensor:
    return t.select(block_dim, b)


def check_copy(name: str, src_ids: list[int], dst_ids: list[int], n_src=40, n_dst=50,
               dst_name: str | None = None):
    make, bd = LAYOUTS[name]
    make_dst, dst_bd = LAYOUTS[dst_name or name]
    assert dst_bd == bd
    src, dst = make(n_src), make_dst(n_dst)
    fill_random(src, 1)
    dst.zero_()
    runs = byte_runs(BlockLayout.from_tensor(src, bd), BlockLayout.from_tensor(dst, bd),
                     src_ids, dst_ids)
    copy_through(runs, src, dst)
    for s, d in zip(src_ids, dst_ids):
        assert torch.equal(block(dst, bd, d), block(src, bd, s)), (name, s, d)
    untouched = sorted(set(range(n_dst)) - set(dst_ids))
    for d in untouched:
        assert not block(dst, bd, d).any(), f"{name}: block {d} written but not targeted"
    assert total_bytes(runs) == len(src_ids) * BlockLayout.from_tensor(src, bd).block_bytes
    return runs


def test_block_runs_need_both_sides_consecutive():
    assert block_runs([3, 4, 5, 9, 10], [7, 8, 20, 21, 22]) == [
        BlockRun(3, 7, 2), BlockRun(5, 20, 1), BlockRun(9, 21, 2)]
    assert block_runs([], []) == []
    with pytest.raises(ValueError):
        block_runs([1, 2], [1])


def test_segments_from_shapes():
    fa = BlockLayout.from_tensor(vllm032_fa(10), 0)
    page = HEADS * BS * 2 * DIM * 2
    assert fa.dense and fa.segments == ((0, page),) and fa.block_stride == page
    legacy = BlockLayout.from_tensor(legacy_fa(10), 1)
    half = BS * HEADS * DIM * 2
    assert legacy.segments == ((0, half), (10 * half, half)) and not legacy.dense
    outer = BlockLayout.from_tensor(block_outer(10), 0)
    assert outer.segments == ((0, page),) and outer.block_stride == 3 * page
    assert fa.region() == (fa.base, 10 * page)


def test_consecutive_blocks_make_one_run_per_segment():
    runs = check_copy("vllm032_fa", list(range(5, 25)), list(range(30, 50)))
    assert len(runs) == 1
    runs = check_copy("legacy_fa", list(range(5, 25)), list(range(30, 50)))
    assert len(runs) == 2  # K and V planes


def test_fragmented_table_counts():
    src_ids = [0, 1, 2, 7, 8, 3, 20, 21]
    dst_ids = [10, 11, 12, 4, 5, 30, 40, 41]
    assert len(check_copy("vllm032_fa", src_ids, dst_ids)) == 4
    assert len(check_copy("legacy_fa", src_ids, dst_ids)) == 8
    assert len(check_copy("cpu", src_ids, dst_ids)) == 4
    assert len(check_copy("block_outer", src_ids, dst_ids)) == len(src_ids)  # never adjacent


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("seed", range(5))
def test_random_tables_copy_exactly(name, seed):
    rng = random.Random(seed)
    n = rng.randint(1, 30)
    check_copy(name, vllm_like_ids(rng, n, 40), vllm_like_ids(rng, n, 50))


def vllm_like_ids(rng: random.Random, n: int, num_blocks: int) -> list[int]:
    """Block ids as a busy allocator hands them out: consecutive stretches, shuffled."""
    ids = sorted(rng.sample(range(num_blocks), n))
    cuts = sorted(rng.sample(range(n + 1), min(n + 1, 3)))
    pieces = [ids[a:b] for a, b in zip([0, *cuts], [*cuts, n])]
    rng.shuffle(pieces)
    return [b for piece in pieces for b in piece]


@pytest.mark.parametrize("seed", range(3))
def test_dense_source_into_block_outer_destination(seed):
    rng = random.Random(seed)
    n = rng.randint(5, 30)
    runs = check_copy("vllm032_fa", list(range(n)), vllm_like_ids(rng, n, 50),
                      dst_name="block_outer")
    assert len(runs) == n  # destination pages never adjacent


def test_merge_adjacent_requires_both_sides():
    runs = [ByteRun(0, 100, 10), ByteRun(10, 110, 5), ByteRun(15, 200, 5), ByteRun(20, 205, 1)]
    assert merge_adjacent(runs) == [ByteRun(0, 100, 15), ByteRun(15, 200, 6)]


def test_bad_input_is_rejected():
    lay = BlockLayout.from_tensor(vllm032_fa(4), 0)
    with pytest.raises(ValueError, match="outside"):
        byte_runs(lay, lay, [0, 4], [1, 2])
    other = BlockLayout.from_tensor(legacy_fa(4), 1)
    with pytest.raises(ValueError, match="differ"):
        byte_runs(lay, other, [0], [0])
    with pytest.raises(ValueError, match="differ"):  # same bytes per page, other element order
        byte_runs(lay, BlockLayout.from_tensor(head_major(4), 0), [0], [0])
    with pytest.raises(ValueError, match="aliasing"):
        BlockLayout.from_strided(0, (4, 2, 8), (8, 0, 1), 2, 0)
    with pytest.raises(ValueError, match="block_dim"):
        BlockLayout.from_strided(0, (4, 8), (8, 1), 2, 2)


def test_run_plan_matches_byte_runs_per_layer():
    raw_src = torch.empty(4, 40, BS, HEADS, 2 * DIM, dtype=torch.bfloat16)
    raw_dst = torch.empty(4, 50, BS, HEADS, 2 * DIM, dtype=torch.bfloat16)
    src = [BlockLayout.from_tensor(raw_src[i].permute(0, 2, 1, 3), 0) for i in range(4)]
    dst = [BlockLayout.from_tensor(raw_dst[i].permute(0, 2, 1, 3), 0) for i in range(4)]
    dst[2] = BlockLayout.from_tensor(block_outer(50), 0)  # a layer of another structure
    rng = random.Random(7)
    src_ids, dst_ids = vllm_like_ids(rng, 20, 40), vllm_like_ids(rng, 20, 50)
    plan = RunPlan(src, dst, src_ids, dst_ids)
    assert len(plan) == 4
    for i in range(4):
        assert plan.layer(i) == byte_runs(src[i], dst[i], src_ids, dst_ids)
    with pytest.raises(ValueError):
        RunPlan(src, dst[:3], src_ids, dst_ids)
