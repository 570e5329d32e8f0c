"""The shared base of routed linears (`SegmentRoutedLinear`, `TokenRoutedLinear`).

`_RoutedLinear` holds the experts, the gate (owners) or a reference to the leader whose decision it
reuses (followers, SPEC §2.6: `attn_out` after `qkv`, `ffn_out` after `ffn_in`), input checks and
the batch-invariant eval switch (`invariant_chunk`, `row_chunk`).
"""

from __future__ import annotations

import torch
from torch import nn

from uniperceiver_cli.model.config import MoEConfig, RoutingStrategy, Sublayer
from uniperceiver_cli.model.gemm import GemmBackend
from uniperceiver_cli.model.moe.experts import (
    INVARIANT_CHUNK,
    ExpertWeights,
)
from uniperceiver_cli.model.moe.router import (
    RoutingError,
)
from uniperceiver_cli.model.routing import RoutingContext

#: Sublayer pairs whose second member reuses the first one's decision (SPEC §2.6).
SHARED_PAIRS: tuple[tuple[Sublayer, Sublayer], ...] = (("qkv", "attn_out"), ("ffn_in", "ffn_out"))


class SharedDecisionError(RuntimeError):
    """A follower linear was called without a matching call of its leader."""


class _RoutedLinear(nn.Module):
    """State shared by both routed linear kinds.

    `router` (the gate a gate owner registers) is only checked here: exactly one of `router` and
    `leader` must be given, else `ValueError`.

    Attributes:
        invariant_chunk: in eval without gradients every matmul of this linear (gate, experts,
            merged weights) runs on fixed chunks of this many rows (`experts.chunked_linear`),
            so a token's output is bitwise the same whatever else is in the batch; None turns
            the mode off (plain matmuls, outputs then vary in the last bits with the batch).
        cpu_gemm: GEMM library of this linear's float32 CPU matmuls (`gemm`: `auto` picks oneDNN
            where it measures faster than torch's BLAS, `onednn`, `torch`); set from the
            recipe's `runtime.cpu_gemm` by `gemm.set_cpu_gemm`.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        moe: MoEConfig,
        *,
        router: nn.Module | None,
        layer_index: int,
        sublayer: str,
        leader: _RoutedLinear | None,
        bias: bool,
        fused_qkv: bool,
    ) -> None:
        if (router is None) == (leader is None):
            raise ValueError("give exactly one of router (gate owner) and leader (follower)")
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.moe = moe
        self.layer_index = layer_index
        self.sublayer = sublayer
        self.experts = ExpertWeights(moe.num_experts, in_features, out_features, bias, fused_qkv)
        # a tuple keeps the leader out of the module tree: its gate is registered once, there
        self._leader: tuple[_RoutedLinear, ...] = (leader,) if leader is not None else ()
        self.invariant_chunk: int | None = INVARIANT_CHUNK
        self.cpu_gemm: GemmBackend = "auto"

    @property
    def leader(self) -> _RoutedLinear | None:
        """The linear whose decisions this one reuses, or None when it owns its gate."""
        return self._leader[0] if self._leader else None

    @property
    def strategy(self) -> RoutingStrategy:
        """Routing strategy."""
        return self.moe.routing

    def row_chunk(self) -> int | None:
        """Rows per matmul of the batch-invariant eval mode now, or None (fast path).

        The mode is on in eval without gradients (`not training` and `torch.no_grad()` or
        inference mode) unless `invariant_chunk` is None.
        """
        if self.invariant_chunk is None or self.training or torch.is_grad_enabled():
            return None
        return self.invariant_chunk

    def _check_input(self, x: torch.Tensor, routing: RoutingContext) -> None:
        if x.ndim != 3 or x.shape[-1] != self.in_features:
            raise RoutingError(
                f"layers.{self.layer_index}.{self.sublayer} expects (B, L, {self.in_features}) "
                f"input, got {tuple(x.shape)}"
            )
        if routing.length != x.shape[1]:
            raise RoutingError(
                f"layers.{self.layer_index}.{self.sublayer}: RoutingContext segments cover "
                f"{routing.length} positions but the input has L={x.shape[1]}; build the context "
                "for exactly the positions passed to the linear (RoutingContext.with_prefix for "
                "prepended prompts)"
            )

    def extra_repr(self) -> str:
        """Summary line."""
        role = "follower" if self.leader is not None else "gate owner"
        return (
            f"layer={self.layer_index}, sublayer={self.sublayer}, routing={self.strategy}, "
            f"top_k={self.moe.top_k}, {role}"
        )
