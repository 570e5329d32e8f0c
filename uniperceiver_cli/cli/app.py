"""The `uniperceiver` Typer app: root options and the command table.

Commands are thin: parse flags, load the recipe (`recipe/`, torch-free), call one engine function (imported
inside the command body so `--help` never imports torch), render the result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import logging
import os
import shutil
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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
from uniperceiver_cli.cli.render import (
    print_issues,
    print_json,
    print_mapping,
    stderr_console,
    stdout_console,
)
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


def _run_training(
    loaded: LoadedRecipe, output_dir: Path | None, resume: bool, as_json: bool
) -> None:
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
            print_json(
                {"ok": False, "status": "failed", "error": type(exc).__name__, "message": str(exc)}
            )
        raise typer.Exit(ExitCode.FAILURE) from None
    print_training_result(result, as_json=as_json)


def _training_command(command: str, recipe_command: str, summary: str) -> None:
    """Register one training command (`pretrain`, `finetune`, `prompt-tune`); they differ only by recipe kind."""

    def run(
        recipe: RecipeArg,
        sets: SetOption = None,
        output_dir: OutputDirOption = None,
        resume: ResumeOption = True,
        dry_run: DryRunOption = False,
        as_json: JsonOption = False,
    ) -> None:
        loaded = load_or_exit(recipe, sets, recipe_command)
        _finish_recipe(loaded, output_dir, dry_run, as_json)
        if not engine_available("uniperceiver_cli.engine.train"):
            not_available(command, "the training engine", 6, as_json=as_json)
        _run_training(loaded, output_dir, resume, as_json)

    run.__doc__ = summary
    run.__name__ = recipe_command
    app.command(command, context_settings=CONTEXT)(run)


_training_command(
    "pretrain",
    "pretrain",
    "Multi-task pretraining from a recipe (works under `torchrun -m uniperceiver_cli`).",
)
_training_command("finetune", "finetune", "Single-task full fine-tuning from a recipe.")
_training_command(
    "prompt-tune",
    "prompt_tune",
    "Prompt tuning: train deep prompts and norms of a frozen checkpoint.",
)


FailUnderOption = Annotated[
    list[str] | None,
    typer.Option(
        "--fail-under",
        metavar="METRIC=VALUE",
        help="Exit 1 if a metric is lower, e.g. r1_i2t=0.5 or toy_retrieve/r1_i2t=0.5 (repeatable; "
        "metrics are fractions in [0, 1]).",
    ),
]
DataRootOption = Annotated[
    Path | None,
    typer.Option("--data-root", help="Root of the data (default: $UNIPERCEIVER_DATA_ROOT or .)."),
]
DeviceOption = Annotated[
    str | None,
    typer.Option("--device", help="cpu, cuda, cuda:1, ... (default: the recipe's, else auto)."),
]
BatchSizeOption = Annotated[
    int | None, typer.Option("--batch-size", min=1, help="Override the evaluation batch size.")
]


@dataclass(frozen=True)
class EvalRunOptions:
    """The options `eval` and `zero-shot` share, one Typer option a field (`_with_run_options`)."""

    data_root: DataRootOption = None
    fail_under: FailUnderOption = None
    sets: SetOption = None
    output_dir: OutputDirOption = None
    device: DeviceOption = None
    batch_size: BatchSizeOption = None
    as_json: JsonOption = False


def _with_run_options(command: Callable[..., None]) -> Callable[..., None]:
    """Give a command the `EvalRunOptions` options after its own parameters.

    `command` declares its own Typer parameters and a last parameter `options: EvalRunOptions`.
    Typer sees the command's parameters followed by one keyword parameter per `EvalRunOptions`
    field (same names, annotations and defaults); the returned wrapper packs those into `options`
    and calls `command`.

    Args:
        command: the command body.

    Returns:
        The function to register with Typer.
    """
    fields = dataclasses.fields(EvalRunOptions)
    hints = typing.get_type_hints(EvalRunOptions, include_extras=True)
    own = inspect.signature(command, eval_str=True).parameters.values()
    shared = [
        inspect.Parameter(
            f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name]
        )
        for f in fields
    ]

    @functools.wraps(command)
    def run(**kwargs: Any) -> None:
        options = EvalRunOptions(**{f.name: kwargs.pop(f.name) for f in fields})
        command(**kwargs, options=options)

    params = [p for p in own if p.name != "options"] + shared
    run.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    return run


@app.command("eval", context_settings=CONTEXT)
@_with_run_options
def evaluate(
    recipe: Annotated[
        Path | None, typer.Argument(help="Eval recipe (or use --task).", show_default=False)
    ] = None,
    checkpoint_arg: Annotated[
        Path | None,
        typer.Argument(metavar="CHECKPOINT", help="Checkpoint to evaluate.", show_default=False),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option("--task", help="Preset protocol, e.g. coco-retrieval (see docs/eval.md)."),
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="Checkpoint (with --task).")
    ] = None,
    *,
    options: EvalRunOptions,
) -> None:
    """Evaluate a checkpoint with the paper's protocols (a recipe, or `--task NAME --checkpoint CKPT`)."""
    if recipe is None and task is None:
        _usage("eval needs a RECIPE or --task NAME (see `uniperceiver eval --help`)")
    if task is not None and recipe is not None and checkpoint_arg is None and checkpoint is None:
        recipe, checkpoint = None, recipe  # `eval --task NAME CHECKPOINT`
    if recipe is not None and task is not None:
        _usage("give either a RECIPE or --task NAME, not both")
    loaded = None
    if recipe is not None:
        loaded = load_or_exit(recipe, options.sets, "eval")
        if checkpoint_arg is None and checkpoint is None:
            _usage("eval RECIPE needs a CHECKPOINT argument")
    elif checkpoint is None:
        _usage("eval --task needs --checkpoint")
    ckpt = checkpoint_arg or checkpoint
    assert ckpt is not None
    _run_evaluation("eval", loaded, task, ckpt, options)


