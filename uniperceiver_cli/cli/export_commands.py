"""Export commands: `export` (bundle, ONNX, torch.export) and `convert` (released checkpoints)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from uniperceiver_cli.cli.common import exit_with, usage
from uniperceiver_cli.cli.exit_codes import ExitCode
from uniperceiver_cli.cli.options import JsonOption, engine_available, not_available
from uniperceiver_cli.cli.render import print_json, print_mapping, stderr_console


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
        usage(f"--format {fmt!r} is not one of: bundle, onnx, torch-export")
    if not checkpoint.exists():
        usage(f"checkpoint {checkpoint} does not exist")
    if not engine_available("uniperceiver_cli.export.bundle"):
        not_available("export", "the export engine", 8, as_json=as_json)
    from uniperceiver_cli.export.run import export_checkpoint

    with _export_errors(as_json):
        result = export_checkpoint(checkpoint, out, fmt, fold_for=fold_for)
    _render_export(result, as_json)


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
        usage(f"checkpoint {released} does not exist")
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
        exit_with(ExitCode.USAGE, str(e), as_json=as_json, title="export input")
    except ExportError as e:
        exit_with(ExitCode.FAILURE, str(e), as_json=as_json, title="export")


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
