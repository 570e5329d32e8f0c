"""Routed linears: the MoE replacements of an encoder block's four linears, and their factory.

* `SegmentRoutedLinear` (modality, task, attribute routing): one decision per segment, experts
  merged into one weight per decision (SPEC §2.5); in eval (no grad) decisions and merged weights
  are cached per key and rebuilt when a parameter changes (version counters), on `train()` and on
  device moves.
* `TokenRoutedLinear` (token, context routing): top-k, capacity, batch-prioritised routing and a
  grouped per-expert matmul (`dispatch.py`, `fused_dispatch.py`); experts may be sharded over ranks
  (`parallel.py`). In eval without gradients every matmul runs on fixed row chunks, so a token's
  output is bitwise independent of the rest of the batch (`invariant_chunk`, docs/moe.md).

Both are called as `y, aux = module(x, routing)`. Shared decisions (SPEC §2.6): the second linear of
a pair (`attn_out` after `qkv`, `ffn_out` after `ffn_in`) holds no gate; it keeps an unregistered
reference to its leader and reuses the decision of the leader's latest call, so it must be called
after the leader within the same block call. Followers return `aux=None`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from uniperceiver_cli.model.config import ModelConfig, MoEConfig, RoutingStrategy, Sublayer
from uniperceiver_cli.model.moe.dispatch import (
    DispatchPlan,
    combine_units,
    expert_capacity,
    gather_units,
    plan_dispatch,
    select_top_k,
)
from uniperceiver_cli.model.moe.experts import (
    INVARIANT_CHUNK,
    ExpertWeights,
    chunked_linear,
    grouped_linear,
    merge_experts,
)
from uniperceiver_cli.model.moe.fused_dispatch import dispatch_linear
from uniperceiver_cli.model.moe.losses import (
    balance_loss,
    gate_entropy,
    importance_loss,
    router_z_loss,
)
from uniperceiver_cli.model.moe.router import (
    AttributeRouter,
    ContextRouter,
    ModalityRouter,
    RoutingError,
    SegmentRouter,
    TaskRouter,
    TokenRouter,
)
from uniperceiver_cli.model.moe.telemetry import MoEAux, SegmentRoute
from uniperceiver_cli.model.routing import RoutingContext

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

logger = logging.getLogger(__name__)

#: Sublayer pairs whose second member reuses the first one's decision (SPEC §2.6).
SHARED_PAIRS: tuple[tuple[Sublayer, Sublayer], ...] = (("qkv", "attn_out"), ("ffn_in", "ffn_out"))


class MoEConfigError(ValueError):
    """The MoE part of a ModelConfig cannot be built."""


class SharedDecisionError(RuntimeError):
    """A follower linear was called without a matching call of its leader."""


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


class _RoutedLinear(nn.Module):
    """State shared by both routed linear kinds.

    `router` (the gate a gate owner registers) is only checked here: exactly one of `router` and
    `leader` must be given, else `ValueError`.

    Attributes:
        invariant_chunk: in eval without gradients every matmul of this linear (gate, experts,
            merged weights) runs on fixed chunks of this many rows (`experts.chunked_linear`),
            so a token's output is bitwise the same whatever else is in the batch; None turns
            the mode off (plain matmuls, outputs then vary in the last bits with the batch).
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
                y = nn.functional.linear(x, w, b)
            else:
                rows = x.reshape(-1, self.in_features)
                y = _invariant_linear(rows, w, b, chunk).view(*x.shape[:-1], self.out_features)
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
                out = _invariant_linear(rows, w, b, chunk)
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
            out = nn.functional.linear(rows, w, b)
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


@dataclass(frozen=True)
class TokenRoute:
    """A gate owner's routing of one call, reused by its follower.

    Attributes:
        batch_shape: (B, L) of the call.
        padding: the call's (B, L) padding mask or None.
        valid_index: (U,) flat positions b * L + l of the routed tokens (token routing with
            padding), or None when every position is a unit (token) or a sample is (context).
        plan: the dispatch plan over U units.
    """

    batch_shape: tuple[int, int]
    padding: torch.Tensor | None
    valid_index: torch.Tensor | None
    plan: DispatchPlan


