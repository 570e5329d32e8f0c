"""`SegmentRoutedLinear`: modality, task and attribute routing by weight merging (SPEC §2.5).

One decision per segment; the experts are merged into one weight per decision. In eval (no grad)
decisions and merged weights are cached per key and rebuilt when a parameter changes (version
counters), on `train()` and on device moves.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from uniperceiver_cli.model.config import MoEConfig
from uniperceiver_cli.model.gemm import GemmBackend, linear
from uniperceiver_cli.model.moe.dispatch import (
    select_top_k,
)
from uniperceiver_cli.model.moe.experts import (
    chunked_linear,
    merge_experts,
)
from uniperceiver_cli.model.moe.losses import (
    gate_entropy,
)
from uniperceiver_cli.model.moe.routed import _RoutedLinear
from uniperceiver_cli.model.moe.router import (
    SegmentRouter,
)
from uniperceiver_cli.model.moe.telemetry import MoEAux, SegmentRoute
from uniperceiver_cli.model.routing import RoutingContext


@dataclass(frozen=True)
class SegmentDecision:
    """The experts merged for one routing key.

    Attributes:
        expert_ids: (K',) int64 experts (K' = K, or E for the uniform average).
        weights: (K',) float32 merge weights.
        probs: (E,) gate probabilities, or None for the uniform average.
    """

    expert_ids: torch.Tensor
    weights: torch.Tensor
    probs: torch.Tensor | None


def _signature(params: Sequence[torch.Tensor]) -> tuple[tuple[int, int, int], ...]:
    """Identity of parameter contents: storage, in-place version and dtype."""
    return tuple((p.data_ptr(), p._version, hash(p.dtype)) for p in params)


class SegmentRoutedLinear(_RoutedLinear):
    """Linear with segment-constant routing (modality, task or attribute), by weight merging.

    Args:
        in_features: Din.
        out_features: Dout.
        moe: MoE settings.
        router: the gate this linear owns, or None for a follower.
        leader: the gate-owning linear whose decisions are reused, or None.
        layer_index: encoder layer (telemetry).
        sublayer: sublayer name (telemetry).
        bias: experts have biases.
        fused_qkv: reference init fan for fused qkv weights.

    Attributes:
        cache_merged: keep merged weights per key in eval (one dense weight per key, like a fold);
            set False to save memory and merge on every call (decisions stay cached).
        invariant_chunk: None by default here (the merged-weight matmul is as batch-invariant as
            a dense `nn.Linear`); set `experts.INVARIANT_CHUNK` for bitwise batch-invariant eval.
            Eval decisions are always computed one key at a time (batch-invariant either way).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        moe: MoEConfig,
        *,
        router: SegmentRouter | None,
        leader: SegmentRoutedLinear | None = None,
        layer_index: int = 0,
        sublayer: str = "linear",
        bias: bool = True,
        fused_qkv: bool = False,
    ) -> None:
        super().__init__(
            in_features,
            out_features,
            moe,
            router=router,
            layer_index=layer_index,
            sublayer=sublayer,
            leader=leader,
            bias=bias,
            fused_qkv=fused_qkv,
        )
        self.gate = router
        self.cache_merged = True
        # merged-weight matmuls behave like a dense nn.Linear; the chunked mode is opt-in here
        # (float32 eval +6-13% with it, over the 1.05x budget of a dense linear; docs/moe.md)
        self.invariant_chunk = None
        self._memo: dict[Hashable, SegmentDecision] = {}
        self._decision_cache: dict[Hashable, SegmentDecision] = {}
        self._decision_sig: tuple[tuple[int, int, int], ...] = ()
        self._merged_cache: dict[Hashable, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._merged_sig: tuple[tuple[int, int, int], ...] = ()

    # decisions -------------------------------------------------------------------------------

    @property
    def owner(self) -> SegmentRoutedLinear:
        """The gate-owning linear (self or the leader)."""
        lead = self.leader
        return self if lead is None else lead  # type: ignore[return-value]

    @property
    def router(self) -> SegmentRouter:
        """The router that decides for this linear."""
        gate = self.owner.gate
        assert gate is not None
        return gate

    def routing_keys(self, routing: RoutingContext) -> list[Hashable]:
        """Routing key of every segment, in order."""
        return [self.router.segment_key(seg, routing.task) for seg in routing.segments]

    def clear_cache(self) -> None:
        """Drop the eval caches and the shared-decision memo."""
        self._memo = {}
        self._decision_cache = {}
        self._merged_cache = {}

    def train(self, mode: bool = True) -> SegmentRoutedLinear:
        """Switch mode and invalidate cached eval plans."""
        self.clear_cache()
        super().train(mode)
        return self

    def _static(self) -> bool:
        return not self.training and not torch.is_grad_enabled()

    def _compute(self, keys: Sequence[Hashable], noisy: bool) -> dict[Hashable, SegmentDecision]:
        gate = self.gate
        assert gate is not None, "only the gate owner computes decisions"
        out: dict[Hashable, SegmentDecision] = {}
        device = self.experts.weight.device
        routed = [k for k in keys if k is not None]
        if any(k is None for k in keys):
            n = self.moe.num_experts
            out[None] = SegmentDecision(
                torch.arange(n, device=device),
                torch.full((n,), 1.0 / n, device=device),
                None,
            )
        # eval decisions are computed one key at a time, so a key's decision never depends on
        # which other keys missed the cache together (the gate's matmuls vary with row counts)
        groups = [[k] for k in routed] if self._static() else [routed] if routed else []
        for group in groups:
            gate_out = gate(group, noisy=noisy)
            top = select_top_k(gate_out.noisy_logits, self.moe.top_k)
            for row, key in enumerate(group):
                out[key] = SegmentDecision(top.expert_ids[row], top.weights[row], top.probs[row])
        return out

    def decisions(
        self, keys: Sequence[Hashable], reuse: bool = False
    ) -> dict[Hashable, SegmentDecision]:
        """Decisions of the gate owner for distinct keys.

        In eval without grad they come from the static cache. Otherwise a gate owner's own call
        (`reuse=False`) computes them afresh (one noise draw per key) and memoises them; a
        follower's call (`reuse=True`) takes the memoised ones and computes only missing keys.

        Args:
            keys: distinct routing keys.
            reuse: take memoised decisions of the latest call when present.

        Returns:
            Key -> decision.
        """
        if self._static():
            sig = _signature(list(self.router.parameters()))
            if sig != self._decision_sig:
                self._decision_cache = {}
                self._decision_sig = sig
            missing = [k for k in keys if k not in self._decision_cache]
            if missing:
                with torch.no_grad():
                    self._decision_cache.update(self._compute(missing, noisy=False))
            return {k: self._decision_cache[k] for k in keys}
        if reuse:
            missing = [k for k in keys if k not in self._memo]
            if missing:
                self._memo.update(self._compute(missing, noisy=True))
            return {k: self._memo[k] for k in keys}
        self._memo = self._compute(keys, noisy=True)
        return dict(self._memo)

    def eval_decision(self, key: Hashable) -> SegmentDecision:
        """Noise-free decision for one key, regardless of mode (used by `fold`)."""
        with torch.no_grad():
            return self.owner._compute([key], noisy=False)[key]

    # computation -----------------------------------------------------------------------------

    def _merged(
        self, decisions: dict[Hashable, SegmentDecision]
    ) -> dict[Hashable, tuple[torch.Tensor, torch.Tensor | None]]:
        weight, bias = self.experts.weight, self.experts.bias
        if not (self.cache_merged and self._static()):
            return {
                k: merge_experts(weight, bias, d.expert_ids, d.weights)
                for k, d in decisions.items()
            }
        sig = _signature(list(self.experts.parameters()) + list(self.router.parameters()))
        if sig != self._merged_sig:
            self._merged_cache = {}
            self._merged_sig = sig
        for k, d in decisions.items():
            if k not in self._merged_cache:
                with torch.no_grad():
                    self._merged_cache[k] = merge_experts(weight, bias, d.expert_ids, d.weights)
        return {k: self._merged_cache[k] for k in decisions}

    def forward(
        self, x: torch.Tensor, routing: RoutingContext
    ) -> tuple[torch.Tensor, MoEAux | None]:
        """Apply the merged expert weights segment by segment.

        Args:
            x: (B, L, Din) inputs.
            routing: segments covering the L positions, and the task.

        Returns:
            (B, L, Dout) outputs and the aux record (None for a follower).
        """
        self._check_input(x, routing)
        keys = self.routing_keys(routing)
        distinct = list(dict.fromkeys(keys))
        decisions = self.owner.decisions(distinct, reuse=self.leader is not None)
        merged = self._merged(decisions)
        bounds = routing.boundaries()
        # runs of adjacent segments with the same key share one matmul
        runs: list[tuple[Hashable, int, int]] = []
        for key, (start, end) in zip(keys, bounds, strict=True):
            if end == start:
                continue
            if runs and runs[-1][0] == key:
                runs[-1] = (key, runs[-1][1], end)
            else:
                runs.append((key, start, end))
        chunk = self.row_chunk()
        if not runs:
            y = x.new_zeros((*x.shape[:-1], self.out_features))
        elif len(runs) == 1:
            w, b = merged[runs[0][0]]
            if chunk is None:
                y = linear(x, w, b, self.cpu_gemm)
            else:
                rows = x.reshape(-1, self.in_features)
                y = _invariant_linear(rows, w, b, chunk, self.cpu_gemm)
                y = y.view(*x.shape[:-1], self.out_features)
        else:
            y = self._segment_matmuls(x, runs, merged, chunk)
        if self.leader is not None:
            return y, None
        return y, self._aux(x.shape[0], routing, keys, bounds, decisions)

    def _segment_matmuls(
        self,
        x: torch.Tensor,
        runs: Sequence[tuple[Hashable, int, int]],
        merged: dict[Hashable, tuple[torch.Tensor, torch.Tensor | None]],
        chunk: int | None,
    ) -> torch.Tensor:
        """One matmul per run of positions with the same key: (B, L, Din) -> (B, L, Dout).

        Each run's rows are copied into one contiguous (B * n, Din) block, go
        through a single 2-D matmul and land in their slice of a preallocated output; under
        autocast (output dtype decided by the matmul) per-run linears are concatenated instead.
        With `chunk`, each run's block goes through `chunked_linear` (batch-invariant eval).
        """
        if chunk is not None:
            batch = x.shape[0]
            parts = []
            for key, start, end in runs:
                w, b = merged[key]
                rows = x[:, start:end].reshape(batch * (end - start), self.in_features)
                out = _invariant_linear(rows, w, b, chunk, self.cpu_gemm)
                parts.append(out.view(batch, end - start, self.out_features))
            return torch.cat(parts, dim=1)
        if torch.is_autocast_enabled(x.device.type):
            parts = []
            for key, start, end in runs:
                w, b = merged[key]
                parts.append(nn.functional.linear(x[:, start:end], w, b))
            return torch.cat(parts, dim=1)
        batch = x.shape[0]
        y = x.new_empty((batch, x.shape[1], self.out_features))
        for key, start, end in runs:
            w, b = merged[key]
            rows = x[:, start:end].reshape(batch * (end - start), self.in_features)
            out = linear(rows, w, b, self.cpu_gemm)
            y[:, start:end] = out.view(batch, end - start, self.out_features)
        return y

    def _aux(
        self,
        batch: int,
        routing: RoutingContext,
        keys: Sequence[Hashable],
        bounds: Sequence[tuple[int, int]],
        decisions: dict[Hashable, SegmentDecision],
    ) -> MoEAux:
        device = self.experts.weight.device
        n = self.moe.num_experts
        rows = []
        segments = []
        for key, (start, end) in zip(keys, bounds, strict=True):
            d = decisions[key]
            row = torch.zeros(n, device=device)
            row[d.expert_ids] = float(batch * (end - start))
            rows.append(row)
            segments.append(
                SegmentRoute(key, start, end, d.expert_ids.detach(), d.weights.detach())
            )
        by_segment = torch.stack(rows) if rows else torch.zeros((0, n), device=device)
        probs = [d.probs for d in decisions.values() if d.probs is not None]
        entropy = (
            gate_entropy(torch.stack(probs).detach())
            if probs
            else torch.tensor(math.log(n), device=device)
        )
        zero = torch.zeros((), device=device)
        return MoEAux(
            layer_index=self.layer_index,
            sublayer=self.sublayer,
            task=routing.task,
            strategy=self.strategy,
            tokens_per_expert=by_segment.sum(0),
            tokens_per_expert_by_segment=by_segment,
            gate_entropy=entropy,
            dropped_fraction=zero,
            balance_loss=zero,
            z_loss=zero,
            importance_loss=zero,
            loss=zero,
            segments=tuple(segments),
        )


def _invariant_linear(
    rows: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    chunk: int,
    cpu_gemm: GemmBackend,
) -> torch.Tensor:
    """`chunked_linear` with the operand casts `F.linear` would get under autocast: (R, Dout)."""
    device_type = rows.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        rows, weight = rows.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device_type=device_type, enabled=False):
        return chunked_linear(rows, weight, bias, chunk, cpu_gemm)
