"""`glue_tsv` reader: GLUE tasks as cloze sentences with an SPE slot (SPEC §3.2.9).

Files are `<root>/<TASK>/processed/<split>.tsv` (fairseq layout: the GLUE TSVs without their
header; a header row is detected and skipped anyway). Templates, with E = EOT and Z = the SPE
slot whose output is scored against the label words:

| task | template | label words |
|---|---|---|
| SST-2 | `s E It is Z . E` | bad, wonderful |
| CoLA | `s This is Z . E` | incorrect, correct |
| RTE | `s1(-.) ? E it is` + `Z , s2 E` | no, yes |
| QNLI | `s1(-.) E it is` + `Z , s2 E` | no, yes |
| MRPC | `s1(-.) .` + `Z , s2 E` | no, yes |
| QQP | `s1(-.) E` + `Z , s2 E` | no, yes |
| MNLI | `s1` + `Z , s2 E` | no, maybe, yes |

`s1(-.)` drops a sentence-final "." token. Pair tasks cut the second part to `max_text_len // 2`
and the first to the remaining budget, both keeping their last token; single-sentence tasks cut
the sentence so the whole template fits. Training sets under 200 rows are repeated to >= 200.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.formats.base import MapDataset
from uniperceiver_cli.data.options import GlueTaskName, GlueTsvOptions
from uniperceiver_cli.data.samples import TextClassificationSample, collate_text_classification
from uniperceiver_cli.data.text import (
    EOT_ID,
    SPE_ID,
    TextTokenizer,
    default_tokenizer,
    truncate_keep_last,
)

#: Label words per GLUE task, in class-index order.
GLUE_LABEL_WORDS: dict[str, tuple[str, ...]] = {
    "SST-2": ("bad", "wonderful"),
    "CoLA": ("incorrect", "correct"),
    "RTE": ("no", "yes"),
    "MRPC": ("no", "yes"),
    "QQP": ("no", "yes"),
    "QNLI": ("no", "yes"),
    "MNLI": ("no", "maybe", "yes"),
}

_TEXT_LABELS: dict[str, dict[str, int]] = {
    "MNLI": {"contradiction": 0, "neutral": 1, "entailment": 2},
    "RTE": {"not_entailment": 0, "entailment": 1},
    "QNLI": {"not_entailment": 0, "entailment": 1},
}

#: 0-based (sentence columns, label column) of labelled splits; -1 = last column.
_COLUMNS: dict[str, tuple[tuple[int, ...], int]] = {
    "SST-2": ((0,), 1),
    "CoLA": ((3,), 1),
    "MRPC": ((3, 4), 0),
    "QQP": ((3, 4), 5),
    "QNLI": ((1, 2), 3),
    "RTE": ((1, 2), 3),
    "MNLI": ((8, 9), -1),
}
#: 0-based sentence columns of the unlabelled test split.
_TEST_COLUMNS: dict[str, tuple[int, ...]] = {
    "SST-2": (1,),
    "CoLA": (1,),
    "MRPC": (3, 4),
    "QQP": (1, 2),
    "QNLI": (1, 2),
    "RTE": (1, 2),
    "MNLI": (8, 9),
}
MIN_TRAIN_ROWS = 200


@dataclass(frozen=True)
class GlueRow:
    """One GLUE example: one or two sentences and a label (-1 in the unlabelled test split)."""

    sentences: tuple[str, ...]
    label: int


def _parse_label(task: str, value: str) -> int | None:
    value = value.strip()
    mapping = _TEXT_LABELS.get(task)
    if mapping is not None and value in mapping:
        return mapping[value]
    if value.lstrip("-").isdigit():
        label = int(value)
        return label if 0 <= label < len(GLUE_LABEL_WORDS[task]) else None
    return None


def read_glue_rows(path: Path, task: str, *, labelled: bool) -> list[GlueRow]:
    """Parse a GLUE TSV into rows (header detected and skipped).

    Raises:
        DataError: missing file, too few columns, or an unknown label.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: GLUE file not found; check data.root and glue_task") from exc
    sent_cols, label_col = _COLUMNS[task] if labelled else (_TEST_COLUMNS[task], None)
    rows: list[GlueRow] = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        cells = line.split("\t")
        needed = max(sent_cols) + 1
        if label_col is not None:
            needed = max(needed, label_col + 1) if label_col >= 0 else needed + 1
        if len(cells) < needed:
            if lineno == 1:
                continue
            raise DataError(
                f"{path}: line {lineno}: expected at least {needed} tab-separated columns for "
                f"{task}, found {len(cells)}"
            )
        label = -1
        if label_col is not None:
            parsed = _parse_label(task, cells[label_col])
            if parsed is None:
                if lineno == 1:  # header row
                    continue
                raise DataError(
                    f"{path}: line {lineno}: unknown {task} label {cells[label_col]!r}; expected "
                    f"{sorted(_TEXT_LABELS.get(task, {})) or 'an integer class index'}"
                )
            label = parsed
        elif lineno == 1 and cells[0].strip().lower() in ("index", "id"):
            continue
        rows.append(GlueRow(tuple(cells[c].strip() for c in sent_cols), label))
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


