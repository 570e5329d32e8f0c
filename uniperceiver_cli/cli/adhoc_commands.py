"""Ad-hoc inference on your own files: `zero-shot classify`, `caption` and `retrieve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from uniperceiver_cli.cli.common import exit_with, load_model, pick_device, usage
from uniperceiver_cli.cli.eval_commands import DeviceOption
from uniperceiver_cli.cli.exit_codes import ExitCode
from uniperceiver_cli.cli.options import JsonOption, engine_available, not_available
from uniperceiver_cli.cli.render import stdout_console

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
        exit_with(ExitCode.USAGE, str(exc), as_json=as_json, title=title)
    except DataError as exc:
        exit_with(ExitCode.FAILURE, str(exc), as_json=as_json, title=title)
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
        usage("--labels needs at least one name, e.g. --labels cat,dog")
    if not engine_available("uniperceiver_cli.engine.inference"):
        not_available("zero-shot classify", "ad-hoc inference", 7, as_json=as_json)
    from uniperceiver_cli.engine.inference import classify_files

    model, _ = load_model(checkpoint, pick_device(device), as_json=as_json, title="classify")
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

    model, _ = load_model(checkpoint, pick_device(device), as_json=as_json, title="caption")
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

    model, _ = load_model(checkpoint, pick_device(device), as_json=as_json, title="retrieve")
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
