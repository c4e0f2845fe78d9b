"""Model shapes, vLLM-like block tables, and KV caches laid out as vLLM 0.32 lays them out for
FlashAttention, for the GPU data-plane harness.

Layout source: vllm/v1/kv_cache_interface.py (`compute_layout_strides`, `create_kv_cache_views`)
builds one raw buffer per KV cache group and gives each layer a view of logical shape
(num_blocks, kv_heads, block_size, 2 * head_size) (the FlashAttention forward documents it:
vllm/v1/attention/backends/flash_attn.py, "kv_cache: shape = [num_blocks, num_kv_heads,
block_size, 2 * head_size]"). FlashAttention declares no layout preference, so the default
`LBNHC` applies (vllm/v1/attention/backends/utils.py, `_DEFAULT_LAYOUT_PREFERENCE`): physical
order [layer, block, token, head, K|V]. `KVCaches` reproduces exactly that with torch views.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any

import torch

from pdpush.transfer.layout import BlockLayout

BLOCK_SIZE = 16
PROMPT_TOKENS = 2000


@dataclass(frozen=True)
class ModelShape:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    block_size: int = BLOCK_SIZE
    itemsize: int = 2  # bf16

    @property
    def page_bytes(self) -> int:
        """Bytes of one block of one layer (K and V)."""
        return self.kv_heads * self.block_size * 2 * self.head_dim * self.itemsize

    def prompt_blocks(self, tokens: int = PROMPT_TOKENS) -> int:
        return math.ceil(tokens / self.block_size)

    def prompt_bytes(self, tokens: int = PROMPT_TOKENS) -> int:
        """KV bytes of a prompt over all layers (whole blocks, as they are pushed)."""
        return self.layers * self.prompt_blocks(tokens) * self.page_bytes


SHAPES = {
    "qwen2-7b": ModelShape("qwen2-7b", layers=28, kv_heads=4, head_dim=128),
    "qwen2-72b-tp4": ModelShape("qwen2-72b-tp4", layers=80, kv_heads=2, head_dim=128),
    # for --device cpu runs: same code paths, a size a 2-core machine handles in seconds
    "tiny": ModelShape("tiny", layers=4, kv_heads=2, head_dim=16),
}


def fragmented_ids(rng: random.Random, n: int, num_blocks: int, mean_run: float) -> list[int]:
    """`n` block ids the way a busy vLLM allocator hands them out: the free queue is made of
    stretches of consecutive blocks (geometric lengths, mean `mean_run`) in random order."""
    if n > num_blocks:
        raise ValueError(f"need {n} blocks, the cache has {num_blocks}")
    stretches, start = [], 0
    while start < num_blocks:
        length = 1
        while rng.random() > 1 / mean_run:
            length += 1
        stretches.append(range(start, min(start + length, num_blocks)))
        start += length
    rng.shuffle(stretches)
    return [b for s in stretches for b in s][:n]


class KVCaches:
    """One raw buffer (layers, blocks, block_size, kv_heads, 2*head_dim) and per-layer views of
    logical shape (blocks, kv_heads, block_size, 2*head_dim): vLLM 0.32 FlashAttention, LBNHC."""

    def __init__(self, shape: ModelShape, num_blocks: int, device: Any):
        self.shape = shape
        self.num_blocks = num_blocks
        self.raw = torch.zeros(
            shape.layers, num_blocks, shape.block_size, shape.kv_heads, 2 * shape.head_dim,
            dtype=torch.bfloat16, device=device,
        )
        self.layers = [self.raw[i].permute(0, 2, 1, 3) for i in range(shape.layers)]
        self.layouts = [BlockLayout.from_tensor(view, block_dim=0) for view in self.layers]

    def region(self) -> tuple[int, int]:
        """(addr, nbytes) of the raw buffer: one registration covers every layer."""
        return self.raw.data_ptr(), self.raw.numel() * self.raw.element_size()


def layer_content(shape: ModelShape, seed: int, layer: int, n_blocks: int, device: Any) -> Any:
    """Deterministic random bits for `n_blocks` blocks of one layer (bf16, NaNs included).

    P writes it and D regenerates it to compare bitwise, so nothing extra crosses the link.
    """

    gen = torch.Generator(device=device).manual_seed(seed * 100_003 + layer)
    bits = torch.randint(
        -(2**15), 2**15, (n_blocks, shape.kv_heads, shape.block_size, 2 * shape.head_dim),
        generator=gen, dtype=torch.int16, device=device,
    )
    return bits.view(torch.bfloat16)
