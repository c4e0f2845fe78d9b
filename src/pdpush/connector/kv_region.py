"""A worker's own KV cache as the transfer engine sees it: per-layer block layouts, registered.

Both roles register every layer's cache tensor once (`register_kv_caches`) and describe its
layout to the peer as plain JSON, so P computes byte runs into D's memory without assuming a
backend layout (transfer/layout.py derives it from shape and stride).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from pdpush.transfer.engine import DRAM, VRAM, MemRegion, Placement, TransferEngine
from pdpush.transfer.layout import BlockLayout


@dataclass
class LocalKV:
    layer_names: list[str]
    layouts: list[BlockLayout]
    placement: Placement

    @classmethod
    def from_caches(cls, kv_caches: dict[str, Any], num_blocks: int) -> "LocalKV":
        """The block dimension is the one whose size is the engine's block count."""
        names = list(kv_caches)
        layouts = []
        for name in names:
            tensor = kv_caches[name]
            dims = [d for d, n in enumerate(tensor.shape) if n == num_blocks]
            if not dims:
                raise ValueError(f"pdpush: no dimension of {name} {tuple(tensor.shape)} has "
                                 f"{num_blocks} blocks")
            layouts.append(BlockLayout.from_tensor(tensor, block_dim=dims[0]))
        first = kv_caches[names[0]]
        device = first.device
        placement = VRAM(device.index or 0) if device.type == "cuda" else DRAM
        return cls(names, layouts, placement)

    def register(self, engine: TransferEngine) -> None:
        regions = {layout.region() for layout in self.layouts}  # layers may share a tensor
        engine.register([MemRegion(addr, nbytes, self.placement) for addr, nbytes in sorted(regions)])

    def describe(self) -> dict[str, Any]:
        """JSON for the peer: layer names in order and each layer's layout."""
        return {
            "layers": self.layer_names,
            "layouts": [asdict(layout) for layout in self.layouts],
            "placement": asdict(self.placement),
        }


@dataclass
class RemoteKV:
    """The peer's KV as described by `LocalKV.describe()` (fetched over the side channel)."""

    agent: str
    layouts: dict[str, BlockLayout]
    placement: Placement

    @classmethod
    def from_description(cls, agent: str, desc: dict[str, Any]) -> "RemoteKV":
        layouts = {name: BlockLayout(**{k: _tuples(v) for k, v in raw.items()})
                   for name, raw in zip(desc["layers"], desc["layouts"])}
        return cls(agent, layouts, Placement(**desc["placement"]))


def _tuples(value: Any) -> Any:
    """JSON turned the layout's tuples into lists; equality checks need them back."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value
