"""Helpers the command modules share: the context settings, usage and error exits, device and model."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import typer

from uniperceiver_cli.cli.exit_codes import ExitCode
from uniperceiver_cli.cli.render import print_issues, print_json, stderr_console
from uniperceiver_cli.recipe.errors import Issue

CONTEXT = {"help_option_names": ["-h", "--help"]}


def usage(message: str) -> NoReturn:
    """Report a bad invocation (stderr) and exit 2."""
    print_issues("invocation", [Issue("command line", None, "", message)])
    raise typer.Exit(ExitCode.USAGE)


def exit_with(code: ExitCode, message: str, *, as_json: bool, title: str = "eval") -> NoReturn:
    """Print a problem (stderr; plus a JSON status on stdout with --json) and exit."""
    if code == ExitCode.USAGE:
        print_issues(title, [Issue("command line", None, "", message)])
    else:
        stderr_console().print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    if as_json:
        print_json({"ok": False, "error": message, "exit_code": int(code)})
    raise typer.Exit(code)


def pick_device(requested: str | None) -> str:
    """`auto`/None -> cuda when available, else cpu."""
    if requested not in (None, "auto"):
        assert requested is not None
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(checkpoint: Path, device: str, *, as_json: bool, title: str) -> Any:
    """Load a checkpoint with `uniperceiver_cli.load`; a bad path or file is exit 2."""
    from uniperceiver_cli.api import CheckpointError, load, resolve_checkpoint

    try:
        resolved = resolve_checkpoint(checkpoint)
        return load(resolved, device=device), resolved
    except CheckpointError as exc:
        exit_with(ExitCode.USAGE, str(exc), as_json=as_json, title=title)
