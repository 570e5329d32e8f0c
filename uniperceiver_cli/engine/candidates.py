"""Candidate (target) sets at training time: class names, label words and the vocabulary (SPEC §3.4).

Two levers against the reference's waste (PERF.md), both documented in `docs/training.md`:

* **Length bucketing** (exact): class names are encoded in groups of equal length, so no padded positions are
  computed. Attention with masked padding equals attention over the unpadded sequence, so the features are
  the same up to float rounding; 76% of the reference's class-name positions were padding.
* **Sampled vocabulary** (an approximation, chosen per task with `vocab_negatives`): caption and MLM steps
  score token outputs against the vocabulary ids present in the (global) batch plus `vocab_negatives` ids
  drawn uniformly from the vocabulary (or from `vocabulary_file`'s words), instead of re-encoding all 49,411
  entries with gradients at every step. `vocab_negatives: null` restores the exact full-vocabulary softmax.
  All ranks use the same candidate list (batch ids are gathered, negatives come from a step-seeded generator),
  so DDP equals one process with the global batch.

Large sets can be **sharded across ranks**: each rank encodes a contiguous slice and the features are gathered
with gradients flowing back to the owner (`runtime.gather_with_grad`), which gives the same gradients as every
rank encoding the whole set.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from uniperceiver_cli.engine.runtime import Runtime, gather_no_grad, gather_with_grad
from uniperceiver_cli.model.uniperceiver import TargetKind, UniPerceiver


@dataclass(frozen=True)
class TokenizedSet:
    """Candidate sequences ready for the encoder.

    Attributes:
        ids: (C, L) int64 token ids ending with EOT, right-padded with 0.
        padding: (C, L) bool, True at padding.
    """

    ids: Tensor
    padding: Tensor

    @property
    def size(self) -> int:
        """Number of candidates C."""
        return int(self.ids.shape[0])


def tokenize_names(names: Sequence[str], max_len: int = 77) -> TokenizedSet:
    """Tokenise class names / label words as `[name tokens..., EOT]` (SPEC §3.4; no prompt templates).

    Args:
        names: C strings.
        max_len: longest sequence kept (EOT stays last).

    Returns:
        The tokenised set.
    """
    from uniperceiver_cli.data.tokenizer import get_tokenizer

    ids, padding = get_tokenizer().encode_batch(list(names), max_len=max_len, append_eot=True)
    return TokenizedSet(ids=ids, padding=padding)


def encode_bucketed(
    model: UniPerceiver,
    ids: Tensor,
    padding: Tensor,
    *,
    kind: TargetKind,
    task: str,
    chunk_size: int = 4096,
) -> tuple[Tensor, list[object]]:
    """Encode candidate sequences grouped by true length (no padded positions computed).

    Args:
        model: the model (unwrapped).
        ids: (C, L) candidate ids.
        padding: (C, L) True at padding.
        kind: candidate kind (routing and target-side prompts).
        task: routing name of the set.
        chunk_size: sequences per encoder call.

    Returns:
        Post-projected features (C, D) in the input order, and the MoE aux outputs.
    """
    lengths = (~padding).sum(dim=1)  # (C,)
    order: list[Tensor] = []
    feats: list[Tensor] = []
    aux: list[object] = []
    for n in torch.unique(lengths).tolist():
        rows = torch.nonzero(lengths == n, as_tuple=False).flatten()
        out = model.target_features(
            ids[rows, : int(n)], None, kind=kind, task=task, chunk_size=chunk_size
        )
        order.append(rows)
        feats.append(out.features)
        aux.extend(out.aux)
    index = torch.cat(order)
    stacked = torch.cat(feats, dim=0)
    result = torch.empty_like(stacked)
    result[index.to(stacked.device)] = stacked
    return result, aux


def encode_set(
    model: UniPerceiver,
    tokens: TokenizedSet,
    *,
    kind: TargetKind,
    task: str,
    runtime: Runtime,
    shard: bool = False,
) -> tuple[Tensor, list[object]]:
    """Encode a candidate set, optionally sharded across ranks (gathered with gradients).

    Args:
        model: the model (unwrapped).
        tokens: the set.
        kind: candidate kind.
        task: routing name of the set.
        runtime: the run's runtime.
        shard: split the set across ranks (only when distributed).

    Returns:
        Features (C, D) and the MoE aux outputs of this rank's encodings.
    """
    device = runtime.device
    ids, padding = tokens.ids.to(device), tokens.padding.to(device)
    c = tokens.size
    if not (shard and runtime.distributed and c >= runtime.world_size):
        return encode_bucketed(model, ids, padding, kind=kind, task=task)
    per = math.ceil(c / runtime.world_size)
    start = runtime.rank * per
    rows = torch.arange(start, start + per, device=device).clamp(
        max=c - 1
    )  # repeat the last to pad
    local, aux = encode_bucketed(model, ids[rows], padding[rows], kind=kind, task=task)
    return gather_with_grad(local, runtime)[:c], aux


@dataclass(frozen=True)
class VocabCandidates:
    """The vocabulary entries scored at one caption/MLM step.

    Attributes:
        ids: (C,) int64 sorted vocabulary ids (all of them when the full vocabulary is used).
        full: `ids` is the whole vocabulary in order (targets need no remapping).
    """

    ids: Tensor
    full: bool

    def columns(self, targets: Tensor, ignore_index: int = -1) -> Tensor:
        """Map vocabulary ids (any shape, `ignore_index` kept) to candidate columns."""
        if self.full:
            return targets
        valid = targets != ignore_index
        pos = torch.searchsorted(self.ids.to(targets.device), targets.clamp(min=0))
        return torch.where(valid, pos, torch.full_like(targets, ignore_index))


def vocab_candidates(
    targets: Tensor,
    *,
    vocab_size: int,
    negatives: int | None,
    generator: torch.Generator,
    runtime: Runtime,
    pool: Tensor | None = None,
    ignore_index: int = -1,
) -> VocabCandidates:
    """Choose the vocabulary entries of a step: every target id of every rank plus sampled negatives.

    Args:
        targets: this rank's target ids (any shape), `ignore_index` where there is none.
        vocab_size: V.
        negatives: extra ids drawn uniformly (from `pool` or all of V); None = the full vocabulary.
        generator: step-seeded generator, identical on every rank.
        runtime: the run's runtime (batch ids are gathered across ranks).
        pool: restricted vocabulary (sorted unique ids) to draw negatives from.
        ignore_index: marker of positions without a target.

    Returns:
        `VocabCandidates`.
    """
    if negatives is None and pool is None:
        return VocabCandidates(ids=torch.arange(vocab_size), full=True)
    present = torch.unique(targets[targets != ignore_index].detach().to("cpu"))
    if runtime.distributed:
        size = torch.tensor([present.numel()], dtype=torch.int64, device=runtime.device)
        longest = int(gather_no_grad(size, runtime).max())
        padded = torch.full((longest,), -1, dtype=torch.int64)
        padded[: present.numel()] = present
        everyone = gather_no_grad(padded.to(runtime.device), runtime).to("cpu")
        present = torch.unique(everyone[everyone >= 0])
    parts = [present]
    if pool is not None:
        source = pool.to(torch.int64)
        if negatives is None:
            parts.append(source)
        elif negatives > 0:
            pick = torch.randint(source.numel(), (negatives,), generator=generator)
            parts.append(source[pick])
    elif negatives:
        parts.append(torch.randint(vocab_size, (negatives,), generator=generator))
    ids = torch.unique(torch.cat(parts))
    return VocabCandidates(ids=ids, full=False)


def vocabulary_pool(words_file: str) -> Tensor:
    """Sorted unique vocabulary ids of the words in a file (one word or phrase per line) plus EOT."""
    from pathlib import Path

    from uniperceiver_cli.data.tokenizer import EOT_ID, get_tokenizer

    tok = get_tokenizer()
    ids: set[int] = {EOT_ID}
    for line in Path(words_file).read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids.update(tok.encode(line.strip()))
    return torch.tensor(sorted(ids), dtype=torch.int64)
