"""The `uniperceiver` Typer app: root options and the command table.

Commands are thin: parse flags, load the recipe (`recipe/`, torch-free), call one engine function (imported
inside the command body so `--help` never imports torch), render the result.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from uniperceiver_cli import __version__
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
from uniperceiver_cli.cli.shipped import find_shipped, list_shipped, shipped_recipes_dir
from uniperceiver_cli.recipe.errors import Issue, RecipeError
from uniperceiver_cli.recipe.load import LoadedRecipe, dump_resolved, load_recipe

CONTEXT = {"help_option_names": ["-h", "--help"]}

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


def _run_training(loaded: LoadedRecipe, output_dir: Path | None, resume: bool, as_json: bool) -> None:
    """Run the training engine and render its result (Rich summary on stderr, `--json` on stdout).

    Exit codes: 0 done, 130 interrupted (a checkpoint was saved), 1 the run failed (divergence, data or
    checkpoint problems; the message says which and what to do).
    """
    from uniperceiver_cli.cli.render import print_training_result
    from uniperceiver_cli.engine.train import TrainingInterrupted, train, user_errors

    try:
        result = train(loaded, output_dir=output_dir, resume=resume)
    except TrainingInterrupted as stop:
        print_training_result(stop.result, as_json=as_json)
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    except user_errors() as exc:
        stderr_console().print(f"[bold red]training failed:[/] {exc}", markup=True, highlight=False)
        if as_json:
            print_json({"ok": False, "status": "failed", "error": type(exc).__name__, "message": str(exc)})
        raise typer.Exit(ExitCode.FAILURE) from None
    print_training_result(result, as_json=as_json)

@app.command(context_settings=CONTEXT)
def pretrain(
    recipe: RecipeArg,
    sets: SetOption = None,
    output_dir: OutputDirOption = None,
    resume: ResumeOption = True,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
) -> None:
    """Multi-task pretraining from a recipe (works under `torchrun -m uniperceiver_cli`)."""
    loaded = load_or_exit(recipe, sets, "pretrain")
    _finish_recipe(loaded, output_dir, dry_run, as_json)
    if not engine_available("uniperceiver_cli.engine.train"):
        not_available("pretrain", "the training engine", 6, as_json=as_json)
    _run_training(loaded, output_dir, resume, as_json)


@app.command(context_settings=CONTEXT)
def finetune(
    recipe: RecipeArg,
    sets: SetOption = None,
    output_dir: OutputDirOption = None,
    resume: ResumeOption = True,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
) -> None:
    """Single-task full fine-tuning from a recipe."""
    loaded = load_or_exit(recipe, sets, "finetune")
    _finish_recipe(loaded, output_dir, dry_run, as_json)
    if not engine_available("uniperceiver_cli.engine.train"):
        not_available("finetune", "the training engine", 6, as_json=as_json)
    _run_training(loaded, output_dir, resume, as_json)


@app.command("prompt-tune", context_settings=CONTEXT)
def prompt_tune(
    recipe: RecipeArg,
    sets: SetOption = None,
    output_dir: OutputDirOption = None,
    resume: ResumeOption = True,
    dry_run: DryRunOption = False,
    as_json: JsonOption = False,
) -> None:
    """Prompt tuning: train deep prompts and norms of a frozen checkpoint."""
    loaded = load_or_exit(recipe, sets, "prompt_tune")
    _finish_recipe(loaded, output_dir, dry_run, as_json)
    if not engine_available("uniperceiver_cli.engine.train"):
        not_available("prompt-tune", "the training engine", 6, as_json=as_json)
    _run_training(loaded, output_dir, resume, as_json)


@app.command("eval", context_settings=CONTEXT)
def evaluate(
    recipe: Annotated[
        Path | None, typer.Argument(help="Eval recipe (or use --task).", show_default=False)
    ] = None,
    checkpoint_arg: Annotated[
        Path | None,
        typer.Argument(metavar="CHECKPOINT", help="Checkpoint to evaluate.", show_default=False),
    ] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="Preset protocol, e.g. coco-retrieval.")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="Checkpoint (with --task).")
    ] = None,
    data_root: Annotated[
        Path | None, typer.Option("--data-root", help="Root of the preset's data.")
    ] = None,
    fail_under: Annotated[
        list[str] | None,
        typer.Option("--fail-under", metavar="METRIC=VALUE", help="Exit 1 if a metric is lower."),
    ] = None,
    sets: SetOption = None,
    output_dir: OutputDirOption = None,
    as_json: JsonOption = False,
) -> None:
    """Evaluate a checkpoint with the paper's protocols (a recipe, or `--task NAME --checkpoint CKPT`)."""
    del data_root, fail_under, output_dir
    if recipe is None and task is None:
        _usage("eval needs a RECIPE or --task NAME (see `uniperceiver eval --help`)")
    if recipe is not None:
        load_or_exit(recipe, sets, "eval")
        if checkpoint_arg is None and checkpoint is None:
            _usage("eval RECIPE needs a CHECKPOINT argument")
    elif checkpoint is None:
        _usage("eval --task needs --checkpoint")
    if not engine_available("uniperceiver_cli.engine.evaluate"):
        not_available("eval", "the evaluation engine", 7, as_json=as_json)