class TokenRoutedLinear(_RoutedLinear):
    """Linear with token- or context-level routing and token dispatch.

    Token routing routes every non-padding token; context routing routes each sample by the
    masked mean of its tokens and sends all its positions to the chosen experts. Capacity
    C = ceil(capacity_factor * U * K / E) in training; eval is dropless unless
    `eval_capacity_factor` is set.

    Args:
        in_features: Din.
        out_features: Dout.
        moe: MoE settings.
        router: the gate this linear owns, or None for a follower.
        leader: the gate-owning linear whose routing is reused, or None.
        layer_index: encoder layer (telemetry).
        sublayer: sublayer name (telemetry).
        bias: experts have biases.
        fused_qkv: reference init fan for fused qkv weights.

    Attributes:
        expert_group: process group experts are sharded over (set by `parallel.shard_experts`).
        use_grouped_mm: run experts with `torch._grouped_mm` when the operands allow it.
        fused_dispatch: without expert parallelism or `use_grouped_mm`, run gather, experts and
            combine as one autograd node (`fused_dispatch.dispatch_linear`); False composes
            `gather_units`, `grouped_linear` and `combine_units` (same results, more memory).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        moe: MoEConfig,
        *,
        router: TokenRouter | ContextRouter | None,
        leader: TokenRoutedLinear | None = None,
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
        self.expert_group: ProcessGroup | None = None
        self.use_grouped_mm = False
        self.fused_dispatch = True
        self._memo: TokenRoute | None = None

    @property
    def context(self) -> bool:
        """Whether units are samples (context routing) rather than tokens."""
        return self.strategy == "context"

    def train(self, mode: bool = True) -> TokenRoutedLinear:
        """Switch mode and drop the memoised routing."""
        self._memo = None
        super().train(mode)
        return self

    def route(
        self, x: torch.Tensor, padding: torch.Tensor | None
    ) -> tuple[TokenRoute, dict[str, torch.Tensor]]:
        """Route one call (gate owners only).

        Args:
            x: (B, L, Din) inputs.
            padding: (B, L) bool padding mask or None.

        Returns:
            The routing and the loss/statistics tensors.
        """
        gate = self.gate
        assert gate is not None, "only the gate owner routes"
        batch, length, _ = x.shape
        valid_index = None
        chunk = self.row_chunk()
        if isinstance(gate, ContextRouter):
            gate_out = gate(x, padding, row_chunk=chunk)
        else:
            flat = x.reshape(batch * length, -1)
            if padding is not None:
                valid_index = torch.nonzero(~padding.reshape(-1)).squeeze(1)
                flat = flat.index_select(0, valid_index)
            gate_out = gate(flat, row_chunk=chunk)
        moe = self.moe
        top = select_top_k(gate_out.noisy_logits, moe.top_k)
        factor = moe.capacity_factor if self.training else moe.eval_capacity_factor
        units = int(top.expert_ids.shape[0])
        capacity = expert_capacity(units, moe.num_experts, moe.top_k, factor)
        plan = plan_dispatch(top, moe.num_experts, capacity, moe.batch_prioritized)
        stats = {
            "balance": balance_loss(top.probs, top.expert_ids[:, 0]),
            "z": router_z_loss(gate_out.logits),
            "importance": importance_loss(top.probs),
            "entropy": gate_entropy(top.probs.detach()),
        }
        return TokenRoute((batch, length), padding, valid_index, plan), stats

    def _units(self, x: torch.Tensor, route: TokenRoute) -> torch.Tensor:
        if self.context:
            return x
        flat = x.reshape(-1, 1, x.shape[-1])
        if route.valid_index is not None:
            flat = flat.index_select(0, route.valid_index)
        return flat

    def _run_experts(self, rows: torch.Tensor, plan: DispatchPlan, tokens: int) -> torch.Tensor:
        if self.expert_group is not None:
            from uniperceiver_cli.model.moe.parallel import expert_parallel_linear

            return expert_parallel_linear(
                rows, plan.counts * tokens, self.experts, self.expert_group
            )
        counts = [c * tokens for c in plan.counts.tolist()]
        return grouped_linear(
            rows, self.experts.weight, self.experts.bias, counts, self.use_grouped_mm
        )

    def _dispatch(self, x: torch.Tensor, route: TokenRoute) -> torch.Tensor:
        """Local experts, gather and weighted combine as one fused node: (B, L, Din) -> (B, L, Dout).

        Works on the flat (B * L) token rows: routed rows read and write their token's row
        directly, so padding positions (token routing) stay zero without a final scatter.
        """
        plan = route.plan
        batch, length = route.batch_shape
        row_weights = plan.weights.reshape(-1).index_select(0, plan.order)  # (M,)
        units = plan.units  # (M,)
        if self.context:
            # every position of the sample goes to the sample's experts
            offsets = torch.arange(length, device=units.device)
            rows = (units.unsqueeze(1) * length + offsets).reshape(-1)
            row_weights = row_weights.repeat_interleave(length)
            counts = [c * length for c in plan.counts.tolist()]
        else:
            rows = units if route.valid_index is None else route.valid_index.index_select(0, units)
            counts = plan.counts.tolist()
        y = dispatch_linear(
            x.reshape(batch * length, self.in_features),
            self.experts.weight,
            self.experts.bias,
            counts,
            rows,
            row_weights,
            rows,
            batch * length,
            row_chunk=self.row_chunk(),
        )
        return y.view(batch, length, self.out_features)

    def forward(
        self, x: torch.Tensor, routing: RoutingContext
    ) -> tuple[torch.Tensor, MoEAux | None]:
        """Dispatch tokens to their experts and combine the outputs.

        Args:
            x: (B, L, Din) inputs.
            routing: segments covering the L positions, the task and optional padding.

        Returns:
            (B, L, Dout) outputs (zero at padding positions under token routing; dropped tokens
            get zero from dropped assignments) and the aux record (None for a follower).
        """
        self._check_input(x, routing)
        batch, length, _ = x.shape
        padding = routing.padding
        if padding is not None and tuple(padding.shape) != (batch, length):
            raise RoutingError(
                f"RoutingContext.padding must be (B, L) = {(batch, length)}, "
                f"got {tuple(padding.shape)}"
            )
        stats: dict[str, torch.Tensor] = {}
        lead = self.leader
        if lead is None:
            route, stats = self.route(x, padding)
            self._memo = route
        else:
            assert isinstance(lead, TokenRoutedLinear)
            memo = lead._memo
            if memo is None or memo.batch_shape != (batch, length):
                found = None if memo is None else memo.batch_shape
                raise SharedDecisionError(
                    f"layers.{self.layer_index}.{self.sublayer} reuses the routing of "
                    f"layers.{lead.layer_index}.{lead.sublayer}, whose latest call had "
                    f"(B, L) = {found}, not {(batch, length)}; call the leader first with the "
                    "same batch"
                )
            if not _same_padding(memo.padding, padding):
                raise SharedDecisionError(
                    f"layers.{self.layer_index}.{self.sublayer} got a different padding mask than "
                    f"the latest call of layers.{lead.layer_index}.{lead.sublayer}; pass the same "
                    "RoutingContext to both linears of a pair"
                )
            route = memo
        fused = self.fused_dispatch and not self.use_grouped_mm
        # the batch-invariant eval mode always takes the fused node (it chunks every matmul)
        if self.expert_group is None and (fused or self.row_chunk() is not None):
            y = self._dispatch(x, route)
            return (y, None) if lead is not None else (y, self._aux(routing, route, stats, padding))
        tokens = length if self.context else 1
        units = self._units(x, route)
        rows = gather_units(units, route.plan)
        out_sorted = self._run_experts(rows, route.plan, tokens)
        y_units = combine_units(out_sorted, route.plan, tokens)  # (U, T, Dout)
        if self.context:
            y = y_units
        elif route.valid_index is None:
            y = y_units.view(batch, length, self.out_features)
        else:
            y = y_units.new_zeros((batch * length, self.out_features))
            y = y.index_copy(0, route.valid_index, y_units[:, 0])
            y = y.view(batch, length, self.out_features)
        if lead is not None:
            return y, None
        return y, self._aux(routing, route, stats, padding)

    def _aux(
        self,
        routing: RoutingContext,
        route: TokenRoute,
        stats: dict[str, torch.Tensor],
        padding: torch.Tensor | None,
    ) -> MoEAux:
        plan = route.plan
        batch, length = route.batch_shape
        n = self.moe.num_experts
        device = plan.expert_ids.device
        with torch.no_grad():
            assigned = torch.zeros((plan.num_units, n), device=device)
            assigned.scatter_add_(1, plan.expert_ids, plan.kept.float())  # (U, E)
            bounds = routing.boundaries()
            seg_of_pos = torch.zeros(length, dtype=torch.long, device=device)
            for s, (start, end) in enumerate(bounds):
                seg_of_pos[start:end] = s
            num_segments = len(bounds)
            if self.context:
                valid = torch.ones((batch, length), device=device)
                if padding is not None:
                    valid = (~padding).float()
                per_seg = torch.zeros((batch, num_segments), device=device)
                per_seg.index_add_(1, seg_of_pos, valid)  # (B, S) valid tokens
                by_segment = per_seg.t() @ assigned  # (S, E)
            else:
                positions = (
                    torch.arange(batch * length, device=device)
                    if route.valid_index is None
                    else route.valid_index
                )
                seg = seg_of_pos[positions % max(length, 1)]
                by_segment = torch.zeros((num_segments, n), device=device)
                by_segment.index_add_(0, seg, assigned)
        moe = self.moe
        loss = (
            moe.balance_loss_weight * stats["balance"]
            + moe.z_loss_weight * stats["z"]
            + moe.importance_loss_weight * stats["importance"]
        )
        return MoEAux(
            layer_index=self.layer_index,
            sublayer=self.sublayer,
            task=routing.task,
            strategy=self.strategy,
            tokens_per_expert=by_segment.sum(0),
            tokens_per_expert_by_segment=by_segment,
            gate_entropy=stats["entropy"],
            dropped_fraction=plan.dropped_fraction(),
            balance_loss=stats["balance"],
            z_loss=stats["z"],
            importance_loss=stats["importance"],
            loss=loss,
        )


RoutedLinear = SegmentRoutedLinear | TokenRoutedLinear


def _invariant_linear(
    rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, chunk: int
) -> torch.Tensor:
    """`chunked_linear` with the operand casts `F.linear` would get under autocast: (R, Dout)."""
    device_type = rows.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        rows, weight = rows.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    with torch.autocast(device_type=device_type, enabled=False):
        return chunked_linear(rows, weight, bias, chunk)


def _same_padding(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    return a.shape == b.shape and bool(torch.equal(a, b))


def validate_moe_config(config: ModelConfig) -> None:
    """Check the MoE settings a build relies on.

    Args:
        config: model configuration.

    Raises:
        MoEConfigError: naming the field, the value found and what to change.
    """
    moe = config.moe
    if moe is None:
        return
    if moe.routing not in ("token", "context", "modality", "task", "attribute"):
        raise MoEConfigError(f"moe.routing {moe.routing!r} is not a known strategy")
    if not 1 <= moe.top_k <= moe.num_experts:
        raise MoEConfigError(f"moe.top_k ({moe.top_k}) must be in 1..{moe.num_experts}")
    bad_layers = [i for i in moe.layers if not 0 <= i < config.num_layers]
    if bad_layers:
        raise MoEConfigError(
            f"moe.layers {bad_layers} are outside 0..{config.num_layers - 1} (num_layers)"
        )
    bad_sub = [s for s in moe.sublayers if s not in ("qkv", "attn_out", "ffn_in", "ffn_out")]
    if bad_sub:
        raise MoEConfigError(f"unknown moe.sublayers {bad_sub}; use qkv/attn_out/ffn_in/ffn_out")
    if moe.expert_parallel_size < 1 or moe.num_experts % moe.expert_parallel_size:
        raise MoEConfigError(
            f"moe.expert_parallel_size ({moe.expert_parallel_size}) must divide "
            f"moe.num_experts ({moe.num_experts})"
        )
    if moe.expert_parallel_size > 1 and moe.routing not in ("token", "context"):
        raise MoEConfigError(
            f"moe.expert_parallel_size={moe.expert_parallel_size} needs token or context routing "
            f"(got {moe.routing!r}); segment routing merges weights and keeps all experts local"
        )
    if moe.capacity_factor <= 0 or (
        moe.eval_capacity_factor is not None and moe.eval_capacity_factor <= 0
    ):
        raise MoEConfigError(
            f"capacity factors must be > 0, got capacity_factor={moe.capacity_factor}, "
            f"eval_capacity_factor={moe.eval_capacity_factor}"
        )


def build_router(
    config: ModelConfig, in_features: int
) -> TokenRouter | ContextRouter | SegmentRouter:
    """Build the gate of one gate-owning routed linear.

    Args:
        config: model configuration with `moe` set.
        in_features: input width of the linear (gate input of token/context routers).

    Returns:
        The router for `config.moe.routing`.
    """
    moe = config.moe
    assert moe is not None
    e, noise, std = moe.num_experts, moe.noise, moe.noise_std
    if moe.routing == "token":
        return TokenRouter(in_features, e, noise, std)
    if moe.routing == "context":
        return ContextRouter(in_features, e, noise, std)
    if moe.routing == "modality":
        return ModalityRouter(config.hidden_size, e, noise, std)
    if moe.routing == "task":
        return TaskRouter(
            config.hidden_size, e, noise, std, moe.task_names, moe.unseen_task, moe.fallback_task
        )
    return AttributeRouter(moe.attribute_length, config.hidden_size, e, noise, std, config.ln_eps)


def sublayer_shapes(config: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) features of the four block linears."""
    d, f = config.hidden_size, config.ffn_size
    return {"qkv": (d, 3 * d), "attn_out": (d, d), "ffn_in": (d, f), "ffn_out": (f, d)}


