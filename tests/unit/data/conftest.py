"""Shared fixtures of the data-engine tests: the real tokenizer and a small toy world on disk."""

from __future__ import annotations

import pytest

from uniperceiver_cli.data.toy_files import ToyWorldSummary, write_toy_world


@pytest.fixture(scope="session")
def tok():  # type: ignore[no-untyped-def]
    from uniperceiver_cli.data.tokenizer import get_tokenizer

    return get_tokenizer()


@pytest.fixture(scope="session")
def toy_dir(tmp_path_factory: pytest.TempPathFactory) -> ToyWorldSummary:
    out = tmp_path_factory.mktemp("toy")
    return write_toy_world(
        out, seed=3, num_images=40, num_videos=20, num_sentences=60, images_per_shard=10
    )