@zero_shot_app.callback()
def zero_shot(
    ctx: typer.Context,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Zero-shot recipe.")] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="Preset protocol, e.g. msvd-retrieval.")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="Checkpoint to evaluate.")
    ] = None,
    sets: SetOption = None,
    as_json: JsonOption = False,
) -> None:
    """Evaluate task types the checkpoint never trained on, or run `classify`/`caption`/`retrieve` on files."""
    if ctx.invoked_subcommand is not None:
        return
    if recipe is None and task is None:
        stderr_console().print(ctx.get_help())
        raise typer.Exit(ExitCode.USAGE)
    if recipe is not None:
        load_or_exit(recipe, sets, "zero_shot")
    del checkpoint
    if not engine_available("uniperceiver_cli.engine.evaluate"):
        not_available("zero-shot", "the evaluation engine", 7, as_json=as_json)


@zero_shot_app.command("classify")
def zero_shot_classify(
    files: Annotated[list[Path], typer.Argument(help="Images or videos.")],
    labels: Annotated[str, typer.Option("--labels", help="Comma-separated class names.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint to use.")],
    template: Annotated[str, typer.Option("--template", help="Prompt template.")] = "{}",
    as_json: JsonOption = False,
) -> None:
    """Classify files against the given labels."""
    del files, labels, checkpoint, template
    if not engine_available("uniperceiver_cli.engine.inference"):
        not_available("zero-shot classify", "ad-hoc inference", 7, as_json=as_json)


@zero_shot_app.command("caption")
def zero_shot_caption(
    files: Annotated[list[Path], typer.Argument(help="Images or videos.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint to use.")],
    as_json: JsonOption = False,
) -> None:
    """Caption files."""
    del files, checkpoint
    if not engine_available("uniperceiver_cli.engine.inference"):
        not_available("zero-shot caption", "ad-hoc inference", 7, as_json=as_json)


@zero_shot_app.command("retrieve")
def zero_shot_retrieve(
    images: Annotated[Path, typer.Option("--images", help="Folder of images or videos.")],
    texts: Annotated[Path, typer.Option("--texts", help="Text file, one query per line.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint to use.")],
    as_json: JsonOption = False,
) -> None:
    """Rank files against text queries."""
    del images, texts, checkpoint
    if not engine_available("uniperceiver_cli.engine.inference"):
        not_available("zero-shot retrieve", "ad-hoc inference", 7, as_json=as_json)


