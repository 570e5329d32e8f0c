"""Shared test set-up: few threads (2-core CI), fixture locations, a CLI runner."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ.setdefault("OMP_NUM_THREADS", "1")


def fixtures_dir() -> Path:
    """Folder of the reference fixtures (`../shared/fixtures/official_tiny` or $UNIPERCEIVER_FIXTURES)."""
    env = os.environ.get("UNIPERCEIVER_FIXTURES")
    return Path(env) if env else REPO.parent / "shared" / "fixtures" / "official_tiny"


@pytest.fixture(scope="session")
def official_tiny() -> Path:
    """The reference fixture folder; skips the test when it is not available (a user's clone)."""
    path = fixtures_dir()
    if not (path / "manifest.json").is_file():
        pytest.skip(f"reference fixtures not found at {path} (set UNIPERCEIVER_FIXTURES)")
    return path


@pytest.fixture(autouse=True, scope="session")
def _few_threads() -> None:
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(1)
