"""Fixtures shared by the end-to-end tests (real vLLM CPU engines)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdpush.local.tinymodel import ensure_tiny_model


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return ensure_tiny_model()
