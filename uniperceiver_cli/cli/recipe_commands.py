"""Recipe commands: `validate` and `recipes list` / `show` / `cp`."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from uniperceiver_cli.cli.common import usage
from uniperceiver_cli.cli.exit_codes import ExitCode
from uniperceiver_cli.cli.options import JsonOption, SetOption
from uniperceiver_cli.cli.render import print_issues, print_json, stderr_console, stdout_console
from uniperceiver_cli.cli.shipped import find_shipped, list_shipped, shipped_recipes_dir
from uniperceiver_cli.recipe.errors import RecipeError
from uniperceiver_cli.recipe.load import dump_resolved, load_recipe


def validate(
    recipes: Annotated[
        list[Path], typer.Argument(help="Recipe files to check.", show_default=False)
    ],
    sets: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Validate recipes without running anything (and without importing torch)."""
    results: list[dict[str, Any]] = []
    failed = 0
    console = stderr_console()
    for path in recipes:
        try:
            loaded = load_recipe(path, sets or [])
        except RecipeError as exc:
            failed += 1
            if not as_json:
                print_issues(exc.file, exc.issues)
            results.append(
                {"file": str(path), "ok": False, "issues": [i.to_dict() for i in exc.issues]}
            )
            continue
        results.append({"file": str(path), "ok": True, "command": loaded.command, "issues": []})
        if not as_json:
            console.print(f"[green]ok[/]  {path}  ({loaded.command.replace('_', '-')})")
    if as_json:
        print_json({"ok": failed == 0, "files": results})
    elif len(recipes) > 1:
        console.print(f"{len(recipes) - failed} of {len(recipes)} recipes valid")
    raise typer.Exit(ExitCode.USAGE if failed else ExitCode.OK)


def recipes_list(as_json: JsonOption = False) -> None:
    """List the shipped recipes."""
    rows = []
    for rel in list_shipped():
        try:
            loaded = load_recipe(shipped_recipes_dir() / rel)
            command = loaded.command.replace("_", "-")
            doc = str(loaded.recipe.run.name)
        except RecipeError:
            command, doc = "?", "(invalid)"
        rows.append({"recipe": str(rel), "command": command, "run": doc})
    if as_json:
        print_json(rows)
        return
    from rich.table import Table

    table = Table(title=f"shipped recipes ({shipped_recipes_dir()})", title_justify="left")
    for col in ("recipe", "command", "run"):
        table.add_column(col)
    for row in rows:
        table.add_row(row["recipe"], row["command"], row["run"])
    stdout_console().print(table)


def _shipped_or_exit(name: str) -> Path:
    found = find_shipped(name)
    if found is None:
        names = ", ".join(str(p) for p in list_shipped())
        usage(f"no shipped recipe named {name!r}; available: {names}")
    return found


def recipes_show(
    name: Annotated[str, typer.Argument(help="Shipped recipe (e.g. pretrain/tiny_toy) or a path.")],
    resolved: Annotated[
        bool, typer.Option("--resolved", help="Print with every default filled in.")
    ] = False,
    sets: SetOption = None,
) -> None:
    """Print a shipped recipe (or any recipe file)."""
    path = Path(name) if Path(name).is_file() else _shipped_or_exit(name)
    if not resolved:
        stdout_console().print(path.read_text(encoding="utf-8"), markup=False, end="")
        return
    try:
        loaded = load_recipe(path, sets or [])
    except RecipeError as exc:
        print_issues(exc.file, exc.issues)
        raise typer.Exit(ExitCode.USAGE) from None
    stdout_console().print(dump_resolved(loaded), markup=False, end="")


def recipes_cp(
    name: Annotated[str, typer.Argument(help="Shipped recipe to copy.")],
    dest: Annotated[Path, typer.Argument(help="Destination file or folder.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Copy a shipped recipe to edit it."""
    src = _shipped_or_exit(name)
    target = dest / src.name if dest.is_dir() else dest
    if target.exists() and not force:
        usage(f"{target} exists; pass --force to overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    tmp.replace(target)
    stderr_console().print(f"copied {src.name} → {target}")
