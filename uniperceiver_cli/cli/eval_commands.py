"""Evaluation commands: `eval`, the `zero-shot` protocol callback and `score captions`."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer

from uniperceiver_cli.cli.common import exit_with, load_model, pick_device, usage
from uniperceiver_cli.cli.exit_codes import ExitCode
from uniperceiver_cli.cli.options import (
    JsonOption,
    OutputDirOption,
    SetOption,
    engine_available,
    load_or_exit,
    not_available,
)
from uniperceiver_cli.cli.render import print_json, print_mapping, stderr_console
from uniperceiver_cli.recipe.load import LoadedRecipe

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
        usage("eval needs a RECIPE or --task NAME (see `uniperceiver eval --help`)")
    if task is not None and recipe is not None and checkpoint_arg is None and checkpoint is None:
        recipe, checkpoint = None, recipe  # `eval --task NAME CHECKPOINT`
    if recipe is not None and task is not None:
        usage("give either a RECIPE or --task NAME, not both")
    loaded = None
    if recipe is not None:
        loaded = load_or_exit(recipe, options.sets, "eval", as_json=options.as_json)
        if checkpoint_arg is None and checkpoint is None:
            usage("eval RECIPE needs a CHECKPOINT argument")
    elif checkpoint is None:
        usage("eval --task needs --checkpoint")
    ckpt = checkpoint_arg or checkpoint
    assert ckpt is not None
    _run_evaluation("eval", loaded, task, ckpt, options)


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
        exit_with(ExitCode.USAGE, str(exc), as_json=as_json, title=title)
    recipe_dir: Path | None = None
    if preset_name is not None:
        try:
            preset = get_preset(preset_name)
        except PresetError as exc:
            exit_with(ExitCode.USAGE, str(exc), as_json=as_json, title=title)
        root = data_root or env_data_root(None)
        if preset.expects:
            try:
                check_preset_data(preset, root)
            except PresetDataError as exc:
                exit_with(ExitCode.USAGE, str(exc), as_json=as_json, title=title)
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
        exit_with(ExitCode.USAGE, str(exc), as_json=as_json, title=title)
    dev = pick_device(options.device or str(recipe.runtime.device))
    if recipe.runtime.threads:
        import torch

        torch.set_num_threads(int(recipe.runtime.threads))
    model, resolved = load_model(checkpoint, dev, as_json=as_json, title=title)
    try:
        tasks, _ = resolve_tasks(
            recipe, model, recipe_dir=recipe_dir, data_root=data_root, batch_size=batch_size
        )
    except (DataError, TaskDataError, PresetDataError, ValueError) as exc:
        formats = sorted({t.data.format for t in recipe.tasks})
        layouts = "\n".join(f"  {f}: {FORMAT_LAYOUTS[f]}" for f in formats if f in FORMAT_LAYOUTS)
        exit_with(
            ExitCode.USAGE, f"{exc}\nexpected layout:\n{layouts}", as_json=as_json, title=title
        )
    if not tasks:
        exit_with(
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
        exit_with(ExitCode.FAILURE, f"evaluation failed: {exc}", as_json=as_json, title=title)
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
        usage("give either --recipe or --task, not both")
    loaded = (
        load_or_exit(recipe, options.sets, "zero_shot", as_json=options.as_json)
        if recipe is not None
        else None
    )
    if checkpoint is None:
        usage("zero-shot needs --checkpoint")
    _run_evaluation("zero_shot", loaded, task, checkpoint, options)


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
            usage(f"{path} does not exist")
    if backend not in ("builtin", "coco"):
        usage(f"--backend {backend!r} is not one of: builtin, coco")
    if not engine_available("uniperceiver_cli.metrics.caption"):
        not_available("score captions", "the caption metrics", 7, as_json=as_json)
    from uniperceiver_cli.metrics.score import MetricsInputError
    from uniperceiver_cli.metrics.score import score_captions as score

    try:
        scores = score(results, annotations, backend=backend)  # type: ignore[arg-type]
    except MetricsInputError as exc:
        exit_with(ExitCode.USAGE, str(exc), as_json=as_json, title="score captions")
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
