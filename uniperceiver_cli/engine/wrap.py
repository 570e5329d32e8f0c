"""Wrapping the training module for speed and scale: activation checkpointing, `torch.compile` of
dense blocks, DDP / FSDP2, and the FSDP2 helpers the loop and checkpointing need."""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from uniperceiver_cli.engine.expert_parallel import ExpertParallel
from uniperceiver_cli.engine.runtime import Runtime
from uniperceiver_cli.engine.tasks import TrainingModule
from uniperceiver_cli.engine.train_types import TrainingError

logger = logging.getLogger(__name__)


def compile_blocks(model: nn.Module) -> None:
    """`torch.compile` every dense encoder block; blocks holding routed (MoE) linears stay eager.

    Routed linears keep Python-side routing plans and split sequences at data-dependent segment boundaries,
    which TorchDynamo cannot trace into one graph (an AOTAutograd shape assertion in torch 2.11), so their
    blocks run eagerly and the dense blocks are compiled.
    """
    skipped = 0
    for block in model.encoder.blocks():  # type: ignore[operator, union-attr]
        if any(
            not isinstance(m, nn.Linear)
            for m in (block.qkv, block.attn_out, block.ffn_in, block.ffn_out)
        ):
            skipped += 1
            continue
        block.compile()
    if skipped:
        logger.info("torch.compile: %d block(s) with routed MoE linears run eagerly", skipped)


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute every encoder block in backward (keeps parameter names unchanged)."""
    from torch.utils.checkpoint import checkpoint

    from uniperceiver_cli.model.encoder import EncoderBlock

    for module in model.modules():
        if isinstance(module, EncoderBlock):
            original = module.forward

            def wrapped(*args: Any, _f: Any = original, **kwargs: Any) -> Any:
                return checkpoint(_f, *args, use_reentrant=False, **kwargs)

            module.forward = wrapped  # type: ignore[method-assign]


def wrap_parallel(
    module: TrainingModule, runtime: Runtime, mode: str, ep: ExpertParallel | None
) -> nn.Module:
    """Wrap `module` in FSDP2 or DDP when the run is distributed; single-process runs get it back."""
    if not runtime.distributed:
        return module
    if mode == "fsdp2":
        if ep is not None:
            raise TrainingError(
                "runtime.distributed fsdp2 cannot shard a model whose experts are already sharded by "
                "expert parallelism; use runtime.distributed ddp with model.moe.expert_parallel_size > 1"
            )
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(runtime.device.type, (runtime.world_size,))
        # FSDP2 cannot shard 0-dim parameters (the logit scales, a head's similarity weight): they stay
        # replicated and their gradients are averaged by `sync_ignored_grads`.
        scalars = {p for p in module.parameters() if p.dim() == 0}
        fully_shard(module, mesh=mesh, reshard_after_forward=False, ignored_params=scalars)
        return module
    from torch.nn.parallel import DistributedDataParallel

    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    if ep is not None:
        # Expert shards differ per rank: their gradients are reduced by `ExpertParallel`, not by DDP.
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(  # type: ignore[no-untyped-call]
            module, [f"model.{n}" for n in ep.names]
        )
    return DistributedDataParallel(
        module, device_ids=ids, find_unused_parameters=True, broadcast_buffers=False
    )


def sync_ignored_grads(module: nn.Module, runtime: Runtime) -> None:
    """Average the gradients of parameters FSDP2 left replicated (0-dim ones) over ranks."""
    if not runtime.distributed or not is_fsdp(module):
        return
    import torch.distributed as dist

    for p in module.parameters():
        if p.dim() == 0 and p.requires_grad:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad, op=dist.ReduceOp.SUM)
            p.grad = grad / runtime.world_size


def is_fsdp(module: nn.Module) -> bool:
    """Whether `module` was sharded by FSDP2 (`fully_shard`)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)