@app.command(context_settings=CONTEXT)
def export(
    checkpoint: Annotated[
        Path, typer.Argument(help="Checkpoint, run folder or bundle.", show_default=False)
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder.")],
    fmt: Annotated[str, typer.Option("--format", help="bundle | onnx | torch-export.")] = "bundle",
    fold_for: Annotated[
        str | None, typer.Option("--fold-for", help="Fold experts for one task.")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Export a checkpoint as a safetensors bundle, ONNX or torch.export."""
    del out, fold_for
    if fmt not in ("bundle", "onnx", "torch-export"):
        _usage(f"--format {fmt!r} is not one of: bundle, onnx, torch-export")
    if not checkpoint.exists():
        _usage(f"checkpoint {checkpoint} does not exist")
    if not engine_available("uniperceiver_cli.export.bundle"):
        not_available("export", "the export engine", 8, as_json=as_json)


@app.command(context_settings=CONTEXT)
def convert(
    released: Annotated[
        Path, typer.Argument(help="Released reference checkpoint (.pth / DeepSpeed .pt).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output bundle folder.")],
    trust: Annotated[
        bool,
        typer.Option("--trust", help="Allow arbitrary pickled objects (only for files you trust)."),
    ] = False,
    as_json: JsonOption = False,
) -> None:
    """Convert a released reference checkpoint into our bundle format."""
    del out, trust
    if not released.exists():
        _usage(f"checkpoint {released} does not exist")
    if not engine_available("uniperceiver_cli.export.convert"):
        not_available("convert", "checkpoint conversion", 8, as_json=as_json)


@score_app.command("captions")
def score_captions(
    results: Annotated[Path, typer.Argument(help="COCO result JSON: [{image_id, caption}].")],
    annotations: Annotated[Path, typer.Argument(help="COCO caption annotation JSON.")],
    as_json: JsonOption = False,
) -> None:
    """Score captions with BLEU, METEOR, ROUGE-L and CIDEr-D (no Java needed)."""
    for path in (results, annotations):
        if not path.exists():
            _usage(f"{path} does not exist")
    if not engine_available("uniperceiver_cli.metrics.caption"):
        not_available("score captions", "the caption metrics", 7, as_json=as_json)


@data_app.command("toy")
def data_toy(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the toy world into.")],
    seed: Annotated[int, typer.Option("--seed", help="World seed.")] = 0,
    num_images: Annotated[int, typer.Option("--num-images", min=10, help="Images in all splits.")] = 600,
    num_videos: Annotated[int, typer.Option("--num-videos", min=10, help="Videos in all splits.")] = 120,
    image_size: Annotated[int, typer.Option("--image-size", min=8, help="Image and frame side in pixels.")] = 32,
    as_json: JsonOption = False,
) -> None:
    """Write the built-in toy world (images, captions, videos, text) in the real dataset formats."""
    if out.exists() and any(out.iterdir()):
        _usage(f"{out} exists and is not empty; choose a new folder")
    from uniperceiver_cli.data.toy import write_toy_world

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        summary = write_toy_world(tmp, seed=seed, num_images=num_images, num_videos=num_videos, image_size=image_size)
        if out.exists():
            out.rmdir()
        tmp.replace(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    paths = {name: str(out / Path(p).relative_to(tmp)) for name, p in summary.paths.items()}
    if as_json:
        print_json({"ok": True, "out": str(out), "seed": seed, "paths": paths})
    else:
        stderr_console().print(f"wrote the toy world (seed {seed}) to {out}")
        for name, path in paths.items():
            stderr_console().print(f"  {name:24s} {path}")


@app.command(context_settings=CONTEXT)
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


@recipes_app.command("list")
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
        _usage(f"no shipped recipe named {name!r}; available: {names}")
    return found


@recipes_app.command("show")
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


@recipes_app.command("cp")
def recipes_cp(
    name: Annotated[str, typer.Argument(help="Shipped recipe to copy.")],
    dest: Annotated[Path, typer.Argument(help="Destination file or folder.")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Copy a shipped recipe to edit it."""
    src = _shipped_or_exit(name)
    target = dest / src.name if dest.is_dir() else dest
    if target.exists() and not force:
        _usage(f"{target} exists; pass --force to overwrite")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.copyfile(src, tmp)
    tmp.replace(target)
    stderr_console().print(f"copied {src.name} → {target}")


def _usage(message: str) -> NoReturn:
    print_issues("invocation", [Issue("command line", None, "", message)])
    raise typer.Exit(ExitCode.USAGE)


def main() -> None:
    """Console-script entry point."""
    app()
