"""Training commands (`pretrain`, `finetune`, `prompt-tune`): recipe, dry run, engine call, summary."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import typer

from uniperceiver_cli.cli.exit_codes import ExitCode
from uniperceiver_cli.cli.options import (
    DryRunOption,
    JsonOption,
    OutputDirOption,
    RecipeArg,
    ResumeOption,
    SetOption,
    engine_available,
    load_or_exit,
    not_available,
)
from uniperceiver_cli.cli.render import print_issues, print_json, stderr_console, stdout_console
from uniperceiver_cli.recipe.errors import Issue
from uniperceiver_cli.recipe.load import LoadedRecipe, dump_resolved


def _finish_recipe(
    loaded: LoadedRecipe, output_dir: Path | None, dry_run: bool, as_json: bool
) -> None:
    """Print the resolved recipe for --dry-run (stdout) and stop."""
    if dry_run:
        if as_json:
            print_json(
                {
                    "ok": True,
                    "command": loaded.command,
                    "recipe": loaded.recipe.model_dump(mode="json"),
                }
            )
        else:
            stdout_console().print(dump_resolved(loaded), markup=False, end="")
        raise typer.Exit(ExitCode.OK)
    del output_dir


def _run_training(
    loaded: LoadedRecipe, output_dir: Path | None, resume: bool, as_json: bool
) -> None:
    """Run the training engine and render its result (Rich summary on stderr, `--json` on stdout).

    Exit codes: 0 done, 130 interrupted (a checkpoint was saved), 1 the run failed (divergence, data or
    checkpoint problems; the message says which and what to do).
    """
    from uniperceiver_cli.cli.render import print_training_result
    from uniperceiver_cli.engine.train import (
        RunFolderInUseError,
        TrainingInterrupted,
        train,
        user_errors,
    )

    try:
        result = train(loaded, output_dir=output_dir, resume=resume)
    except RunFolderInUseError as exc:
        print_issues("output folder", [Issue("command line", None, "--output-dir", str(exc))])
        if as_json:
            print_json(
                {"ok": False, "status": "usage", "error": type(exc).__name__, "message": str(exc)}
            )
        raise typer.Exit(ExitCode.USAGE) from None
    except TrainingInterrupted as stop:
        print_training_result(stop.result, as_json=as_json)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except user_errors() as exc:
        stderr_console().print(f"[bold red]training failed:[/] {exc}", markup=True, highlight=False)
        if as_json:
            print_json(
                {"ok": False, "status": "failed", "error": type(exc).__name__, "message": str(exc)}
            )
        raise typer.Exit(ExitCode.FAILURE) from None
    print_training_result(result, as_json=as_json)


def training_command(command: str, recipe_command: str, summary: str) -> Callable[..., None]:
    """Build one training command (`pretrain`, `finetune`, `prompt-tune`); they differ only by recipe kind.

    Args:
        command: the command name, used in the not-available message.
        recipe_command: the recipe kind the command accepts (e.g. `prompt_tune`).
        summary: the command's help text.

    Returns:
        The command function, for `app.command(command)`.
    """

    def run(
        recipe: RecipeArg,
        sets: SetOption = None,
        output_dir: OutputDirOption = None,
        resume: ResumeOption = True,
        dry_run: DryRunOption = False,
        as_json: JsonOption = False,
    ) -> None:
        loaded = load_or_exit(recipe, sets, recipe_command, as_json=as_json)
        _finish_recipe(loaded, output_dir, dry_run, as_json)
        if not engine_available("uniperceiver_cli.engine.train"):
            not_available(command, "the training engine", 6, as_json=as_json)
        _run_training(loaded, output_dir, resume, as_json)

    run.__doc__ = summary
    run.__name__ = recipe_command
    return run
