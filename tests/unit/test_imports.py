"""Startup stays light: `--help`, `validate` and the recipe layer never import torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys\nprint('\\n'.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
    ).stdout
    return set(out.split())


def test_package_and_recipe_layer_are_torch_free() -> None:
    mods = _modules_after(
        "import uniperceiver_cli, uniperceiver_cli.recipe.load, uniperceiver_cli.recipe.docs"
    )
    assert "torch" not in mods
    assert "uniperceiver_cli.recipe.schema" in mods


def test_help_does_not_import_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "uniperceiver_cli", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "typer" in imported
    assert "torch" not in imported


def test_validate_does_not_import_torch() -> None:
    code = (
        "from typer.testing import CliRunner\n"
        "from uniperceiver_cli.cli.app import app\n"
        "r = CliRunner().invoke(app, ['validate', 'recipes/pretrain/tiny_toy.yaml'])\n"
        "assert r.exit_code == 0, r.output\n"
    )
    assert "torch" not in _modules_after(code)
