"""What a routed linear returns besides its output: auxiliary losses and routing statistics.

One `MoEAux` per gate-owning routed linear per call; the encoder collects them in a list (nothing
is stored in globals or on modules). `total_aux_loss` sums the weighted losses for the optimiser;
`MoEAux.metrics` flattens the statistics for a metric sink.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from uniperceiver_cli.model.config import RoutingStrategy


@dataclass(frozen=True)
class SegmentRoute:
    """The decision a segment-constant router took for one segment.

    Attributes:
        key: attribute row, modality, task name, or None (uniform average of experts).
        start: first position of the segment.
        end: one past the last position.
        expert_ids: (K',) int64 experts merged for the segment.
        weights: (K',) float32 merge weights (detached).
    """

    key: Hashable
    start: int
    end: int
    expert_ids: torch.Tensor
    weights: torch.Tensor


@dataclass(frozen=True)
class MoEAux:
    """Auxiliary losses and telemetry of one routed linear call.

    Attributes:
        layer_index: encoder layer of the linear.
        sublayer: `qkv`, `attn_out`, `ffn_in` or `ffn_out`.
        task: `RoutingContext.task` of the call.
        strategy: routing strategy.
        tokens_per_expert: (E,) float32 token assignments each expert processed (after capacity;
            a top-2 token counts for two experts).
        tokens_per_expert_by_segment: (S, E) the same split by segment of the RoutingContext.
        gate_entropy: 0-dim mean entropy of the gate distributions (nats).
        dropped_fraction: 0-dim share of token assignments dropped by capacity.
        balance_loss: 0-dim GShard balance loss (0 for segment-constant routing).
        z_loss: 0-dim router z-loss (0 for segment-constant routing).
        importance_loss: 0-dim importance loss (0 for segment-constant routing).
        loss: 0-dim weighted sum of the three losses (carries gradient).
        segments: per-segment decisions (segment-constant routing only).
    """

    layer_index: int
    sublayer: str
    task: str
    strategy: RoutingStrategy
    tokens_per_expert: torch.Tensor
    tokens_per_expert_by_segment: torch.Tensor
    gate_entropy: torch.Tensor
    dropped_fraction: torch.Tensor
    balance_loss: torch.Tensor
    z_loss: torch.Tensor
    importance_loss: torch.Tensor
    loss: torch.Tensor
    segments: tuple[SegmentRoute, ...] = ()

    @property
    def name(self) -> str:
        """`layers.<i>.<sublayer>`."""
        return f"layers.{self.layer_index}.{self.sublayer}"

    def metrics(self) -> dict[str, float]:
        """Flatten the statistics into `moe/<name>/<stat>` floats (host copies)."""
        prefix = f"moe/{self.name}"
        out = {
            f"{prefix}/entropy": float(self.gate_entropy),
            f"{prefix}/dropped": float(self.dropped_fraction),
            f"{prefix}/balance": float(self.balance_loss.detach()),
            f"{prefix}/z": float(self.z_loss.detach()),
            f"{prefix}/importance": float(self.importance_loss.detach()),
        }
        for e, count in enumerate(self.tokens_per_expert.tolist()):
            out[f"{prefix}/tokens/{e}"] = float(count)
        return out


def total_aux_loss(auxes: Sequence[MoEAux | None]) -> torch.Tensor | None:
    """Sum the weighted auxiliary losses of one forward.

    Args:
        auxes: what the routed linears returned (None entries are skipped).

    Returns:
        0-dim loss, or None when there is nothing to add.
    """
    losses = [a.loss for a in auxes if a is not None]
    if not losses:
        return None
    return torch.stack(losses).sum()
