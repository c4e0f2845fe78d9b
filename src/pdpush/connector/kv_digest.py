"""A debug view of D's KV blocks: a 64-bit hash of each block's bytes, per layer (off by default).

The GPU suite (tests/gpu) uses it to show that the blocks P pushed are bit for bit the blocks D
computes itself for the same prompt. D's worker serves it on its side channel as `/kv_digest`
when `debug_kv_digest` is set: each call answers the blocks whose bytes changed since the previous
call (the first call only takes the snapshot) and the requests D was told to expect meanwhile,
with the D blocks P was to fill, in prompt order. The KV lives in the worker process, hence the
worker's server rather than the scheduler's /stats.

The hash is a weighted sum of the block's raw elements (as integers of the element's width) with
fixed odd 64-bit weights, wrapping mod 2^64: equal bytes give equal hashes; different bytes
collide with probability ~2^-64. Computed on the KV's own device in chunks of blocks.
"""

from __future__ import annotations

from typing import Any

import torch

_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
CHUNK_BLOCKS = 4096


class KVDigest:
    def __init__(self, kv_caches: dict[str, Any], num_blocks: int) -> None:
        self.layers = [_blocks_first(t, num_blocks) for t in kv_caches.values()]
        device = self.layers[0].device
        width = self.layers[0][0].numel()
        gen = torch.Generator().manual_seed(0)
        weights = torch.randint(-2**62, 2**62, (width,), dtype=torch.int64, generator=gen) | 1
        self._weights = weights.to(device)
        self._last: torch.Tensor | None = None
        self.expected: dict[str, list[int]] = {}

    def hashes(self) -> torch.Tensor:
        """[layers, blocks] int64."""
        if self.layers[0].is_cuda:
            torch.cuda.synchronize(self.layers[0].device)
        return torch.stack([self._layer_hashes(t) for t in self.layers])

    def _layer_hashes(self, blocks: torch.Tensor) -> torch.Tensor:
        out = []
        as_int = _INT_OF_WIDTH[blocks.element_size()]
        for start in range(0, blocks.shape[0], CHUNK_BLOCKS):
            chunk = blocks[start:start + CHUNK_BLOCKS].reshape(-1, self._weights.numel())
            out.append((chunk.view(as_int).to(torch.int64) * self._weights).sum(dim=1))
        return torch.cat(out)

    def changed(self) -> dict[str, Any]:
        """Blocks changed since the last call -> per-layer hex hashes; expected requests since."""
        now = self.hashes()
        changed: dict[str, list[str]] = {}
        if self._last is not None:
            ids = (now != self._last).any(dim=0).nonzero().flatten().tolist()
            rows = now[:, ids].t().tolist()
            changed = {str(b): [f"{h & (2**64 - 1):016x}" for h in row] for b, row in zip(ids, rows)}
        self._last = now
        expected, self.expected = self.expected, {}
        return {"layers": len(self.layers), "changed": changed, "expected": expected}


def _blocks_first(tensor: Any, num_blocks: int) -> torch.Tensor:
    """The layer's cache with its block dimension first (the dimension of size num_blocks)."""
    dim = next(d for d, n in enumerate(tensor.shape) if n == num_blocks)
    return tensor.movedim(dim, 0)
