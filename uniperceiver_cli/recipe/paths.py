"""Resolve relative paths of a recipe: the data root first, then the recipe's folder (torch-free)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

DATA_ROOT_ENV = "UNIPERCEIVER_DATA_ROOT"


def data_root(recipe_data_root: str | None, env: Mapping[str, str] | None = None) -> Path | None:
    """Return the data root: the recipe's `run.data_root`, else `$UNIPERCEIVER_DATA_ROOT`, else None."""
    env = os.environ if env is None else env
    value = recipe_data_root or env.get(DATA_ROOT_ENV)
    return Path(value).expanduser() if value else None


def resolve_path(value: str, *, root: Path | None, recipe_dir: Path) -> Path:
    """Resolve one recipe path.

    Absolute paths (and `~`) are kept. A relative path resolves against the data root when it exists there,
    otherwise against the recipe's folder; when it exists in neither, the data-root candidate is returned (or the
    recipe-folder one without a data root) so that the error message names where it was expected.

    Args:
        value: the path as written in the recipe.
        root: the data root, or None.
        recipe_dir: folder of the recipe file.

    Returns:
        The resolved path (not checked for existence).
    """
    path = Path(value).expanduser()
    if path.is_absolute():
        return path
    candidates = ([root / path] if root is not None else []) + [recipe_dir / path]
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0]