def _exit_with(code: ExitCode, message: str, *, as_json: bool, title: str = "eval") -> NoReturn:
    """Print a problem (stderr; plus a JSON status on stdout with --json) and exit."""
    if code == ExitCode.USAGE:
        print_issues(title, [Issue("command line", None, "", message)])
    else:
        stderr_console().print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    if as_json:
        print_json({"ok": False, "error": message, "exit_code": int(code)})
    raise typer.Exit(code)


def _pick_device(requested: str | None) -> str:
    """`auto`/None -> cuda when available, else cpu."""
    if requested not in (None, "auto"):
        assert requested is not None
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _load_model(checkpoint: Path, device: str, *, as_json: bool, title: str) -> Any:
    """Load a checkpoint with `uniperceiver_cli.load`; a bad path or file is exit 2."""
    from uniperceiver_cli.api import CheckpointError, load, resolve_checkpoint

    try:
        resolved = resolve_checkpoint(checkpoint)
        return load(resolved, device=device), resolved
    except CheckpointError as exc:
        _exit_with(ExitCode.USAGE, str(exc), as_json=as_json, title=title)


def _run_evaluation(
    command: str,
    loaded: LoadedRecipe | None,
    preset_name: str | None,
    checkpoint: Path,
    options: EvalRunOptions,
) -> None:
    """Shared body of `eval` and `zero-shot`: recipe/preset -> data -> model -> metrics -> outputs."""
    title = command.replace("_", "-")
    as_json = options.as_json
    if not engine_available("uniperceiver_cli.engine.evaluate"):
        not_available(title, "the evaluation engine", 7, as_json=as_json)
    from uniperceiver_cli.data.errors import DataError
    from uniperceiver_cli.engine.data import TaskDataError
    from uniperceiver_cli.engine.evaluate import (
        METRICS_BY_TYPE,
        EvalError,
        check_fail_under,
        default_cache_dir,
        evaluate_tasks,
        failed_thresholds,
        parse_fail_under,
        resolve_tasks,
        write_outputs,
    )
    from uniperceiver_cli.engine.presets import (
        FORMAT_LAYOUTS,
        PresetDataError,
        PresetError,
        check_preset_data,
        get_preset,
        preset_recipe,
    )
    from uniperceiver_cli.metrics.caption import CaptionMetricsError
    from uniperceiver_cli.recipe.paths import data_root as env_data_root

    data_root, batch_size = options.data_root, options.batch_size
    try:
        thresholds = parse_fail_under(options.fail_under or [])
    except EvalError as exc:
        _exit_with(ExitCode.USAGE, str(exc), as_json=as_json, title=title)
    recipe_dir: Path | None = None
    if preset_name is not None:
        try:
            preset = get_preset(preset_name)
        except PresetError as exc:
            _exit_with(ExitCode.USAGE, str(exc), as_json=as_json, title=title)
        root = data_root or env_data_root(None)
        if preset.expects:
            try:
                check_preset_data(preset, root)
            except PresetDataError as exc:
                _exit_with(ExitCode.USAGE, str(exc), as_json=as_json, title=title)
        recipe: Any = preset_recipe(
            preset,
            command="zero_shot" if command == "zero_shot" else "eval",
            data_root=root,
            batch_size=batch_size,
        )
        name = preset.name
    else:
        assert loaded is not None
        recipe = loaded.recipe
        recipe_dir = loaded.path.parent.resolve()
        name = str(recipe.run.name)
    available = {t.name: METRICS_BY_TYPE.get(t.type, ()) for t in recipe.tasks}
    try:
        check_fail_under(thresholds, available)
    except EvalError as exc:
        _exit_with(ExitCode.USAGE, str(exc), as_json=as_json, title=title)
    dev = _pick_device(options.device or str(recipe.runtime.device))
    if recipe.runtime.threads:
        import torch

        torch.set_num_threads(int(recipe.runtime.threads))
    model, resolved = _load_model(checkpoint, dev, as_json=as_json, title=title)
    try:
        tasks, _ = resolve_tasks(
            recipe, model, recipe_dir=recipe_dir, data_root=data_root, batch_size=batch_size
        )
    except (DataError, TaskDataError, PresetDataError, ValueError) as exc:
        formats = sorted({t.data.format for t in recipe.tasks})
        layouts = "\n".join(f"  {f}: {FORMAT_LAYOUTS[f]}" for f in formats if f in FORMAT_LAYOUTS)
        _exit_with(
            ExitCode.USAGE, f"{exc}\nexpected layout:\n{layouts}", as_json=as_json, title=title
        )
    if not tasks:
        _exit_with(
            ExitCode.USAGE, "the recipe has no task to evaluate", as_json=as_json, title=title
        )
    out_dir = options.output_dir or Path(recipe.run.output_dir or Path("runs") / f"eval-{name}")
    try:
        result = evaluate_tasks(
            model,
            tasks,
            device=dev,
            checkpoint=resolved,
            vocab_cache_dir=default_cache_dir(),
            precision=recipe.runtime.precision,
        )
    except (EvalError, DataError, CaptionMetricsError, RuntimeError, ValueError) as exc:
        _exit_with(ExitCode.FAILURE, f"evaluation failed: {exc}", as_json=as_json, title=title)
    result.metadata.update(run=name, command=command, preset=preset_name)
    write_outputs(result, out_dir)
    failures = failed_thresholds(result, thresholds)
    _render_metrics(result, out_dir, failures)
    if as_json:
        print_json(
            {
                "ok": not failures,
                "output_dir": str(out_dir),
                **result.to_json(),
                "fail_under": failures,
            }
        )
    raise typer.Exit(ExitCode.FAILURE if failures else ExitCode.OK)


