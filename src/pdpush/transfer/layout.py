"""Where each KV block's bytes lie in a layer's cache tensor, and the byte runs that copy blocks.

Pure Python: no torch import. Everything is derived from (data_ptr, shape, stride, itemsize) and
the index of the block dimension, never from an assumed backend layout:

* vLLM 0.32 (`vllm/v1/kv_cache_interface.py`, `compute_layout_strides` / `create_kv_cache_views`)
  hands every backend a per-layer view of logical shape `(num_blocks, kv_heads, block_size, C)`,
  C = 2 * head_size (K and V side by side), strided by the resolved `KVCacheLayout`
  (`vllm/v1/kv_cache_layout.py`). FlashAttention declares no preference, so the default
  preference `LBNHC` applies (`vllm/v1/attention/backends/utils.py`, `_DEFAULT_LAYOUT_PREFERENCE`):
  every block is one dense page and consecutive blocks are adjacent. With a block-outer layout
  (`BLHNC`) a layer's pages are a whole cross-layer page apart and never merge within a layer.
* Older FlashAttention layouts were `(2, num_blocks, block_size, kv_heads, head_size)`: block
  dim 1, two segments (K, V) per block, each merging with the next block's same segment.
* The CPU backend's view as the connector sees it is `(num_blocks, 2, block_size, heads*dim)`.

Public API (the connector uses these):

    layout = BlockLayout.from_tensor(kv_cache_tensor, block_dim=0)      # or .from_strided(...)
    runs = byte_runs(src_layout, dst_layout, src_block_ids, dst_block_ids)  # list[ByteRun]
    block_runs(src_ids, dst_ids) -> list[BlockRun]   # positions consecutive on BOTH sides
    merge_adjacent(runs) -> list[ByteRun]            # join runs contiguous on both sides
    plan = RunPlan(src_layouts, dst_layouts, src_ids, dst_ids); plan.layer(i)  # per request,
                                                     # cheap per layer (layers share structure)
    layout.region() -> (addr, nbytes)                # what to register with the engine

`byte_runs` pairs position i of `src_block_ids` with position i of `dst_block_ids`. A segment of a
run of consecutive blocks becomes one ByteRun when the segment spans the whole block stride on both
sides; neighbouring runs are then merged wherever both the source and destination bytes continue,
so descriptor count (the cost on NIXL, about 7-10 us each) is as small as the layouts allow.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import product
from typing import Any, NamedTuple, Sequence


class ByteRun(NamedTuple):
    """Copy `nbytes` from absolute address `src` to absolute address `dst`."""

    src: int
    dst: int
    nbytes: int


class BlockRun(NamedTuple):
    """`count` blocks starting at `src` map onto `count` blocks starting at `dst`."""

    src: int
    dst: int
    count: int


@dataclass(frozen=True)
class BlockLayout:
    """One layer's cache: block b's segment j lies at base + b*block_stride + segments[j][0]."""

    base: int
    num_blocks: int
    block_stride: int
    segments: tuple[tuple[int, int], ...]  # (offset in block, nbytes), sorted by offset
    span: int  # bytes from base to the end of the tensor's last element
    order: tuple[tuple[int, int | None], ...] = ()  # per non-block dim: (size, stride in segment)

    @classmethod
    def from_strided(
        cls,
        data_ptr: int,
        shape: Sequence[int],
        stride: Sequence[int],
        itemsize: int,
        block_dim: int,
    ) -> BlockLayout:
        """Build from a strided view (strides in elements, as torch and numpy//itemsize give)."""
        if len(shape) != len(stride):
            raise ValueError(f"shape {tuple(shape)} and stride {tuple(stride)} differ in rank")
        if not -len(shape) <= block_dim < len(shape):
            raise ValueError(f"block_dim {block_dim} out of range for rank {len(shape)}")
        if any(s < 0 for s in stride) or any(n <= 0 for n in shape):
            raise ValueError("negative strides and empty dims are not supported")
        block_dim %= len(shape)
        inner = [
            (n, s * itemsize) for d, (n, s) in enumerate(zip(shape, stride)) if d != block_dim
        ]
        seg_bytes, outer = _collapse(inner, itemsize)
        offsets = sorted(sum(i * s for i, (_, s) in zip(idx, outer))
                         for idx in product(*(range(n) for n, _ in outer)))
        segments = tuple((off, seg_bytes) for off in offsets)
        _check_disjoint(segments)
        span = sum((n - 1) * s for n, s in zip(shape, stride)) * itemsize + itemsize
        order = tuple((n, s if s < seg_bytes else None) for n, s in inner if n > 1)
        return cls(data_ptr, shape[block_dim], stride[block_dim] * itemsize, segments, span, order)

    @classmethod
    def from_tensor(cls, tensor: Any, block_dim: int = 0) -> BlockLayout:
        """Build from a torch tensor (duck-typed: data_ptr(), shape, stride(), element_size())."""
        return cls.from_strided(
            tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.element_size(), block_dim,
        )

    @property
    def block_bytes(self) -> int:
        """Payload bytes of one block (the sum of its segments)."""
        return sum(n for _, n in self.segments)

    @property
    def dense(self) -> bool:
        """True when a run of consecutive blocks is one contiguous byte range."""
        return len(self.segments) == 1 and self.segments[0] == (0, self.block_stride)

    def region(self) -> tuple[int, int]:
        """(addr, nbytes) of the memory the tensor spans: what to register."""
        return self.base, self.span

    def check_ids(self, block_ids: Sequence[int]) -> None:
        """Raise ValueError for a block id outside [0, num_blocks)."""
        bad = [b for b in block_ids if not 0 <= b < self.num_blocks]
        if bad:
            raise ValueError(f"block ids {bad[:5]} outside [0, {self.num_blocks})")


def _collapse(dims: list[tuple[int, int]], itemsize: int) -> tuple[int, list[tuple[int, int]]]:
    """Split non-block dims (size, byte stride) into a contiguous segment length and outer dims.

    Dims are ordered by decreasing stride; the innermost ones that tile memory densely form
    the segment, the rest enumerate segment offsets (merged where they tile each other too).
    """
    dims = sorted((d for d in dims if d[0] > 1), key=lambda d: d[1], reverse=True)
    seg = itemsize
    while dims and dims[-1][1] == seg:
        seg *= dims.pop()[0]
    merged: list[tuple[int, int]] = []
    for n, s in dims:
        if merged and merged[-1][1] == s * n:
            merged[-1] = (merged[-1][0] * n, s)
        else:
            merged.append((n, s))
    return seg, merged


def _check_disjoint(segments: tuple[tuple[int, int], ...]) -> None:
    """Overlapping segments would mean an aliasing view: copying it would be ill-defined."""
    for (a, n), (b, _) in zip(segments, segments[1:]):
        if a + n > b:
            raise ValueError("overlapping elements within a block (aliasing strides)")


def block_runs(src_ids: Sequence[int], dst_ids: Sequence[int]) -> list[BlockRun]:
    """Group positions whose source AND destination ids both continue by +1."""
    if len(src_ids) != len(dst_ids):
        raise ValueError(f"{len(src_ids)} source blocks but {len(dst_ids)} destination blocks")
    runs: list[BlockRun] = []
    for s, d in zip(src_ids, dst_ids):
        if runs:
            last = runs[-1]
            if s == last.src + last.count and d == last.dst + last.count:
                runs[-1] = BlockRun(last.src, last.dst, last.count + 1)
                continue
        runs.append(BlockRun(s, d, 1))
    return runs


def byte_runs(
    src: BlockLayout,
    dst: BlockLayout,
    src_ids: Sequence[int],
    dst_ids: Sequence[int],
) -> list[ByteRun]:
    """Byte runs that copy blocks src_ids[i] of `src` onto dst_ids[i] of `dst`, merged."""
    if [n for _, n in src.segments] != [n for _, n in dst.segments] or src.order != dst.order:
        raise ValueError(
            f"block layouts differ: source segments {src.segments} order {src.order}, "
            f"destination segments {dst.segments} order {dst.order}"
        )
    src.check_ids(src_ids)
    dst.check_ids(dst_ids)
    pairs = block_runs(src_ids, dst_ids)
    runs: list[ByteRun] = []
    for (s_off, nbytes), (d_off, _) in zip(src.segments, dst.segments):
        whole = nbytes == src.block_stride and nbytes == dst.block_stride
        for r in pairs:
            s_addr = src.base + r.src * src.block_stride + s_off
            d_addr = dst.base + r.dst * dst.block_stride + d_off
            if whole:
                runs.append(ByteRun(s_addr, d_addr, nbytes * r.count))
                continue
            runs.extend(
                ByteRun(s_addr + k * src.block_stride, d_addr + k * dst.block_stride, nbytes)
                for k in range(r.count)
            )
    return merge_adjacent(runs)


def merge_adjacent(runs: Sequence[ByteRun]) -> list[ByteRun]:
    """Join each run with the previous one when both its source and destination continue it."""
    out: list[ByteRun] = []
    for run in runs:
        if out:
            last = out[-1]
            if run.src == last.src + last.nbytes and run.dst == last.dst + last.nbytes:
                out[-1] = ByteRun(last.src, last.dst, last.nbytes + run.nbytes)
                continue
        out.append(run)
    return out


def rebase(runs: Sequence[ByteRun], src_delta: int, dst_delta: int) -> list[ByteRun]:
    """The same runs moved by fixed address offsets on each side."""
    return [ByteRun(r.src + src_delta, r.dst + dst_delta, r.nbytes) for r in runs]


class RunPlan:
    """Byte runs of every layer for one request, computed once.

    Layers of one cache group share their structure and differ only in base address, so the
    runs of layer 0 shifted by the layers' base offsets are the runs of every layer; that makes
    `layer(i)` cost a list shift (~10 us) instead of a full `byte_runs` (~150 us in Python) on
    the forward path. Layers whose structure differs fall back to `byte_runs`.
    """

    def __init__(self, src: Sequence[BlockLayout], dst: Sequence[BlockLayout],
                 src_ids: Sequence[int], dst_ids: Sequence[int]):
        if len(src) != len(dst):
            raise ValueError(f"{len(src)} source layers but {len(dst)} destination layers")
        self.src, self.dst = list(src), list(dst)
        self.src_ids, self.dst_ids = list(src_ids), list(dst_ids)
        self._base = byte_runs(self.src[0], self.dst[0], self.src_ids, self.dst_ids) if src else []

    def __len__(self) -> int:
        return len(self.src)

    def layer(self, i: int) -> list[ByteRun]:
        s, d, s0, d0 = self.src[i], self.dst[i], self.src[0], self.dst[0]
        if _same_structure(s, s0) and _same_structure(d, d0):
            return rebase(self._base, s.base - s0.base, d.base - d0.base)
        return byte_runs(s, d, self.src_ids, self.dst_ids)


def _same_structure(a: BlockLayout, b: BlockLayout) -> bool:
    return (a.num_blocks, a.block_stride, a.segments, a.order) == (
        b.num_blocks, b.block_stride, b.segments, b.order)


def total_bytes(runs: Sequence[ByteRun]) -> int:
    """Sum of the runs' lengths."""
    return sum(r.nbytes for r in runs)
