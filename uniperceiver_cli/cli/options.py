"""Shared option types of the commands (Annotated aliases) and the small helpers every command uses."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from uniperceiver_cli import __version__
from uniperceiver_cli.cli.exit_codes import ExitCode
from uniperceiver_cli.cli.render import print_issues, print_json, stderr_console
from uniperceiver_cli.recipe.errors import RecipeError
from uniperceiver_cli.recipe.load import LoadedRecipe, load_recipe

RecipeArg = Annotated[
    Path,
    typer.Argument(help="Recipe YAML file (see `uniperceiver recipes list`).", show_default=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override a recipe value, e.g. `--set schedule.max_steps=100` (repeatable).",
        metavar="KEY.PATH=VALUE",
    ),
]
OutputDirOption = Annotated[
    Path | None,
    typer.Option(
        "--output-dir", "-o", help="Output folder; overrides the recipe's `run.output_dir`."
    ),
]
ResumeOption = Annotated[
    bool,
    typer.Option(
        "--resume/--no-resume", help="Continue from the output folder's latest checkpoint."
    ),
]
JsonOption = Annotated[
    bool,
    typer.Option("--json", help="Print a machine-readable result on stdout (logs stay on stderr)."),
]
DryRunOption = Annotated[
    bool,
    typer.Option("--dry-run", help="Validate and print the resolved recipe, then stop."),
]


def load_or_exit(
    recipe: Path, sets: list[str] | None, command: str, *, as_json: bool = False
) -> LoadedRecipe:
    """Load and validate a recipe; on problems print the table and exit with code 2.

    Args:
        recipe: the recipe file.
        sets: `--set` overrides.
        command: the recipe command expected (`pretrain`, `prompt_tune`, ...).
        as_json: also print the problems on stdout as JSON (the shape `validate --json` uses).
    """
    try:
        return load_recipe(recipe, sets or [], expected_command=command)
    except RecipeError as exc:
        print_issues(exc.file, exc.issues)
        if as_json:
            print_json(
                {
                    "ok": False,
                    "exit_code": int(ExitCode.USAGE),
                    "file": str(exc.file),
                    "issues": [issue.to_dict() for issue in exc.issues],
                }
            )
        raise typer.Exit(ExitCode.USAGE) from None


def engine_available(module: str) -> bool:
    """Say whether an engine module of this package is present in this version."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def not_available(command: str, what: str, issue: int, *, as_json: bool = False) -> NoReturn:
    """Stop with exit code 3: the command exists but its engine has not landed yet.

    Args:
        command: the command as typed (`pretrain`).
        what: the missing engine, in words.
        issue: the tracker issue that delivers it.
        as_json: also print a JSON status object on stdout.
    """
    message = (
        f"`uniperceiver {command}` is not available yet in uniperceiver-cli {__version__}: "
        f"{what} has not landed (issue #{issue}). Nothing was run."
    )
    stderr_console().print(f"[bold yellow]not available yet:[/] {message}")
    if as_json:
        print_json({"ok": False, "status": "not_available", "command": command, "message": message})
    raise typer.Exit(ExitCode.NOT_AVAILABLE)
