"""The Uni-Perceiver model: one shared encoder for every input and every candidate (SPEC §1).

Design in brief:
- every sequence is `[SPE; visual tokens; text tokens]`, embedded by `Embeddings` (shared LayerNorm, SPE prefix
  without position/type, frozen 2-D sin-cos spatial table, learned temporal table);
- a pre-LN Transformer with layer scale, fixed-rate drop path and fused qkv (`Encoder`), MoE-ready: any of the
  four linears of a block may be an injected routed module, called with the sequence's `RoutingContext`;
- a similarity head: `proj(ln_post(h))`, L2-normalised cosine times a capped per-task temperature;
- task formulations are encodings + the head: classification and retrieval compare SPE features, MLM and
  captioning compare token outputs with the encoded vocabulary, GLUE/VQA use an in-text SPE slot.
Decoding lives in `decode.py`, checkpoints in `checkpoint.py`, construction in `build.py`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor, nn

from uniperceiver_cli.model.config import ModelConfig
from uniperceiver_cli.model.embed import EOT_ID, SPE_ID, Embeddings, rescaled_position_scale
from uniperceiver_cli.model.encoder import Encoder, KVCache, LinearsForLayer
from uniperceiver_cli.model.heads import SimilarityHead, l2_normalize
from uniperceiver_cli.model.layers import caption_attention_mask
from uniperceiver_cli.model.routing import (
    RoutingContext,
    input_segments,
    target_segments,
)

if TYPE_CHECKING:
    from uniperceiver_cli.data.tokenizer import ClipTokenizer

logger = logging.getLogger(__name__)

TargetKind = Literal["classes", "captions", "vocabulary", "labels"]

#: Default chunk of candidate sequences encoded at once (bounds activation memory).
DEFAULT_CHUNK = 4096


@dataclass
class ModelOutput:
    """Result of one encoder call on an assembled sequence.

    Attributes:
        hidden: encoder output (B, L, D).
        features: post-projected output at position 0 (the SPE prefix), (B, D), not normalised.
        key_padding: (B, L) bool, True = padding, or None when nothing is padded.
        aux: auxiliary outputs of MoE linears (empty for a dense model).
        visual_len: number of visual tokens in the sequence (after the SPE prefix).
        layer_inputs: input of every layer and the final output, if requested.
        cache: key/value cache written by the call, if requested.
    """

    hidden: Tensor
    features: Tensor
    key_padding: Tensor | None
    aux: list[object] = field(default_factory=list)
    visual_len: int = 0
    layer_inputs: list[Tensor] | None = None
    cache: KVCache | None = None


@dataclass
class Scores:
    """Logits of one task formulation.

    Attributes:
        logits: temperature-scaled cosine logits (N, M).
        features: the post-projected query features the logits were computed from (N, D).
        aux: auxiliary outputs of MoE linears of every encoder call involved.
    """

    logits: Tensor
    features: Tensor
    aux: list[object] = field(default_factory=list)


def as_video(x: Tensor, *, name: str = "images") -> Tensor:
    """View images (B, 3, S, S) as 1-frame videos (B, 1, 3, S, S); pass videos (B, T, 3, S, S) through.

    Raises:
        ValueError: for any other rank.
    """
    if x.dim() == 4:
        return x.unsqueeze(1)
    if x.dim() == 5:
        return x
    raise ValueError(
        f"{name} must have shape (B, 3, S, S) or (B, T, 3, S, S), got {tuple(x.shape)}"
    )


class UniPerceiver(nn.Module):
    """Uni-Perceiver: embeddings, the shared encoder and the similarity head.

    Attributes:
        config: the architecture.
        embed: all embedding tables.
        encoder: the Transformer stack.
        head: post-projection and temperatures.
    """

    def __init__(
        self, config: ModelConfig, linears_for_layer: LinearsForLayer | None = None
    ) -> None:
        """Create the modules (use `build.build_model` to also initialise the weights)."""
        super().__init__()
        self.config = config
        self.embed = Embeddings(config)
        self.encoder = Encoder(config, linears_for_layer)
        self.head = SimilarityHead(config)
        self._vocab_cache: tuple[tuple[object, ...], Tensor] | None = None
        self._tokenizer: ClipTokenizer | None = None

    # ------------------------------------------------------------------ assembly and encoding

    def encode(
        self,
        *,
        task_type: str,
        task: str | None = None,
        visual: Tensor | None = None,
        text_ids: Tensor | None = None,
        text_padding: Tensor | None = None,
        text_positions: Tensor | None = None,
        attn_mask: Tensor | None = None,
        target_kind: TargetKind | None = None,
        routing: RoutingContext | None = None,
        generator: torch.Generator | None = None,
        return_layer_inputs: bool = False,
        cache_capacity: int | None = None,
    ) -> ModelOutput:
        """Assemble `[SPE; visual; text]`, encode it and project the SPE output (SPEC §1.7).

        Args:
            task_type: task type deciding the routing rows (e.g. `image_caption`); for targets, any name.
            task: routing task name (recipe task or target-set name); default `task_type`.
            visual: pixels (B, T, 3, S, S) or (B, 3, S, S).
            text_ids: text ids (B, Lt).
            text_padding: (B, Lt) bool/uint8, True/1 = padding.
            text_positions: text position ids (Lt,) or (B, Lt); default 0..Lt-1.
            attn_mask: (L, L) mask over the whole sequence, True = may attend; None = bidirectional.
            target_kind: encode as a candidate (target) sequence of this kind (target-side routing
                and target-side deep prompts).
            routing: explicit routing context (overrides the one built from the task).
            generator: RNG for the training-time temporal offset.
            return_layer_inputs: keep every layer's input.
            cache_capacity: build a key/value cache with this capacity (decoding).

        Returns:
            `ModelOutput`.

        Raises:
            ValueError: when no input is given or batch sizes disagree.
        """
        parts: list[Tensor] = []
        pads: list[Tensor] = []
        visual_len = 0
        batch = None
        if visual is not None:
            visual = as_video(visual, name="visual input")
            batch = visual.shape[0]
        if text_ids is not None:
            if text_ids.dim() != 2:
                raise ValueError(f"text ids must have shape (B, L), got {tuple(text_ids.shape)}")
            if batch is not None and text_ids.shape[0] != batch:
                raise ValueError(
                    f"visual batch {batch} and text batch {text_ids.shape[0]} must be equal"
                )
            batch = text_ids.shape[0]
        if batch is None:
            raise ValueError("encode needs visual input, text ids, or both")
        parts.append(self.embed.spe(batch))
        device = self.embed.word.weight.device
        pads.append(torch.zeros(batch, 1, dtype=torch.bool, device=device))
        if visual is not None:
            v = self.embed.visual(visual, generator)
            visual_len = v.shape[1]
            parts.append(v)
            pads.append(torch.zeros(batch, visual_len, dtype=torch.bool, device=device))
        text_len = 0
        if text_ids is not None:
            parts.append(self.embed.text(text_ids, text_positions))
            text_len = text_ids.shape[1]
            if text_padding is not None:
                if text_padding.shape != text_ids.shape:
                    raise ValueError(
                        f"text padding {tuple(text_padding.shape)} must match text ids "
                        f"{tuple(text_ids.shape)}"
                    )
                pads.append(text_padding.to(torch.bool))
            else:
                pads.append(torch.zeros(batch, text_len, dtype=torch.bool, device=device))
        x = torch.cat(parts, dim=1)  # (B, L, D)
        key_padding = torch.cat(pads, dim=1)
        has_padding = text_padding is not None and bool(key_padding.any())
        if routing is None:
            routing = self.routing_for(
                task_type,
                task=task,
                visual_len=visual_len,
                text_len=text_len,
                target_kind=target_kind,
            )
        out = self.encoder(
            x,
            routing,
            attn_mask=attn_mask,
            key_padding_mask=key_padding if has_padding else None,
            target_side=target_kind is not None,
            cache_capacity=cache_capacity,
            return_layer_inputs=return_layer_inputs,
        )
        return ModelOutput(
            hidden=out.hidden,
            features=self.head.project(out.hidden[:, 0]),
            key_padding=key_padding if has_padding else None,
            aux=out.aux,
            visual_len=visual_len,
            layer_inputs=out.layer_inputs,
            cache=out.cache,
        )

    #: `model(...)` is `model.encode(...)` (the MoE aux outputs are in `ModelOutput.aux`).
    forward = encode

    def routing_for(
        self,
        task_type: str,
        *,
        task: str | None = None,
        visual_len: int = 0,
        text_len: int = 0,
        target_kind: TargetKind | None = None,
    ) -> RoutingContext:
        """Routing context of a sequence `[SPE; visual_len visual; text_len text]` (SPEC §2.3).

        Args:
            task_type: task type of the input sequence.
            task: task or target-set name; default `task_type`.
            visual_len: visual tokens.
            text_len: text positions.
            target_kind: candidate kind for target sequences (text only).
        """
        name = task or task_type
        if target_kind is not None:
            return RoutingContext(name, target_segments(target_kind, 1 + visual_len + text_len))
        modality: Literal["image", "video"] = "video" if task_type.startswith("video") else "image"
        segs = input_segments(
            task_type, visual_len=visual_len, text_len=text_len, visual_modality=modality
        )
        return RoutingContext(name, segs)

    # ------------------------------------------------------------------ features

    def visual_features(
        self,
        x: Tensor,
        *,
        task_type: str = "image_classification",
        task: str | None = None,
        generator: torch.Generator | None = None,
    ) -> ModelOutput:
        """Encode `[SPE; patches]` of images (B, 3, S, S) or videos (B, T, 3, S, S)."""
        return self.encode(task_type=task_type, task=task, visual=x, generator=generator)

    def target_features(
        self,
        ids: Tensor,
        padding: Tensor | None = None,
        *,
        kind: TargetKind = "classes",
        task: str | None = None,
        chunk_size: int = DEFAULT_CHUNK,
    ) -> ModelOutput:
        """Encode candidate sequences `[SPE; ids]` (class names, captions, label words) in chunks.

        Args:
            ids: candidate token ids (N, Lt), each ending with EOT, right-padded.
            padding: (N, Lt) True/1 = padding.
            kind: candidate kind (decides target-side routing).
            task: target-set name for routing; default the kind.
            chunk_size: sequences encoded per encoder call.

        Returns:
            `ModelOutput` whose `features` (N, D) are the post-projected SPE outputs; `hidden` holds
            only the SPE outputs (N, 1, D) when more than one chunk was needed.
        """
        if ids.dim() != 2:
            raise ValueError(f"candidate ids must have shape (N, L), got {tuple(ids.shape)}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        outs: list[ModelOutput] = []
        for start in range(0, ids.shape[0], chunk_size):
            sl = slice(start, start + chunk_size)
            outs.append(
                self.encode(
                    task_type=kind,
                    task=task or kind,
                    text_ids=ids[sl],
                    text_padding=padding[sl] if padding is not None else None,
                    target_kind=kind,
                )
            )
        if len(outs) == 1:
            return outs[0]
        aux: list[object] = []
        for o in outs:
            aux.extend(o.aux)
        return ModelOutput(
            hidden=torch.cat([o.hidden[:, :1] for o in outs]),
            features=torch.cat([o.features for o in outs]),
            key_padding=None,
            aux=aux,
        )

    def vocabulary_features(
        self,
        ids: Tensor | None = None,
        *,
        task: str = "vocabulary",
        chunk_size: int = DEFAULT_CHUNK,
    ) -> Tensor:
        """Post-projected features of vocabulary entries, each encoded as `[SPE, v, EOT]` (SPEC §1.10.3).

        The full-vocabulary result is cached on the module while the weights are unchanged, the model
        is in eval mode and autograd is off (it costs one encoder pass over V sequences).

        Args:
            ids: vocabulary ids (N,) to encode; default all V ids.
            task: target-set name for routing.
            chunk_size: sequences per encoder call.

        Returns:
            (N, D) or (V, D), not normalised.
        """
        device = self.embed.word.weight.device
        cacheable = ids is None and not self.training and not torch.is_grad_enabled()
        key: tuple[object, ...] = ()
        if cacheable:
            weight = self.embed.word.weight
            versions = ((id(p), p._version) for p in self.parameters())
            key = (task, str(weight.device), weight.dtype, *versions)
            if self._vocab_cache is not None and self._vocab_cache[0] == key:
                return self._vocab_cache[1]
        if ids is None:
            ids = torch.arange(self.config.vocab_size, device=device)
        seqs = torch.stack([ids, torch.full_like(ids, EOT_ID)], dim=1)  # (N, 2)
        feats = self.target_features(seqs, kind="vocabulary", task=task, chunk_size=chunk_size)
        if cacheable:
            self._vocab_cache = (key, feats.features)
        return feats.features

    # ------------------------------------------------------------------ task formulations

    def classification_logits(
        self,
        visual: Tensor,
        class_ids: Tensor,
        class_padding: Tensor | None = None,
        *,
        task_type: str = "image_classification",
        task: str | None = None,
        target_set: str = "classes",
        generator: torch.Generator | None = None,
    ) -> Scores:
        """Image/video classification: SPE feature vs every encoded class name (SPEC §1.10.1).

        Args:
            visual: images (B, 3, S, S) or videos (B, T, 3, S, S).
            class_ids: class-name sequences (C, Lc) ending with EOT.
            class_padding: (C, Lc) padding mask.
            task_type: `image_classification` or `video_classification` (also picks the temperature).
            task: routing task name.
            target_set: routing name of the class set.
            generator: RNG for the training-time temporal offset.

        Returns:
            `Scores` with logits (B, C).
        """
        inp = self.visual_features(visual, task_type=task_type, task=task, generator=generator)
        cls = self.target_features(class_ids, class_padding, kind="classes", task=target_set)
        logits = self.head.logits(inp.features, cls.features, task_type)
        return Scores(logits, inp.features, [*inp.aux, *cls.aux])

    def retrieval_logits(
        self, visual_features: Tensor, text_features: Tensor, *, task: str = "retrieve"
    ) -> tuple[Tensor, Tensor]:
        """Retrieval logits (SPEC §1.10.2) from post-projected features.

        Args:
            visual_features: (B, D).
            text_features: (M, D).
            task: logit-scale name or task type.

        Returns:
            `(i2t (B, M), t2i (M, B))`.
        """
        i2t = self.head.logits(visual_features, text_features, task)
        return i2t, i2t.t()

    def mlm_logits(
        self,
        ids: Tensor,
        padding: Tensor | None,
        masked: Tensor,
        vocab_features: Tensor,
        *,
        task_type: str = "mlm",
        task: str | None = None,
    ) -> Scores:
        """Masked language modelling: outputs at masked positions vs the vocabulary (SPEC §1.10.3).

        Args:
            ids: corrupted text (B, L) (masked tokens already replaced by SPE).
            padding: (B, L) padding mask.
            masked: (B, L) bool, True at positions to predict.
            vocab_features: post-projected vocabulary features (V, D).
            task_type: input task type (`mlm`).
            task: routing task name.

        Returns:
            `Scores` with logits (N_masked, V), rows in row-major (sample, position) order.
        """
        out = self.encode(task_type=task_type, task=task, text_ids=ids, text_padding=padding)
        if masked.shape != ids.shape:
            raise ValueError(f"masked {tuple(masked.shape)} must match ids {tuple(ids.shape)}")
        h = out.hidden[:, 1:][masked.to(torch.bool)]  # (N, D)
        z = self.head.project(h)
        return Scores(self.head.logits(z, vocab_features, task_type), z, out.aux)

    def caption_logits(
        self,
        visual: Tensor,
        words: Tensor,
        word_padding: Tensor | None,
        vocab_features: Tensor,
        *,
        task_type: str = "image_caption",
        task: str | None = None,
        generator: torch.Generator | None = None,
    ) -> Scores:
        """Caption teacher forcing with the two-stream sequence `[SPE, visual, w, s]` (SPEC §1.10.4).

        Args:
            visual: images (B, 3, S, S) or videos (B, T, 3, S, S).
            words: caption ids w_1..w_n (B, n) ending with EOT, right-padded.
            word_padding: (B, n) padding mask of `words`.
            vocab_features: post-projected vocabulary features (V, D).
            task_type: `image_caption` or `video_caption`.
            task: routing task name.
            generator: RNG for the training-time temporal offset.

        Returns:
            `Scores` with logits (B, n, V) at the query positions s_i (row i predicts w_i) and the
            query features (B, n, D).
        """
        if words.dim() != 2:
            raise ValueError(f"caption words must have shape (B, n), got {tuple(words.shape)}")
        b, n = words.shape
        queries = torch.full_like(words, SPE_ID)
        text = torch.cat([words, queries], dim=1)  # (B, 2n)
        pos = torch.arange(n, device=words.device).repeat(2)  # [0..n-1, 0..n-1]
        pad = None
        if word_padding is not None:
            wp = word_padding.to(torch.bool)
            pad = torch.cat([wp, wp], dim=1)
        visual = as_video(visual, name="visual input")
        prefix = 1 + visual.shape[1] * self.embed.grid_size**2
        mask = caption_attention_mask(prefix, n, device=words.device)
        out = self.encode(
            task_type=task_type,
            task=task,
            visual=visual,
            text_ids=text,
            text_padding=pad,
            text_positions=pos,
            attn_mask=mask,
            generator=generator,
        )
        z = self.head.project(out.hidden[:, prefix + n :])  # (B, n, D)
        logits = self.head.logits(z.reshape(b * n, -1), vocab_features, task_type)
        return Scores(logits.view(b, n, -1), z, out.aux)

    def cloze_logits(
        self,
        text_ids: Tensor,
        text_padding: Tensor | None,
        label_features: Tensor,
        *,
        visual: Tensor | None = None,
        task_type: str = "text_classification",
        task: str | None = None,
    ) -> Scores:
        """GLUE/VQA cloze: output at the first in-text SPE slot vs encoded label words (SPEC §1.10.5-6).

        Args:
            text_ids: prompt text (B, L) containing one SPE slot per row.
            text_padding: (B, L) padding mask.
            label_features: post-projected label/answer features (C, D).
            visual: images for VQA (B, 3, S, S), else None.
            task_type: `text_classification` or `vqa`.
            task: routing task name.

        Returns:
            `Scores` with logits (B, C).

        Raises:
            ValueError: if a row has no SPE slot.
        """
        out = self.encode(
            task_type=task_type,
            task=task,
            visual=visual,
            text_ids=text_ids,
            text_padding=text_padding,
        )
        is_slot = text_ids == SPE_ID
        if not bool(is_slot.any(dim=1).all()):
            raise ValueError("every cloze text needs an in-text <|spe|> slot (id 49410)")
        slot = is_slot.to(torch.int64).argmax(dim=1)  # first SPE in the text
        index = 1 + out.visual_len + slot  # (B,)
        h = out.hidden[torch.arange(text_ids.shape[0], device=text_ids.device), index]
        z = self.head.project(h)
        return Scores(self.head.logits(z, label_features, task_type), z, out.aux)

    # ------------------------------------------------------------------ user-facing API

    @property
    def tokenizer(self) -> ClipTokenizer:
        """The CLIP BPE tokenizer with the five Uni-Perceiver specials (loaded on first use)."""
        if self._tokenizer is None:
            from uniperceiver_cli.data.tokenizer import get_tokenizer

            self._tokenizer = get_tokenizer()
        return self._tokenizer

    def _check_pixels(self, x: Tensor, video: bool) -> None:
        s = self.embed.grid_size * self.config.patch_size
        want = (
            f"(B, T, 3, {s}, {s}) with T <= {self.config.max_frames}"
            if video
            else f"(B, 3, {s}, {s})"
        )
        rank = 5 if video else 4
        ok = x.dim() == rank and tuple(x.shape[-3:]) == (3, s, s)
        if video and ok:
            ok = 1 <= x.shape[1] <= self.config.max_frames
        if not ok:
            raise ValueError(
                f"expected {'videos' if video else 'images'} of shape {want}, got {tuple(x.shape)}"
            )

    def encode_images(self, x: Tensor) -> Tensor:
        """L2-normalised retrieval features of already-normalised images (B, 3, S, S) -> (B, D)."""
        self._check_pixels(x, video=False)
        return l2_normalize(self.visual_features(x, task_type="image_retrieval").features)

    def encode_videos(self, x: Tensor) -> Tensor:
        """L2-normalised retrieval features of already-normalised videos (B, T, 3, S, S) -> (B, D)."""
        self._check_pixels(x, video=True)
        return l2_normalize(self.visual_features(x, task_type="video_retrieval").features)

    def encode_texts(self, texts: Sequence[str], *, chunk_size: int = DEFAULT_CHUNK) -> Tensor:
        """L2-normalised features of texts encoded as `[SPE, tokens, EOT]` (retrieval targets) -> (B, D)."""
        if isinstance(texts, str):
            raise ValueError("encode_texts expects a list of strings, got a single string")
        ids, padding = self.tokenizer.encode_batch(
            list(texts), max_len=self.config.max_text_positions, append_eot=True
        )
        device = self.embed.word.weight.device
        out = self.target_features(
            ids.to(device), padding.to(device), kind="captions", chunk_size=chunk_size
        )
        return l2_normalize(out.features)

    def similarity(self, a: Tensor, b: Tensor, task: str = "retrieve") -> Tensor:
        """Temperature-scaled cosine logits (N, M) between features a (N, D) and b (M, D).

        `task` is a logit-scale name (e.g. `retrieve`, `img_cls`) or a task type (e.g. `image_caption`).
        """
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
            raise ValueError(
                f"similarity expects features (N, D) and (M, D), got {tuple(a.shape)} and {tuple(b.shape)}"
            )
        return self.head.logits(a, b, task)

    @torch.no_grad()
    def caption(
        self,
        x: Tensor,
        beam_size: int = 2,
        max_len: int = 21,
        length_penalty: float = 0.0,
    ) -> list[str]:
        """Caption images (B, 3, S, S) or videos (B, T, 3, S, S) with beam search (SPEC §1.11).

        Returns:
            One string per input, decoded up to the first EOT.
        """
        from uniperceiver_cli.model.decode import caption_search

        video = x.dim() == 5
        self._check_pixels(x, video=video)
        result = caption_search(
            self,
            x,
            beam_size=beam_size,
            max_len=max_len,
            length_penalty=length_penalty,
            task_type="video_caption" if video else "image_caption",
        )
        texts: list[str] = []
        for row in result.ids.tolist():
            words = row[: row.index(EOT_ID)] if EOT_ID in row else row
            texts.append(self.tokenizer.decode(words))
        return texts

    # ------------------------------------------------------------------ resolution

    def set_image_size(self, image_size: int, pos_embed_scale: float | None = None) -> None:
        """Rebuild the spatial sin-cos table for a new image side (SPEC §8.2, §11.9).

        Args:
            image_size: new side S (a multiple of the patch size).
            pos_embed_scale: scale of the new table; default keeps the coordinate span
                (`rescaled_position_scale`, i.e. 160/S for the released models).
        """
        cfg = self.config
        if image_size % cfg.patch_size != 0:
            raise ValueError(
                f"image_size ({image_size}) must be a multiple of patch_size ({cfg.patch_size})"
            )
        grid = image_size // cfg.patch_size
        scale = (
            pos_embed_scale
            if pos_embed_scale is not None
            else rescaled_position_scale(cfg.pos_embed_scale, cfg.grid_size, grid)
        )
        self.embed.set_grid(grid, scale)
        self.config = dataclasses.replace(cfg, image_size=image_size, pos_embed_scale=scale)
