"""VQA reader: JSON lines `{"image", "question", "answers": [...], "scores": [...]}` (SPEC §1.10.6).

A VQA task reads a `jsonl_pairs` data section; the keys are options (`image_key`, `question_key`,
`answers_key`, `scores_key`). `answers` may repeat an answer once per annotator; without `scores`
each distinct answer scores `min(1, count / 3)` (the VQA accuracy rule), with `scores` (one per
answer, in [0, 1]) a repeated answer keeps its highest score.

The answer vocabulary (the target set the head scores against, `targets.answer_targets`) comes from
`answers_file` (one answer per line) or, by default, from the file itself: the distinct answers,
most frequent first (ties alphabetical). Evaluation splits should pass the training vocabulary
(`answers_file`, or `answers=` to the reader) so that indices agree.

Each sample's text is `question tokens + [SPE, EOT]` (the SPE slot is where the head reads the
answer). Training flips half the images horizontally and swaps the words `left` and `right` in the
question and answers (SPEC §3.3); the training target is drawn in proportion to the scores of the
answers that are in the vocabulary.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.base import MapDataset
from uniperceiver_cli.data.formats.captions import read_jsonl_records
from uniperceiver_cli.data.images import read_image
from uniperceiver_cli.data.options import JsonlPairsOptions
from uniperceiver_cli.data.samples import VQASample, collate_vqa
from uniperceiver_cli.data.text import (
    EOT_ID,
    SPE_ID,
    TextTokenizer,
    default_tokenizer,
    truncate_keep_last,
)
from uniperceiver_cli.data.transforms import ImageTransform, to_float_image

#: Score of an answer given by `count` annotators when the file has no scores.
ANNOTATORS_FOR_FULL_SCORE = 3

_LEFT_RIGHT = re.compile(r"\b(left|right)\b", re.IGNORECASE)


@dataclass(frozen=True)
class VQARecord:
    """One question about one image.

    Attributes:
        path: the image file.
        item_id: question id (`question_id`, else `id`, else the line index).
        question: the question text.
        answers: distinct answers.
        scores: soft score of each answer in [0, 1].
    """

    path: Path
    item_id: int | str
    question: str
    answers: tuple[str, ...]
    scores: tuple[float, ...]


def swap_left_right(text: str) -> str:
    """Swap the words `left` and `right` (keeping their case), as a horizontal flip does."""

    def swap(m: re.Match[str]) -> str:
        word = m.group(0)
        new = "right" if word.lower() == "left" else "left"
        return new.capitalize() if word[0].isupper() else new

    return _LEFT_RIGHT.sub(swap, text)


def _answer_scores(
    answers: Sequence[str], scores: Sequence[Any] | None, where: str
) -> tuple[tuple[str, ...], tuple[float, ...]]:
    if scores is None:
        counts = Counter(answers)
        distinct = tuple(counts)
        return distinct, tuple(min(1.0, counts[a] / ANNOTATORS_FOR_FULL_SCORE) for a in distinct)
    if len(scores) != len(answers):
        raise DataError(
            f"{where}: expected one score per answer, found {len(answers)} answers and "
            f"{len(scores)} scores"
        )
    best: dict[str, float] = {}
    for a, s in zip(answers, scores, strict=True):
        if isinstance(s, bool) or not isinstance(s, int | float) or not 0.0 <= float(s) <= 1.0:
            raise DataError(
                f"{where}: score of answer {a!r} must be a number in [0, 1], found {s!r}"
            )
        best[a] = max(best.get(a, 0.0), float(s))
    return tuple(best), tuple(best.values())


def parse_vqa_jsonl(options: JsonlPairsOptions) -> list[VQARecord]:
    """Read the VQA JSON-lines file named by a `jsonl_pairs` section.

    Raises:
        DataError: naming the file, the record (line index) and the field of every malformed
            record.
    """
    p = Path(options.file)
    root = Path(options.images_dir) if options.images_dir else p.parent
    records: list[VQARecord] = []
    for i, rec in read_jsonl_records(p, "VQA questions file"):
        where = f"{p}: record {i}"
        for key in (options.image_key, options.question_key, options.answers_key):
            if key not in rec:
                raise DataError(f"{where}: missing '{key}'")
        image, question, answers = (
            rec[options.image_key],
            rec[options.question_key],
            rec[options.answers_key],
        )
        if not isinstance(image, str) or not image:
            raise DataError(f"{where}: '{options.image_key}' must be a non-empty path string")
        if not isinstance(question, str) or not question.strip():
            raise DataError(f"{where}: '{options.question_key}' must be a non-empty string")
        if isinstance(answers, str):
            answers = [answers]
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise DataError(
                f"{where}: '{options.answers_key}' must be a string or a list of strings"
            )
        scores = rec.get(options.scores_key)
        if scores is not None and not isinstance(scores, list):
            raise DataError(f"{where}: '{options.scores_key}' must be a list of numbers")
        distinct, values = _answer_scores([a.strip() for a in answers], scores, where)
        item_id = rec.get("question_id", rec.get("id", i))
        records.append(
            VQARecord(
                path=root / image.replace(".zip@", "").lstrip("/"),
                item_id=item_id,
                question=question.strip(),
                answers=distinct,
                scores=values,
            )
        )
    if not records:
        raise DataError(f"{p}: no VQA records")
    return records


def read_answers_file(path: str | Path) -> tuple[str, ...]:
    """Read an answer vocabulary: one answer per line, blank lines ignored, no duplicates.

    Raises:
        DataError: missing file, duplicate answer or no answer.
    """
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{p}: answers file not found; check answers_file") from exc
    seen: dict[str, int] = {}
    for lineno, line in enumerate(lines, start=1):
        answer = line.strip()
        if not answer:
            continue
        if answer in seen:
            raise DataError(
                f"{p}: line {lineno}: answer {answer!r} already on line {seen[answer]}; "
                "list each answer once"
            )
        seen[answer] = lineno
    if not seen:
        raise DataError(f"{p}: no answers; expected one answer per line")
    return tuple(seen)


def answer_vocabulary(records: Sequence[VQARecord]) -> tuple[str, ...]:
    """Distinct answers of `records`, most frequent first (ties alphabetical)."""
    counts = Counter(a for r in records for a in r.answers)
    return tuple(sorted(counts, key=lambda a: (-counts[a], a)))


def encode_question(tokenizer: TextTokenizer, question: str, max_text_len: int) -> Tensor:
    """`question tokens + [SPE, EOT]`, the question cut to fit `max_text_len` (>= 3) tokens."""
    if max_text_len < 3:
        raise ValueError(f"expected max_text_len >= 3 for VQA, found {max_text_len}")
    ids = list(tokenizer.encode(question))
    if len(ids) > max_text_len - 2:
        ids = truncate_keep_last(ids, max_text_len - 2)
    return torch.tensor([*ids, SPE_ID, EOT_ID], dtype=torch.int64)


def make_vqa_sample(
    image: Tensor,
    *,
    question: str,
    answers: Sequence[str],
    scores: Sequence[float],
    answer_index: Mapping[str, int],
    tokenizer: TextTokenizer,
    max_text_len: int,
    transform: ImageTransform,
    train: bool,
    item_id: int | str,
    index: int,
) -> VQASample:
    """Build one `VQASample` (flip + left/right swap and target draw in training).

    Args:
        image: `(3, H, W)` uint8.
        question: the question.
        answers: distinct answers.
        scores: their soft scores.
        answer_index: answer vocabulary → index.
        tokenizer: the tokenizer.
        max_text_len: question tokens kept including SPE and EOT.
        transform: uint8 image → float `(3, S, S)`.
        train: flip half the images (swapping left/right words) and draw the target.
        item_id: question id.
        index: dataset position.

    Returns:
        The sample; random choices use torch's current RNG.
    """
    if train and bool(torch.rand(()) < 0.5):
        image = torch.flip(image, dims=(-1,))
        question = swap_left_right(question)
        answers = [swap_left_right(a) for a in answers]
    labels = tuple(answer_index.get(a, -1) for a in answers)
    known = [k for k, lab in enumerate(labels) if lab >= 0 and scores[k] > 0]
    target = -1
    if known:
        weights = torch.tensor([scores[k] for k in known], dtype=torch.float64)
        if train:
            pick = known[int(torch.multinomial(weights, 1))]
        else:
            pick = known[int(torch.argmax(weights))]
        target = labels[pick]
    ids = encode_question(tokenizer, question, max_text_len)
    return VQASample(
        pixels=transform(image),
        ids=ids,
        slot=int(ids.shape[0]) - 2,
        question=question,
        answers=tuple(answers),
        scores=tuple(float(s) for s in scores),
        answer_labels=labels,
        target=target,
        item_id=item_id,
        index=index,
    )


class VQADataset(MapDataset[VQASample]):
    """Images with questions and soft-scored answers from a JSON-lines file.

    Args:
        options: the `jsonl_pairs` options (VQA keys and `answers_file`).
        split: overrides `options.split`.
        transform: uint8 `(3, H, W)` → float `(3, S, S)`; default: scale to [0, 1] only.
        tokenizer: default: the packaged CLIP tokenizer.
        max_text_len: question tokens kept including SPE and EOT (40 in the reference).
        answers: explicit answer vocabulary (overrides `answers_file` and the default).
        train: flips and target draws (default: split == "train").
    """

    collate_fn = staticmethod(collate_vqa)

    def __init__(
        self,
        options: JsonlPairsOptions,
        *,
        split: str | None = None,
        transform: ImageTransform | None = None,
        tokenizer: TextTokenizer | None = None,
        max_text_len: int = 40,
        answers: Sequence[str] | None = None,
        train: bool | None = None,
    ) -> None:
        split = split or options.split
        super().__init__(
            source=str(options.file),
            on_error=options.on_error,
            max_samples=options.max_samples,
            max_bad_fraction=options.max_bad_fraction,
        )
        self.records = parse_vqa_jsonl(options)
        if answers is not None:
            vocab = tuple(answers)
        elif options.answers_file:
            vocab = read_answers_file(options.answers_file)
        else:
            vocab = answer_vocabulary(self.records)
        if not vocab:
            raise DataError(f"{options.file}: the answer vocabulary is empty")
        self.answers: tuple[str, ...] = vocab
        self.answer_index: dict[str, int] = {a: k for k, a in enumerate(vocab)}
        self.transform = transform or to_float_image
        self._tokenizer = tokenizer
        self.max_text_len = max_text_len
        self.train = split == "train" if train is None else train

    @property
    def tokenizer(self) -> TextTokenizer:
        """The tokenizer (the packaged CLIP tokenizer unless one was given)."""
        if self._tokenizer is None:
            self._tokenizer = default_tokenizer()
        return self._tokenizer

    @property
    def labels(self) -> list[int]:
        """Vocabulary index of each question's best-scored answer, -1 if none is in it."""
        out: list[int] = []
        for r in self.records[: len(self)]:
            ranked = sorted(zip(r.scores, r.answers, strict=True), key=lambda t: -t[0])
            out.append(
                next((self.answer_index[a] for _, a in ranked if a in self.answer_index), -1)
            )
        return out

    def targets(self) -> list[dict[str, float]]:
        """Per question, answer → soft score (the input of `metrics.vqa_soft_accuracy`)."""
        return [dict(zip(r.answers, r.scores, strict=True)) for r in self.records[: len(self)]]

    def _num_items(self) -> int:
        return len(self.records)

    def item_name(self, index: int) -> str:
        """The image file of question `index`."""
        return str(self.records[index].path)

    def load(self, index: int) -> VQASample:
        r = self.records[index]
        return make_vqa_sample(
            read_image(r.path),
            question=r.question,
            answers=r.answers,
            scores=r.scores,
            answer_index=self.answer_index,
            tokenizer=self.tokenizer,
            max_text_len=self.max_text_len,
            transform=self.transform,
            train=self.train,
            item_id=r.item_id,
            index=index,
        )