def _render_metrics(result: Any, out_dir: Path, failures: list[dict[str, Any]]) -> None:
    """The metrics table (stderr)."""
    from rich.table import Table

    failed = {f["metric"] for f in failures}
    table = Table(title=f"{result.metadata.get('run', 'eval')}: metrics", title_justify="left")
    for col in ("task", "type", "metric", "value", "items", "protocol"):
        table.add_column(col, overflow="fold")
    for name, res in result.tasks.items():
        proto = ", ".join(f"{k}={v}" for k, v in res.protocol.items() if k != "label_words")
        for i, (metric, value) in enumerate(res.metrics.items()):
            mark = " [red](below --fail-under)[/]" if f"{name}/{metric}" in failed else ""
            table.add_row(
                name if i == 0 else "",
                res.type if i == 0 else "",
                metric,
                f"{value:.4f}{mark}",
                str(res.num_items) if i == 0 else "",
                proto if i == 0 else "",
            )
    console = stderr_console()
    console.print(table)
    console.print(f"metrics and predictions written to {out_dir}")
    for f in failures:
        console.print(
            f"[bold red]fail-under:[/] {f['metric']} = {f['value']:.4f} < {f['threshold']:g}"
        )


@zero_shot_app.callback()
@_with_run_options
def zero_shot(
    ctx: typer.Context,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Zero-shot recipe.")] = None,
    task: Annotated[
        str | None, typer.Option("--task", help="Preset protocol, e.g. msvd-retrieval.")
    ] = None,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="Checkpoint to evaluate.")
    ] = None,
    *,
    options: EvalRunOptions,
) -> None:
    """Evaluate task types the checkpoint never trained on, or run `classify`/`caption`/`retrieve` on files."""
    if ctx.invoked_subcommand is not None:
        return
    if recipe is None and task is None:
        stderr_console().print(ctx.get_help())
        raise typer.Exit(ExitCode.USAGE)
    if recipe is not None and task is not None:
        _usage("give either --recipe or --task, not both")
    loaded = load_or_exit(recipe, options.sets, "zero_shot") if recipe is not None else None
    if checkpoint is None:
        _usage("zero-shot needs --checkpoint")
    _run_evaluation("zero_shot", loaded, task, checkpoint, options)


