"""A stand-in for D's block pool as vLLM keeps it: a reference count per block, free at zero."""

from __future__ import annotations


class RefPool:
    """`hold`/`release` are BlockAccess's (the quarantine's); `quarantine=False` makes them do
    nothing, which is how D behaved before the quarantine: the control of the canary test."""

    def __init__(self, num_blocks: int, quarantine: bool = True) -> None:
        self.refs = [0] * num_blocks
        self.quarantine = quarantine

    def alloc(self, ids) -> None:
        for i in ids:
            assert self.refs[i] == 0, f"block {i} handed out while in use"
            self.refs[i] = 1

    def free(self, ids) -> None:
        for i in ids:
            assert self.refs[i] > 0
            self.refs[i] -= 1

    def hold(self, ids) -> None:
        if self.quarantine:
            self.refs = [r + (i in ids) for i, r in enumerate(self.refs)]

    def release(self, ids) -> None:
        if self.quarantine:
            self.free(ids)

    def free_ids(self) -> list[int]:
        return [i for i, r in enumerate(self.refs) if r == 0]
