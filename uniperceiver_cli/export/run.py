"""The one engine call behind `uniperceiver export`: load a checkpoint and write one artefact.

`export_checkpoint` resolves the checkpoint like `uniperceiver_cli.load` (run folder, checkpoint folder, bundle or
released file), then writes a bundle, torch.export programs or ONNX models, folding MoE experts for `--fold-for`.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from uniperceiver_cli.export.errors import ExportInputError
from uniperceiver_cli.model.uniperceiver import UniPerceiver

logger = logging.getLogger(__name__)

FORMATS: tuple[str, ...] = ("bundle", "onnx", "torch-export")


def load_for_export(checkpoint: str | os.PathLike[str]) -> tuple[UniPerceiver, Path]:
    """Load what `uniperceiver_cli.load` would load, in eval mode on CPU.

    Returns:
        The model and the resolved checkpoint (folder or file).

    Raises:
        CheckpointError: nothing loadable at `checkpoint` (with the reason).
    """
    from uniperceiver_cli.api import resolve_checkpoint
    from uniperceiver_cli.model.checkpoint import (
        UntrustedCheckpointError,
        load_pretrained,
        load_reference_checkpoint,
    )

    target = resolve_checkpoint(checkpoint)
    if target.is_file():
        try:
            model, _ = load_reference_checkpoint(target)
        except UntrustedCheckpointError as e:
            raise UntrustedCheckpointError(
                f"{e}; export reads files safely only: run `uniperceiver convert {target} --out DIR --trust` "
                "and export the bundle",
                e.global_name,
            ) from e
        return model, target
    return load_pretrained(target), target


def export_checkpoint(
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str],
    fmt: str = "bundle",
    *,
    fold_for: str | None = None,
) -> dict[str, Any]:
    """Export a checkpoint.

    Args:
        checkpoint: run folder, checkpoint folder, bundle or released file.
        out: output folder.
        fmt: `bundle`, `onnx` or `torch-export`.
        fold_for: fold MoE experts for this task (onnx / torch-export; MoE models are always folded for
            export, by default for image/video-text retrieval).

    Returns:
        A JSON-ready result: format, output folder, files, fold summary, verification.

    Raises:
        ExportInputError: bad format/option/task; CheckpointError: nothing loadable.
        ExportError / VerificationError: the export failed.
    """
    if fmt not in FORMATS:
        raise ExportInputError(f"--format {fmt!r} is not one of: {', '.join(FORMATS)}")
    if fmt == "bundle" and fold_for is not None:
        raise ExportInputError(
            "--fold-for applies to --format onnx and torch-export; a bundle keeps the routed experts so "
            "it can serve (and be fine-tuned for) every task"
        )
    model, target = load_for_export(checkpoint)
    result: dict[str, Any] = {"ok": True, "format": fmt, "source": str(target)}
    if fmt == "bundle":
        from uniperceiver_cli.export.bundle import find_recipe, write_bundle

        bundle = write_bundle(model, out, source=str(target), recipe=find_recipe(target))
        result |= {"out": str(bundle.path), "files": sorted(bundle.manifest["files"])}
        return result
    from uniperceiver_cli.export.entry import build_entry_points

    if fmt == "onnx":
        from uniperceiver_cli.export.onnx import check_onnx_available

        check_onnx_available()
    entry = build_entry_points(model, fold_for)
    if fmt == "onnx":
        from uniperceiver_cli.export.onnx import export_onnx

        folder, report, manifest = export_onnx(entry, out, source=str(target))
    else:
        from uniperceiver_cli.export.torch_export import export_torch

        folder, report, manifest = export_torch(entry, out, source=str(target))
    result |= {
        "out": str(folder),
        "task": entry.task,
        "entry_points": sorted(entry.modules),
        "fold": entry.fold.as_dict() if entry.fold is not None else None,
        "verification": report.as_dict(),
        "files": sorted(manifest["files"]),
    }
    return result
