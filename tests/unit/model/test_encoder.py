"""Encoder: a hand-written reference block, masks, deep prompts, the key/value cache and the MoE contract."""

from __future__ import annotations

import math
from collections.abc import Mapping

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uniperceiver_cli.model.build import build_model
from uniperceiver_cli.model.encoder import EncoderBlock
from uniperceiver_cli.model.layers import DropPath, caption_attention_mask
from uniperceiver_cli.model.presets import get_preset
from uniperceiver_cli.model.routing import RoutingContext, Segment, input_segments
from uniperceiver_cli.model.uniperceiver import UniPerceiver


def naive_block(block: EncoderBlock, x: Tensor, allowed: Tensor, prompts: Tensor | None) -> Tensor:
    """SPEC §1.8 written out with explicit loops over heads: x (B, L, D), allowed (B, L, Lk) bool."""
    b, _n, d = x.shape
    h = block.norm1(x)
    kv_in = h if prompts is None else torch.cat([block.norm1(prompts).expand(b, -1, -1), h], 1)
    w, bias = block.qkv.weight, block.qkv.bias
    q = h @ w[:d].t() + bias[:d]
    k = kv_in @ w[d : 2 * d].t() + bias[d : 2 * d]
    v = kv_in @ w[2 * d :].t() + bias[2 * d :]
    heads = []
    hd = block.head_dim
    for i in range(block.num_heads):
        sl = slice(i * hd, (i + 1) * hd)
        scores = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd)
        scores = scores.masked_fill(~allowed, float("-inf"))
        heads.append(torch.softmax(scores, -1) @ v[..., sl])
    attn = torch.cat(heads, -1) @ block.attn_out.weight.t() + block.attn_out.bias
    x = x + block.gamma_1 * attn
    f = F.gelu(block.norm2(x) @ block.ffn_in.weight.t() + block.ffn_in.bias)
    return x + block.gamma_2 * (f @ block.ffn_out.weight.t() + block.ffn_out.bias)


def caption_batch(model: UniPerceiver) -> dict[str, Tensor]:
    torch.manual_seed(3)
    words = torch.randint(0, 49000, (2, 5))
    words[1, 3:] = 0
    padding = torch.zeros(2, 5, dtype=torch.bool)
    padding[1, 3:] = True
    return {"images": torch.randn(2, 3, 32, 32), "words": words, "padding": padding}


