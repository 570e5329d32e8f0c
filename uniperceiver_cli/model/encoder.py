"""The shared pre-LN Transformer encoder: blocks, deep prompts, masks and the key/value cache (SPEC §1.8).

Each block owns its four linears as `qkv` (D->3D), `attn_out` (D->D), `ffn_in` (D->F) and `ffn_out` (F->D); an
MoE module injected through `linears` replaces the default `nn.Linear` of that name and is called with the
`RoutingContext` of exactly the positions it transforms (see `layers.call_linear`). Auxiliary MoE outputs flow back
through `EncoderOutput.aux`. Incremental decoding caches per-layer keys/values in preallocated buffers (`KVCache`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from uniperceiver_cli.model.config import ModelConfig
from uniperceiver_cli.model.gemm import GemmLinear
from uniperceiver_cli.model.layers import DropPath, attend, call_linear
from uniperceiver_cli.model.moe.token_linear import TokenRoutedLinear
from uniperceiver_cli.model.routing import RoutingContext

LINEAR_NAMES: tuple[str, ...] = ("qkv", "attn_out", "ffn_in", "ffn_out")

#: Builds the linears to inject into layer `i` (MoE), by name.
LinearsForLayer = Callable[[int], Mapping[str, nn.Module]]


@dataclass
class KVCache:
    """Per-layer key/value buffers for incremental decoding, filled in place.

    Positions `[0, num_prompts)` hold the deep prompts (always visible), `[num_prompts, length)` the cached
    tokens. Buffers have room for `capacity` positions; calls write new keys/values past `length` and then
    keep only the first positions they were asked to keep.

    Attributes:
        keys: per layer, (B, H, capacity, Dh).
        values: per layer, (B, H, capacity, Dh).
        key_padding: (B, capacity) bool, True = padding.
        length: filled positions, prompts included.
        num_prompts: deep-prompt positions at the front.
    """

    keys: list[Tensor]
    values: list[Tensor]
    key_padding: Tensor
    length: int = 0
    num_prompts: int = 0

    @property
    def capacity(self) -> int:
        """Positions the buffers can hold."""
        return int(self.key_padding.shape[1])

    @property
    def num_tokens(self) -> int:
        """Cached token positions, prompts excluded."""
        return self.length - self.num_prompts

    def reorder(self, index: Tensor, start: int = 0) -> None:
        """Reorder the batch rows of positions `[start, length)` in place (beam search).

        Args:
            index: (B,) new row -> old row.
            start: first position to reorder; rows before it must already agree across the
                reordered rows (e.g. a prefix shared by all beams of one image).
        """
        end = self.length
        if end <= start:
            return
        for buf in (*self.keys, *self.values):
            buf[:, :, start:end] = buf[index, :, start:end]
        self.key_padding[:, start:end] = self.key_padding[index, start:end]

    def repeat_interleave(self, repeats: int, capacity: int | None = None) -> KVCache:
        """Return a new cache with every batch row repeated `repeats` times (B -> B*repeats).

        Args:
            repeats: copies of each row.
            capacity: capacity of the new buffers (default: the current one).
        """
        cap = self.capacity if capacity is None else capacity
        if cap < self.length:
            raise ValueError(f"capacity {cap} is smaller than the cached length {self.length}")

        def grow(buf: Tensor) -> Tensor:
            b, h, _, dh = buf.shape
            out = buf.new_zeros(b * repeats, h, cap, dh)
            out[:, :, : self.length] = buf[:, :, : self.length].repeat_interleave(repeats, dim=0)
            return out

        pad = self.key_padding.new_zeros(self.key_padding.shape[0] * repeats, cap)
        pad[:, : self.length] = self.key_padding[:, : self.length].repeat_interleave(repeats, dim=0)
        return KVCache(
            keys=[grow(k) for k in self.keys],
            values=[grow(v) for v in self.values],
            key_padding=pad,
            length=self.length,
            num_prompts=self.num_prompts,
        )


@dataclass
class EncoderOutput:
    """What one encoder call returns.

    Attributes:
        hidden: output of the last layer (B, L, D); there is no final LayerNorm.
        aux: auxiliary outputs of MoE linears, in call order (empty for a dense model).
        layer_inputs: if requested, L+1 tensors (B, L, D): the input of every layer, then the output.
        cache: the key/value cache written by this call, if any.
    """

    hidden: Tensor
    aux: list[object] = field(default_factory=list)
    layer_inputs: list[Tensor] | None = None
    cache: KVCache | None = None


class EncoderBlock(nn.Module):
    """Pre-LN block with layer scale and drop path (SPEC §1.8).

    `h = x + g1 * DropPath(Attn(LN1(x)))`, `y = h + g2 * DropPath(W2 GELU(W1 LN2(h)))`. Deep prompts
    (prompt tuning) are passed through LN1 and prepended to the keys/values only.
    """

    def __init__(self, config: ModelConfig, linears: Mapping[str, nn.Module] | None = None) -> None:
        """Build the block; any name of `LINEAR_NAMES` in `linears` replaces the default `nn.Linear`."""
        super().__init__()
        d, f = config.hidden_size, config.ffn_size
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        given = dict(linears or {})
        unknown = set(given) - set(LINEAR_NAMES)
        if unknown:
            raise ValueError(
                f"unknown linear names {sorted(unknown)}; expected a subset of {LINEAR_NAMES}"
            )
        self.norm1 = nn.LayerNorm(d, eps=config.ln_eps)
        self.qkv = given.get("qkv") or GemmLinear(d, 3 * d)
        self.attn_out = given.get("attn_out") or GemmLinear(d, d)
        self.norm2 = nn.LayerNorm(d, eps=config.ln_eps)
        self.ffn_in = given.get("ffn_in") or GemmLinear(d, f)
        self.ffn_out = given.get("ffn_out") or GemmLinear(f, d)
        # whole-FFN experts (moe.expert_ffn): ffn_in and ffn_out run as one routed FFN
        self.expert_ffn = (
            config.moe is not None
            and config.moe.expert_ffn
            and isinstance(self.ffn_in, TokenRoutedLinear)
            and isinstance(self.ffn_out, TokenRoutedLinear)
        )
        self.gamma_1 = nn.Parameter(torch.full((d,), config.layer_scale_init))
        self.gamma_2 = nn.Parameter(torch.full((d,), config.layer_scale_init))
        self.drop_path = DropPath(config.drop_path)
        self.prompt: nn.Parameter | None = None
        self.target_prompt: nn.Parameter | None = None
        if config.prompt is not None:
            self.prompt = nn.Parameter(torch.zeros(config.prompt.length, d))
            if config.prompt.target_prompts:
                self.target_prompt = nn.Parameter(torch.zeros(config.prompt.length, d))

    def prompts_for(self, target_side: bool) -> Tensor | None:
        """Deep prompts (Lp, D) for input- or target-side sequences, or None without prompt tuning."""
        if target_side and self.target_prompt is not None:
            return self.target_prompt
        return self.prompt

    def forward(
        self,
        x: Tensor,
        routing: RoutingContext,
        mask: Tensor | None,
        *,
        target_side: bool = False,
        kv: tuple[Tensor, Tensor, int] | None = None,
        add_prompts: bool = True,
    ) -> tuple[Tensor, list[object]]:
        """Run the block.

        Args:
            x: (B, L, D).
            routing: routing context of the L positions of `x`.
            mask: attention mask over the key axis `[prompts; cached; x]`, broadcastable to
                (B, H, L, Lk); boolean (True = may attend) or additive; None = attend to all.
            target_side: use the target-side deep prompts.
            kv: optional `(key_buffer, value_buffer, start)`: the new keys/values (prompts first, if
                added) are written at `start` and attention runs over `[0, start + new)` of the buffers.
            add_prompts: prepend this block's deep prompts to the keys/values of this call.

        Returns:
            Output (B, L, D) and the auxiliary outputs of MoE linears.
        """
        aux: list[object] = []
        b, n, d = x.shape
        h = self.norm1(x)
        prompts = self.prompts_for(target_side) if add_prompts else None
        num_p = 0
        qkv_routing = routing
        if prompts is not None:
            num_p = prompts.shape[0]
            p = self.norm1(prompts).unsqueeze(0).expand(b, -1, -1)  # (B, Lp, D)
            h = torch.cat([p.to(h.dtype), h], dim=1)
            qkv_routing = routing.with_prefix(num_p)
        qkv = call_linear(self.qkv, h, qkv_routing, aux)  # (B, Lp+L, 3D)
        qkv = qkv.reshape(b, num_p + n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0][:, :, num_p:], qkv[1], qkv[2]  # q (B, H, L, Dh); k, v (B, H, Lp+L, Dh)
        if kv is not None:
            kbuf, vbuf, start = kv
            end = start + k.shape[2]
            kbuf[:, :, start:end] = k
            vbuf[:, :, start:end] = v
            k, v = kbuf[:, :, :end], vbuf[:, :, :end]
        o = attend(q, k, v, mask)  # (B, H, L, Dh)
        o = o.transpose(1, 2).reshape(b, n, d)
        o = call_linear(self.attn_out, o, routing, aux)
        x = x + self.drop_path(self.gamma_1 * o)
        if self.expert_ffn:
            assert isinstance(self.ffn_in, TokenRoutedLinear)
            assert isinstance(self.ffn_out, TokenRoutedLinear)
            f, ffn_aux = self.ffn_in.expert_ffn(self.norm2(x), self.ffn_out, routing)
            aux.append(ffn_aux)
        else:
            f = call_linear(self.ffn_in, self.norm2(x), routing, aux)
            f = call_linear(self.ffn_out, F.gelu(f), routing, aux)
        x = x + self.drop_path(self.gamma_2 * f)
        return x, aux


class Encoder(nn.Module):
    """A stack of `EncoderBlock`s shared by every sequence (no final LayerNorm)."""

    def __init__(
        self,
        config: ModelConfig,
        linears_for_layer: LinearsForLayer | None = None,
    ) -> None:
        """Build `config.num_layers` blocks; `linears_for_layer(i)` may inject MoE linears."""
        super().__init__()
        self.config = config
        self.layers = nn.ModuleList(
            EncoderBlock(config, linears_for_layer(i) if linears_for_layer else None)
            for i in range(config.num_layers)
        )

    def blocks(self) -> list[EncoderBlock]:
        """The blocks, typed (`self.layers` is an `nn.ModuleList`)."""
        return [layer for layer in self.layers if isinstance(layer, EncoderBlock)]

    @property
    def num_prompts(self) -> int:
        """Deep-prompt length per layer (0 without prompt tuning)."""
        return self.config.prompt.length if self.config.prompt is not None else 0

    def new_cache(self, batch_size: int, capacity: int, like: Tensor) -> KVCache:
        """Allocate an empty cache for `capacity` positions (prompts included).

        Args:
            batch_size: B.
            capacity: positions to reserve.
            like: a tensor whose dtype/device the buffers take.
        """
        shape = (batch_size, self.config.num_heads, capacity, self.config.head_dim)
        n = self.config.num_layers
        return KVCache(
            keys=[like.new_zeros(shape) for _ in range(n)],
            values=[like.new_zeros(shape) for _ in range(n)],
            key_padding=torch.zeros(batch_size, capacity, dtype=torch.bool, device=like.device),
        )

    def forward(
        self,
        x: Tensor,
        routing: RoutingContext,
        *,
        attn_mask: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        target_side: bool = False,
        cache: KVCache | None = None,
        cache_keep: int | None = None,
        cache_capacity: int | None = None,
        return_layer_inputs: bool = False,
    ) -> EncoderOutput:
        """Encode a sequence, optionally against and into a key/value cache.

        Without a cache this is a plain encoder call. With `cache_capacity` (and no `cache`) a new cache of
        that many positions is created and filled with the prompts and all L positions of `x`. With a
        `cache`, the L new positions attend to `[prompts; cached tokens; themselves]` and the first
        `cache_keep` of them (default all) are appended to it in place.

        Args:
            x: embedded sequence (B, L, D).
            routing: routing context of the L positions (`routing.length == L`).
            attn_mask: mask over the token columns `[cached tokens; x]` (prompt columns are added
                here, always visible): (L, Lt) or (B, L, Lt); boolean with True = may attend, or additive.
            key_padding_mask: (B, L) bool, True = padding (keys only; padded queries are computed).
            target_side: use the target-side deep prompts (candidate sequences).
            cache: key/value cache to attend to and extend.
            cache_keep: leading positions of `x` to append to `cache`.
            cache_capacity: create a new cache with this capacity (ignored when `cache` is given).
            return_layer_inputs: also return the input of every layer and the final output.

        Returns:
            `EncoderOutput` with the hidden states, MoE aux outputs, optional layer inputs and the cache.

        Raises:
            ValueError: if shapes, routing length or cache capacity disagree.
        """
        if x.dim() != 3:
            raise ValueError(f"encoder input must have shape (B, L, D), got {tuple(x.shape)}")
        b, n, _ = x.shape
        if routing.length != n:
            raise ValueError(
                f"routing context covers {routing.length} positions but the sequence has {n}; "
                "build it with routing.input_segments/target_segments for this exact sequence"
            )
        add_prompts = cache is None or cache.length == 0
        num_p = self.num_prompts if add_prompts else 0
        if cache is None and cache_capacity is not None:
            cache = self.new_cache(b, cache_capacity, x)
            cache_keep = n if cache_keep is None else cache_keep
        start = cache.length if cache is not None else 0
        if cache is not None:
            if start + num_p + n > cache.capacity:
                raise ValueError(
                    f"cache capacity {cache.capacity} is too small for {start + num_p + n} positions"
                )
            if cache.key_padding.shape[0] != b:
                raise ValueError(
                    f"cache batch {cache.key_padding.shape[0]} does not match input batch {b}"
                )
        mask = self._full_mask(b, n, num_p, attn_mask, key_padding_mask, cache, x)
        layer_inputs: list[Tensor] | None = [] if return_layer_inputs else None
        aux: list[object] = []
        for i, layer in enumerate(self.layers):
            if layer_inputs is not None:
                layer_inputs.append(x)
            kv = (cache.keys[i], cache.values[i], start) if cache is not None else None
            x, layer_aux = layer(
                x, routing, mask, target_side=target_side, kv=kv, add_prompts=add_prompts
            )
            aux.extend(layer_aux)
        if layer_inputs is not None:
            layer_inputs.append(x)
        if cache is not None:
            keep = n if cache_keep is None else cache_keep
            if not 0 <= keep <= n:
                raise ValueError(f"cache_keep must be in 0..{n}, got {keep}")
            new_pad = torch.zeros(b, num_p + n, dtype=torch.bool, device=x.device)
            if key_padding_mask is not None:
                new_pad[:, num_p:] = key_padding_mask
            cache.key_padding[:, start : start + num_p + n] = new_pad
            cache.length = start + num_p + keep
            cache.num_prompts += num_p
        return EncoderOutput(hidden=x, aux=aux, layer_inputs=layer_inputs, cache=cache)

    def _full_mask(
        self,
        b: int,
        n: int,
        num_new_prompts: int,
        attn_mask: Tensor | None,
        key_padding_mask: Tensor | None,
        cache: KVCache | None,
        like: Tensor,
    ) -> Tensor | None:
        """Combine the token mask, key padding, cache padding and prompt columns into one SDPA mask.

        Returns:
            None (attend everywhere) or a mask (B, 1, L, Lk) over `[prompts; cached tokens; x]`:
            boolean True = may attend, or additive float if `attn_mask` was additive.
        """
        past = cache.length if cache is not None else 0
        past_prompts = cache.num_prompts if cache is not None else 0
        prompts = past_prompts + num_new_prompts
        tokens = past - past_prompts + n
        has_pad = key_padding_mask is not None or (
            cache is not None and past > 0 and bool(cache.key_padding[:, :past].any())
        )
        if attn_mask is None and not has_pad:
            return None
        dev = like.device
        if attn_mask is None:
            token_mask = torch.ones(1, n, tokens, dtype=torch.bool, device=dev)
        else:
            token_mask = attn_mask if attn_mask.dim() == 3 else attn_mask.unsqueeze(0)
            if token_mask.shape[-2:] != (n, tokens):
                raise ValueError(
                    f"attn_mask must cover ({n}, {tokens}) = (new positions, cached tokens + new), "
                    f"got {tuple(attn_mask.shape)}"
                )
        additive = token_mask.is_floating_point()
        lk = prompts + tokens
        # Key padding over [prompts; cached tokens; x]; prompts are never padded.
        pad = torch.zeros(b, lk, dtype=torch.bool, device=dev)
        if cache is not None and past > 0:
            pad[:, past_prompts:past] = cache.key_padding[:, past_prompts:past]
        if key_padding_mask is not None:
            if key_padding_mask.shape != (b, n):
                raise ValueError(
                    f"key_padding_mask must have shape ({b}, {n}), got {tuple(key_padding_mask.shape)}"
                )
            pad[:, prompts + tokens - n :] = key_padding_mask.to(torch.bool)
        if additive:
            full = torch.zeros(token_mask.shape[0], n, lk, dtype=like.dtype, device=dev)
            full[:, :, prompts:] = token_mask.to(like.dtype)
            blocked = torch.zeros(b, 1, lk, dtype=like.dtype, device=dev)
            full = full + blocked.masked_fill(pad[:, None, :], float("-inf"))
        else:
            full = torch.ones(token_mask.shape[0], n, lk, dtype=torch.bool, device=dev)
            full[:, :, prompts:] = token_mask
            full = full & ~pad[:, None, :]
        return full.unsqueeze(1)  # (B, 1, L, Lk)
