"""Parameter counts of the `base` MoE preset, stored and folded, next to the released numbers.

Run with `-s` to see the table. The released MoE-Base file stores 422,668,811 numbers and deploys
as 167,265,803 for image-text retrieval (SPEC §2.8, two merged attribute sets per MoE linear).
"""

from __future__ import annotations

import torch
from torch import nn

from uniperceiver_cli.model.build import build_model
from uniperceiver_cli.model.config import MoEConfig
from uniperceiver_cli.model.moe import SegmentRoutedLinear, fold_report
from uniperceiver_cli.model.presets import get_preset

RELEASED_STORED = 422_668_811
RELEASED_FOLDED = 167_265_803
#: `video_embed.embeddings_type.weight` [1, 768]: stored by the reference, never added at runtime;
#: our model has no such tensor (the MoE importer ignores it by default).
VISUAL_TYPE_EMBEDDING = 768
#: image-text retrieval: visual input row and text target row (SPEC §2.3)
RETRIEVAL_ROWS = [(1, 0, 0, 1, 1, 0, 0, 0), (1, 0, 0, 1, 0, 1, 1, 0)]


def _stored(model: nn.Module) -> int:
    """Numbers in the state dict: parameters and persistent buffers, shared tensors once."""
    seen: dict[int, int] = {}
    for tensor in model.state_dict(keep_vars=True).values():
        seen[id(tensor)] = tensor.numel()
    return sum(seen.values())


def test_base_moe_preset_counts_next_to_the_released_ones() -> None:
    moe = MoEConfig(routing="attribute", num_experts=8, top_k=2, layers=(0, 2, 4, 6, 8, 10))
    with torch.device("meta"):
        model = build_model(get_preset("base", moe=moe), init=False)
    params = sum(p.numel() for p in model.parameters())
    stored = _stored(model)
    buffers = stored - params  # the fixed sin-cos spatial table, stored but not trained
    report = fold_report(model, RETRIEVAL_ROWS)
    folded_stored = report.params_after + buffers

    owners = [
        m for m in model.modules() if isinstance(m, SegmentRoutedLinear) and m.gate is not None
    ]
    gate = owners[0].gate
    assert gate is not None
    gate_size = sum(p.numel() for p in gate.parameters())
    dead_gates = len(moe.layers) * 2  # attn_out and ffn_out gates of every MoE layer (SPEC §2.6)
    lines = [
        "base MoE preset (8 experts, top-2, every other layer, 4 linears routed)",
        f"  stored : ours {stored:>11,}  released {RELEASED_STORED:>11,}  "
        f"diff {RELEASED_STORED - stored:,} = {dead_gates} dead gates x {gate_size:,} "
        f"({dead_gates * gate_size:,}) + visual type embedding ({VISUAL_TYPE_EMBEDDING})",
        f"  folded : ours {folded_stored:>11,}  released {RELEASED_FOLDED:>11,}  "
        f"diff {RELEASED_FOLDED - folded_stored:,} = visual type embedding",
        f"  trainable parameters: {params:,} stored, {report.params_after:,} folded "
        f"(the {buffers:,}-number sin-cos spatial table is a buffer)",
        f"  {report.routed_linears} routed linears, {report.merged_sets} merged sets each, "
        f"{len(owners)} live gates of {gate_size:,}",
    ]
    print("\n" + "\n".join(lines))

    assert report.routed_linears == 24 and report.merged_sets == 2
    assert len(owners) == 12
    # Linear(8 -> 768) + LayerNorm(768) + wg Linear(768 -> 8, no bias)
    assert gate_size == 8 * 768 + 768 + 2 * 768 + 768 * 8 == 14_592
    assert dead_gates * gate_size == 175_104
    assert buffers == 196 * 768
    assert RELEASED_STORED - stored == 175_104 + VISUAL_TYPE_EMBEDDING
    assert RELEASED_FOLDED - folded_stored == VISUAL_TYPE_EMBEDDING
    # folding replaces each routed linear's 8 experts and its gate by 2 dense merged linears
    assert params - report.params_after == 6 * (6 * 7_084_800 + 2 * gate_size)
