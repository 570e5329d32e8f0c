"""Caption metrics (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D) without Java, pinned to pycocoevalcap 1.2.

`compute_caption_metrics` tokenises like the COCO evaluation (``ptb.py``), then scores with the
re-implementations in ``ngrams.py`` and ``meteor.py``; ``backend="coco"`` runs pycocoevalcap itself
(Java needed). SPICE is not computed. Torch-free.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Literal, TypeVar

from uniperceiver_cli.metrics.caption.meteor import load_meteor_resources, meteor
from uniperceiver_cli.metrics.caption.ngrams import bleu_scores, cider_d, rouge_l
from uniperceiver_cli.metrics.caption.ptb import tokenize_captions

__all__ = ["CaptionMetricsError", "CaptionScores", "compute_caption_metrics", "tokenize_captions"]

logger = logging.getLogger(__name__)

Backend = Literal["builtin", "coco"]
ImageId = TypeVar("ImageId", bound=Hashable)


class CaptionMetricsError(Exception):
    """Caption metrics cannot be computed with the given inputs or backend."""


@dataclass(frozen=True)
class CaptionScores:
    """Corpus-level caption scores (fractions, as pycocoevalcap returns them; CIDEr not ×100).

    Attributes:
        bleu1, bleu2, bleu3, bleu4: corpus BLEU-n.
        meteor: corpus METEOR.
        rouge_l: mean ROUGE-L.
        cider: mean CIDEr-D.
        num_images: images evaluated.
        implementation: "builtin" or "pycocoevalcap".
        versions: what produced each number (library versions, METEOR data source and modules).
    """

    bleu1: float
    bleu2: float
    bleu3: float
    bleu4: float
    meteor: float
    rouge_l: float
    cider: float
    num_images: int
    implementation: str
    versions: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Plain dict with the metric names used in reports (``BLEU-4``, ``CIDEr`` ...)."""
        values = asdict(self)
        names = {
            "bleu1": "BLEU-1", "bleu2": "BLEU-2", "bleu3": "BLEU-3", "bleu4": "BLEU-4",
            "meteor": "METEOR", "rouge_l": "ROUGE-L", "cider": "CIDEr",
        }  # fmt: skip
        return {names.get(key, key): value for key, value in values.items()}


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "absent"


def _ordered_inputs(
    predictions: Mapping[ImageId, str], references: Mapping[ImageId, Sequence[str]]
) -> list[ImageId]:
    missing = [key for key in predictions if key not in references]
    if missing:
        raise CaptionMetricsError(
            f"{len(missing)} prediction id(s) have no references, e.g. {missing[:5]!r}; "
            "pass references for every predicted image id"
        )
    empty = [key for key in predictions if len(references[key]) == 0]
    if empty:
        raise CaptionMetricsError(
            f"image id(s) {empty[:5]!r} have an empty reference list; every image needs >= 1 reference"
        )
    ids = [key for key in references if key in predictions]
    unused = len(references) - len(ids)
    if unused:
        logger.warning("%d image(s) have references but no prediction; they are not scored", unused)
    if not ids:
        raise CaptionMetricsError("no predictions to score: the predictions mapping is empty")
    return ids


def compute_caption_metrics(
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
    backend: Backend = "builtin",
) -> CaptionScores:
    """Score one generated caption per image against its references, as the COCO evaluation does.

    The evaluated images are the predicted ones (in the order of `references`), so CIDEr-D's
    document frequencies and log(#images) come from their references only.

    Args:
        predictions: image id -> generated caption (raw text).
        references: image id -> reference captions (raw text); extra ids are ignored.
        backend: "builtin" (pure Python, no Java) or "coco" (pycocoevalcap 1.2 itself, needs Java).

    Returns:
        The corpus scores with implementation metadata.

    Raises:
        CaptionMetricsError: a predicted id without references, no predictions, or the coco backend
            is unavailable.
    """
    ids = _ordered_inputs(predictions, references)
    if backend == "coco":
        return _coco_scores(ids, predictions, references)
    if backend != "builtin":
        raise CaptionMetricsError(f"backend must be 'builtin' or 'coco', got {backend!r}")
    counts = [len(references[key]) for key in ids]
    flat_refs = tokenize_captions([caption for key in ids for caption in references[key]])
    hyps = tokenize_captions([predictions[key] for key in ids])
    refs: list[list[str]] = []
    start = 0
    for count in counts:
        refs.append(flat_refs[start : start + count])
        start += count
    bleu, _ = bleu_scores(hyps, refs)
    rouge, _ = rouge_l(hyps, refs)
    cider, _ = cider_d(hyps, refs)
    resources = load_meteor_resources()
    meteor_score, _ = meteor(hyps, refs, resources)
    modules = "+".join(resources.modules)
    return CaptionScores(
        bleu1=bleu[0], bleu2=bleu[1], bleu3=bleu[2], bleu4=bleu[3],
        meteor=meteor_score, rouge_l=rouge, cider=cider, num_images=len(ids),
        implementation="builtin",
        versions={
            "uniperceiver_cli": _version("uniperceiver-cli"),
            "reference": "pycocoevalcap 1.2 (PTBTokenizer 3.4.1 rules, Bleu/Rouge/Cider re-implemented)",
            "meteor": f"python re-implementation of METEOR 1.5 ({modules}, data: {resources.source})",
        },
    )  # fmt: skip


def _coco_scores(
    ids: list[ImageId],
    predictions: Mapping[ImageId, str],
    references: Mapping[ImageId, Sequence[str]],
) -> CaptionScores:
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
        from pycocoevalcap.meteor.meteor import Meteor
        from pycocoevalcap.rouge.rouge import Rouge
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    except ImportError as exc:
        raise CaptionMetricsError(
            "backend='coco' needs pycocoevalcap: pip install \"uniperceiver-cli[coco-metrics]\" "
            "(and a Java runtime on PATH), or use backend='builtin'"
        ) from exc
    if shutil.which("java") is None:
        raise CaptionMetricsError(
            "backend='coco' runs pycocoevalcap's Java tokenizer and METEOR, but no 'java' is on PATH; "
            "install a Java runtime (>= 8) or use backend='builtin'"
        )
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in references[k]] for k in ids})
    res = tokenizer.tokenize({k: [{"caption": predictions[k]}] for k in ids})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor_score, _ = Meteor().compute_score(gts, res)
    rouge, _ = Rouge().compute_score(gts, res)
    cider, _ = Cider().compute_score(gts, res)
    return CaptionScores(
        bleu1=float(bleu[0]), bleu2=float(bleu[1]), bleu3=float(bleu[2]), bleu4=float(bleu[3]),
        meteor=float(meteor_score), rouge_l=float(rouge), cider=float(cider), num_images=len(ids),
        implementation="pycocoevalcap",
        versions={"pycocoevalcap": _version("pycocoevalcap"), "java": shutil.which("java") or ""},
    )  # fmt: skip
