"""`export --format onnx`: one ONNX model per inference entry point, verified with onnxruntime.

Uses the dynamo-based exporter (`torch.onnx.export(..., dynamo=True)`, which needs `onnxscript`) with the same
dynamic shapes as `torch_export.py`; the TorchScript exporter would bake sequence lengths in. Output folder:
`<entry>.onnx`, `config.json`, `tokenizer/`, `manifest.json`. After saving, each file is loaded into an
`onnxruntime.InferenceSession` (CPU) and compared with the eager model at two batch sizes and two lengths.
Requires the optional extra `onnx` (onnx, onnxscript, onnxruntime).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from uniperceiver_cli.export.bundle import (
    atomic_folder,
    copy_tokenizer_assets,
    write_manifest,
    write_model_config,
)
from uniperceiver_cli.export.entry import (
    INPUT_NAMES,
    EntryPoints,
    describe,
    dynamic_shapes,
    example_inputs,
)
from uniperceiver_cli.export.errors import ExportError, ExportInputError
from uniperceiver_cli.export.verify import DEFAULT_CASES, VerifyReport, verify_entry_points

logger = logging.getLogger(__name__)

ONNX_SUFFIX = ".onnx"
_REQUIRED = ("onnx", "onnxscript", "onnxruntime")


def check_onnx_available() -> None:
    """Raise `ExportInputError` naming the missing packages of the `onnx` extra."""
    missing = [m for m in _REQUIRED if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportInputError(
            f"ONNX export needs {', '.join(missing)}; install them with "
            "`pip install 'uniperceiver-cli[onnx]'`"
        )


def export_onnx_file(entry: EntryPoints, name: str, path: Path) -> None:
    """Export one entry point to an ONNX file.

    Raises:
        ExportError: when the exporter fails.
    """
    module = entry.modules[name]
    try:
        with warnings.catch_warnings():
            # onnxscript/torch emit FutureWarnings about pytree internals during export; not ours to fix
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used.*")
            # the exporter prints its progress to stdout; keep stdout for --json
            with contextlib.redirect_stdout(io.StringIO()):
                program = torch.onnx.export(
                    module,
                    example_inputs(entry.model, name),
                    dynamo=True,
                    dynamic_shapes=dynamic_shapes(entry.model, name),
                    input_names=list(INPUT_NAMES[name]),
                    output_names=["output"],
                    verbose=False,
                )
        if program is None:
            raise ExportError(f"torch.onnx.export returned no program for {name}")
        program.save(str(path))
    except ExportError:
        raise
    except Exception as e:  # the exporter raises many internal error types
        raise ExportError(f"ONNX export failed for {name}: {type(e).__name__}: {e}") from e


def load_sessions(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """onnxruntime CPU sessions of the `.onnx` files of a folder (entry name -> session)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return {
        path.stem: ort.InferenceSession(
            str(path), sess_options=options, providers=["CPUExecutionProvider"]
        )
        for path in sorted(Path(folder).glob(f"*{ONNX_SUFFIX}"))
    }


def run_session(session: Any, name: str, args: Sequence[Tensor]) -> np.ndarray[Any, Any]:
    """Run one entry point's session on torch inputs; return its (only) output."""
    feeds = {n: a.detach().cpu().numpy() for n, a in zip(INPUT_NAMES[name], args, strict=True)}
    outputs = session.run(None, feeds)
    return np.asarray(outputs[0])


def export_onnx(
    entry: EntryPoints,
    out: str | os.PathLike[str],
    *,
    source: str | None = None,
    names: Sequence[str] | None = None,
    cases: Sequence[tuple[int, int, int]] | None = None,
) -> tuple[Path, VerifyReport, dict[str, Any]]:
    """Export, reload with onnxruntime and verify the entry points.

    Args:
        entry: the entry points.
        out: output folder (written atomically).
        source: what the model came from (manifest).
        names: entry points to export (default all).
        cases: verification grid.

    Returns:
        The folder, the verification report and the manifest.

    Raises:
        ExportInputError: the onnx extra is not installed.
        ExportError: the exporter failed.
        VerificationError: onnxruntime outputs differ from the eager model.
    """
    check_onnx_available()
    selected = list(names or entry.modules)
    final = Path(out)
    with atomic_folder(final) as tmp:
        for name in selected:
            export_onnx_file(entry, name, tmp / f"{name}{ONNX_SUFFIX}")
        sessions = load_sessions(tmp)

        def run(name: str, args: Sequence[Tensor]) -> np.ndarray[Any, Any]:
            return run_session(sessions[name], name, args)

        report = verify_entry_points(entry, run, names=selected, cases=cases or DEFAULT_CASES)
        report.raise_if_failed("the ONNX models (onnxruntime)")
        write_model_config(entry.model.config, tmp)
        copy_tokenizer_assets(tmp)
        info = describe(entry)
        info["entry_points"] = {k: v for k, v in info["entry_points"].items() if k in selected}
        manifest = write_manifest(
            tmp, "onnx", source=source, extra=info | {"verification": report.as_dict()}
        )
    for name in selected:
        logger.info("ONNX %s: max |onnxruntime - eager| = %.3g", name, report.max_diff(name))
    return final, report, manifest
