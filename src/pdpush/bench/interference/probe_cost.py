"""Host time the step probe adds to one step, next to the same loop without it:
`python -m pdpush.bench.interference.probe_cost [steps]`. On a GPU each step launches one tiny
kernel, so the CUDA events have work to bracket and nothing waits for the GPU; on the CPU it uses
the perf_counter timer. (The in-engine A/B figure comes from `pdpush bench interference`.)"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from pdpush.probe import ENGINE_RX, BatchStats, StepProbe, make_timer


def per_step_us(steps: int, probe: StepProbe | None, work, sync) -> float:
    stats = BatchStats(64, 64, 1500, 1500, 96_000)
    start = time.perf_counter()
    for i in range(steps):
        if probe is not None:
            probe.step_begin()
        work()
        if probe is not None:
            probe.step_end(stats, rx_bytes_total=i * 4096)
    if probe is not None:
        probe.close()
    sync()
    return (time.perf_counter() - start) / steps * 1e6


def main(argv: list[str]) -> int:
    steps = int(argv[0]) if argv else 20_000
    timer = make_timer("auto")
    work = sync = lambda: None  # noqa: E731
    if timer.name == "cuda":
        import torch

        x = torch.zeros(1, device="cuda")
        work, sync = (lambda: x.add_(1)), torch.cuda.synchronize
    bare = per_step_us(steps, None, work, sync)
    with tempfile.TemporaryDirectory() as tmp:
        probe = StepProbe(timer, ENGINE_RX, str(Path(tmp) / "steps.jsonl"))
        full = per_step_us(steps, probe, work, sync)
    print(f"timer {timer.name}, {steps} steps: without probe {bare:.2f} µs/step, "
          f"with probe {full:.2f} µs/step, probe adds {full - bare:.2f} µs/step")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
