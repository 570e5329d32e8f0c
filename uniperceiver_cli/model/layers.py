"""Small building blocks of the encoder: drop path, the linear-call contract, attention masks (SPEC §1.8, §1.10).

The four linears of a block are plain `nn.Linear`s unless an MoE module was injected; `call_linear` is the one
place that knows the difference. The block itself lives in `encoder.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uniperceiver_cli.model.routing import RoutingContext


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch of a sample with probability `p` (training only).

    The reference uses the same fixed rate in every layer (`DROP_PATH_PROB_FIXED`).
    """

    def __init__(self, p: float) -> None:
        """Create the module; `p` in [0, 1)."""
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        """Apply to a residual branch (B, L, D); identity in eval mode or when p == 0."""
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        mask.bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        """Show the rate in `print(model)`."""
        return f"p={self.p}"


def call_linear(module: nn.Module, x: Tensor, routing: RoutingContext, aux: list[object]) -> Tensor:
    """Apply one of a block's four linears under the MoE-readiness contract.

    An `nn.Linear` is called as `module(x)`; any other module as `y, a = module(x, routing)`, where
    `routing` describes exactly the positions (dim 1) of `x`. A non-None `a` is appended to `aux`.

    Args:
        module: the linear or its MoE replacement.
        x: input (B, L, D_in).
        routing: routing context covering the L positions of `x`.
        aux: list collecting auxiliary outputs of MoE linears.

    Returns:
        (B, L, D_out).
    """
    if isinstance(module, nn.Linear):
        return module(x)  # type: ignore[no-any-return]
    y, extra = module(x, routing)
    if extra is not None:
        aux.append(extra)
    return y  # type: ignore[no-any-return]


def caption_attention_mask(
    prefix_len: int, num_words: int, device: torch.device | None = None
) -> Tensor:
    """Two-stream caption mask of SPEC §1.10.4, True = may attend (the SDPA convention).

    Layout of the L = prefix_len + 2n positions: `[SPE + visual (a = prefix_len); w_1..w_n; s_1..s_n]`.
    Rules: every row sees `[0, a)`; prefix rows see no text; `w_i` sees `w_j` iff j <= i and no `s`;
    `s_i` sees `w_j` iff j < i and, among `s`, only itself.

    Args:
        prefix_len: a = 1 + number of visual tokens.
        num_words: n, length of each text stream.
        device: where to build the mask.

    Returns:
        Boolean mask (L, L).
    """
    a, n = prefix_len, num_words
    total = a + 2 * n
    allowed = torch.zeros(total, total, dtype=torch.bool, device=device)
    allowed[:, :a] = True
    idx = torch.arange(n, device=device)
    causal = idx[None, :] <= idx[:, None]  # (n, n) j <= i
    allowed[a : a + n, a : a + n] = causal
    allowed[a + n :, a : a + n] = idx[None, :] < idx[:, None]  # s_i sees w_j, j < i
    allowed[a + n :, a + n :] = torch.eye(n, dtype=torch.bool, device=device)
    return allowed


def attend(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """Scaled dot-product attention over heads.

    Args:
        q: queries (B, H, Lq, Dh).
        k: keys (B, H, Lk, Dh).
        v: values (B, H, Lk, Dh).
        mask: None, a boolean mask broadcastable to (B, H, Lq, Lk) with True = may attend, or an
            additive float mask of that shape.

    Returns:
        (B, H, Lq, Dh).
    """
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
