"""The evaluation engine behind `eval` and `zero-shot` (SPEC §6-§7), also callable from training.

Entry point::

    from uniperceiver_cli.engine.evaluate import evaluate_tasks

    result = evaluate_tasks(model, recipe)               # an eval/zero-shot recipe, or a training recipe
    result["toy_retrieve/r1_i2t"]                        # flat metrics, `<task>/<metric>` -> float
    result.tasks["toy_retrieve"].metrics                 # per task, with protocol and predictions

`evaluate_tasks(model, recipe_or_tasks, *, device=None, output_dir=None, recipe_dir=None, data_root=None,
batch_size=None, checkpoint=None, vocab_cache_dir=None, precision=None) -> EvalResult` evaluates every task of an
eval/zero-shot recipe on its `data`, or every task of a training recipe that has `eval_data`. The model is put in
eval mode under `torch.no_grad()` and its training mode is restored afterwards. `EvalResult` is a `dict` of the flat
metrics (so the training loop can log it as is) that also carries per-task results and metadata. With
`output_dir`, `metrics.json` and the predictions are written there.

Protocols, per task type (every metric is a fraction in [0, 1], CIDEr may exceed 1; papers print ×100):

| task type | metrics | protocol |
|---|---|---|
| image/video classification | `acc1`, `acc5` | logits against every encoded class name; videos: softmax per view (temporal × spatial), mean over views |
| image/video retrieval | `r1_i2t` `r5_i2t` `r10_i2t` `r1_t2i` `r5_t2i` `r10_t2i` `r_mean` `rsum` | all items and all captions encoded once, full ranking (`metrics.retrieval`) |
| image/video caption | `bleu1`..`bleu4` `meteor` `rouge_l` `cider` | batched beam search over the whole vocabulary, encoded once (cached per checkpoint) |
| text classification (GLUE) | `accuracy` (+ `f1` MRPC/QQP, `mcc` CoLA) | cloze: the in-text SPE slot against the encoded label words |

Determinism: no randomness is drawn at evaluation; captions and cloze texts are encoded in groups of equal length
(no padding), so a sample's features do not depend on what it is batched with, and metrics are identical across
runs and evaluation batch sizes (up to float ties). VQA is not evaluated yet: the data engine has no VQA reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from uniperceiver_cli.data.samples import (
    ClassificationBatch,
    ClassificationSample,
    TextClassificationBatch,
    VisualTextBatch,
)
from uniperceiver_cli.engine.candidates import encode_bucketed, tokenize_names
from uniperceiver_cli.engine.data import PathContext, TaskData, TaskDataError, eval_batches
from uniperceiver_cli.model.embed import EOT_ID
from uniperceiver_cli.model.heads import l2_normalize
from uniperceiver_cli.model.uniperceiver import UniPerceiver

__all__ = [
    "METRICS_BY_TYPE",
    "EvalError",
    "EvalResult",
    "EvalTask",
    "FailUnder",
    "Protocol",
    "TaskResult",
    "check_fail_under",
    "checkpoint_sha256",
    "evaluate_tasks",
    "parse_fail_under",
    "resolve_tasks",
    "tasks_from_recipe",
    "vocabulary_features_cached",
    "write_outputs",
]

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]

CLASSIFICATION_TYPES = frozenset({"image_classification", "video_classification"})
RETRIEVAL_TYPES = frozenset({"image_retrieval", "video_retrieval"})
CAPTION_TYPES = frozenset({"image_caption", "video_caption"})
TEXT_TYPES = frozenset({"text_classification"})

#: Metrics each task type can report (`--fail-under` names are checked against these before a run).
METRICS_BY_TYPE: dict[str, tuple[str, ...]] = {
    "image_classification": ("acc1", "acc5"),
    "video_classification": ("acc1", "acc5"),
    "image_retrieval": (
        "r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i", "r10_t2i", "r_mean", "rsum",
    ),
    "video_retrieval": (
        "r1_i2t", "r5_i2t", "r10_i2t", "r1_t2i", "r5_t2i", "r10_t2i", "r_mean", "rsum",
    ),
    "image_caption": ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"),
    "video_caption": ("bleu1", "bleu2", "bleu3", "bleu4", "meteor", "rouge_l", "cider"),
    "text_classification": ("accuracy", "f1", "mcc"),
}  # fmt: skip

#: Top-k rows written to the retrieval predictions (the reference caps ranks at 10).
RANKS_KEPT = 10

VOCAB_CACHE_ENV = "UNIPERCEIVER_CACHE"


class EvalError(Exception):
    """An evaluation cannot run as asked (unsupported task type, bad threshold, unusable model)."""


# ---------------------------------------------------------------------------------------------- protocol


@dataclass(frozen=True)
class Protocol:
    """How a task is evaluated (the recipe's `evaluation` section, SPEC §6-§7).

    Attributes:
        batch_size: samples per evaluation batch.
        beam_size: caption beam size (1 = greedy).
        max_len: caption decoding length in tokens.
        length_penalty: beam ranking divides by (#tokens + 1)^length_penalty.
        temporal_views: temporal clips per video (video classification).
        spatial_crops: spatial crops per clip (video classification).
        view_mode: `uniform` or `interleaved` temporal views.
        caption_metrics: `builtin` (no Java) or `coco` (pycocoevalcap).
        metrics: report only these metrics (None = all of the task type).
    """

    batch_size: int = 64
    beam_size: int = 2
    max_len: int = 21
    length_penalty: float = 0.0
    temporal_views: int = 1
    spatial_crops: int = 1
    view_mode: Literal["uniform", "interleaved"] = "uniform"
    caption_metrics: Literal["builtin", "coco"] = "builtin"
    metrics: tuple[str, ...] | None = None

    @classmethod
    def from_spec(cls, evaluation: Any, *, batch_size: int | None = None) -> Protocol:
        """Build from a recipe `evaluation` section (any object with its attributes)."""
        metrics = getattr(evaluation, "metrics", None)
        return cls(
            batch_size=int(batch_size or getattr(evaluation, "batch_size", None) or 64),
            beam_size=int(getattr(evaluation, "beam_size", 2)),
            max_len=int(getattr(evaluation, "max_len", 21)),
            length_penalty=float(getattr(evaluation, "length_penalty", 0.0)),
            temporal_views=int(getattr(evaluation, "temporal_views", 1)),
            spatial_crops=int(getattr(evaluation, "spatial_crops", 1)),
            view_mode=getattr(evaluation, "view_mode", "uniform"),
            caption_metrics=getattr(evaluation, "caption_metrics", "builtin"),
            metrics=tuple(metrics) if metrics else None,
        )

    def describe(self, task_type: str) -> dict[str, Any]:
        """The protocol fields that matter for a task type (written to `metrics.json`)."""
        out: dict[str, Any] = {"batch_size": self.batch_size}
        if task_type in CAPTION_TYPES:
            out.update(
                beam_size=self.beam_size,
                max_len=self.max_len,
                length_penalty=self.length_penalty,
                caption_metrics=self.caption_metrics,
            )
        if task_type == "video_classification":
            out.update(
                temporal_views=self.temporal_views,
                spatial_crops=self.spatial_crops,
                view_mode=self.view_mode,
                views=self.temporal_views * self.spatial_crops,
            )
        return out


@dataclass
class EvalTask:
    """One task ready to evaluate.

    Attributes:
        spec: the recipe task section (name, type, temperature, frames, ...).
        data: its evaluation dataset (typed samples) and candidates.
        protocol: how it is evaluated.
        split: the data split, for the report.
        data_format: the data format, for the report.
    """

    spec: Any
    data: TaskData
    protocol: Protocol
    split: str = ""
    data_format: str = ""

    @property
    def name(self) -> str:
        """Task name."""
        return str(self.spec.name)

    @property
    def type(self) -> str:
        """Task type."""
        return str(self.spec.type)


@dataclass
class TaskResult:
    """What evaluating one task produced.

    Attributes:
        name: task name.
        type: task type.
        metrics: metric name -> value (fractions).
        num_items: images, videos or sentences evaluated.
        num_texts: captions ranked (retrieval) or references (captioning), else None.
        seconds: wall time.
        protocol: protocol fields that applied.
        implementation: which code computed the metrics, with versions.
        split: data split.
        data_format: data format.
        predictions: captions in COCO result format, classification/cloze top predictions, or None.
        ranks: retrieval top-k rows and ranks of the positives, or None.
    """

    name: str
    type: str
    metrics: dict[str, float]
    num_items: int
    num_texts: int | None = None
    seconds: float = 0.0
    protocol: dict[str, Any] = field(default_factory=dict)
    implementation: dict[str, Any] = field(default_factory=dict)
    split: str = ""
    data_format: str = ""
    predictions: list[dict[str, Any]] | None = None
    ranks: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary without the predictions."""
        return {
            "type": self.type,
            "split": self.split,
            "data_format": self.data_format,
            "num_items": self.num_items,
            "num_texts": self.num_texts,
            "seconds": round(self.seconds, 3),
            "protocol": self.protocol,
            "implementation": self.implementation,
        }


class EvalResult(dict[str, float]):
    """Flat metrics `{"<task>/<metric>": value}`, plus per-task results and run metadata.

    It is a plain `dict` of floats so that callers that only want numbers (the training loop) can log it.

    Attributes:
        tasks: task name -> `TaskResult`, in evaluation order.
        metadata: checkpoint, device, precision, versions, vocabulary cache use.
    """

    def __init__(self, tasks: Mapping[str, TaskResult], metadata: Mapping[str, Any]) -> None:
        """Flatten the task metrics."""
        super().__init__(
            {f"{name}/{k}": float(v) for name, res in tasks.items() for k, v in res.metrics.items()}
        )
        self.tasks: dict[str, TaskResult] = dict(tasks)
        self.metadata: dict[str, Any] = dict(metadata)

    def nested(self) -> dict[str, dict[str, float]]:
        """Metrics by task: `{task: {metric: value}}`."""
        return {name: dict(res.metrics) for name, res in self.tasks.items()}

    def to_json(self) -> dict[str, Any]:
        """The content of `metrics.json`."""
        return {
            "format_version": 1,
            **self.metadata,
            "metrics": self.nested(),
            "tasks": {name: res.summary() for name, res in self.tasks.items()},
        }


# ---------------------------------------------------------------------------------------------- thresholds


@dataclass(frozen=True)
class FailUnder:
    """One `--fail-under METRIC=VALUE` threshold.

    Attributes:
        metric: `metric` (every task that reports it) or `task/metric`.
        value: the minimum accepted value (same scale as the reported metric).
    """

    metric: str
    value: float


def parse_fail_under(items: Sequence[str]) -> list[FailUnder]:
    """Parse `METRIC=VALUE` strings.

    Raises:
        EvalError: a malformed item, naming it and the expected form.
    """
    out: list[FailUnder] = []
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not sep or not name or math.isnan(number):
            raise EvalError(
                f"--fail-under {item!r}: expected METRIC=VALUE with a number, e.g. r1_i2t=0.5 "
                "or toy_retrieve/r1_i2t=0.5"
            )
        out.append(FailUnder(name, number))
    return out


def _threshold_targets(threshold: FailUnder, available: Mapping[str, Sequence[str]]) -> list[str]:
    """Flat names `task/metric` a threshold applies to, given each task's metric names."""
    task, sep, metric = threshold.metric.rpartition("/")
    if sep:
        if task in available and metric in available[task]:
            return [threshold.metric]
        return []
    return [
        f"{t}/{threshold.metric}" for t, names in available.items() if threshold.metric in names
    ]


def check_fail_under(
    thresholds: Sequence[FailUnder], available: Mapping[str, Sequence[str]]
) -> None:
    """Check that every threshold names a metric some task reports (before or after a run).

    Args:
        thresholds: parsed thresholds.
        available: task name -> metric names it reports (or can report).

    Raises:
        EvalError: for an unknown metric, listing the known names.
    """
    for th in thresholds:
        if not _threshold_targets(th, available):
            known = sorted({m for names in available.values() for m in names})
            tasks = ", ".join(available)
            raise EvalError(
                f"--fail-under {th.metric}: no evaluated task reports this metric; known metrics: "
                f"{', '.join(known)} (prefix with a task name to pick one task: {tasks})"
            )


def failed_thresholds(result: EvalResult, thresholds: Sequence[FailUnder]) -> list[dict[str, Any]]:
    """Thresholds that the result falls short of, as `{metric, value, threshold}` records.

    Raises:
        EvalError: a threshold names a metric the result does not have.
    """
    available = {name: list(res.metrics) for name, res in result.tasks.items()}
    check_fail_under(thresholds, available)
    failures: list[dict[str, Any]] = []
    for th in thresholds:
        for flat in _threshold_targets(th, available):
            if result[flat] < th.value:
                failures.append({"metric": flat, "value": result[flat], "threshold": th.value})
    return failures


# ---------------------------------------------------------------------------------------------- data


class _RepeatViews(torch.utils.data.Dataset[Any]):
    """Serve every clip of a classification dataset as V identical views `(V, T, 3, S, S)`.

    Used for in-memory toy videos, whose uniform motion makes every temporal view the same clip.
    """

    def __init__(self, dataset: torch.utils.data.Dataset[Any], views: int) -> None:
        self.dataset = dataset
        self.views = views

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> ClassificationSample:
        sample: ClassificationSample = self.dataset[index]
        pixels = sample.pixels.unsqueeze(0).expand(self.views, *sample.pixels.shape)
        return ClassificationSample(
            pixels=pixels.contiguous(), label=sample.label, index=sample.index
        )


def open_eval_data(
    spec: Any, data_spec: Any, *, paths: PathContext, model_image_size: int, protocol: Protocol
) -> TaskData:
    """Open a task's evaluation data (the training engine's readers in evaluation mode, plus multi-view video).

    Args:
        spec: the recipe task section.
        data_spec: its data section.
        paths: how relative paths resolve.
        model_image_size: default input side.
        protocol: views for video classification.

    Returns:
        `TaskData` whose samples are evaluation samples (all captions per item, centre crops, views).

    Raises:
        TaskDataError: a task type the engine cannot evaluate (VQA, MLM).
    """
    from uniperceiver_cli.engine.data import open_task_data

    if spec.type == "vqa":
        raise TaskDataError(
            f"task {spec.name!r}: VQA evaluation needs a VQA reader, which the data engine does not "
            "provide yet; remove the task from the recipe"
        )
    if spec.type not in METRICS_BY_TYPE:
        raise TaskDataError(
            f"task {spec.name!r}: task type {spec.type!r} has no evaluation protocol; evaluable types: "
            f"{', '.join(METRICS_BY_TYPE)}"
        )
    views = protocol.temporal_views * protocol.spatial_crops
    if spec.type != "video_classification" or views == 1:
        return open_task_data(
            spec, data_spec, train=False, paths=paths, model_image_size=model_image_size
        )
    if data_spec.format == "toy":
        data = open_task_data(
            spec, data_spec, train=False, paths=paths, model_image_size=model_image_size
        )
        return TaskData(
            _RepeatViews(data.dataset, views), data.collate, class_names=data.class_names
        )
    return _open_multiview_videos(spec, data_spec, paths, model_image_size, protocol)


def _open_multiview_videos(
    spec: Any, data_spec: Any, paths: PathContext, model_image_size: int, protocol: Protocol
) -> TaskData:
    from uniperceiver_cli.data.formats.base import read_class_names
    from uniperceiver_cli.data.formats.video_classification import VideoClassificationDataset
    from uniperceiver_cli.data.options import options_for
    from uniperceiver_cli.data.transforms import video_transform
    from uniperceiver_cli.data.video import ClipSpec
    from uniperceiver_cli.recipe.data import PATH_FIELDS

    values = data_spec.model_dump()
    for key in PATH_FIELDS:
        if isinstance(values.get(key), str):
            values[key] = paths.resolve(values[key])
    options = options_for(values)
    size = int(getattr(spec, "image_size", None) or model_image_size)
    clip = ClipSpec(
        num_frames=int(spec.num_frames),
        frame_stride=int(spec.frame_stride),
        temporal_views=protocol.temporal_views,
        spatial_crops=protocol.spatial_crops,
        view_mode=protocol.view_mode,
    )
    transform = video_transform(size, train=False, num_spatial_crops=protocol.spatial_crops)
    ds = VideoClassificationDataset(options, transform=transform, clip=clip, train=False)  # type: ignore[arg-type]
    names = tuple(ds.class_synonyms)
    if getattr(spec, "class_names_file", None):
        names = tuple(read_class_names(paths.resolve(spec.class_names_file), expected=len(names)))
    return TaskData(ds, ds.collate_fn, class_names=names)


def tasks_from_recipe(
    recipe: Any,
    *,
    model_image_size: int,
    recipe_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    batch_size: int | None = None,
) -> list[EvalTask]:
    """The evaluation tasks of a recipe.

    Eval and zero-shot recipes evaluate every task on its `data`; training recipes evaluate the tasks that
    have `eval_data` (others are skipped).

    Args:
        recipe: a validated recipe root model.
        model_image_size: the model's image side (default input size).
        recipe_dir: folder relative paths fall back to (default: the current folder).
        data_root: overrides the recipe's data root.
        batch_size: overrides `evaluation.batch_size`.

    Returns:
        The tasks, in recipe order.
    """
    from uniperceiver_cli.recipe.paths import data_root as resolve_data_root

    root = Path(data_root) if data_root is not None else resolve_data_root(recipe.run.data_root)
    paths = PathContext(root, Path(recipe_dir) if recipe_dir is not None else Path.cwd())
    protocol = Protocol.from_spec(recipe.evaluation, batch_size=batch_size)
    evaluating = getattr(recipe, "command", "eval") in ("eval", "zero_shot")
    tasks: list[EvalTask] = []
    for spec in recipe.tasks:
        data_spec = spec.data if evaluating else spec.eval_data
        if data_spec is None:
            continue
        if not evaluating and spec.type not in METRICS_BY_TYPE:
            continue
        data = open_eval_data(
            spec, data_spec, paths=paths, model_image_size=model_image_size, protocol=protocol
        )
        tasks.append(
            EvalTask(spec, data, protocol, split=str(data_spec.split), data_format=data_spec.format)
        )
    return tasks


# ---------------------------------------------------------------------------------------------- vocabulary


def checkpoint_sha256(path: str | Path) -> str:
    """SHA-256 identifying a checkpoint: of the file, or of a folder's weight and config files.

    For a folder, the digest runs over the sorted `*.safetensors` and `*.json` files (name and content), so it
    changes whenever the weights or the architecture do.

    Raises:
        EvalError: the path is neither a file nor a folder holding such files.
    """
    p = Path(path)
    digest = hashlib.sha256()
    if p.is_file():
        files = [p]
    elif p.is_dir():
        files = sorted(
            f for f in p.iterdir() if f.is_file() and f.suffix in (".safetensors", ".json")
        )
    else:
        files = []
    if not files:
        raise EvalError(
            f"{p}: expected a checkpoint file or a folder with .safetensors/.json files"
        )
    for f in files:
        if p.is_dir():
            digest.update(f.name.encode("utf-8") + b"\0")
        with f.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def default_cache_dir() -> Path:
    """Where encoded vocabularies are cached: `$UNIPERCEIVER_CACHE`, else `$XDG_CACHE_HOME/uniperceiver-cli`,
    else `~/.cache/uniperceiver-cli`."""
    if os.environ.get(VOCAB_CACHE_ENV):
        return Path(os.environ[VOCAB_CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "uniperceiver-cli"


def vocabulary_features_cached(
    model: UniPerceiver,
    *,
    fingerprint: str | None = None,
    cache_dir: str | Path | None = None,
) -> tuple[Tensor, str]:
    """Post-projected features of the whole vocabulary (V, D), encoded once per checkpoint.

    In memory the model keeps the last encoding while its weights are unchanged; with a checkpoint
    `fingerprint` and a `cache_dir` the features are also stored on disk as
    `<cache_dir>/vocab/<fingerprint[:32]>-<device type>-<dtype>.safetensors` and read back by later runs.

    Args:
        model: the model, in eval mode, under `torch.no_grad()`.
        fingerprint: checkpoint SHA-256 (`checkpoint_sha256`), or None for no disk cache.
        cache_dir: cache root, or None for no disk cache.

    Returns:
        The features and where they came from: `disk`, `encoded` (and cached in memory).
    """
    weight = model.embed.word.weight
    path: Path | None = None
    if fingerprint and cache_dir is not None:
        dtype = str(weight.dtype).removeprefix("torch.")
        name = f"{fingerprint[:32]}-{weight.device.type}-{dtype}.safetensors"
        path = Path(cache_dir) / "vocab" / name
        if path.is_file():
            from safetensors.torch import load_file

            try:
                feats = load_file(str(path))["features"]
            except (OSError, KeyError, ValueError, RuntimeError) as exc:
                logger.warning("ignoring unreadable vocabulary cache %s (%s)", path, exc)
            else:
                expected = (model.config.vocab_size, model.config.hidden_size)
                if tuple(feats.shape) == expected:
                    return feats.to(device=weight.device, dtype=weight.dtype), "disk"
                logger.warning("ignoring vocabulary cache %s of shape %s", path, tuple(feats.shape))
    feats = model.vocabulary_features()
    if path is not None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({"features": feats.detach().cpu().contiguous()}, str(tmp))
        tmp.replace(path)
    return feats, "encoded"


# ---------------------------------------------------------------------------------------------- evaluators


def _temperature(spec: Any) -> str:
    from uniperceiver_cli.recipe.tasks import DEFAULT_TEMPERATURE

    return str(getattr(spec, "temperature", None) or DEFAULT_TEMPERATURE[spec.type])


def _batches(task: EvalTask) -> Iterator[Any]:
    return eval_batches(task.data, batch_size=task.protocol.batch_size)


def _single_view(pixels: Tensor) -> Tensor:
    """Drop a singleton view axis: (B, 1, T, 3, S, S) -> (B, T, 3, S, S)."""
    if pixels.dim() == 6:
        if pixels.shape[1] != 1:
            raise EvalError(
                f"expected one view per item for this task, found {pixels.shape[1]}; "
                "set evaluation.temporal_views and spatial_crops to 1"
            )
        return pixels[:, 0]
    return pixels


def _encode_candidates(
    model: UniPerceiver,
    task: EvalTask,
    names: Sequence[str],
    device: torch.device,
    *,
    kind: Literal["classes", "labels"],
) -> Tensor:
    """Encode the class names or label words a task scores against (one group per token length).

    Args:
        model: the model.
        task: the task (its name prefixes the routing task name `<task>.<kind>` of the target set).
        names: C strings, tokenised as `[name tokens..., EOT]`.
        device: where to encode.
        kind: `classes` (class names) or `labels` (label words).

    Returns:
        Projected features (C, D).

    Raises:
        EvalError: when there are no names.
    """
    if not names:
        what = "class names" if kind == "classes" else "label words"
        raise EvalError(f"task {task.name!r}: the data has no {what} to score against")
    tokens = tokenize_names(names)
    feats, _ = encode_bucketed(
        model,
        tokens.ids.to(device),
        tokens.padding.to(device),
        kind=kind,
        task=f"{task.name}.{kind}",
    )
    return feats


def _select(metrics: dict[str, float], wanted: tuple[str, ...] | None) -> dict[str, float]:
    if wanted is None:
        return metrics
    return {k: v for k, v in metrics.items() if k in wanted}


def _eval_classification(model: UniPerceiver, task: EvalTask, device: torch.device) -> TaskResult:
    from uniperceiver_cli.metrics.classification import multiview_probabilities, topk_accuracy

    spec = task.spec
    first_names = [n[0] for n in task.data.class_names or ()]
    classes = _encode_candidates(model, task, first_names, device, kind="classes")
    temp = _temperature(spec)
    # A prompt-tuned checkpoint may carry a linear head for this task (SPEC §5.1 `fc_prompt`):
    # logits = w_sim * cos-logits + fc(features).
    prompt_head = getattr(model, "prompt_heads", {}).get(task.name)
    scores: list[Tensor] = []
    labels: list[Tensor] = []
    indices: list[Tensor] = []
    views = 1

    def class_logits(feats: Tensor) -> Tensor:
        logits = model.head.logits(feats, classes, temp)
        if prompt_head is None:
            return logits
        out_features = int(prompt_head.fc.out_features)
        if out_features != logits.shape[1]:
            raise EvalError(
                f"task {task.name!r}: the checkpoint's prompt-tuning linear head has {out_features} classes, "
                f"the evaluation data {logits.shape[1]}"
            )
        head_logits: Tensor = prompt_head(logits, feats)
        return head_logits

    for batch in _batches(task):
        assert isinstance(batch, ClassificationBatch)
        pixels = batch.pixels.to(device)
        if pixels.dim() == 6:  # (B, V, T, 3, S, S): softmax per view, mean over views
            b, views = int(pixels.shape[0]), int(pixels.shape[1])
            feats = model.visual_features(
                pixels.flatten(0, 1), task_type=spec.type, task=task.name
            ).features
            out = multiview_probabilities(class_logits(feats).view(b, views, -1))
        else:
            feats = model.visual_features(pixels, task_type=spec.type, task=task.name).features
            out = class_logits(feats)
        scores.append(out.float().cpu())
        labels.append(batch.labels)
        indices.append(batch.indices)
    if not scores:
        raise EvalError(f"task {task.name!r}: the evaluation data is empty")
    all_scores = torch.cat(scores)
    all_labels = torch.cat(labels)
    ks = tuple(k for k in (1, 5) if k <= all_scores.shape[1])
    acc = topk_accuracy(all_scores, all_labels, ks=ks)
    metrics = {f"acc{k}": acc[f"top{k}"] / 100.0 for k in ks}
    top = all_scores.topk(min(5, all_scores.shape[1]), dim=1).indices
    predictions = [
        {"index": int(i), "label": int(y), "top5": [int(c) for c in row]}
        for i, y, row in zip(torch.cat(indices).tolist(), all_labels.tolist(), top, strict=True)
    ]
    protocol = task.protocol.describe(spec.type)
    protocol["views"] = views
    protocol["temperature"] = temp
    protocol["prompt_linear_head"] = prompt_head is not None
    return TaskResult(
        name=task.name,
        type=spec.type,
        metrics=_select(metrics, task.protocol.metrics),
        num_items=int(all_labels.numel()),
        protocol=protocol,
        implementation={"metrics": "uniperceiver_cli.metrics.classification.topk_accuracy"},
        predictions=predictions,
    )


def _topk_rows(sim: Tensor, k: int, chunk: int = 1024) -> Tensor:
    """Indices (Q, k) of the k highest columns of every row, chunked over rows.

    Equal scores are ordered by column index (the tie rule of `metrics.retrieval`); which of several
    candidates tied exactly at the k-th place is kept is up to `torch.topk`.
    """
    out: list[Tensor] = []
    for s in range(0, sim.shape[0], chunk):
        top = sim[s : s + chunk].topk(k, dim=1)
        by_index = top.indices.sort(dim=1, stable=True)
        values = top.values.gather(1, by_index.indices)
        order = values.sort(dim=1, descending=True, stable=True).indices
        out.append(by_index.values.gather(1, order))
    return torch.cat(out).cpu()


def rank_retrieval(
    visual: Tensor, texts: Tensor, text_owner: Tensor, *, chunk: int = 1024
) -> tuple[dict[str, float], dict[str, Any]]:
    """Full-ranking retrieval metrics and the top-k rows (SPEC §7).

    Args:
        visual: L2-normalised item features (Q, D).
        texts: L2-normalised caption features (N, D).
        text_owner: (N,) item index of each caption.
        chunk: rows ranked at once for the top-k lists.

    Returns:
        Metrics (fractions; `r1_i2t`, ... `r_mean`, `rsum`) and the ranks record: `i2t_top` (Q, k) caption
        indices, `t2i_top` (N, k) item indices, `i2t_rank`/`t2i_rank` (0-based rank of the best positive, or
        None beyond k).
    """
    from uniperceiver_cli.metrics.retrieval import retrieval_metrics

    sim = visual.float() @ texts.float().t()  # (Q, N)
    raw = retrieval_metrics(sim, text_owner.to(sim.device))
    metrics: dict[str, float] = {}
    for direction in ("i2t", "t2i"):
        for k in (1, 5, 10):
            metrics[f"r{k}_{direction}"] = raw[f"{direction}_r{k}"] / 100.0
    metrics["r_mean"] = raw["r_mean"] / 100.0
    metrics["rsum"] = raw["rsum"] / 100.0
    owner = text_owner.cpu()
    k_i2t = min(RANKS_KEPT, sim.shape[1])
    k_t2i = min(RANKS_KEPT, sim.shape[0])
    i2t_top = _topk_rows(sim, k_i2t, chunk)  # (Q, k) caption indices
    t2i_top = _topk_rows(sim.t(), k_t2i, chunk)  # (N, k) item indices
    hits_i2t = owner[i2t_top] == torch.arange(sim.shape[0]).unsqueeze(1)
    hits_t2i = t2i_top == owner.unsqueeze(1)

    def first_hit(hits: Tensor) -> list[int | None]:
        found = hits.any(dim=1)
        pos = hits.to(torch.int64).argmax(dim=1)
        return [int(p) if f else None for p, f in zip(pos.tolist(), found.tolist(), strict=True)]

    ranks = {
        "k": RANKS_KEPT,
        "i2t_top": i2t_top.tolist(),
        "i2t_rank": first_hit(hits_i2t),
        "t2i_top": t2i_top.tolist(),
        "t2i_rank": first_hit(hits_t2i),
    }
    return metrics, ranks


def _eval_retrieval(model: UniPerceiver, task: EvalTask, device: torch.device) -> TaskResult:
    spec = task.spec
    feats: list[Tensor] = []
    item_ids: list[int | str] = []
    ids: list[Tensor] = []
    owners: list[Tensor] = []
    captions: list[str] = []
    offset = 0
    for batch in _batches(task):
        assert isinstance(batch, VisualTextBatch)
        pixels = _single_view(batch.pixels.to(device))
        v = model.visual_features(pixels, task_type=spec.type, task=task.name).features
        feats.append(l2_normalize(v).float())
        # Strip each caption's padding: captions are re-grouped by length below.
        lengths = (~batch.text_padding).sum(dim=1).tolist()
        ids.extend(batch.text_ids[row, :n] for row, n in enumerate(lengths))
        owners.append(batch.text_owner + offset)
        item_ids.extend(batch.item_ids)
        captions.extend(batch.captions)
        offset += batch.batch_size
    if not feats:
        raise EvalError(f"task {task.name!r}: the evaluation data is empty")
    from uniperceiver_cli.data.samples import pad_sequences

    text_ids, text_pad = pad_sequences(ids)
    text_feats, _ = encode_bucketed(
        model,
        text_ids.to(device),
        text_pad.to(device),
        kind="captions",
        task=f"{task.name}.captions",
        chunk_size=max(1, task.protocol.batch_size * 4),
    )
    visual = torch.cat(feats)
    texts = l2_normalize(text_feats).float()
    owner = torch.cat(owners)
    metrics, ranks = rank_retrieval(visual, texts, owner)
    ranks["items"] = [_json_id(i) for i in item_ids]
    ranks["texts"] = captions
    ranks["text_item"] = owner.tolist()
    return TaskResult(
        name=task.name,
        type=spec.type,
        metrics=_select(metrics, task.protocol.metrics),
        num_items=int(visual.shape[0]),
        num_texts=int(texts.shape[0]),
        protocol=task.protocol.describe(spec.type)
        | {"max_text_len": int(getattr(spec, "max_text_len", 0))},
        implementation={"metrics": "uniperceiver_cli.metrics.retrieval.retrieval_metrics"},
        ranks=ranks,
    )


def _json_id(value: int | str) -> int | str:
    return value if isinstance(value, int | str) else str(value)


def decode_captions(model: UniPerceiver, ids: Tensor) -> list[str]:
    """Detokenise decoded ids (B, L) up to the first EOT."""
    texts: list[str] = []
    for row in ids.tolist():
        words = row[: row.index(EOT_ID)] if EOT_ID in row else row
        texts.append(model.tokenizer.decode(words).strip())
    return texts


def _eval_caption(
    model: UniPerceiver, task: EvalTask, device: torch.device, vocab: Tensor
) -> TaskResult:
    from uniperceiver_cli.metrics.caption import compute_caption_metrics
    from uniperceiver_cli.model.decode import caption_search

    spec = task.spec
    proto = task.protocol
    predictions: dict[int | str, str] = {}
    references: dict[int | str, list[str]] = {}
    order: list[int | str] = []
    for batch in _batches(task):
        assert isinstance(batch, VisualTextBatch)
        pixels = _single_view(batch.pixels.to(device))
        result = caption_search(
            model,
            pixels,
            beam_size=proto.beam_size,
            max_len=proto.max_len,
            length_penalty=proto.length_penalty,
            vocab_features=vocab,
            task_type=spec.type,
            task=task.name,
        )
        texts = decode_captions(model, result.ids)
        owners = batch.text_owner.tolist()
        for b, item in enumerate(batch.item_ids):
            key = _json_id(item)
            if key in predictions:  # a duplicated item keeps its first caption (SPEC §7)
                continue
            predictions[key] = texts[b]
            references[key] = [c for c, o in zip(batch.captions, owners, strict=True) if o == b]
            order.append(key)
    if not predictions:
        raise EvalError(f"task {task.name!r}: the evaluation data is empty")
    scores = compute_caption_metrics(predictions, references, backend=proto.caption_metrics)
    metrics = {
        "bleu1": scores.bleu1,
        "bleu2": scores.bleu2,
        "bleu3": scores.bleu3,
        "bleu4": scores.bleu4,
        "meteor": scores.meteor,
        "rouge_l": scores.rouge_l,
        "cider": scores.cider,
    }
    return TaskResult(
        name=task.name,
        type=spec.type,
        metrics=_select(metrics, proto.metrics),
        num_items=len(predictions),
        num_texts=sum(len(r) for r in references.values()),
        protocol=proto.describe(spec.type),
        implementation={"metrics": scores.implementation, "versions": dict(scores.versions)},
        predictions=[{"image_id": k, "caption": predictions[k]} for k in order],
    )


def _eval_cloze(model: UniPerceiver, task: EvalTask, device: torch.device) -> TaskResult:
    from uniperceiver_cli.metrics.glue import accuracy, glue_metrics

    spec = task.spec
    words = task.data.label_words or ()
    label_feats = _encode_candidates(model, task, list(words), device, kind="labels")
    preds: list[int] = []
    labels: list[int] = []
    indices: list[int] = []
    for batch in _batches(task):
        assert isinstance(batch, TextClassificationBatch)
        lengths = (~batch.padding).sum(dim=1)
        batch_pred = torch.empty(batch.batch_size, dtype=torch.int64)
        # Equal-length groups: no padded positions, so a sentence's score does not depend on its batch.
        for n in torch.unique(lengths).tolist():
            rows = torch.nonzero(lengths == n).flatten()
            scores = model.cloze_logits(
                batch.ids[rows, : int(n)].to(device),
                None,
                label_feats,
                task_type=spec.type,
                task=task.name,
            )
            batch_pred[rows] = scores.logits.argmax(dim=1).cpu()
        preds.extend(batch_pred.tolist())
        labels.extend(batch.labels.tolist())
        indices.extend(batch.indices.tolist())
    if not preds:
        raise EvalError(f"task {task.name!r}: the evaluation data is empty")
    glue_task = getattr(spec.data, "glue_task", None) if spec.data.format == "glue_tsv" else None
    if glue_task is not None:
        raw = glue_metrics(str(glue_task), preds, labels)
        implementation = "uniperceiver_cli.metrics.glue.glue_metrics"
    else:
        raw = {"accuracy": accuracy(preds, labels)}
        implementation = "uniperceiver_cli.metrics.glue.accuracy"
    names = {"accuracy": "accuracy", "f1": "f1", "matthews_corr": "mcc"}
    metrics = {names[k]: v / 100.0 for k, v in raw.items()}
    return TaskResult(
        name=task.name,
        type=spec.type,
        metrics=_select(metrics, task.protocol.metrics),
        num_items=len(preds),
        protocol=task.protocol.describe(spec.type) | {"label_words": list(words)},
        implementation={"metrics": implementation},
        predictions=[
            {"index": i, "label": y, "prediction": p}
            for i, y, p in zip(indices, labels, preds, strict=True)
        ],
    )


# ---------------------------------------------------------------------------------------------- driver


def _autocast(device: torch.device, precision: Precision) -> contextlib.AbstractContextManager[Any]:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def _versions() -> dict[str, str]:
    from importlib import metadata

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "absent"

    return {
        "uniperceiver_cli": version("uniperceiver-cli"),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def resolve_tasks(
    recipe_or_tasks: Any,
    model: UniPerceiver,
    *,
    recipe_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    batch_size: int | None = None,
) -> tuple[list[EvalTask], Any]:
    """The evaluation tasks of a recipe for `model` (its image size), as `evaluate_tasks` runs them.

    Args:
        recipe_or_tasks: a recipe root model, a `LoadedRecipe` or a sequence of `EvalTask`.
        model: the model to evaluate.
        recipe_dir: folder relative data paths fall back to (default: the recipe file's folder,
            else cwd).
        data_root: overrides the recipe's data root.
        batch_size: overrides the evaluation batch size.

    Returns:
        The tasks in recipe order, and the recipe (None when tasks were given).

    Raises:
        TaskDataError, DataError: the data cannot be opened.
        EvalError: the argument is neither a recipe nor tasks.
    """
    recipe = recipe_or_tasks
    if hasattr(recipe, "recipe") and hasattr(recipe, "path"):  # a LoadedRecipe
        recipe_dir = recipe_dir if recipe_dir is not None else Path(recipe.path).parent
        recipe = recipe.recipe
    if hasattr(recipe, "tasks") and hasattr(recipe, "evaluation"):
        tasks = tasks_from_recipe(
            recipe,
            model_image_size=model.config.image_size,
            recipe_dir=recipe_dir,
            data_root=data_root,
            batch_size=batch_size,
        )
        return tasks, recipe
    items = list(recipe_or_tasks)
    if not all(isinstance(t, EvalTask) for t in items):
        raise EvalError(
            "evaluate_tasks expects a recipe, a LoadedRecipe or a sequence of EvalTask, found "
            f"{type(recipe_or_tasks).__name__}"
        )
    return items, None


def evaluate_tasks(
    model: UniPerceiver,
    recipe_or_tasks: Any,
    *,
    device: str | torch.device | None = None,
    output_dir: str | Path | None = None,
    recipe_dir: str | Path | None = None,
    data_root: str | Path | None = None,
    batch_size: int | None = None,
    checkpoint: str | Path | None = None,
    vocab_cache_dir: str | Path | None = None,
    precision: Precision | None = None,
) -> EvalResult:
    """Evaluate a model on the tasks of a recipe (or on prepared `EvalTask`s).

    Args:
        model: the model (any mode; eval mode is used and the previous mode restored).
        recipe_or_tasks: an eval / zero-shot recipe (every task on its `data`), a training recipe (tasks with
            `eval_data`), a `LoadedRecipe`, or a sequence of `EvalTask`.
        device: where to evaluate; default the model's device (the model is moved when it differs).
        output_dir: write `metrics.json` and the predictions there (None: write nothing).
        recipe_dir: folder relative data paths fall back to (default: the recipe file's folder, else cwd).
        data_root: overrides the recipe's data root.
        batch_size: overrides the evaluation batch size.
        checkpoint: the checkpoint the model came from (its SHA-256 goes into the metadata and keys the
            vocabulary cache).
        vocab_cache_dir: disk cache root for encoded vocabularies (needs `checkpoint`); None: memory only.
        precision: autocast precision; default the recipe's `runtime.precision`, else fp32.

    Returns:
        `EvalResult` (flat metrics dict with per-task results and metadata).

    Raises:
        TaskDataError, DataError: the data cannot be opened or read.
        EvalError: an unsupported task or an empty split.
    """
    params = next(model.parameters(), None)
    if params is None:
        raise EvalError("the model has no parameters to evaluate")
    dev = torch.device(device) if device is not None else params.device
    if dev != params.device:
        model.to(dev)
    tasks, recipe = resolve_tasks(
        recipe_or_tasks, model, recipe_dir=recipe_dir, data_root=data_root, batch_size=batch_size
    )
    if precision is None:
        precision = getattr(getattr(recipe, "runtime", None), "precision", "fp32")
    assert precision is not None
    sha = checkpoint_sha256(checkpoint) if checkpoint is not None else None
    metadata: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": {"path": str(checkpoint) if checkpoint else None, "sha256": sha},
        "model": {
            "hidden_size": model.config.hidden_size,
            "num_layers": model.config.num_layers,
            "image_size": model.config.image_size,
            "moe": model.config.moe is not None,
        },
        "device": str(dev),
        "precision": precision,
        "versions": _versions(),
        "metric_scale": "fraction (papers print x100)",
    }
    if recipe is not None:
        metadata["run"] = str(recipe.run.name)
        metadata["command"] = str(getattr(recipe, "command", ""))
    results: dict[str, TaskResult] = {}
    vocab: Tensor | None = None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _autocast(dev, precision):
            for task in tasks:
                start = time.perf_counter()
                if task.type in CLASSIFICATION_TYPES:
                    res = _eval_classification(model, task, dev)
                elif task.type in RETRIEVAL_TYPES:
                    res = _eval_retrieval(model, task, dev)
                elif task.type in CAPTION_TYPES:
                    if vocab is None:
                        t0 = time.perf_counter()
                        vocab, source = vocabulary_features_cached(
                            model, fingerprint=sha, cache_dir=vocab_cache_dir
                        )
                        metadata["vocabulary"] = {
                            "source": source,
                            "seconds": round(time.perf_counter() - t0, 3),
                            "size": int(vocab.shape[0]),
                        }
                    res = _eval_caption(model, task, dev, vocab)
                elif task.type in TEXT_TYPES:
                    res = _eval_cloze(model, task, dev)
                else:
                    raise EvalError(f"task {task.name!r}: no evaluation for type {task.type!r}")
                res.seconds = time.perf_counter() - start
                res.split = task.split
                res.data_format = task.data_format
                results[task.name] = res
                logger.info(
                    "evaluated %s (%s, %d items) in %.1f s", task.name, task.type, res.num_items,
                    res.seconds,
                )  # fmt: skip
    finally:
        model.train(was_training)
    result = EvalResult(results, metadata)
    if output_dir is not None:
        write_outputs(result, output_dir)
    return result


def _write_json(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_outputs(result: EvalResult, output_dir: str | Path) -> list[Path]:
    """Write `metrics.json` and the predictions of every task.

    Files: `metrics.json`; `<task>.captions.json` (COCO result format `[{image_id, caption}]`);
    `<task>.ranks.json` (retrieval: top-10 rows both ways and the rank of the best positive);
    `<task>.predictions.json` (classification top-5 / cloze predictions).

    Returns:
        The files written.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "metrics.json"]
    _write_json(written[0], result.to_json())
    for name, res in result.tasks.items():
        if res.type in CAPTION_TYPES and res.predictions is not None:
            path = out / f"{name}.captions.json"
            _write_json(path, res.predictions)
            written.append(path)
        elif res.ranks is not None:
            path = out / f"{name}.ranks.json"
            _write_json(path, res.ranks)
            written.append(path)
        elif res.predictions is not None:
            path = out / f"{name}.predictions.json"
            _write_json(path, res.predictions)
            written.append(path)
    return written


def task_result_dict(res: TaskResult) -> dict[str, Any]:
    """A `TaskResult` as plain data (with predictions), for tests and tools."""
    return asdict(res)
