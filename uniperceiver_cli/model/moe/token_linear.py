"""`TokenRoutedLinear`: token and context routing with capacity and expert dispatch.

Top-k, capacity, batch-prioritised routing and the fused per-expert matmul (`dispatch.py`,
`fused_dispatch.py`); experts may be sharded over ranks (`parallel.py`). In eval without gradients
every matmul runs on fixed row chunks, so a token's output is bitwise independent of the rest of
the batch (`invariant_chunk`, docs/moe.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from uniperceiver_cli.model.config import MoEConfig
from uniperceiver_cli.model.moe.dispatch import (
    DispatchPlan,
    combine_units,
    expert_capacity,
    gather_units,
    plan_dispatch,
    select_top_k,
)
from uniperceiver_cli.model.moe.expert_ffn import expert_ffn
from uniperceiver_cli.model.moe.experts import (
    grouped_linear,
)
from uniperceiver_cli.model.moe.fused_dispatch import dispatch_linear
from uniperceiver_cli.model.moe.losses import (
    balance_loss,
    gate_entropy,
    importance_loss,
    router_z_loss,
)
from uniperceiver_cli.model.moe.router import (
    ContextRouter,
    RoutingError,
    TokenRouter,
)
from uniperceiver_cli.model.moe.telemetry import MoEAux
from uniperceiver_cli.model.routing import RoutingContext

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

from uniperceiver_cli.model.moe.routed import SharedDecisionError, _RoutedLinear


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
                rows, plan.counts * tokens, self.experts, self.expert_group, self.cpu_gemm
            )
        counts = [c * tokens for c in plan.counts.tolist()]
        return grouped_linear(
            rows,
            self.experts.weight,
            self.experts.bias,
            counts,
            self.use_grouped_mm,
            cpu_gemm=self.cpu_gemm,
        )

    def _routed_rows(self, route: TokenRoute) -> tuple[torch.Tensor, list[int], torch.Tensor]:
        """Flat (B * L) token row, per-expert counts and combine weight of every routed row.

        Returns:
            (M,) int64 rows, expert-major; E counts (sum M); (M,) combine weights.
        """
        plan = route.plan
        length = route.batch_shape[1]
        row_weights = plan.weights.reshape(-1).index_select(0, plan.order)  # (M,)
        units = plan.units  # (M,)
        if self.context:
            # every position of the sample goes to the sample's experts
            offsets = torch.arange(length, device=units.device)
            rows = (units.unsqueeze(1) * length + offsets).reshape(-1)
            return (
                rows,
                [c * length for c in plan.counts.tolist()],
                row_weights.repeat_interleave(length),
            )
        rows = units if route.valid_index is None else route.valid_index.index_select(0, units)
        return rows, plan.counts.tolist(), row_weights

    def _dispatch(self, x: torch.Tensor, route: TokenRoute) -> torch.Tensor:
        """Local experts, gather and weighted combine as one fused node: (B, L, Din) -> (B, L, Dout).

        Works on the flat (B * L) token rows: routed rows read and write their token's row
        directly, so padding positions (token routing) stay zero without a final scatter.
        """
        batch, length = route.batch_shape
        rows, counts, row_weights = self._routed_rows(route)
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
            cpu_gemm=self.cpu_gemm,
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
        padding = self._checked_padding(x, routing)
        batch, length, _ = x.shape
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
        y = self._combined(out_sorted, route)
        if lead is not None:
            return y, None
        return y, self._aux(routing, route, stats, padding)

    def _combined(self, out_sorted: torch.Tensor, route: TokenRoute) -> torch.Tensor:
        """Weighted combine of expert-sorted outputs (M, Dout) into (B, L, Dout) token order."""
        batch, length = route.batch_shape
        tokens = length if self.context else 1
        y_units = combine_units(out_sorted, route.plan, tokens)  # (U, T, Dout)
        width = y_units.shape[-1]
        if self.context:
            return y_units
        if route.valid_index is None:
            return y_units.view(batch, length, width)
        y = y_units.new_zeros((batch * length, width))
        y = y.index_copy(0, route.valid_index, y_units[:, 0])
        return y.view(batch, length, width)

    def _checked_padding(self, x: torch.Tensor, routing: RoutingContext) -> torch.Tensor | None:
        """Check the input and return the (B, L) padding mask of the call (or None)."""
        self._check_input(x, routing)
        batch, length, _ = x.shape
        padding = routing.padding
        if padding is not None and tuple(padding.shape) != (batch, length):
            raise RoutingError(
                f"RoutingContext.padding must be (B, L) = {(batch, length)}, "
                f"got {tuple(padding.shape)}"
            )
        return padding

    def expert_ffn(
        self, x: torch.Tensor, second: TokenRoutedLinear, routing: RoutingContext
    ) -> tuple[torch.Tensor, MoEAux]:
        """Whole-FFN experts (`moe.expert_ffn`): this gate owner (`ffn_in`) and `second` (its
        follower `ffn_out`) as E FFNs, W2_e GELU(W1_e x + b1_e) + b2_e, mixed once per token.

        Args:
            x: (B, L, D) inputs (the block's normalised hidden states).
            second: the follower linear (F -> D) whose experts are the FFNs' second layers.
            routing: segments covering the L positions, the task and optional padding.

        Returns:
            (B, L, D) outputs (zero at padding positions under token routing; dropped tokens get
            zero from dropped assignments) and this layer's aux record.

        Raises:
            SharedDecisionError: when `second` does not follow this linear.
            RoutingError: when only one of the two linears is sharded (expert parallelism).
        """
        if self.leader is not None or second.leader is not self:
            raise SharedDecisionError(
                f"expert FFNs pair a gate owner with its follower; layers.{self.layer_index}."
                f"{self.sublayer} and layers.{second.layer_index}.{second.sublayer} are not one"
            )
        if self.expert_group is not second.expert_group:
            raise RoutingError(
                "expert FFNs need both linears' experts sharded over the same group, or neither"
            )
        padding = self._checked_padding(x, routing)
        batch, length, _ = x.shape
        route, stats = self.route(x, padding)
        self._memo = route
        if self.expert_group is not None:
            from uniperceiver_cli.model.moe.parallel import expert_parallel_ffn

            tokens = length if self.context else 1
            out_sorted = expert_parallel_ffn(
                gather_units(self._units(x, route), route.plan),
                route.plan.counts * tokens,
                self.experts,
                second.experts,
                self.expert_group,
                self.cpu_gemm,
            )
            return self._combined(out_sorted, route), self._aux(routing, route, stats, padding)
        rows, counts, row_weights = self._routed_rows(route)
        y = expert_ffn(
            x.reshape(batch * length, self.in_features),
            self.experts.weight,
            self.experts.bias,
            second.experts.weight,
            second.experts.bias,
            counts,
            rows,
            row_weights,
            row_chunk=self.row_chunk(),
            cpu_gemm=self.cpu_gemm,
        )
        return y.view(batch, length, second.out_features), self._aux(routing, route, stats, padding)

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


def _same_padding(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is b:
        return True
    if a is None or b is None:
        return False
    return a.shape == b.shape and bool(torch.equal(a, b))
