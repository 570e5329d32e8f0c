"""Shared check of the expert-parallel tests: one rank's sharded run equals the full layer.

Used by `test_moe_parallel.py` (torch.multiprocessing workers) and by `ep_torchrun_worker.py`
(launched with torchrun). Needs an initialised default process group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from moe_helpers import tiny_config
from torch import nn

from uniperceiver_cli.model.moe import TokenRoutedLinear, build_routed_linears
from uniperceiver_cli.model.moe.parallel import shard_experts
from uniperceiver_cli.model.routing import RoutingContext, input_segments

B, L = 3, 8
NUM_EXPERTS = 4
ROUTING = RoutingContext("caption", input_segments("image_caption", visual_len=4, text_len=3))


def _pair(
    routing: str, capacity: float | None, top_k: int, world: int, expert_ffn: bool
) -> tuple[TokenRoutedLinear, TokenRoutedLinear]:
    torch.manual_seed(0)
    config = tiny_config(
        routing=routing,
        num_experts=NUM_EXPERTS,
        top_k=top_k,
        noise="none",
        capacity_factor=capacity or 1.0,
        eval_capacity_factor=capacity,
        expert_parallel_size=world,
        expert_ffn=expert_ffn,
    )
    modules = build_routed_linears(config, 0)
    lead, follow = modules["ffn_in"], modules["ffn_out"]
    assert isinstance(lead, TokenRoutedLinear) and isinstance(follow, TokenRoutedLinear)
    return lead, follow


def _loss(
    lead: TokenRoutedLinear, follow: TokenRoutedLinear, x: torch.Tensor, rank: int, expert_ffn: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    if expert_ffn:
        out, aux = lead.expert_ffn(x, follow, ROUTING)
    else:
        y, aux = lead(x, ROUTING)
        out, _ = follow(F.gelu(y), ROUTING)
    assert aux is not None
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(50 + rank))
    return out, (out * target).sum() + aux.loss


def check_expert_parallel(
    routing: str, capacity: float | None, top_k: int = 2, expert_ffn: bool = False
) -> None:
    """Compare this rank's expert-parallel outputs and gradients with a single-process run.

    Every rank first runs the full (unsharded) pair on the inputs of all ranks, then the sharded
    pair on its own input. Outputs, input gradients, the local experts' gradients and the
    all-reduced router gradient must match (atol/rtol 1e-5).

    Args:
        routing: "token" or "context".
        capacity: capacity factor (training and eval), or None for dropless eval capacity.
        top_k: K.
        expert_ffn: run the pair as whole-FFN experts (`moe.expert_ffn`).

    Raises:
        AssertionError: on any mismatch.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    local_experts = NUM_EXPERTS // world
    inputs = [
        torch.randn(B, L, 16, generator=torch.Generator().manual_seed(100 + r)).requires_grad_()
        for r in range(world)
    ]
    lead, follow = _pair(routing, capacity, top_k, world, expert_ffn)
    outs = []
    total = torch.zeros(())
    for r, x in enumerate(inputs):
        out, loss = _loss(lead, follow, x, r, expert_ffn)
        outs.append(out.detach())
        total = total + loss
    total.backward()  # type: ignore[no-untyped-call]

    ep_lead, ep_follow = _pair(routing, capacity, top_k, world, expert_ffn)
    assert shard_experts(nn.ModuleDict({"a": ep_lead, "b": ep_follow})) == 2
    assert ep_lead.experts.num_local == local_experts
    assert ep_lead.experts.first_expert == local_experts * rank
    x = inputs[rank].detach().clone().requires_grad_()
    out, loss = _loss(ep_lead, ep_follow, x, rank, expert_ffn)
    loss.backward()  # type: ignore[no-untyped-call]
    torch.testing.assert_close(out, outs[rank], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, inputs[rank].grad, atol=1e-5, rtol=1e-5)
    local = slice(local_experts * rank, local_experts * (rank + 1))
    for ep, full in ((ep_lead, lead), (ep_follow, follow)):
        assert ep.experts.weight.grad is not None and full.experts.weight.grad is not None
        assert ep.experts.bias is not None and full.experts.bias is not None
        assert ep.experts.bias.grad is not None and full.experts.bias.grad is not None
        torch.testing.assert_close(
            ep.experts.weight.grad, full.experts.weight.grad[local], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            ep.experts.bias.grad, full.experts.bias.grad[local], atol=1e-5, rtol=1e-5
        )
    # replicated router: gradients summed over ranks (what DDP would do) equal the full ones
    assert ep_lead.gate is not None and lead.gate is not None
    ep_grad, full_grad = ep_lead.gate.wg.weight.grad, lead.gate.wg.weight.grad
    assert ep_grad is not None and full_grad is not None
    gate_grad = ep_grad.clone()
    dist.all_reduce(gate_grad)
    torch.testing.assert_close(gate_grad, full_grad, atol=1e-5, rtol=1e-5)
