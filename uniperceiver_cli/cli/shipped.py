"""Locate the recipes shipped with the package (the repository's `recipes/` folder, or its copy in the wheel)."""

from __future__ import annotations

from pathlib import Path


def shipped_recipes_dir() -> Path:
    """Return the folder holding the shipped recipes.

    In an installed wheel they live in `uniperceiver_cli/_shipped_recipes`; in a source checkout (editable
    install) they are the repository's `recipes/` folder.
    """
    package_dir = Path(__file__).resolve().parents[1]
    bundled = package_dir / "_shipped_recipes"
    if bundled.is_dir():
        return bundled
    return package_dir.parent / "recipes"


def list_shipped() -> list[Path]:
    """All shipped recipe files, sorted, relative to the recipes folder."""
    root = shipped_recipes_dir()
    return sorted(p.relative_to(root) for p in root.rglob("*.yaml"))


def find_shipped(name: str) -> Path | None:
    """Find a shipped recipe by relative path (`pretrain/tiny_toy.yaml`) or bare name (`tiny_toy`)."""
    root = shipped_recipes_dir()
    direct = root / name
    if direct.is_file():
        return direct
    if not name.endswith(".yaml") and (root / f"{name}.yaml").is_file():
        return root / f"{name}.yaml"
    stem = Path(name).stem
    matches = [p for p in root.rglob("*.yaml") if p.stem == stem]
    return matches[0] if len(matches) == 1 else None