FramesOption = Annotated[
    int | None,
    typer.Option(
        "--frames", min=1, help="Frames per video, evenly spaced (default: the model's max)."
    ),
]


def _adhoc(title: str, as_json: bool, run: Any) -> list[dict[str, Any]]:
    """Run an ad-hoc inference call; bad inputs are exit 2, decoding failures exit 1."""
    from uniperceiver_cli.data.errors import DataError
    from uniperceiver_cli.engine.inference import InferenceError

    try:
        records: list[dict[str, Any]] = run()
    except InferenceError as exc:
        _exit_with(ExitCode.USAGE, str(exc), as_json=as_json, title=title)
    except DataError as exc:
        _exit_with(ExitCode.FAILURE, str(exc), as_json=as_json, title=title)
    return records


def _print_records(
    records: list[dict[str, Any]], columns: list[tuple[str, Any]], title: str
) -> None:
    """JSON lines are printed by the caller; this prints the Rich table on stdout."""
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for name, _ in columns:
        table.add_column(name, overflow="fold")
    for rec in records:
        table.add_row(*[str(fn(rec)) for _, fn in columns])
    stdout_console().print(table)


def _print_json_lines(records: list[dict[str, Any]]) -> None:
    import json
    import sys

    for rec in records:
        sys.stdout.write(json.dumps(rec) + "\n")
    sys.stdout.flush()


