"""CUDA smoke test of every routing strategy (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from moe_helpers import tiny_config

from uniperceiver_cli.model.moe import build_routed_linears
from uniperceiver_cli.model.routing import RoutingContext, input_segments

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("routing", ["token", "context", "modality", "task", "attribute"])
def test_cuda_forward_backward_and_eval(routing: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device = torch.device("cuda")
    modules = build_routed_linears(
        tiny_config(routing=routing, task_names=("caption",), capacity_factor=0.75), 0
    )
    for m in modules.values():
        m.to(device)
        gate = getattr(m, "gate", None)
        if gate is not None:
            gate.generator = torch.Generator(device="cpu").manual_seed(0)
    padding = torch.zeros(2, 8, dtype=torch.bool, device=device)
    padding[1, 6:] = True
    ctx = RoutingContext(
        "caption", input_segments("image_caption", visual_len=4, text_len=3), padding
    )
    x = torch.randn(2, 8, 16, device=device, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h, aux = modules["ffn_in"](x, ctx)
        y, _ = modules["ffn_out"](torch.nn.functional.gelu(h), ctx)
    assert aux is not None and aux.tokens_per_expert.device.type == "cuda"
    (y.float().square().mean() + aux.loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for m in modules.values():
        m.eval()
    with torch.no_grad():
        first, _ = modules["ffn_in"](x, ctx)
        second, _ = modules["ffn_in"](x, ctx)
        cpu_module = modules["ffn_in"].to("cpu")
        on_cpu, _ = cpu_module(x.cpu(), RoutingContext(ctx.task, ctx.segments, padding.cpu()))
    assert torch.equal(first, second)
    torch.testing.assert_close(first.cpu(), on_cpu, atol=1e-4, rtol=1e-4)
