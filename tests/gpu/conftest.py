"""Fixtures of the GPU suite: the model (made on the machine) and the report recorder.

The suite reuses the end-to-end tests' request helpers (tests/e2e/e2e_helpers.py); that folder is
not a package, so it is put on the import path here.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "e2e"))

from gpu_helpers import GPU_SPEC, Recorder, model_dir, out_dir  # noqa: E402


@pytest.fixture(scope="session")
def recorder() -> Recorder:
    return Recorder(out_dir())


@pytest.fixture(scope="session")
def gpu_model(recorder: Recorder) -> Path:
    from pdpush.local.tinymodel import ensure_tiny_model

    t0 = time.monotonic()
    path = ensure_tiny_model(model_dir(), GPU_SPEC)
    recorder.note(model=str(path), model_spec=GPU_SPEC.__dict__,
                  model_made_s=round(time.monotonic() - t0, 1))
    return path