@zero_shot_app.command("classify")
def zero_shot_classify(
    files: Annotated[list[Path], typer.Argument(help="Images or videos.")],
    labels: Annotated[str, typer.Option("--labels", help="Comma-separated class names.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint to use.")],
    template: Annotated[
        str, typer.Option("--template", help='Prompt template, e.g. "a photo of a {}."')
    ] = "{}",
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Labels listed per file.")] = 3,
    frames: FramesOption = None,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Classify files against the given labels (JSON lines with --json)."""
    names = [n.strip() for n in labels.split(",") if n.strip()]
    if not names:
        _usage("--labels needs at least one name, e.g. --labels cat,dog")
    if not engine_available("uniperceiver_cli.engine.inference"):
        not_available("zero-shot classify", "ad-hoc inference", 7, as_json=as_json)
    from uniperceiver_cli.engine.inference import classify_files

    model, _ = _load_model(checkpoint, _pick_device(device), as_json=as_json, title="classify")
    records = _adhoc(
        "classify",
        as_json,
        lambda: classify_files(model, files, names, template=template, frames=frames, top_k=top_k),
    )
    if as_json:
        _print_json_lines(records)
        return
    _print_records(
        records,
        [
            ("file", lambda r: r["file"]),
            ("label", lambda r: r["label"]),
            ("p", lambda r: f"{r['score']:.3f}"),
            ("top", lambda r: ", ".join(f"{t['label']} {t['score']:.2f}" for t in r["top"])),
        ],
        "zero-shot classification",
    )


@zero_shot_app.command("caption")
def zero_shot_caption(
    files: Annotated[list[Path], typer.Argument(help="Images or videos.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint to use.")],
    beam_size: Annotated[int, typer.Option("--beam-size", min=1, help="Beam size.")] = 2,
    max_len: Annotated[int, typer.Option("--max-len", min=1, help="Tokens decoded.")] = 21,
    length_penalty: Annotated[
        float, typer.Option("--length-penalty", min=0.0, help="Beam length penalty.")
    ] = 0.0,
    frames: FramesOption = None,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Caption files (JSON lines with --json)."""
    if not engine_available("uniperceiver_cli.engine.inference"):
        not_available("zero-shot caption", "ad-hoc inference", 7, as_json=as_json)
    from uniperceiver_cli.engine.inference import caption_files

    model, _ = _load_model(checkpoint, _pick_device(device), as_json=as_json, title="caption")
    records = _adhoc(
        "caption",
        as_json,
        lambda: caption_files(
            model,
            files,
            beam_size=beam_size,
            max_len=max_len,
            length_penalty=length_penalty,
            frames=frames,
        ),
    )
    if as_json:
        _print_json_lines(records)
        return
    _print_records(
        records,
        [("file", lambda r: r["file"]), ("caption", lambda r: r["caption"])],
        "zero-shot captions",
    )


@zero_shot_app.command("retrieve")
def zero_shot_retrieve(
    images: Annotated[Path, typer.Option("--images", help="Folder of images or videos.")],
    texts: Annotated[Path, typer.Option("--texts", help="Text file, one query per line.")],
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="Checkpoint to use.")],
    top_k: Annotated[int, typer.Option("--top-k", min=1, help="Files listed per query.")] = 5,
    frames: FramesOption = None,
    device: DeviceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Rank files against text queries (JSON lines with --json)."""
    if not engine_available("uniperceiver_cli.engine.inference"):
        not_available("zero-shot retrieve", "ad-hoc inference", 7, as_json=as_json)
    from uniperceiver_cli.engine.inference import list_media, read_queries, retrieve_files

    def run() -> list[dict[str, Any]]:
        queries = read_queries(texts)
        files = list_media(images)
        return retrieve_files(model, files, queries, top_k=top_k, frames=frames)

    model, _ = _load_model(checkpoint, _pick_device(device), as_json=as_json, title="retrieve")
    records = _adhoc("retrieve", as_json, run)
    if as_json:
        _print_json_lines(records)
        return
    _print_records(
        records,
        [
            ("query", lambda r: r["query"]),
            (
                "best matches",
                lambda r: "\n".join(f"{x['score']:.3f}  {x['file']}" for x in r["results"]),
            ),
        ],
        "zero-shot retrieval",
    )


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
    if fmt not in ("bundle", "onnx", "torch-export"):
        _usage(f"--format {fmt!r} is not one of: bundle, onnx, torch-export")
    if not checkpoint.exists():
        _usage(f"checkpoint {checkpoint} does not exist")
    if not engine_available("uniperceiver_cli.export.bundle"):
        not_available("export", "the export engine", 8, as_json=as_json)
    from uniperceiver_cli.export.run import export_checkpoint

    with _export_errors(as_json):
        result = export_checkpoint(checkpoint, out, fmt, fold_for=fold_for)
    _render_export(result, as_json)


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
    if not released.exists():
        _usage(f"checkpoint {released} does not exist")
    if not engine_available("uniperceiver_cli.export.convert"):
        not_available("convert", "checkpoint conversion", 8, as_json=as_json)
    from uniperceiver_cli.export.convert import convert_released

    with _export_errors(as_json):
        result = convert_released(released, out, trust=trust)
    _render_convert(result, as_json)


@contextlib.contextmanager
def _export_errors(as_json: bool) -> Iterator[None]:
    """Turn export/convert failures into exit 2 (bad input) or 1 (runtime), without a traceback."""
    from uniperceiver_cli.export.errors import ExportError, ExportInputError
    from uniperceiver_cli.model.checkpoint import CheckpointError
    from uniperceiver_cli.model.moe.fold import FoldError

    try:
        yield
    except (CheckpointError, ExportInputError, FoldError) as e:
        _exit_with(ExitCode.USAGE, str(e), as_json=as_json, title="export input")
    except ExportError as e:
        _exit_with(ExitCode.FAILURE, str(e), as_json=as_json, title="export")


def _render_export(result: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print_json(result)
        return
    rows: dict[str, Any] = {
        "format": result["format"],
        "source": result["source"],
        "out": result["out"],
    }
    fold = result.get("fold")
    if fold:
        rows["fold for"] = ", ".join(fold["tasks"])
        rows["routing keys"] = len(fold["routing_keys"])
        rows["parameters (released layout)"] = f"{fold['params_released'] / 1e6:.2f}M"
        rows["parameters (stored)"] = f"{fold['params_before'] / 1e6:.2f}M"
        rows["parameters (deployed)"] = f"{fold['params_after'] / 1e6:.2f}M"
    verification = result.get("verification")
    if verification:
        for name, diff in verification["max_abs_diff"].items():
            rows[f"max |diff| {name}"] = f"{diff:.3g}"
    rows["files"] = len(result["files"])
    print_mapping("export", rows)


def _render_convert(result: Any, as_json: bool) -> None:
    import re
    from collections import Counter

    from rich.table import Table

    summary = result.as_dict()
    if as_json:
        print_json(summary)
        return
    report = result.report

    def collapse(key: str) -> str:
        return re.sub(r"\[\d+\]$", "[*]", re.sub(r"layers\.\d+\.", "layers.*.", key))

    grouped = Counter((collapse(src), collapse(dst)) for src, dst in report.mapped.items())
    table = Table(title=f"key mapping: {len(report.mapped)} tensors", title_justify="left")
    table.add_column("reference key")
    table.add_column("our key")
    table.add_column("count", justify="right")
    for (src, dst), count in sorted(grouped.items()):
        table.add_row(src, dst, str(count))
    stderr_console().print(table)
    if report.ignored:
        ignored = Table(title=f"not loaded: {len(report.ignored)} tensors", title_justify="left")
        ignored.add_column("reference key")
        ignored.add_column("why")
        for key, why in report.ignored.items():
            ignored.add_row(key, why)
        stderr_console().print(ignored)
    rep = summary["report"]
    print_mapping(
        "convert",
        {
            "source": rep["source"],
            "layout / naming": f"{rep['layout']} / {rep['naming']}",
            "model": "MoE" if rep["moe"] else "dense",
            "dead gates dropped": len(rep["dead_gates"]),
            "type embedding folded": rep["folded_type_embedding"],
            "parameters": summary["model"]["parameters"],
            "out": summary["out"],
        },
    )


@score_app.command("captions")
def score_captions(
    results: Annotated[Path, typer.Argument(help="COCO result JSON: [{image_id, caption}].")],
    annotations: Annotated[Path, typer.Argument(help="COCO caption annotation JSON.")],
    backend: Annotated[
        str,
        typer.Option(
            "--backend", help="builtin (pure Python, no Java) or coco (pycocoevalcap + Java)."
        ),
    ] = "builtin",
    as_json: JsonOption = False,
) -> None:
    """Score captions with BLEU, METEOR, ROUGE-L and CIDEr-D (no Java needed)."""
    for path in (results, annotations):
        if not path.exists():
            _usage(f"{path} does not exist")
    if backend not in ("builtin", "coco"):
        _usage(f"--backend {backend!r} is not one of: builtin, coco")
    if not engine_available("uniperceiver_cli.metrics.caption"):
        not_available("score captions", "the caption metrics", 7, as_json=as_json)
    from uniperceiver_cli.metrics.score import MetricsInputError
    from uniperceiver_cli.metrics.score import score_captions as score

    try:
        scores = score(results, annotations, backend=backend)  # type: ignore[arg-type]
    except MetricsInputError as exc:
        _exit_with(ExitCode.USAGE, str(exc), as_json=as_json, title="score captions")
    if as_json:
        print_json({"ok": True, **scores})
        return
    print_mapping(
        f"caption scores ({scores.get('implementation')}, {scores.get('num_images')} images)",
        {
            k: (f"{v:.4f}" if isinstance(v, float) else v)
            for k, v in scores.items()
            if k != "versions"
        },
    )


@data_app.command("toy")
def data_toy(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the toy world into.")],
    seed: Annotated[int, typer.Option("--seed", help="World seed.")] = 0,
    num_images: Annotated[
        int, typer.Option("--num-images", min=10, help="Images in all splits.")
    ] = 600,
    num_videos: Annotated[
        int, typer.Option("--num-videos", min=10, help="Videos in all splits.")
    ] = 120,
    image_size: Annotated[
        int, typer.Option("--image-size", min=8, help="Image and frame side in pixels.")
    ] = 32,
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
        summary = write_toy_world(
            tmp, seed=seed, num_images=num_images, num_videos=num_videos, image_size=image_size
        )
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
