"""Every shipped recipe validates (no data access), and the generated reference is current."""

from __future__ import annotations

from pathlib import Path

import pytest

from uniperceiver_cli.recipe.docs import render
from uniperceiver_cli.recipe.load import load_recipe
from uniperceiver_cli.recipe.schema import PRESET_LAYERS, ROOTS

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "recipes").rglob("*.yaml"))


def test_there_is_a_recipe_per_command() -> None:
    folders = {p.parent.name for p in SHIPPED}
    assert set(ROOTS) <= folders


@pytest.mark.parametrize("path", SHIPPED, ids=[str(p.relative_to(REPO)) for p in SHIPPED])
def test_shipped_recipe_validates(path: Path) -> None:
    loaded = load_recipe(path)
    assert loaded.command == path.parent.name


def test_recipes_reference_is_current() -> None:
    committed = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert committed == render(), (
        "docs/recipes.md is stale: run `python -m uniperceiver_cli.recipe.docs docs/recipes.md`"
    )


def test_preset_layer_table_matches_presets() -> None:
    from uniperceiver_cli.model.presets import PRESETS

    assert {name: cfg.num_layers for name, cfg in PRESETS.items()} == PRESET_LAYERS
