"""Target sets: candidate texts the unified head scores against, as token tensors (SPEC §3.4).

Every entry is `tokenize(text) + [EOT]`, padded with 0 into `ids (C, L)` with a `padding (C, L)`
mask (True = padding); no prompt template is used unless one is given.

* `ClassNameTargets`: one or more variants per class (synonyms × templates); `draw` picks one
  variant per class per batch (SPEC §3.4: ImageNet-21k synonyms), `first` is the deterministic
  evaluation choice, `variants` returns all of them with their owner class (for averaging).
* `vocabulary_targets`: the word vocabulary `[v, EOT]` for every id `v` (captioning, MLM);
  `restricted_vocabulary_targets` keeps only the ids of a word list (a cheaper caption head).
* `caption_targets` / `label_word_targets` / `answer_targets`: per-batch captions, GLUE label
  words and the VQA answer vocabulary.
* `TargetSetCache`: memoises built sets in memory and optionally on disk, keyed by their content.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from uniperceiver_cli.data.formats.base import read_class_names
from uniperceiver_cli.data.samples import pad_sequences
from uniperceiver_cli.data.text import (
    EOT_ID,
    VOCAB_SIZE,
    TextTokenizer,
    default_tokenizer,
    encode_caption,
)

logger = logging.getLogger(__name__)

TargetKind = Literal["classes", "captions", "vocabulary", "labels"]

#: Name of the full vocabulary set in the reference configs.
VOCABULARY_NAME = "Vocab_Word"


@dataclass(frozen=True)
class TargetSet:
    """Encoded candidates of one target set.

    Attributes:
        name: set name (e.g. `ImageNet1k`, `Vocab_Word`); also the routing key of target sets.
        kind: `classes`, `captions`, `vocabulary` or `labels` (selects the attribute row).
        ids: `(C, L)` int64 token ids padded with 0, each row ending with EOT.
        padding: `(C, L)` bool, True at padding.
        token_ids: `(C,)` int64 vocabulary id that each entry stands for (vocabulary sets), else
            None.
        num_valid: entries that are real (a distributed shard pads with copies of entry 0).
    """

    name: str
    kind: TargetKind
    ids: Tensor
    padding: Tensor
    token_ids: Tensor | None = None
    num_valid: int | None = None

    def __len__(self) -> int:
        return int(self.ids.shape[0])

    def to(self, device: torch.device | str) -> TargetSet:
        """Copy with every tensor on `device`."""
        return dataclasses.replace(
            self,
            ids=self.ids.to(device),
            padding=self.padding.to(device),
            token_ids=None if self.token_ids is None else self.token_ids.to(device),
        )

    def shard(self, rank: int, world_size: int) -> TargetSet:
        """Rank `rank`'s contiguous `ceil(C / world)` slice, padded by repeating entry 0 (SPEC §3.4).

        `num_valid` tells how many rows are real; the gathered features are cut back to C.
        """
        if not 0 <= rank < world_size:
            raise ValueError(f"expected 0 <= rank < world_size, found {rank}, {world_size}")
        n = len(self)
        per = math.ceil(n / world_size)
        start, stop = rank * per, min((rank + 1) * per, n)
        rows = list(range(start, max(start, stop)))
        valid = len(rows)
        rows += [0] * (per - valid)
        index = torch.tensor(rows, dtype=torch.int64)
        return dataclasses.replace(
            self,
            ids=self.ids[index],
            padding=self.padding[index],
            token_ids=None if self.token_ids is None else self.token_ids[index],
            num_valid=valid,
        )

    def trimmed(self) -> TargetSet:
        """Copy with trailing all-padding columns removed (shorter sequences to encode)."""
        used = int((~self.padding).sum(dim=1).max()) if len(self) else 0
        return dataclasses.replace(self, ids=self.ids[:, :used], padding=self.padding[:, :used])


@dataclass(frozen=True)
class ClassNameTargets:
    """Classes with one or more text variants each.

    Attributes:
        name: set name.
        ids: `(V, L)` int64 ids of all variants, padded with 0.
        padding: `(V, L)` bool, True at padding.
        owner: `(V,)` int64 class of each variant; variants of a class are contiguous.
        num_classes: C.
        texts: the V variant texts (without EOT).
    """

    name: str
    ids: Tensor
    padding: Tensor
    owner: Tensor
    num_classes: int
    texts: tuple[str, ...]

    def _select(self, rows: Tensor) -> TargetSet:
        ids, pad = self.ids[rows], self.padding[rows]
        used = int((~pad).sum(dim=1).max()) if rows.numel() else 0
        return TargetSet(self.name, "classes", ids[:, :used], pad[:, :used])

    def first(self) -> TargetSet:
        """The first variant of every class, `(C, L)`."""
        starts = torch.searchsorted(self.owner, torch.arange(self.num_classes))
        return self._select(starts)

    def draw(self, generator: torch.Generator | None = None) -> TargetSet:
        """One uniformly drawn variant per class, `(C, L)` (call once per batch)."""
        counts = torch.bincount(self.owner, minlength=self.num_classes)
        starts = torch.cumsum(counts, 0) - counts
        if bool((counts == 1).all()):
            return self._select(starts)
        pick = (torch.rand(self.num_classes, generator=generator) * counts).long()
        return self._select(starts + pick)

    def variants(self) -> tuple[TargetSet, Tensor]:
        """All variants `(V, L)` and their owner classes `(V,)` (to average embeddings per class)."""
        return TargetSet(self.name, "classes", self.ids, self.padding), self.owner


def encode_texts(
    texts: Sequence[str], tokenizer: TextTokenizer, max_len: int | None = None
) -> tuple[Tensor, Tensor]:
    """Encode texts as `ids + [EOT]` (truncated keeping EOT) → `ids (N, L)`, `padding (N, L)`."""
    return pad_sequences([encode_caption(tokenizer, t, max_len) for t in texts])


def class_name_targets(
    name: str,
    classes: Sequence[str | Sequence[str]],
    *,
    tokenizer: TextTokenizer | None = None,
    templates: Sequence[str] = ("{}",),
    max_len: int | None = None,
) -> ClassNameTargets:
    """Encode class names, each class with its synonyms × templates as variants.

    Args:
        name: set name.
        classes: per class a name or a sequence of synonyms (first = display name).
        tokenizer: default: the packaged CLIP tokenizer.
        templates: format strings with one `{}` (default: the bare name, as the reference).
        max_len: tokens kept per entry including EOT.

    Returns:
        The encoded `ClassNameTargets`.
    """
    if not classes:
        raise ValueError(f"target set {name!r}: expected at least one class, found none")
    if any("{}" not in t for t in templates):
        raise ValueError(f"expected every template to contain '{{}}', found {list(templates)}")
    tok = tokenizer or default_tokenizer()
    texts: list[str] = []
    owner: list[int] = []
    for c, entry in enumerate(classes):
        names = [entry] if isinstance(entry, str) else list(entry)
        if not names:
            raise ValueError(f"target set {name!r}: class {c} has no name")
        for n in names:
            for t in templates:
                texts.append(t.format(n))
                owner.append(c)
    ids, padding = encode_texts(texts, tok, max_len)
    return ClassNameTargets(
        name=name,
        ids=ids,
        padding=padding,
        owner=torch.tensor(owner, dtype=torch.int64),
        num_classes=len(classes),
        texts=tuple(texts),
    )


def class_name_targets_from_file(
    name: str,
    path: str | Path,
    *,
    tokenizer: TextTokenizer | None = None,
    templates: Sequence[str] = ("{}",),
    max_len: int | None = None,
) -> ClassNameTargets:
    """`class_name_targets` from a file with one class per line (`a|b` lists synonyms)."""
    return class_name_targets(
        name,
        read_class_names(path),
        tokenizer=tokenizer,
        templates=templates,
        max_len=max_len,
    )


def vocabulary_targets(name: str = VOCABULARY_NAME, vocab_size: int = VOCAB_SIZE) -> TargetSet:
    """The full vocabulary: entry v is `[v, EOT]` for v = 0 … vocab_size-1 (SPEC §3.4)."""
    ids = torch.stack(
        [torch.arange(vocab_size, dtype=torch.int64), torch.full((vocab_size,), EOT_ID)], dim=1
    )
    return TargetSet(
        name,
        "vocabulary",
        ids,
        torch.zeros_like(ids, dtype=torch.bool),
        token_ids=torch.arange(vocab_size, dtype=torch.int64),
    )


def restricted_vocabulary_targets(
    words: Sequence[str],
    *,
    tokenizer: TextTokenizer | None = None,
    name: str = "Vocab_Restricted",
    always: Sequence[int] = (EOT_ID,),
) -> TargetSet:
    """A vocabulary limited to the token ids of `words` (plus `always`, EOT by default).

    Entry i is `[token_ids[i], EOT]`; a caption head scoring against this set predicts index i,
    which stands for vocabulary id `token_ids[i]`.
    """
    tok = tokenizer or default_tokenizer()
    ids_set = {int(i) for w in words for i in tok.encode(w)} | {int(i) for i in always}
    token_ids = torch.tensor(sorted(ids_set), dtype=torch.int64)
    ids = torch.stack([token_ids, torch.full_like(token_ids, EOT_ID)], dim=1)
    return TargetSet(name, "vocabulary", ids, torch.zeros_like(ids, dtype=torch.bool), token_ids)


def sampled_vocabulary_targets(
    targets: Tensor,
    num_negatives: int,
    *,
    pool: Tensor | None = None,
    vocab_size: int = VOCAB_SIZE,
    generator: torch.Generator | None = None,
    name: str = VOCABULARY_NAME,
) -> tuple[TargetSet, Tensor]:
    """A per-step vocabulary: the ids present in `targets` plus `num_negatives` sampled ids.

    Negatives are drawn uniformly (with replacement, duplicates merged) from `pool` (e.g. the
    `token_ids` of a restricted vocabulary) or from `[0, vocab_size)`.

    Args:
        targets: token targets of any shape, -1 = no target (MLM labels, caption words).
        num_negatives: extra ids sampled per call.
        pool: `(P,)` candidate ids to sample from; None = the whole vocabulary.
        vocab_size: vocabulary size when `pool` is None.
        generator: RNG of the negatives.
        name: set name (routing key; defaults to the vocabulary's).

    Returns:
        The candidate set (entries `[v, EOT]`, `token_ids` sorted ascending) and `targets`
        remapped to candidate indices (-1 kept).
    """
    present = targets[targets >= 0].to(torch.int64)
    if num_negatives > 0:
        if pool is None:
            negatives = torch.randint(vocab_size, (num_negatives,), generator=generator)
        else:
            pick = torch.randint(int(pool.numel()), (num_negatives,), generator=generator)
            negatives = pool.to(torch.int64)[pick]
        present = torch.cat([present, negatives])
    token_ids = torch.unique(present)
    remapped = targets.clone().to(torch.int64)
    valid = remapped >= 0
    remapped[valid] = torch.searchsorted(token_ids, remapped[valid])
    ids = torch.stack([token_ids, torch.full_like(token_ids, EOT_ID)], dim=1)
    candidates = TargetSet(
        name, "vocabulary", ids, torch.zeros_like(ids, dtype=torch.bool), token_ids
    )
    return candidates, remapped


def caption_targets(
    captions: Sequence[str],
    *,
    tokenizer: TextTokenizer | None = None,
    max_len: int | None = None,
    name: str = "captions",
) -> TargetSet:
    """Encode captions (retrieval candidates) as a `TargetSet` of kind `captions`."""
    ids, padding = encode_texts(captions, tokenizer or default_tokenizer(), max_len)
    return TargetSet(name, "captions", ids, padding)


def label_word_targets(
    words: Sequence[str],
    *,
    tokenizer: TextTokenizer | None = None,
    name: str = "labels",
) -> TargetSet:
    """Encode GLUE-style label words (kind `labels`)."""
    ids, padding = encode_texts(words, tokenizer or default_tokenizer())
    return TargetSet(name, "labels", ids, padding)


#: Name of the VQA answer set in the reference configs.
VQA_ANSWER_NAME = "VQA_Answer"


def answer_targets(
    answers: Sequence[str],
    *,
    tokenizer: TextTokenizer | None = None,
    name: str = VQA_ANSWER_NAME,
    max_len: int | None = None,
) -> TargetSet:
    """Encode a VQA answer vocabulary (`[answer tokens, EOT]` each; kind `labels`, SPEC §1.10.6).

    Row k stands for answer k, the index used by `VQASample.answer_labels` and `target`.

    Raises:
        ValueError: an empty vocabulary or duplicate answers.
    """
    if not answers:
        raise ValueError(f"target set {name!r}: expected at least one answer, found none")
    counts = Counter(answers)
    dupes = sorted(a for a, c in counts.items() if c > 1)
    if dupes:
        raise ValueError(f"target set {name!r}: answers must be unique, found repeats {dupes[:5]}")
    ids, padding = encode_texts(list(answers), tokenizer or default_tokenizer(), max_len)
    return TargetSet(name, "labels", ids, padding)


T = TypeVar("T", TargetSet, ClassNameTargets)


def _fingerprint(tokenizer: TextTokenizer | None) -> str:
    tok = tokenizer if tokenizer is not None else default_tokenizer()
    return f"{type(tok).__module__}.{type(tok).__qualname__}:{tok!r}"


class TargetSetCache:
    """Memoise built target sets by a content key, in memory and optionally on disk.

    Args:
        directory: folder for `<sha256>.pt` files (tensors and strings only, loaded with
            `weights_only=True`); None keeps the cache in memory only.
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[str, TargetSet | ClassNameTargets] = {}

    @staticmethod
    def key(description: Mapping[str, Any], tokenizer: TextTokenizer | None = None) -> str:
        """Hash of a JSON-able description of the set plus the tokenizer's identity."""
        blob = json.dumps(
            {"description": description, "tokenizer": _fingerprint(tokenizer)},
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()

    def get_or_build(self, key: str, build: Callable[[], T]) -> T:
        """Return the set stored under `key`, building (and storing) it on a miss."""
        hit = self._memory.get(key)
        if hit is not None:
            return hit  # type: ignore[return-value]
        path = self.directory / f"{key}.pt" if self.directory is not None else None
        if path is not None and path.is_file():
            loaded = _from_state(torch.load(path, weights_only=True))
            self._memory[key] = loaded
            return loaded  # type: ignore[return-value]
        built = build()
        self._memory[key] = built
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(_to_state(built), tmp)
            tmp.replace(path)
            logger.debug("cached target set %s at %s", built.name, path)
        return built

    def class_names(
        self,
        name: str,
        classes: Sequence[str | Sequence[str]],
        *,
        tokenizer: TextTokenizer | None = None,
        templates: Sequence[str] = ("{}",),
        max_len: int | None = None,
    ) -> ClassNameTargets:
        """Cached `class_name_targets`."""
        classes_json = [[c] if isinstance(c, str) else list(c) for c in classes]
        description = {
            "type": "class_names",
            "name": name,
            "classes": classes_json,
            "templates": list(templates),
            "max_len": max_len,
        }
        return self.get_or_build(
            self.key(description, tokenizer),
            lambda: class_name_targets(
                name, classes, tokenizer=tokenizer, templates=templates, max_len=max_len
            ),
        )

    def vocabulary(self, name: str = VOCABULARY_NAME, vocab_size: int = VOCAB_SIZE) -> TargetSet:
        """Cached `vocabulary_targets` (no tokenizer involved)."""
        key = hashlib.sha256(f"vocabulary:{name}:{vocab_size}".encode()).hexdigest()
        return self.get_or_build(key, lambda: vocabulary_targets(name, vocab_size))


def _to_state(obj: TargetSet | ClassNameTargets) -> dict[str, Any]:
    if isinstance(obj, ClassNameTargets):
        return {
            "type": "class_names",
            "name": obj.name,
            "ids": obj.ids,
            "padding": obj.padding,
            "owner": obj.owner,
            "num_classes": obj.num_classes,
            "texts": list(obj.texts),
        }
    return {
        "type": "target_set",
        "name": obj.name,
        "kind": obj.kind,
        "ids": obj.ids,
        "padding": obj.padding,
        "token_ids": obj.token_ids,
    }


def _from_state(state: Mapping[str, Any]) -> TargetSet | ClassNameTargets:
    if state["type"] == "class_names":
        return ClassNameTargets(
            name=state["name"],
            ids=state["ids"],
            padding=state["padding"],
            owner=state["owner"],
            num_classes=int(state["num_classes"]),
            texts=tuple(state["texts"]),
        )
    return TargetSet(
        state["name"], state["kind"], state["ids"], state["padding"], state["token_ids"]
    )
