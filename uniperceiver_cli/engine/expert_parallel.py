"""Expert parallelism in the training loop (token/context routing, `model.moe.expert_parallel_size` P > 1).

Process groups: the W ranks form W / P *expert-parallel groups* of P consecutive ranks (`[0, P)`,
`[P, 2P)`, ...); rank `g·P + i` keeps experts `[i·E/P, (i+1)·E/P)` of every token-routed linear
(`uniperceiver_cli.model.moe.shard_experts`) and exchanges tokens with its group by all-to-all. Ranks that
hold the same experts (`i, i + P, ...`) form an *expert data-parallel group*.

Gradients: DDP averages the dense parameters over all W ranks and ignores the expert shards. The all-to-all
backward already brings every group member's gradient to the expert's owner, so an owner's gradient is the
sum over its group; `reduce_expert_grads` sums it over the expert data-parallel group and divides by W, which
is what DDP's average gives for a replicated tensor (one process with the global batch). Gradient clipping
uses the norm over all experts (`clip_grad_norm`), so every rank scales by the same factor.

Checkpoints keep the unsharded layout: on save, every expert tensor (weights and their Adam moments) is
gathered along the expert axis within each group and rank 0 writes full `(E, ...)` tensors, the same files as
a run without expert parallelism (so `uniperceiver_cli.load` reads them, and a run may resume with another P
or none). On load, every rank slices its experts out of the full tensors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from uniperceiver_cli.engine.runtime import Runtime

logger = logging.getLogger(__name__)


class ExpertParallelSetupError(RuntimeError):
    """The run asks for expert parallelism the process layout or the model cannot provide."""


@dataclass
class ExpertParallel:
    """This rank's expert-parallel layout.

    Attributes:
        size: P, ranks per expert-parallel group.
        world_size: W.
        group: this rank's expert-parallel group.
        replica_group: ranks holding the same experts (None when W == P).
        index: this rank's position in its group (which experts it holds).
        names: names (relative to the model) of the sharded expert parameters.
        params: the sharded parameters, by name.
    """

    size: int
    world_size: int
    group: dist.ProcessGroup
    replica_group: dist.ProcessGroup | None
    index: int
    names: tuple[str, ...]
    params: dict[str, nn.Parameter]

    def is_expert(self, name: str, prefix: str = "") -> bool:
        """Whether `name` (with `prefix` stripped) is a sharded expert tensor."""
        if prefix:
            if not name.startswith(prefix):
                return False
            name = name[len(prefix) :]
        return name in self.params

    # ------------------------------------------------------------------------------------------ grads

    def reduce_expert_grads(self) -> None:
        """Turn each owner's summed expert gradient into the global-batch average (see module docs).

        Experts that received no token get a zero gradient, as they do when one tensor holds all experts.
        """
        for p in self.params.values():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if self.replica_group is not None:
                dist.all_reduce(p.grad, group=self.replica_group)
            p.grad.div_(self.world_size)

    def clip_grad_norm(self, params: Iterable[nn.Parameter], max_norm: float) -> Tensor:
        """`torch.nn.utils.clip_grad_norm_` over dense parameters plus every rank's expert shards.

        Args:
            params: all trainable parameters of this rank (dense and expert shards).
            max_norm: the clip threshold (inf = only measure).

        Returns:
            The global gradient norm (0-dim, float32).
        """
        expert_ids = {id(p) for p in self.params.values()}
        dense_sq = torch.zeros((), dtype=torch.float64)
        expert_sq = torch.zeros((), dtype=torch.float64)
        grads: list[Tensor] = []
        for p in params:
            if p.grad is None:
                continue
            grads.append(p.grad)
            sq = p.grad.detach().double().pow(2).sum().cpu()
            if id(p) in expert_ids:
                expert_sq += sq
            else:
                dense_sq += sq
        device = grads[0].device if grads else torch.device("cpu")
        expert_sq = expert_sq.to(device)
        dist.all_reduce(expert_sq, group=self.group)
        total = torch.sqrt(dense_sq.to(device) + expert_sq).float()
        if math.isfinite(max_norm):
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for g in grads:
                g.mul_(coef.to(g.dtype))
        return total

    # ------------------------------------------------------------------------------------------ state

    def _gather(self, t: Tensor) -> Tensor:
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t.contiguous(), group=self.group)
        return torch.cat(parts, dim=0)

    def _slice(self, t: Tensor) -> Tensor:
        per = t.shape[0] // self.size
        return t[self.index * per : (self.index + 1) * per].clone()

    def gather_model_state(self, state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
        """Full expert tensors in a (CPU) model state dict; every rank must call it."""
        out = dict(state)
        for name in self.names:
            key = prefix + name
            out[key] = self._gather(state[key].to(self.params[name].device)).cpu()
        return out

    def slice_model_state(self, state: Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
        """This rank's experts out of full expert tensors (keys absent from `state` stay absent)."""
        out = dict(state)
        for name in self.names:
            key = prefix + name
            if key in out:
                out[key] = self._slice(out[key])
        return out

    def _expert_state_ids(self, optimizer: torch.optim.Optimizer) -> dict[int, str]:
        """Optimizer state-dict index → expert name (indices follow the param-group order)."""
        by_id = {id(p): n for n, p in self.params.items()}
        out: dict[int, str] = {}
        index = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in by_id:
                    out[index] = by_id[id(p)]
                index += 1
        return out

    def gather_optimizer_state(
        self, state: dict[str, Any], optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """The optimizer state dict with full-size moments of the expert parameters."""
        out = {"state": dict(state["state"]), "param_groups": state["param_groups"]}
        for idx in sorted(self._expert_state_ids(optimizer)):
            if idx not in out["state"]:  # no step taken yet: no moments on any rank
                continue
            entry = dict(out["state"][idx])
            for k, v in entry.items():
                if isinstance(v, Tensor) and v.dim() > 0:
                    entry[k] = self._gather(v).cpu()
            out["state"][idx] = entry
        return out

    def slice_optimizer_state(
        self, state: Mapping[str, Any], optimizer: torch.optim.Optimizer
    ) -> dict[str, Any]:
        """This rank's share of a full optimizer state dict."""
        out = {"state": dict(state["state"]), "param_groups": state["param_groups"]}
        for idx in self._expert_state_ids(optimizer):
            if idx not in out["state"]:
                continue
            entry = dict(out["state"][idx])
            for k, v in entry.items():
                if isinstance(v, Tensor) and v.dim() > 0:
                    entry[k] = self._slice(v)
            out["state"][idx] = entry
        return out


def setup_expert_parallel(model: nn.Module, runtime: Runtime) -> ExpertParallel | None:
    """Create the process groups and shard the experts of `model` (call on every rank, before the optimizer).

    Args:
        model: the built (and initialised) model with a `config.moe`.
        runtime: the run's runtime.

    Returns:
        The layout, or None without expert parallelism (P = 1, or a single process, where every expert
        stays local and the computation is the same).

    Raises:
        ExpertParallelSetupError: W not divisible by P, or routing other than token/context.
    """
    moe = getattr(getattr(model, "config", None), "moe", None)
    size = int(getattr(moe, "expert_parallel_size", 1) or 1)
    if moe is None or size <= 1:
        return None
    if moe.routing not in ("token", "context"):
        raise ExpertParallelSetupError(
            f"model.moe.expert_parallel_size={size} needs routing token or context, found "
            f"{moe.routing!r}; set expert_parallel_size to 1"
        )
    if not runtime.distributed:
        logger.info(
            "expert_parallel_size %d in a single process: every expert stays on this process", size
        )
        return None
    world = runtime.world_size
    if world % size:
        raise ExpertParallelSetupError(
            f"model.moe.expert_parallel_size={size} must divide the number of processes ({world}); "
            f"launch a multiple of {size} processes or change expert_parallel_size"
        )
    from uniperceiver_cli.model.moe import TokenRoutedLinear
    from uniperceiver_cli.model.moe.parallel import shard_experts

    rank = runtime.rank
    group: dist.ProcessGroup | None = None
    for g in range(world // size):
        ranks = list(range(g * size, (g + 1) * size))
        made = dist.new_group(ranks=ranks)
        if rank in ranks:
            group = made
    replica: dist.ProcessGroup | None = None
    if world > size:
        for i in range(size):
            ranks = list(range(i, world, size))
            made = dist.new_group(ranks=ranks)
            if rank in ranks:
                replica = made
    assert group is not None
    # DDP copies rank 0's dense parameters to every rank but skips the (ignored) expert tensors: copy the
    # full experts from rank 0 before sharding, so every rank shards the same initial weights.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, TokenRoutedLinear):
                dist.broadcast(module.experts.weight.data, src=0)
                if module.experts.bias is not None:
                    dist.broadcast(module.experts.bias.data, src=0)
    count = shard_experts(model, group)
    params: dict[str, nn.Parameter] = {}
    for name, module in model.named_modules():
        if isinstance(module, TokenRoutedLinear):
            params[f"{name}.experts.weight"] = module.experts.weight
            if module.experts.bias is not None:
                params[f"{name}.experts.bias"] = module.experts.bias
    logger.info(
        "expert parallelism: %d routed linears sharded over groups of %d ranks (%d groups)",
        count,
        size,
        world // size,
    )
    return ExpertParallel(
        size=size,
        world_size=world,
        group=group,
        replica_group=replica,
        index=rank % size,
        names=tuple(params),
        params=params,
    )
