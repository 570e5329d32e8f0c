"""Whole-FFN experts (`moe.expert_ffn`): the fused node against a per-row loop, on both GEMM
libraries, and the mode wired through the routed linears and the encoder block."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from moe_helpers import tiny_config

from uniperceiver_cli.model import gemm
from uniperceiver_cli.model.checkpoint import config_from_dict, config_to_dict
from uniperceiver_cli.model.encoder import EncoderBlock
from uniperceiver_cli.model.moe import TokenRoutedLinear, build_routed_linears, total_aux_loss
from uniperceiver_cli.model.moe.expert_ffn import expert_ffn
from uniperceiver_cli.model.routing import RoutingContext, input_segments

E, D, FF = 4, 24, 40


def _case(bias: bool, seed: int = 0) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(10, D, generator=gen)
    w1 = torch.randn(E, FF, D, generator=gen) / D**0.5
    w2 = torch.randn(E, D, FF, generator=gen) / FF**0.5
    b1 = torch.randn(E, FF, generator=gen) if bias else None
    b2 = torch.randn(E, D, generator=gen) if bias else None
    s = torch.rand(9, generator=gen)
    tensors = [x, w1, b1, w2, b2, s]
    for t in tensors:
        if t is not None:
            t.requires_grad_(True)
    return tensors


COUNTS = [3, 0, 4, 2]
ROWS = torch.tensor([0, 4, 9, 1, 4, 7, 8, 2, 5])  # rows 3 and 6 get nothing


def _loop(
    x: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor | None,
    w2: torch.Tensor,
    b2: torch.Tensor | None,
    s: torch.Tensor,
) -> torch.Tensor:
    """The obvious per-row sum: y[row] += s * FFN_e(x[row])."""
    experts = torch.repeat_interleave(torch.arange(E), torch.tensor(COUNTS))
    y = torch.zeros_like(x)
    for r in range(ROWS.shape[0]):
        e, row = int(experts[r]), int(ROWS[r])
        h = x[row] @ w1[e].t() + (0 if b1 is None else b1[e])
        out = F.gelu(h) @ w2[e].t() + (0 if b2 is None else b2[e])
        y = y.index_add(0, ROWS[r : r + 1], (s[r] * out).unsqueeze(0))
    return y


def _run(fn: object, bias: bool, **kwargs: object) -> tuple[torch.Tensor, list[torch.Tensor]]:
    tensors = _case(bias)
    x, w1, b1, w2, b2, s = tensors
    assert x is not None and w1 is not None and w2 is not None and s is not None
    if fn is _loop:
        y = _loop(x, w1, b1, w2, b2, s)
    else:
        y = expert_ffn(x, w1, b1, w2, b2, COUNTS, ROWS, s, **kwargs)  # type: ignore[arg-type]
    grad = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y * grad).sum().backward()  # type: ignore[no-untyped-call]
    return y.detach(), [t.grad for t in tensors if t is not None]  # type: ignore[misc]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "options",
    [
        {"cpu_gemm": "torch"},
        {"cpu_gemm": "torch", "row_multiple": 8},
        {"cpu_gemm": "onednn"},
    ],
    ids=["torch", "torch-padded", "onednn"],
)
def test_expert_ffn_equals_the_row_loop_with_gradients(
    bias: bool, options: dict[str, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    if options["cpu_gemm"] == "onednn":
        if not gemm.onednn_available():
            pytest.skip("no oneDNN in this torch")
        monkeypatch.setattr(gemm, "ONEDNN_MIN_WEIGHT", 0)  # these small experts qualify
    want_y, want_grads = _run(_loop, bias)
    y, grads = _run(expert_ffn, bias, **options)
    torch.testing.assert_close(y, want_y, rtol=1e-5, atol=1e-5)
    assert torch.equal(y[3], torch.zeros(D)) and torch.equal(y[6], torch.zeros(D))
    for ours, theirs in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    w1_grad, w2_grad = grads[1], grads[3 if bias else 2]
    assert torch.equal(w1_grad[1], torch.zeros(FF, D)) and torch.equal(
        w2_grad[1], torch.zeros(D, FF)
    )


def test_expert_ffn_chunked_eval_equals_plain() -> None:
    x, w1, b1, w2, b2, s = (t.detach() if t is not None else None for t in _case(True))
    assert x is not None and w1 is not None and w2 is not None and s is not None
    with torch.no_grad():
        plain = expert_ffn(x, w1, b1, w2, b2, COUNTS, ROWS, s, cpu_gemm="torch")
        chunked = expert_ffn(x, w1, b1, w2, b2, COUNTS, ROWS, s, row_chunk=8, cpu_gemm="torch")
    torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-5)


def test_expert_ffn_under_bf16_autocast_keeps_weight_gradients_in_their_dtype() -> None:
    x, w1, b1, w2, b2, s = _case(True)
    assert x is not None and w1 is not None and w2 is not None and s is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = expert_ffn(x, w1, b1, w2, b2, COUNTS, ROWS, s)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()  # type: ignore[no-untyped-call]
    assert w1.grad is not None and w1.grad.dtype == torch.float32
    want = _loop(x.detach(), w1.detach(), b1, w2.detach(), b2, s.detach())
    torch.testing.assert_close(y.float(), want.detach(), rtol=5e-2, atol=5e-2)


def _block(
    expert_ffn: bool, experts: int = 4, top_k: int = 2, routing: str = "token"
) -> EncoderBlock:
    config = tiny_config(
        routing=routing,
        num_experts=experts,
        top_k=top_k,
        sublayers=("ffn_in", "ffn_out"),
        expert_ffn=expert_ffn,
        noise="none",
    )
    torch.manual_seed(0)
    block = EncoderBlock(config, build_routed_linears(config, 0))
    with torch.no_grad():  # a layer scale of 1, so the FFN shows in the output
        block.gamma_2.fill_(1.0)
    return block


ROUTING = RoutingContext("t", input_segments("image_classification", visual_len=5))


def test_one_expert_top1_gives_the_same_block_output_in_both_modes() -> None:
    """With one expert and K = 1 (weight 1) mixing after each linear or once is the same FFN."""
    x = torch.randn(3, 6, 16)
    outputs = []
    for mode in (False, True):
        block = _block(mode, experts=1, top_k=1).eval()
        assert block.expert_ffn is mode
        with torch.no_grad():
            y, aux = block(x, ROUTING, None)
        assert [a.name for a in aux] == ["layers.0.ffn_in"]  # type: ignore[attr-defined]
        outputs.append(y)
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


def test_expert_ffns_train_every_expert_layer_and_the_gate() -> None:
    block = _block(True).train()
    x = torch.randn(4, 6, 16, requires_grad=True)
    y, aux = block(x, ROUTING, None)
    loss = y.square().mean() + total_aux_loss(aux)  # type: ignore[operator]
    loss.backward()  # type: ignore[no-untyped-call]
    ffn_in, ffn_out = block.ffn_in, block.ffn_out
    assert isinstance(ffn_in, TokenRoutedLinear) and isinstance(ffn_out, TokenRoutedLinear)
    assert ffn_in.gate is not None and ffn_out.gate is None
    for p in (ffn_in.experts.weight, ffn_out.experts.weight, x, *ffn_in.gate.parameters()):
        assert p.grad is not None and bool(p.grad.abs().sum() > 0)
    baseline = _block(False).train()
    torch.manual_seed(1)
    y_linear, _ = baseline(x, ROUTING, None)
    assert not torch.allclose(y_linear, y), "the two mixing modes compute different functions"


@pytest.mark.parametrize("routing", ["token", "context"])
def test_expert_ffn_eval_is_bitwise_batch_invariant(routing: str) -> None:
    block = _block(True, routing=routing).eval()
    pool = torch.randn(7, 6, 16)
    with torch.no_grad():
        full, _ = block(pool, ROUTING, None)
        for index in ([3], [5, 0], [6, 2, 4, 1]):
            out, _ = block(pool[torch.tensor(index)], ROUTING, None)
            for row, sample in enumerate(index):
                assert torch.equal(out[row], full[sample]), f"sample {sample} in batch {index}"


def test_expert_ffn_survives_the_checkpoint_config_round_trip() -> None:
    config = tiny_config(routing="token", sublayers=("ffn_in", "ffn_out"), expert_ffn=True)
    again = config_from_dict(json.loads(json.dumps(config_to_dict(config))))
    assert again == config and again.moe is not None and again.moe.expert_ffn
