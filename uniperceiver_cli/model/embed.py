"""Token embeddings: text words, the SPE prefix, image/video patches, and the sin-cos table (SPEC §1.4-§1.7).

One `Embeddings` module owns every embedding table and the single LayerNorm that text and visual tokens share
(`SHARE_LAYERNORM` in the reference). Sequence assembly (concatenating SPE, visual and text parts) lives in
`uniperceiver.py`; attention and encoder code live in `layers.py` / `encoder.py`.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from uniperceiver_cli.model.config import ModelConfig

logger = logging.getLogger(__name__)

#: Id of the `<|spe|>` token (SPEC §1.3).
SPE_ID = 49410
#: Id of the `<|endoftext|>` token.
EOT_ID = 49407
#: Image side the reference's position scale is anchored to (stage 1 trained at 160 px, scale 1).
REFERENCE_IMAGE_SIZE = 160


def sincos_table(grid: int, dim: int, scale: float) -> Tensor:
    """Build the fixed 2-D sin-cos spatial position table (SPEC §1.6).

    For the flattened patch index `k = i * grid + j` (row `i`, column `j`), with `d4 = dim / 4`,
    `w_m = 1 / 10000^(m / d4)`, `u = scale * i` and `v = scale * j`, the row is
    `[sin(u w), cos(u w), sin(v w), cos(v w)]`.

    Args:
        grid: patches per image side (g).
        dim: embedding width D, a multiple of 4.
        scale: position scale s (160/224 for 224 px models trained from 160 px).

    Returns:
        Table of shape (g*g, D), float32.

    Raises:
        ValueError: if `dim` is not a multiple of 4 or `grid` < 1.
    """
    if dim % 4 != 0:
        raise ValueError(f"sin-cos table width must be a multiple of 4, got {dim}")
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    d4 = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(d4, dtype=torch.float64) / d4))  # (d4,)
    coords = torch.arange(grid, dtype=torch.float64) * scale  # (g,)
    rows = coords.repeat_interleave(grid)  # (g*g,) i of k = i*g + j
    cols = coords.repeat(grid)  # (g*g,) j
    u = rows[:, None] * omega[None, :]
    v = cols[:, None] * omega[None, :]
    table = torch.cat([u.sin(), u.cos(), v.sin(), v.cos()], dim=1)
    return table.to(torch.float32)


def rescaled_position_scale(scale: float, old_grid: int, new_grid: int) -> float:
    """Position scale for a new grid that keeps the table's coordinate span (SPEC §11.9).

    The reference rebuilds the table with `s = 160 / S` when the resolution changes, i.e. it keeps
    `s * g` constant; this generalises that rule to any starting scale and patch size.

    Args:
        scale: position scale of the current table.
        old_grid: current patches per side.
        new_grid: new patches per side.

    Returns:
        The scale to build the new table with.
    """
    return scale * old_grid / new_grid


class Embeddings(nn.Module):
    """All embedding tables of the model and the shared embedding LayerNorm.

    Attributes:
        word: token table (V, D).
        position: learned text position table (max_text_positions, D).
        token_type: text type table; only row 0 is ever added.
        norm: LayerNorm shared by text, SPE and visual tokens.
        patch: Conv2d(3, D, P, stride P) patch embedder (its bias holds the folded visual type embedding).
        temporal: learned frame table (max_frames, D).
        spatial: fixed sin-cos buffer (g*g, D); saved and loaded with the weights, never trained.
        spe_bias: prompt-tuning bias added to every SPE word embedding, or None.
    """

    spatial: Tensor

    def __init__(self, config: ModelConfig) -> None:
        """Create the tables for `config` (weights are initialised by `build.init_weights`)."""
        super().__init__()
        d = config.hidden_size
        self.config = config
        self.word = nn.Embedding(config.vocab_size, d)
        self.position = nn.Embedding(config.max_text_positions, d)
        self.token_type = nn.Embedding(config.type_vocab_size, d)
        self.norm = nn.LayerNorm(d, eps=config.ln_eps)
        p = config.patch_size
        self.patch = nn.Conv2d(3, d, kernel_size=p, stride=p)
        self.temporal = nn.Embedding(config.max_frames, d)
        self.register_buffer(
            "spatial", sincos_table(config.grid_size, d, config.pos_embed_scale), persistent=True
        )
        self.spe_bias: nn.Parameter | None = None
        if config.prompt is not None and config.prompt.spe_bias:
            self.spe_bias = nn.Parameter(torch.zeros(1, d))
        self.grid_size = config.grid_size
        self.pos_embed_scale = config.pos_embed_scale

    def _word(self, ids: Tensor) -> Tensor:
        """Word embeddings (..., D) of `ids`, plus the SPE bias where `ids == SPE_ID`."""
        e: Tensor = self.word(ids)
        if self.spe_bias is not None:
            e = e + (ids == SPE_ID).unsqueeze(-1).to(e.dtype) * self.spe_bias
        return e

    def spe(self, batch_size: int) -> Tensor:
        """Embed the SPE prefix: LN(W_tok[SPE]) with no position or type (SPEC §1.5).

        Args:
            batch_size: B.

        Returns:
            (B, 1, D).
        """
        ids = torch.full((1,), SPE_ID, dtype=torch.long, device=self.word.weight.device)
        e: Tensor = self.norm(self._word(ids))  # (1, D)
        return e.unsqueeze(0).expand(batch_size, 1, -1)

    def text(self, ids: Tensor, positions: Tensor | None = None) -> Tensor:
        """Embed text tokens: LN(W_tok[x] + W_pos[p] + W_type[0]) (SPEC §1.4).

        Args:
            ids: token ids (B, L) int64.
            positions: position ids (L,) or (B, L); default 0..L-1.

        Returns:
            (B, L, D).

        Raises:
            ValueError: if a position exceeds the learned table.
        """
        if ids.dim() != 2:
            raise ValueError(f"text ids must have shape (B, L), got {tuple(ids.shape)}")
        n = ids.shape[1]
        if positions is None:
            positions = torch.arange(n, device=ids.device)
            top = n - 1
        else:
            top = int(positions.max().item()) if positions.numel() else -1
        if top >= self.config.max_text_positions:
            raise ValueError(
                f"text position {top} exceeds the {self.config.max_text_positions}-row position table; "
                "shorten the text (truncate to max_text_positions tokens)"
            )
        e = self._word(ids) + self.position(positions) + self.token_type.weight[0]
        out: Tensor = self.norm(e)
        return out

    def visual(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Embed images or videos: LN(conv(x)_k + W_temporal[t + o] + W_spatial[k]) (SPEC §1.6).

        Tokens are frame-major, then patch rows (row-major). In training a temporal offset
        `o ~ U{0..max_frames - T}` is drawn once per batch from `generator` (or the default RNG);
        in eval `o = 0`.

        Args:
            x: already-normalised pixels (B, T, 3, S, S).
            generator: optional CPU generator for the temporal offset.

        Returns:
            (B, T*g*g, D).

        Raises:
            ValueError: on a wrong shape, a wrong image size or too many frames.
        """
        s = self.grid_size * self.config.patch_size
        if x.dim() != 5 or x.shape[2] != 3 or x.shape[3] != s or x.shape[4] != s:
            raise ValueError(
                f"visual input must have shape (B, T, 3, {s}, {s}), got {tuple(x.shape)}; "
                "resize the pixels or rebuild the spatial table with `UniPerceiver.set_image_size`"
            )
        b, t = x.shape[0], x.shape[1]
        max_frames = self.temporal.num_embeddings
        if not 1 <= t <= max_frames:
            raise ValueError(f"videos must have 1..{max_frames} frames, got {t}")
        offset = 0
        if self.training and t < max_frames:
            offset = int(torch.randint(0, max_frames - t + 1, (1,), generator=generator).item())
        feats = self.patch(x.reshape(b * t, 3, s, s))  # (B*T, D, g, g)
        feats = feats.flatten(2).transpose(1, 2)  # (B*T, g*g, D)
        d = feats.shape[-1]
        feats = feats.reshape(b, t, -1, d)  # (B, T, g*g, D)
        frames = self.temporal.weight[offset : offset + t]  # (T, D)
        pos = frames[:, None, :] + self.spatial[None, :, :]  # (T, g*g, D)
        out: Tensor = self.norm((feats + pos.to(feats.dtype)).reshape(b, -1, d))
        return out

    def set_grid(self, grid: int, scale: float) -> None:
        """Replace the spatial table with a freshly built one for a new grid (SPEC §8.2, §11.9).

        Args:
            grid: new patches per side.
            scale: position scale of the new table (see `rescaled_position_scale`).
        """
        table = sincos_table(grid, self.spatial.shape[1], scale)
        self.spatial = table.to(device=self.spatial.device, dtype=self.spatial.dtype)
        self.grid_size = grid
        self.pos_embed_scale = scale
