"""Expert parallelism on 2 gloo processes equals the single-process layer holding all experts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from moe_helpers import tiny_config
from torch import nn

from uniperceiver_cli.model.moe import TokenRoutedLinear, build_routed_linears
from uniperceiver_cli.model.moe.parallel import shard_experts
from uniperceiver_cli.model.routing import RoutingContext, input_segments

WORLD = 2
B, L = 3, 8
ROUTING = RoutingContext("caption", input_segments("image_caption", visual_len=4, text_len=3))


def _pair(routing: str, capacity: float | None) -> tuple[TokenRoutedLinear, TokenRoutedLinear]:
    torch.manual_seed(0)
    config = tiny_config(
        routing=routing,
        num_experts=4,
        top_k=2,
        noise="none",
        capacity_factor=capacity or 1.0,
        eval_capacity_factor=capacity,
        expert_parallel_size=WORLD,
    )
    modules = build_routed_linears(config, 0)
    lead, follow = modules["ffn_in"], modules["ffn_out"]
    assert isinstance(lead, TokenRoutedLinear) and isinstance(follow, TokenRoutedLinear)
    return lead, follow


def _loss(
    lead: nn.Module, follow: nn.Module, x: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    y, aux = lead(x, ROUTING)
    out, _ = follow(F.gelu(y), ROUTING)
    target = torch.randn(out.shape, generator=torch.Generator().manual_seed(50 + rank))
    return out, (out * target).sum() + aux.loss


def _check(rank: int, routing: str, capacity: float | None) -> None:
    inputs = [
        torch.randn(B, L, 16, generator=torch.Generator().manual_seed(100 + r)).requires_grad_()
        for r in range(WORLD)
    ]
    lead, follow = _pair(routing, capacity)
    outs = []
    total = torch.zeros(())
    for r, x in enumerate(inputs):
        out, loss = _loss(lead, follow, x, r)
        outs.append(out.detach())
        total = total + loss
    total.backward()

    ep_lead, ep_follow = _pair(routing, capacity)
    assert shard_experts(nn.ModuleDict({"a": ep_lead, "b": ep_follow})) == 2
    assert ep_lead.experts.num_local == 2 and ep_lead.experts.first_expert == 2 * rank
    x = inputs[rank].detach().clone().requires_grad_()
    out, loss = _loss(ep_lead, ep_follow, x, rank)
    loss.backward()
    torch.testing.assert_close(out, outs[rank], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x.grad, inputs[rank].grad, atol=1e-5, rtol=1e-5)
    local = slice(2 * rank, 2 * rank + 2)
    for ep, full in ((ep_lead, lead), (ep_follow, follow)):
        torch.testing.assert_close(
            ep.experts.weight.grad, full.experts.weight.grad[local], atol=1e-5, rtol=1e-5
        )
        torch.testing.assert_close(
            ep.experts.bias.grad, full.experts.bias.grad[local], atol=1e-5, rtol=1e-5
        )
    # replicated router: gradients summed over ranks (what DDP would do) equal the full ones
    gate_grad = ep_lead.gate.wg.weight.grad.clone()  # type: ignore[union-attr]
    dist.all_reduce(gate_grad)
    torch.testing.assert_close(gate_grad, lead.gate.wg.weight.grad, atol=1e-5, rtol=1e-5)  # type: ignore[union-attr]


def _worker(rank: int, init_file: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        for routing in ("token", "context"):
            for capacity in (None, 0.5):
                _check(rank, routing, capacity)
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.distributed
def test_expert_parallel_matches_single_process(tmp_path: Path) -> None:
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_worker, args=(str(tmp_path / "init"),), nprocs=WORLD, join=True)
