"""`uniperceiver convert RELEASED --out DIR`: a released reference checkpoint -> our bundle.

Accepts the released dense torch file (`{'model': sd}`), the MoE torch file (MoE key names) and DeepSpeed
releases (`mp_rank_00_model_states.pt`, `{'module': sd, ...}`, old names, fp16); the mapping itself is
`model.checkpoint.load_reference_checkpoint` (dense) and `model.moe.released` (MoE). Files are read with
`torch.load(weights_only=True)`; a file that pickles other Python objects (DeepSpeed files may carry an
`argparse.Namespace`) is refused unless `trust=True` (`--trust`), which loads it unsafely. The bundle holds the
key-mapping report as `conversion.json`.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uniperceiver_cli.export.bundle import BundleResult, write_bundle
from uniperceiver_cli.model.checkpoint import ImportReport, load_reference_checkpoint
from uniperceiver_cli.model.uniperceiver import UniPerceiver

logger = logging.getLogger(__name__)


def report_to_dict(report: ImportReport) -> dict[str, Any]:
    """JSON-ready key-mapping report: layout, naming, counts, every mapping and every ignored key."""
    reasons = Counter(report.ignored.values())
    return {
        "source": report.path,
        "layout": report.layout,
        "naming": report.naming,
        "moe": report.moe,
        "mapped_count": len(report.mapped),
        "ignored_count": len(report.ignored),
        "missing": list(report.missing),
        "folded_type_embedding": report.folded_type_embedding,
        "dead_gates": list(report.dead_gates),
        "ignored_reasons": dict(reasons),
        "mapped": dict(report.mapped),
        "ignored": dict(report.ignored),
    }


@dataclass
class ConvertResult:
    """What `convert_released` did.

    Attributes:
        model: the imported model (eval mode).
        report: the import report.
        bundle: the written bundle.
    """

    model: UniPerceiver
    report: ImportReport
    bundle: BundleResult

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready summary (without the full key lists)."""
        full = report_to_dict(self.report)
        summary = {k: v for k, v in full.items() if k not in ("mapped", "ignored")}
        cfg = self.model.config
        return {
            "ok": True,
            "out": str(self.bundle.path),
            "report": summary,
            "model": {
                "hidden_size": cfg.hidden_size,
                "num_layers": cfg.num_layers,
                "num_experts": cfg.moe.num_experts if cfg.moe is not None else None,
                "moe_layers": list(cfg.moe.layers) if cfg.moe is not None else [],
                "parameters": self.bundle.manifest["model"]["parameters"],
            },
            "files": sorted(self.bundle.manifest["files"]),
        }


def convert_released(
    path: str | os.PathLike[str], out: str | os.PathLike[str], *, trust: bool = False
) -> ConvertResult:
    """Import a released reference file and write it as a bundle.

    Args:
        path: the released `.pth` / `.pt` file.
        out: the bundle folder (written atomically; an existing export folder of ours is replaced).
        trust: allow arbitrary pickled objects (unsafe; only for files you trust).

    Returns:
        The `ConvertResult`.

    Raises:
        UntrustedCheckpointError: the file needs `trust=True`.
        CheckpointError: unreadable, truncated or unknown file.
        ExportInputError: `out` exists and is not ours.
    """
    source = Path(path)
    model, report = load_reference_checkpoint(source, trust=trust)
    bundle = write_bundle(model, out, source=str(source), conversion=report_to_dict(report))
    logger.info(
        "converted %s: %d tensors mapped, %d ignored, %d dead gates dropped",
        source,
        len(report.mapped),
        len(report.ignored),
        len(report.dead_gates),
    )
    return ConvertResult(model, report, bundle)