def _make_linear(
    config: ModelConfig,
    name: str,
    layer_index: int,
    leader: SegmentRoutedLinear | TokenRoutedLinear | None,
) -> SegmentRoutedLinear | TokenRoutedLinear:
    """One routed linear: a gate owner when `leader` is None, else a follower of `leader`."""
    moe = config.moe
    assert moe is not None
    fan_in, fan_out = sublayer_shapes(config)[name]
    fused = name == "qkv"
    if moe.routing in ("modality", "task", "attribute"):
        if leader is None:
            router = build_router(config, fan_in)
            assert isinstance(router, SegmentRouter)
            return SegmentRoutedLinear(
                fan_in,
                fan_out,
                moe,
                router=router,
                layer_index=layer_index,
                sublayer=name,
                fused_qkv=fused,
            )
        assert isinstance(leader, SegmentRoutedLinear)
        return SegmentRoutedLinear(
            fan_in,
            fan_out,
            moe,
            router=None,
            leader=leader,
            layer_index=layer_index,
            sublayer=name,
            fused_qkv=fused,
        )
    if leader is None:
        token_router = build_router(config, fan_in)
        assert isinstance(token_router, TokenRouter | ContextRouter)
        return TokenRoutedLinear(
            fan_in,
            fan_out,
            moe,
            router=token_router,
            layer_index=layer_index,
            sublayer=name,
            fused_qkv=fused,
        )
    assert isinstance(leader, TokenRoutedLinear)
    return TokenRoutedLinear(
        fan_in,
        fan_out,
        moe,
        router=None,
        leader=leader,
        layer_index=layer_index,
        sublayer=name,
        fused_qkv=fused,
    )


def build_routed_linears(config: ModelConfig, layer_index: int) -> dict[str, nn.Module]:
    """Routed replacements for the linears of one encoder block.

    Args:
        config: model configuration.
        layer_index: 0-based encoder layer.

    Returns:
        Sublayer name -> routed module for the sublayers of `config.moe.sublayers` when
        `layer_index` is in `config.moe.layers`, else an empty dict. In a pair whose both members
        are routed, the second one reuses the first one's decision and owns no gate.

    Raises:
        MoEConfigError: when the MoE settings cannot be built.
    """
    moe = config.moe
    if moe is None or layer_index not in moe.layers:
        return {}
    validate_moe_config(config)
    out: dict[str, nn.Module] = {}
    for pair in SHARED_PAIRS:
        leader: SegmentRoutedLinear | TokenRoutedLinear | None = None
        for name in pair:
            if name not in moe.sublayers:
                continue
            module = _make_linear(config, name, layer_index, leader)
            leader = leader or module
            out[name] = module
    return out