class ClozeTemplate:
    """Builds cloze token sequences for one GLUE task (see the module table).

    Args:
        task: GLUE task name, or `TOY` (the toy world's pair task, RTE's template).
        tokenizer: the tokenizer.
        max_text_len: maximum sequence length.
    """

    def __init__(self, task: str, tokenizer: TextTokenizer, max_text_len: int) -> None:
        if max_text_len < 8:
            raise ValueError(
                f"expected max_text_len >= 8 for cloze templates, found {max_text_len}"
            )
        self.task = task
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len
        self._dot = list(tokenizer.encode("."))

    def _enc(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text))

    def _drop_final_dot(self, ids: list[int]) -> list[int]:
        n = len(self._dot)
        return ids[:-n] if n and len(ids) > n and ids[-n:] == self._dot else ids

    def build(self, sentences: Sequence[str]) -> tuple[list[int], int]:
        """Return `(ids, slot)` for one example (one or two sentences)."""
        e, z, t = EOT_ID, SPE_ID, self.task
        if t in ("SST-2", "CoLA"):
            tail = (
                [e, *self._enc("It is"), z, *self._dot, e]
                if t == "SST-2"
                else [*self._enc("This is"), z, *self._dot, e]
            )
            budget = max(1, self.max_text_len - len(tail))
            s = self._enc(sentences[0])
            s = truncate_keep_last(s, budget) if s else s
            ids = [*s, *tail]
            return ids, len(s) + tail.index(z)
        if len(sentences) < 2:
            raise ValueError(f"expected two sentences for {t}, found {len(sentences)}")
        s1, s2 = self._enc(sentences[0]), self._enc(sentences[1])
        if t in ("RTE", "TOY"):
            first = [*self._drop_final_dot(s1), *self._enc("?"), e, *self._enc("it is")]
        elif t == "QNLI":
            first = [*self._drop_final_dot(s1), e, *self._enc("it is")]
        elif t == "MRPC":
            first = [*self._drop_final_dot(s1), *self._dot]
        elif t == "QQP":
            first = [*self._drop_final_dot(s1), e]
        elif t == "MNLI":
            first = s1
        else:
            raise ValueError(f"expected a GLUE task in {sorted(GLUE_LABEL_WORDS)}, found {t!r}")
        second = truncate_keep_last([z, *self._enc(","), *s2, e], self.max_text_len // 2)
        budget = self.max_text_len - len(second)
        first = truncate_keep_last(first, budget) if first else first
        return [*first, *second], len(first)


class GlueTsvDataset(MapDataset[TextClassificationSample]):
    """GLUE examples as cloze `TextClassificationSample`s.

    Args:
        options: the `glue_tsv` options.
        split: overrides `options.split` (`train`, `dev`, `test`; MNLI `dev` falls back to
            `dev_matched.tsv`).
        tokenizer: default: the packaged CLIP tokenizer.
        max_text_len: sequence length budget (256 in the reference).
    """

    collate_fn = staticmethod(collate_text_classification)

    def __init__(
        self,
        options: GlueTsvOptions,
        *,
        split: str | None = None,
        tokenizer: TextTokenizer | None = None,
        max_text_len: int = 256,
    ) -> None:
        split = split or options.split
        task: GlueTaskName = options.glue_task
        folder = Path(options.root) / task / "processed"
        path = folder / f"{split}.tsv"
        if not path.is_file() and task == "MNLI" and split == "dev":
            path = folder / "dev_matched.tsv"
        super().__init__(
            source=str(path),
            on_error=options.on_error,
            max_samples=options.max_samples,
            max_bad_fraction=options.max_bad_fraction,
        )
        rows = read_glue_rows(path, task, labelled=not split.startswith("test"))
        if split == "train" and len(rows) < MIN_TRAIN_ROWS:
            rows = rows * math.ceil(MIN_TRAIN_ROWS / len(rows))
        self.rows = rows
        self.task = task
        self.label_words = GLUE_LABEL_WORDS[task]
        self._template: ClozeTemplate | None = None
        self._tokenizer = tokenizer
        self.max_text_len = max_text_len

    @property
    def template(self) -> ClozeTemplate:
        """The task's cloze template (built on first use)."""
        if self._template is None:
            tok = self._tokenizer or default_tokenizer()
            self._template = ClozeTemplate(self.task, tok, self.max_text_len)
        return self._template

    @property
    def labels(self) -> list[int]:
        """Label of every row (for stratified subsets)."""
        return [r.label for r in self.rows[: len(self)]]

    def _num_items(self) -> int:
        return len(self.rows)

    def load(self, index: int) -> TextClassificationSample:
        row = self.rows[index]
        ids, slot = self.template.build(row.sentences)
        return TextClassificationSample(
            ids=torch.tensor(ids, dtype=torch.int64), slot=slot, label=row.label, index=index
        )
