"""The `uniperceiver` Typer app: root options and the command table.

Commands are thin: parse flags, load the recipe (`recipe/`, torch-free), call one engine function (imported
inside the command body so `--help` never imports torch), render the result. The command bodies live in
modules named after their job (`train_commands`, `eval_commands`, `adhoc_commands`, `export_commands`,
`data_commands`, `recipe_commands`); this module registers them, in the order `--help` lists them.
"""

from __future__ import annotations

import logging
from typing import Annotated

import typer

from uniperceiver_cli import __version__
from uniperceiver_cli.cli.adhoc_commands import (
    zero_shot_caption,
    zero_shot_classify,
    zero_shot_retrieve,
)
from uniperceiver_cli.cli.allocator import reexec_with_tuned_malloc
from uniperceiver_cli.cli.common import CONTEXT
from uniperceiver_cli.cli.data_commands import data_toy
from uniperceiver_cli.cli.eval_commands import evaluate, score_captions, zero_shot
from uniperceiver_cli.cli.exit_codes import ExitCode
from uniperceiver_cli.cli.export_commands import convert, export
from uniperceiver_cli.cli.recipe_commands import recipes_cp, recipes_list, recipes_show, validate
from uniperceiver_cli.cli.render import stderr_console, stdout_console
from uniperceiver_cli.cli.train_commands import training_command

app = typer.Typer(
    name="uniperceiver",
    help="Pretrain, prompt-tune, fine-tune, evaluate and export Uni-Perceiver-MoE generalist models.\n\n"
    "Exit codes: 0 ok · 1 runtime failure · 2 bad invocation, recipe or preflight · 3 not available yet.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    context_settings=CONTEXT,
    add_completion=False,
)
recipes_app = typer.Typer(help="List, show and copy the shipped recipes.", no_args_is_help=True)
data_app = typer.Typer(help="Data helpers: the built-in toy world.", no_args_is_help=True)
score_app = typer.Typer(help="Score predictions made by any model.", no_args_is_help=True)
zero_shot_app = typer.Typer(
    help="Zero-shot evaluation and ad-hoc inference on your own files.", invoke_without_command=True
)
app.add_typer(recipes_app, name="recipes")
app.add_typer(data_app, name="data")
app.add_typer(score_app, name="score")
app.add_typer(zero_shot_app, name="zero-shot")


def _version(value: bool) -> None:
    if value:
        stdout_console().print(f"uniperceiver-cli {__version__}")
        raise typer.Exit(ExitCode.OK)


@app.callback()
def root(
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More log output.")
    ] = 0,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Uni-Perceiver-MoE from the command line."""
    del version
    level = logging.WARNING if quiet else logging.DEBUG if verbose else logging.INFO
    from rich.logging import RichHandler

    handler = RichHandler(console=stderr_console(), show_path=False, rich_tracebacks=False)
    logging.basicConfig(level=level, format="%(message)s", handlers=[handler], force=True)


app.command("pretrain", context_settings=CONTEXT)(
    training_command(
        "pretrain",
        "pretrain",
        "Multi-task pretraining from a recipe (works under `torchrun -m uniperceiver_cli`).",
    )
)
app.command("finetune", context_settings=CONTEXT)(
    training_command("finetune", "finetune", "Single-task full fine-tuning from a recipe.")
)
app.command("prompt-tune", context_settings=CONTEXT)(
    training_command(
        "prompt-tune",
        "prompt_tune",
        "Prompt tuning: train deep prompts and norms of a frozen checkpoint.",
    )
)
app.command("eval", context_settings=CONTEXT)(evaluate)
app.command(context_settings=CONTEXT)(export)
app.command(context_settings=CONTEXT)(convert)
app.command(context_settings=CONTEXT)(validate)
recipes_app.command("list")(recipes_list)
recipes_app.command("show")(recipes_show)
recipes_app.command("cp")(recipes_cp)
data_app.command("toy")(data_toy)
score_app.command("captions")(score_captions)
zero_shot_app.callback()(zero_shot)
zero_shot_app.command("classify")(zero_shot_classify)
zero_shot_app.command("caption")(zero_shot_caption)
zero_shot_app.command("retrieve")(zero_shot_retrieve)


def main() -> None:
    """Console-script entry point (heavy commands first re-execute with tuned malloc, `allocator`)."""
    reexec_with_tuned_malloc()
    app()
