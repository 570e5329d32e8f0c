"""`export --format torch-export`: one `torch.export` program per inference entry point, verified after reload.

Layout of the output folder: `<entry>.pt2` for each entry point (`image_encoder`, `video_encoder`, `text_encoder`,
`similarity`, see `entry.py`), `config.json` (the model config), `tokenizer/` and `manifest.json` (hashes,
versions, entry-point signatures, fold summary, verification results). Programs are traced in eval mode from the
folded model (MoE) with dynamic batch, text length, frame count and candidate count; after saving, each program is
loaded back with `torch.export.load` and compared with the eager model (`verify.py`).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from uniperceiver_cli.export.bundle import (
    atomic_folder,
    copy_tokenizer_assets,
    write_manifest,
    write_model_config,
)
from uniperceiver_cli.export.entry import EntryPoints, describe, dynamic_shapes, example_inputs
from uniperceiver_cli.export.errors import ExportError
from uniperceiver_cli.export.verify import DEFAULT_CASES, VerifyReport, verify_entry_points

logger = logging.getLogger(__name__)

PROGRAM_SUFFIX = ".pt2"


def export_programs(entry: EntryPoints) -> dict[str, torch.export.ExportedProgram]:
    """Trace every entry point with `torch.export.export` (strict=False) and dynamic shapes.

    Raises:
        ExportError: when tracing fails, naming the entry point.
    """
    programs = {}
    for name, module in entry.modules.items():
        try:
            programs[name] = torch.export.export(
                module,
                example_inputs(entry.model, name),
                dynamic_shapes=dynamic_shapes(entry.model, name),
                strict=False,
            )
        except Exception as e:  # torch.export raises many internal error types
            raise ExportError(f"torch.export failed for {name}: {type(e).__name__}: {e}") from e
    return programs


def load_programs(folder: str | os.PathLike[str]) -> dict[str, Callable[..., Tensor]]:
    """Load the `.pt2` programs of an export folder as callables (entry name -> module)."""
    out: dict[str, Callable[..., Tensor]] = {}
    for path in sorted(Path(folder).glob(f"*{PROGRAM_SUFFIX}")):
        with warnings.catch_warnings():
            # torch.export.load maps the archive read-only and warns about it; the weights are not written
            warnings.filterwarnings("ignore", message=r".*buffer is not writable.*")
            out[path.stem] = torch.export.load(path).module()
    return out


def export_torch(
    entry: EntryPoints,
    out: str | os.PathLike[str],
    *,
    source: str | None = None,
    cases: Sequence[tuple[int, int, int]] | None = None,
) -> tuple[Path, VerifyReport, dict[str, Any]]:
    """Export, save, reload and verify the entry points.

    Args:
        entry: the entry points (`build_entry_points`).
        out: output folder (written atomically).
        source: what the model came from (manifest).
        cases: verification grid (default `verify.DEFAULT_CASES`).

    Returns:
        The folder, the verification report and the manifest.

    Raises:
        ExportError: tracing failed.
        VerificationError: the reloaded programs differ from the eager model.
    """
    programs = export_programs(entry)
    final = Path(out)
    with atomic_folder(final) as tmp:
        for name, program in programs.items():
            torch.export.save(program, tmp / f"{name}{PROGRAM_SUFFIX}")
        loaded = load_programs(tmp)

        def run(name: str, args: Sequence[Tensor]) -> Tensor:
            return loaded[name](*args)

        report = verify_entry_points(entry, run, cases=cases or DEFAULT_CASES)
        report.raise_if_failed("the torch.export programs")
        write_model_config(entry.model.config, tmp)
        copy_tokenizer_assets(tmp)
        extra = describe(entry) | {"verification": report.as_dict()}
        manifest = write_manifest(tmp, "torch-export", source=source, extra=extra)
    for name in entry.modules:
        logger.info("torch.export %s: max |exported - eager| = %.3g", name, report.max_diff(name))
    return final, report, manifest
