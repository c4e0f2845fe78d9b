"""Test only: D compares its own KV blocks pairwise, so that a GPU test can hold the KV that P
pushed against the KV that D computes itself for the same prompt (scripts/gpu_ordering.sh).

On with `debug_kv_compare` (a `debug_*` setting: PDPUSH_TEST_MODE=1, connector/config.py):
- D's response carries the request's D block ids as `kv_transfer_params[BLOCK_IDS_KEY]`
  (local and remote requests alike; the blocks keep their bytes after the request until vLLM
  hands them out again);
- each D worker rank serves `GET /debug/kv_compare?a=3,4&b=9,10` on its side channel: for every
  layer and block pair (a[i], b[i]), whether the bytes are equal, the largest absolute
  difference and the largest magnitude in b (so a reader can tell rounding from stale bytes).
"""

from __future__ import annotations

from typing import Any

from pdpush.connector.kv_region import block_dim

BLOCK_IDS_KEY = "pdpush_debug_block_ids"
ROUTE = "/debug/kv_compare"


class BlockComparer:
    """Pairwise comparison of a worker's KV blocks, every layer (K and V together)."""

    def __init__(self, kv_caches: dict[str, Any], num_blocks: int) -> None:
        self._caches = dict(kv_caches)
        self._dims = {name: block_dim(name, t, num_blocks) for name, t in kv_caches.items()}
        self.num_blocks = num_blocks

    def compare(self, a: str = "", b: str = "") -> dict[str, Any]:
        ids_a, ids_b = self._ids("a", a), self._ids("b", b)
        if len(ids_a) != len(ids_b):
            raise ValueError(f"a and b must name as many blocks ({len(ids_a)} != {len(ids_b)})")
        import torch

        layers = {}
        for name, tensor in self._caches.items():
            dim = self._dims[name]
            pick = [tensor.index_select(dim, torch.tensor(ids, device=tensor.device))
                    .movedim(dim, 0).reshape(len(ids), -1).float() for ids in (ids_a, ids_b)]
            x, y = pick
            layers[name] = {"equal": (x == y).all(dim=1).tolist(),
                            "max_abs_diff": (x - y).abs().amax(dim=1).tolist(),
                            "max_abs": y.abs().amax(dim=1).tolist()}
        return {"blocks": len(ids_a), "layers": layers}

    def _ids(self, key: str, raw: str) -> list[int]:
        try:
            ids = [int(x) for x in raw.split(",") if x]
        except ValueError:
            raise ValueError(f"{key} must be comma-separated block ids, got {raw!r}") from None
        if not ids or not all(0 <= i < self.num_blocks for i in ids):
            raise ValueError(f"{key} must name blocks in [0, {self.num_blocks}), got {raw!r}")
        return ids
