"""Compare a reloaded export artefact with the eager model it came from.

`verify_entry_points` runs every entry point on a grid of two batch sizes x two sequence lengths (text length,
candidate count of `similarity`, and frames of the video encoder), none equal to the sizes the graph was traced
with, and records the largest absolute difference per case. Features must agree within `FEATURE_TOL` (1e-5);
`similarity` logits are temperature-scaled cosines, so their tolerance is `FEATURE_TOL` on the cosine scale
(1e-5 x temperature): at tau = 100 one float32 ulp of a logit is already 7.6e-6.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from uniperceiver_cli.export.entry import EntryPoints, Similarity, example_inputs
from uniperceiver_cli.export.errors import VerificationError

logger = logging.getLogger(__name__)

#: Max |exported - eager| of L2-normalised features.
FEATURE_TOL = 1e-5
#: (batch, length, frames) cases; none equals the trace-time example (2, 5, 2).
DEFAULT_CASES: tuple[tuple[int, int, int], ...] = ((1, 4, 1), (1, 11, 3), (3, 4, 1), (3, 11, 3))

#: Runs one entry point of the reloaded artefact: (entry name, inputs) -> output.
Runner = Callable[[str, Sequence[Tensor]], Any]


def max_abs_diff(a: Tensor | np.ndarray[Any, Any], b: Tensor | np.ndarray[Any, Any]) -> float:
    """Largest absolute elementwise difference of two arrays/tensors of the same shape.

    Raises:
        VerificationError: when the shapes differ.
    """
    x = a.detach().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a)
    y = b.detach().cpu().numpy() if isinstance(b, Tensor) else np.asarray(b)
    if x.shape != y.shape:
        raise VerificationError(f"output shapes differ: exported {x.shape}, eager {y.shape}")
    if x.size == 0:
        return 0.0
    return float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))))


def tolerance(module: torch.nn.Module) -> float:
    """Tolerance of one entry point: `FEATURE_TOL`, times the temperature for `Similarity`."""
    if isinstance(module, Similarity):
        tau = float(module.head.temperature(module.task).detach())
        return FEATURE_TOL * max(1.0, tau)
    return FEATURE_TOL


@dataclass
class CaseResult:
    """One comparison.

    Attributes:
        entry: entry-point name.
        batch: B.
        length: text length / candidate count.
        frames: video frames.
        max_abs_diff: largest |exported - eager|.
        tolerance: the allowed difference.
    """

    entry: str
    batch: int
    length: int
    frames: int
    max_abs_diff: float
    tolerance: float

    @property
    def ok(self) -> bool:
        """Within tolerance."""
        return self.max_abs_diff <= self.tolerance


@dataclass
class VerifyReport:
    """All comparisons of one artefact.

    Attributes:
        cases: every (entry, size) compared.
    """

    cases: list[CaseResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every case within tolerance."""
        return all(c.ok for c in self.cases)

    def max_diff(self, entry: str | None = None) -> float:
        """Largest difference (of one entry point, or overall)."""
        diffs = [c.max_abs_diff for c in self.cases if entry is None or c.entry == entry]
        return max(diffs, default=0.0)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form: ok, per-entry max difference and every case."""
        entries = sorted({c.entry for c in self.cases})
        return {
            "ok": self.ok,
            "max_abs_diff": {e: self.max_diff(e) for e in entries},
            "cases": [asdict(c) | {"ok": c.ok} for c in self.cases],
        }

    def raise_if_failed(self, what: str) -> None:
        """Raise `VerificationError` naming the failing cases."""
        bad = [c for c in self.cases if not c.ok]
        if bad:
            detail = "; ".join(
                f"{c.entry} B={c.batch} L={c.length} T={c.frames}: {c.max_abs_diff:.3g} > {c.tolerance:.3g}"
                for c in bad
            )
            raise VerificationError(f"{what} does not reproduce the eager model: {detail}")


@torch.no_grad()
def verify_entry_points(
    entry: EntryPoints,
    run: Runner,
    *,
    names: Sequence[str] | None = None,
    cases: Sequence[tuple[int, int, int]] = DEFAULT_CASES,
) -> VerifyReport:
    """Run eager and exported entry points on the same inputs and record the differences.

    Args:
        entry: the eager entry points.
        run: runs the exported entry point `name` on inputs.
        names: entry points to check (default all).
        cases: (batch, length, frames) grid.

    Returns:
        The report (not raised; call `raise_if_failed`).
    """
    report = VerifyReport()
    for name in names or list(entry.modules):
        module = entry.modules[name]
        tol = tolerance(module)
        seen: set[tuple[int, ...]] = set()
        for batch, length, frames in cases:
            args = example_inputs(entry.model, name, batch=batch, length=length, frames=frames)
            shapes = tuple(s for a in args for s in a.shape)
            if shapes in seen:  # images ignore length and frames
                continue
            seen.add(shapes)
            expected = module(*args)
            got = run(name, args)
            diff = max_abs_diff(got, expected)
            report.cases.append(CaseResult(name, batch, length, frames, diff, tol))
            logger.debug("%s B=%d L=%d T=%d: max |diff| %.3g", name, batch, length, frames, diff)
    return report
