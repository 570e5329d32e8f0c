"""Build a `UniPerceiver` from a `ModelConfig`, initialise it (SPEC §1.12) and count its parameters.

MoE linears come from the MoE package (`model/moe`, `build_routed_linears`) through `linears_for_layer`, and
initialise themselves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from uniperceiver_cli.model.config import ModelConfig
from uniperceiver_cli.model.embed import sincos_table
from uniperceiver_cli.model.encoder import LINEAR_NAMES, LinearsForLayer
from uniperceiver_cli.model.uniperceiver import UniPerceiver


def build_model(
    config: ModelConfig,
    linears_for_layer: LinearsForLayer | None = None,
    *,
    init: bool = True,
) -> UniPerceiver:
    """Create a model for `config` and initialise its weights.

    Args:
        config: the architecture.
        linears_for_layer: `i -> {name: module}` injecting linears (`qkv`, `attn_out`, `ffn_in`,
            `ffn_out`) into layer `i`; default for an MoE config: the MoE package's
            `build_routed_linears`.
        init: run the reference initialisation (skip when weights are loaded right after).

    Returns:
        The model, in training mode, on CPU.

    Raises:
        ValueError: if `config.moe` is set but no linears are injected.
    """
    if config.moe is not None and linears_for_layer is None:
        from uniperceiver_cli.model.moe import build_routed_linears

        def routed(i: int) -> Mapping[str, nn.Module]:
            return build_routed_linears(config, i)

        linears_for_layer = routed
    model = UniPerceiver(config, linears_for_layer)
    if init:
        init_weights(model)
    return model


def _xavier_uniform_(weight: torch.Tensor, fan_in: int, fan_out: int) -> None:
    bound = math.sqrt(6.0 / (fan_in + fan_out))
    with torch.no_grad():
        weight.uniform_(-bound, bound)


@torch.no_grad()
def init_weights(model: UniPerceiver) -> None:
    """Reference (MAE-style) initialisation, SPEC §1.12.

    Linear: Xavier-uniform, for the fused qkv with fan `(out/3 + in)`; biases 0. Embeddings N(0, 0.02^2).
    LayerNorm 1/0. Layer scales = `layer_scale_init`. Logit scales ln(1/temperature_init). Patch conv:
    Xavier-uniform on the D x (3*P*P) view, bias 0. Spatial table: sin-cos. Deep prompts N(0, 0.02^2), SPE bias 0.
    Injected (non-`nn.Linear`) MoE modules are left to initialise themselves.
    """
    cfg = model.config
    qkv_ids = {id(layer.qkv) for layer in model.encoder.blocks()}
    injected: set[int] = set()
    for layer in model.encoder.blocks():
        for name in LINEAR_NAMES:
            linear = getattr(layer, name)
            if not isinstance(linear, nn.Linear):
                injected.update(id(m) for m in linear.modules())
    for module in model.modules():
        if id(module) in injected:
            continue
        if isinstance(module, nn.Linear):
            out_f, in_f = module.weight.shape
            if id(module) in qkv_ids:
                _xavier_uniform_(module.weight, in_f, out_f // 3)
            else:
                _xavier_uniform_(module.weight, in_f, out_f)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, 0.02)
        elif isinstance(module, nn.LayerNorm):
            module.weight.fill_(1.0)
            module.bias.fill_(0.0)
    conv = model.embed.patch
    d = conv.weight.shape[0]
    _xavier_uniform_(conv.weight, conv.weight[0].numel(), d)
    if conv.bias is not None:
        conv.bias.zero_()
    model.embed.spatial.copy_(sincos_table(model.embed.grid_size, d, model.embed.pos_embed_scale))
    if model.embed.spe_bias is not None:
        model.embed.spe_bias.zero_()
    for layer in model.encoder.blocks():
        layer.gamma_1.fill_(cfg.layer_scale_init)
        layer.gamma_2.fill_(cfg.layer_scale_init)
        for prompt in (layer.prompt, layer.target_prompt):
            if prompt is not None:
                prompt.normal_(0.0, 0.02)
    for scale in model.head.logit_scales.values():
        scale.fill_(cfg.logit_scale_init)


def count_parameters(
    model: nn.Module, *, trainable_only: bool = False, include_buffers: bool = False
) -> int:
    """Count parameters (each shared tensor once).

    Args:
        model: any module.
        trainable_only: count only parameters with `requires_grad`.
        include_buffers: also count persistent buffers (e.g. the frozen spatial sin-cos table).

    Returns:
        Number of scalars.
    """
    total = sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
    if include_buffers:
        total += sum(b.numel() for b in model.buffers())
    return total
