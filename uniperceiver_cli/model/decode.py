"""Caption decoding: greedy and beam search with the key/value cache (SPEC §1.11).

The prefix `[SPE; visual]` is encoded once into a cache. At step t the pair `[w_{t-1}, s_t]` is fed at positions
`[t-1, t]`: the word attends to the cache and itself, the SPE query to the cache, the word and itself; only the
word's keys/values are kept. This reproduces the two-stream training mask exactly (and halves the encoder calls of
the reference, which feeds the query and the word separately). `use_cache=False` decodes by full recomputation
of the teacher-forcing sequence instead (the test oracle).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from uniperceiver_cli.model.embed import EOT_ID, SPE_ID
from uniperceiver_cli.model.heads import l2_normalize
from uniperceiver_cli.model.layers import caption_attention_mask
from uniperceiver_cli.model.routing import RoutingContext, input_segments

if TYPE_CHECKING:
    from uniperceiver_cli.model.encoder import KVCache
    from uniperceiver_cli.model.uniperceiver import UniPerceiver


@dataclass
class CaptionResult:
    """Beam-search output; tokens after the first EOT are EOT with log-prob 0.

    Attributes:
        ids: best sequence per input (B, max_len).
        logp: per-token log-probabilities of the best sequence (B, max_len).
        scores: final score of the best sequence (B,): sum of log-probs / (#non-EOT + 1)^LP.
        all_ids: every beam (B, K, max_len), sorted by final score.
        all_logp: per-token log-probabilities of every beam (B, K, max_len).
        all_scores: final scores (B, K).
    """

    ids: Tensor
    logp: Tensor
    scores: Tensor
    all_ids: Tensor
    all_logp: Tensor
    all_scores: Tensor


def text_routing(task_type: str, task: str, length: int) -> RoutingContext:
    """Routing of `length` caption text positions without an SPE prefix (a decoding step, SPEC §2.5)."""
    segs = input_segments(task_type, visual_len=1, text_len=length)
    return RoutingContext(task, (segs[-1],))


class _CachedStepper:
    """Step log-probs from the key/value cache."""

    def __init__(
        self,
        model: UniPerceiver,
        visual: Tensor,
        vocab: Tensor,
        max_len: int,
        task_type: str,
        task: str,
    ) -> None:
        self.model = model
        self.vocab = vocab
        self.task_type = task_type
        self.task = task
        prompts = model.encoder.num_prompts
        tokens = visual.shape[1] * model.embed.grid_size**2
        capacity = prompts + 1 + tokens + max_len + 1
        out = model.encode(task_type=task_type, task=task, visual=visual, cache_capacity=capacity)
        assert out.cache is not None
        self.cache: KVCache = out.cache
        # prompts + SPE + visual: shared by all beams of an input
        self.prefix_end = self.cache.length

    def __call__(self, t: int, last_words: Tensor | None) -> Tensor:
        """Log-probs (N, V) of the word at step t given the previous word (N,) of each sequence."""
        model, cache = self.model, self.cache
        n = cache.key_padding.shape[0]
        dev = cache.key_padding.device
        query = torch.full((n, 1), SPE_ID, dtype=torch.long, device=dev)
        if last_words is None:
            ids, pos, keep, mask = query, torch.tensor([t], device=dev), 0, None
        else:
            ids = torch.cat([last_words.view(n, 1), query], dim=1)  # [w_{t-1}, s_t]
            pos = torch.tensor([t - 1, t], device=dev)
            keep = 1
            past = cache.num_tokens
            mask = torch.ones(2, past + 2, dtype=torch.bool, device=dev)
            mask[0, past + 1] = False  # the word does not see the query
        x = model.embed.text(ids, pos)
        out = model.encoder(
            x,
            text_routing(self.task_type, self.task, ids.shape[1]),
            attn_mask=mask,
            cache=cache,
            cache_keep=keep,
        )
        return _word_logp(model, out.hidden[:, -1], self.vocab, self.task_type)

    def expand(self, repeats: int) -> None:
        """Repeat every row `repeats` times (1 beam -> K beams after the first step)."""
        self.cache = self.cache.repeat_interleave(repeats)

    def reorder(self, index: Tensor) -> None:
        """Reorder rows of the generated-word part of the cache."""
        self.cache.reorder(index, start=self.prefix_end)


class _RecomputeStepper:
    """Step log-probs by re-encoding the whole teacher-forcing sequence (test oracle)."""

    def __init__(
        self, model: UniPerceiver, visual: Tensor, vocab: Tensor, task_type: str, task: str
    ) -> None:
        self.model = model
        self.visual = visual
        self.vocab = vocab
        self.task_type = task_type
        self.task = task
        self.words: Tensor | None = None  # (N, t)

    def __call__(self, t: int, last_words: Tensor | None) -> Tensor:
        model = self.model
        n = self.visual.shape[0]
        dev = self.visual.device
        if last_words is not None:
            lw = last_words.view(n, 1)
            self.words = lw if self.words is None else torch.cat([self.words, lw], dim=1)
        prev = (
            self.words
            if self.words is not None
            else torch.zeros(n, 0, dtype=torch.long, device=dev)
        )
        # s_{t+1} cannot see w_{t+1}: fill that slot with any id (EOT).
        words = torch.cat([prev, torch.full((n, 1), EOT_ID, dtype=torch.long, device=dev)], dim=1)
        k = words.shape[1]
        text = torch.cat([words, torch.full_like(words, SPE_ID)], dim=1)
        pos = torch.arange(k, device=dev).repeat(2)
        prefix = 1 + self.visual.shape[1] * model.embed.grid_size**2
        out = model.encode(
            task_type=self.task_type,
            task=self.task,
            visual=self.visual,
            text_ids=text,
            text_positions=pos,
            attn_mask=caption_attention_mask(prefix, k, device=dev),
        )
        return _word_logp(model, out.hidden[:, -1], self.vocab, self.task_type)

    def expand(self, repeats: int) -> None:
        self.visual = self.visual.repeat_interleave(repeats, dim=0)
        if self.words is not None:
            self.words = self.words.repeat_interleave(repeats, dim=0)

    def reorder(self, index: Tensor) -> None:
        if self.words is not None:
            self.words = self.words[index]


def _word_logp(model: UniPerceiver, h: Tensor, vocab: Tensor, task_type: str) -> Tensor:
    """log_softmax over the vocabulary of the temperature-scaled cosine logits, (N, D) -> (N, V)."""
    z = l2_normalize(model.head.project(h))
    logits = model.head.temperature(task_type) * (z @ vocab.t())
    return torch.log_softmax(logits, dim=-1)


@torch.no_grad()
def caption_search(
    model: UniPerceiver,
    visual: Tensor,
    *,
    beam_size: int = 2,
    max_len: int = 21,
    length_penalty: float = 0.0,
    vocab_features: Tensor | None = None,
    task_type: str = "image_caption",
    task: str | None = None,
    use_cache: bool = True,
) -> CaptionResult:
    """Beam search (greedy for `beam_size=1`) over the whole vocabulary (SPEC §1.11).

    Beams are selected by summed log-probability; a beam that emitted EOT is frozen (it may only continue
    with EOT at log-prob 0, score unchanged). Final ranking divides the sum by `(#non-EOT + 1)^LP` when
    `length_penalty > 0`.

    Args:
        model: the model (eval mode recommended).
        visual: images (B, 3, S, S) or videos (B, T, 3, S, S).
        beam_size: K.
        max_len: decoding steps.
        length_penalty: LP (0 = off).
        vocab_features: post-projected vocabulary features (V, D); default `model.vocabulary_features()`.
        task_type: `image_caption` or `video_caption` (routing and temperature).
        task: routing task name; default `task_type`.
        use_cache: decode with the key/value cache (else by full recomputation).

    Returns:
        `CaptionResult`.
    """
    from uniperceiver_cli.model.uniperceiver import as_video

    if beam_size < 1 or max_len < 1:
        raise ValueError(f"beam_size and max_len must be >= 1, got {beam_size} and {max_len}")
    visual = as_video(visual, name="visual input")
    name = task or task_type
    vocab = vocab_features if vocab_features is not None else model.vocabulary_features()
    vocab = l2_normalize(vocab)
    v = vocab.shape[0]
    b = visual.shape[0]
    dev = visual.device
    stepper: _CachedStepper | _RecomputeStepper
    if use_cache:
        stepper = _CachedStepper(model, visual, vocab, max_len, task_type, name)
    else:
        stepper = _RecomputeStepper(model, visual, vocab, task_type, name)

    return beam_search(
        stepper,
        batch_size=b,
        vocab_size=v,
        beam_size=beam_size,
        max_len=max_len,
        length_penalty=length_penalty,
        device=dev,
    )


class Stepper(Protocol):
    """What `beam_search` drives: step log-probs plus the row bookkeeping of the beams."""

    def __call__(self, t: int, last_words: Tensor | None) -> Tensor:
        """Log-probs (N, V) of step t; `last_words` (N,) are the words chosen at t-1 (None at t=0)."""
        ...

    def expand(self, repeats: int) -> None:
        """Repeat every row (1 beam per input -> `repeats` beams)."""
        ...

    def reorder(self, index: Tensor) -> None:
        """Rows now continue the old rows `index` (N,)."""
        ...


def beam_search(
    stepper: Stepper,
    *,
    batch_size: int,
    vocab_size: int,
    beam_size: int,
    max_len: int,
    length_penalty: float = 0.0,
    eot_id: int = EOT_ID,
    device: torch.device | None = None,
) -> CaptionResult:
    """Vectorised beam search over `batch_size` inputs (greedy when `beam_size == 1`).

    Candidates are ranked by summed log-probability; a beam whose last word is `eot_id` may only continue with
    `eot_id` at log-prob 0 (score unchanged). The final ranking divides by `(#non-EOT + 1)^length_penalty`
    when `length_penalty > 0`.

    Args:
        stepper: produces step log-probs and follows the beam reordering.
        batch_size: B.
        vocab_size: V.
        beam_size: K.
        max_len: steps.
        length_penalty: LP.
        eot_id: the stop token.
        device: where the bookkeeping tensors live.

    Returns:
        `CaptionResult`.
    """
    if beam_size < 1 or max_len < 1:
        raise ValueError(f"beam_size and max_len must be >= 1, got {beam_size} and {max_len}")
    b, v, dev = batch_size, vocab_size, device
    seqs = torch.zeros(b, 1, 0, dtype=torch.long, device=dev)  # (B, k, t)
    tok_logp = torch.zeros(b, 1, 0, device=dev)
    score = torch.zeros(b, 1, device=dev)
    frozen: Tensor | None = None
    for t in range(max_len):
        k_cur = seqs.shape[1]
        last = seqs[:, :, -1].reshape(-1) if t > 0 else None
        logp = stepper(t, last).view(b, k_cur, v)  # (B, k, V)
        if t > 0:
            if frozen is None:
                frozen = torch.full((v,), float("-inf"), device=dev, dtype=logp.dtype)
                frozen[eot_id] = 0.0
            done = (seqs[:, :, -1] == eot_id).unsqueeze(-1)  # (B, k, 1)
            logp = torch.where(done, frozen, logp)
        cand = (score.unsqueeze(-1) + logp).view(b, k_cur * v)
        k_new = min(beam_size, k_cur * v)
        score, flat = cand.topk(k_new, dim=1)  # (B, K), sorted
        beam = flat // v
        word = flat % v
        chosen = logp.view(b, k_cur * v).gather(1, flat)
        seqs = torch.cat([_pick(seqs, beam), word.unsqueeze(-1)], dim=2)
        tok_logp = torch.cat([_pick(tok_logp, beam), chosen.unsqueeze(-1)], dim=2)
        if t + 1 == max_len:
            break
        if k_cur == 1 and k_new > 1:
            stepper.expand(k_new)
        elif k_cur > 1:
            rows = (torch.arange(b, device=dev) * k_cur).unsqueeze(1) + beam
            stepper.reorder(rows.reshape(-1))

    final = score
    if length_penalty > 0:
        lengths = (seqs != eot_id).sum(dim=-1).to(score.dtype)
        final = score / (lengths + 1.0) ** length_penalty
    order = final.argsort(dim=1, descending=True)
    all_ids = _pick(seqs, order)
    all_logp = _pick(tok_logp, order)
    all_scores = final.gather(1, order)
    return CaptionResult(
        ids=all_ids[:, 0],
        logp=all_logp[:, 0],
        scores=all_scores[:, 0],
        all_ids=all_ids,
        all_logp=all_logp,
        all_scores=all_scores,
    )


def _pick(x: Tensor, beam: Tensor) -> Tensor:
    """Select beams: x (B, k, t), beam (B, K) -> (B, K, t)."""
    return x.gather(1, beam.unsqueeze(-1).expand(-1, -1, x.shape[2]))