@pytest.mark.parametrize("prompted", [False, True])
@torch.no_grad()
def test_encoder_matches_hand_written_block(
    tiny: UniPerceiver, tiny_prompted: UniPerceiver, prompted: bool
) -> None:
    model = tiny_prompted if prompted else tiny
    batch = caption_batch(model)
    words, pad = batch["words"], batch["padding"]
    n = words.shape[1]
    text = torch.cat([words, torch.full_like(words, 49410)], 1)
    a = 1 + 4
    mask = caption_attention_mask(a, n)
    full_pad = torch.cat([torch.zeros(2, a, dtype=torch.bool), pad, pad], 1)
    out = model.encode(
        task_type="image_caption",
        visual=batch["images"],
        text_ids=text,
        text_padding=torch.cat([pad, pad], 1),
        text_positions=torch.arange(n).repeat(2),
        attn_mask=mask,
        return_layer_inputs=True,
    )
    assert out.layer_inputs is not None
    x = out.layer_inputs[0]
    lp = model.encoder.num_prompts
    allowed = mask[None] & ~full_pad[:, None, :]
    allowed = torch.cat([torch.ones(2, x.shape[1], lp, dtype=torch.bool), allowed], 2)
    for i, block in enumerate(model.encoder.blocks()):
        x = naive_block(block, x, allowed, block.prompt)
        torch.testing.assert_close(x, out.layer_inputs[i + 1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x, out.hidden, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_additive_mask_equals_boolean(tiny: UniPerceiver) -> None:
    x = torch.randn(2, 7, 64)
    routing = RoutingContext("t", input_segments("mlm", text_len=6))
    allowed = torch.rand(7, 7) > 0.3
    allowed |= torch.eye(7, dtype=torch.bool)
    additive = torch.zeros(7, 7).masked_fill(~allowed, float("-inf"))
    a = tiny.encoder(x, routing, attn_mask=allowed).hidden
    b = tiny.encoder(x, routing, attn_mask=additive).hidden
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("prompted", [False, True])
@torch.no_grad()
def test_cache_equals_full_recomputation(
    tiny: UniPerceiver, tiny_prompted: UniPerceiver, prompted: bool
) -> None:
    model = tiny_prompted if prompted else tiny
    torch.manual_seed(5)
    prefix = torch.randn(3, 5, 64)
    tokens = torch.randn(3, 4, 64)
    pad = torch.tensor([[False] * 5, [False] * 5, [False, False, False, True, True]])
    x = torch.cat([prefix, tokens], 1)
    mask = torch.ones(9, 9, dtype=torch.bool)
    mask[:5, 5:] = False
    mask[5:, 5:] = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    full_pad = torch.cat([pad, torch.zeros(3, 4, dtype=torch.bool)], 1)
    route = RoutingContext("t", (Segment(9, "text", (0,) * 8),))
    full = model.encoder(x, route, attn_mask=mask, key_padding_mask=full_pad).hidden
    pre = model.encoder(
        prefix,
        RoutingContext("t", (Segment(5, "text", (0,) * 8),)),
        key_padding_mask=pad,
        cache_capacity=model.encoder.num_prompts + 9,
    )
    assert pre.cache is not None
    torch.testing.assert_close(pre.hidden, full[:, :5], rtol=1e-5, atol=1e-5)
    cache = pre.cache
    one = RoutingContext("t", (Segment(1, "text", (0,) * 8),))
    for t in range(4):
        step = model.encoder(tokens[:, t : t + 1], one, cache=cache, cache_keep=1)
        torch.testing.assert_close(step.hidden[:, 0], full[:, 5 + t], rtol=1e-5, atol=1e-5)
    assert cache.length == model.encoder.num_prompts + 9
    assert cache.num_prompts == model.encoder.num_prompts


class RecordingLinear(nn.Module):
    """A stand-in MoE linear: same math as its wrapped `nn.Linear`, records what it is called with."""

    def __init__(
        self, linear: nn.Linear, name: str, log: list[tuple[str, int, RoutingContext]]
    ) -> None:
        super().__init__()
        self.inner = linear
        self.name = name
        self.log = log

    def forward(self, x: Tensor, routing: RoutingContext) -> tuple[Tensor, object]:
        self.log.append((self.name, x.shape[1], routing))
        return self.inner(x), ("aux", self.name)


@torch.no_grad()
def test_injected_linears_follow_the_contract(tiny_prompted: UniPerceiver) -> None:
    log: list[tuple[str, int, RoutingContext]] = []
    cfg = tiny_prompted.config
    dense = tiny_prompted

    def linears(i: int) -> Mapping[str, nn.Module]:
        if i != 0:
            return {}
        src = dense.encoder.blocks()[0]
        return {
            name: RecordingLinear(getattr(src, name), name, log)
            for name in ("qkv", "attn_out", "ffn_in", "ffn_out")
        }

    routed = UniPerceiver(cfg, linears)
    state = {k.replace(".inner.", "."): v for k, v in routed.state_dict().items()}
    assert set(state) == set(dense.state_dict())
    routed.load_state_dict(dense.state_dict(), strict=False)
    for name, p in dense.named_parameters():
        if not name.startswith("encoder.layers.0."):
            routed.get_parameter(name).copy_(p)
    routed.eval()
    images = torch.randn(2, 3, 32, 32)
    words = torch.randint(0, 49000, (2, 3))
    vocab = torch.randn(50, 64)
    a = routed.caption_logits(images, words, None, vocab)
    b = dense.caption_logits(images, words, None, vocab)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert a.aux == [("aux", n) for n in ("qkv", "attn_out", "ffn_in", "ffn_out")]
    assert b.aux == []
    lp = cfg.prompt.length if cfg.prompt else 0
    seq = 1 + 4 + 6
    for name, length, routing in log:
        assert routing.length == length
        assert length == (lp + seq if name == "qkv" else seq)
    qkv_routing = log[0][2]
    assert [s.length for s in qkv_routing.segments] == [lp + 5, 6]  # prompts ride with segment 0
    assert qkv_routing.segments[1].attributes == (1, 1, 0, 1, 0, 1, 0, 1)  # caption text row


@torch.no_grad()
def test_dense_numerics_ignore_routing(tiny: UniPerceiver) -> None:
    x = torch.randn(2, 6, 64)
    r1 = RoutingContext("a", input_segments("image_caption", visual_len=2, text_len=3))
    r2 = RoutingContext("b", input_segments("mlm", text_len=5))
    assert torch.equal(tiny.encoder(x, r1).hidden, tiny.encoder(x, r2).hidden)


def test_routing_length_must_match(tiny: UniPerceiver) -> None:
    with pytest.raises(ValueError, match="routing context covers 4 positions"):
        tiny.encoder(torch.randn(1, 6, 64), RoutingContext("a", input_segments("mlm", text_len=3)))


def test_unknown_linear_name_rejected() -> None:
    with pytest.raises(ValueError, match="unknown linear names"):
        EncoderBlock(get_preset("tiny"), {"qkvv": nn.Linear(64, 192)})


def test_drop_path_training_only() -> None:
    torch.manual_seed(0)
    dp = DropPath(0.25)
    x = torch.ones(4000, 1, 1)
    dp.train()
    y = dp(x)
    kept = y != 0
    assert 0.7 < kept.float().mean().item() < 0.8
    assert torch.allclose(y[kept], torch.tensor(1 / 0.75))
    dp.eval()
    assert torch.equal(dp(x), x)
    with pytest.raises(ValueError):
        DropPath(1.0)


def test_drop_path_changes_training_outputs() -> None:
    model = build_model(get_preset("tiny", drop_path=0.5))
    x = torch.randn(8, 5, 64)
    route = RoutingContext("t", input_segments("mlm", text_len=4))
    model.train()
    torch.manual_seed(1)
    a = model.encoder(x, route).hidden
    torch.manual_seed(2)
    b = model.encoder(x, route).hidden
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model.encoder(x, route).hidden, model.encoder(x, route).hidden)
