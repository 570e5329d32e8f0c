"""Built-in validation during training: accuracy@1 for classification tasks, R@1 in both directions for
retrieval, and cloze accuracy for text classification, on each task's `eval_data`.

This is a quick check of learning, not the paper's evaluation protocols (those live in the evaluation engine,
which the loop calls instead when it is installed). Items are split across ranks and the counts reduced.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from uniperceiver_cli.data.samples import (
    ClassificationBatch,
    TextClassificationBatch,
    VisualTextBatch,
)
from uniperceiver_cli.engine.candidates import encode_bucketed, tokenize_names
from uniperceiver_cli.engine.data import TaskData, eval_batches
from uniperceiver_cli.engine.runtime import Runtime
from uniperceiver_cli.model.uniperceiver import UniPerceiver

logger = logging.getLogger(__name__)

#: Task types the built-in validation scores.
VALIDATED_TYPES = frozenset(
    {
        "image_classification",
        "video_classification",
        "image_retrieval",
        "video_retrieval",
        "text_classification",
    }
)


def _reduce_counts(correct: float, total: float, runtime: Runtime) -> tuple[float, float]:
    if not runtime.distributed:
        return correct, total
    t = torch.tensor([correct, total], dtype=torch.float64, device=runtime.device)
    dist.all_reduce(t)
    return float(t[0]), float(t[1])


def _gather_rows(x: Tensor, runtime: Runtime) -> Tensor:
    """Concatenate variable-length (N_r, ...) tensors of every rank (CPU, no autograd)."""
    if not runtime.distributed:
        return x
    parts: list[Any] = [None] * runtime.world_size
    dist.all_gather_object(parts, x.cpu())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def classification_accuracy(
    model: UniPerceiver,
    spec: Any,
    data: TaskData,
    names: tuple[tuple[str, ...], ...],
    *,
    batch_size: int,
    runtime: Runtime,
    head: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Accuracy@1 (%) of a classification task against its encoded class names (first synonyms)."""
    from uniperceiver_cli.recipe.tasks import DEFAULT_TEMPERATURE

    dev = runtime.device
    tokens = tokenize_names([n[0] for n in names])
    classes, _ = encode_bucketed(
        model,
        tokens.ids.to(dev),
        tokens.padding.to(dev),
        kind="classes",
        task=f"{spec.name}.classes",
    )
    temp = spec.temperature or DEFAULT_TEMPERATURE[spec.type]
    correct = total = 0.0
    for batch in eval_batches(
        data, batch_size=batch_size, rank=runtime.rank, world_size=runtime.world_size
    ):
        assert isinstance(batch, ClassificationBatch)
        pixels = batch.pixels.to(dev)
        if pixels.dim() == 6:  # (B, V, T, 3, S, S): average softmax over views
            b, v = pixels.shape[:2]
            feats = model.visual_features(
                pixels.flatten(0, 1), task_type=spec.type, task=spec.name
            ).features
            logits = model.head.logits(feats, classes, temp)
            if head is not None:
                logits = head(logits, feats)
            probs = logits.softmax(-1).view(b, v, -1).mean(1)
        else:
            feats = model.visual_features(pixels, task_type=spec.type, task=spec.name).features
            logits = model.head.logits(feats, classes, temp)
            if head is not None:
                logits = head(logits, feats)
            probs = logits
        correct += float((probs.argmax(-1).cpu() == batch.labels).sum())
        total += batch.batch_size
    correct, total = _reduce_counts(correct, total, runtime)
    return {"acc1": 100.0 * correct / max(1.0, total), "count": total}


@torch.no_grad()
def retrieval_recall(
    model: UniPerceiver, spec: Any, data: TaskData, *, batch_size: int, runtime: Runtime
) -> dict[str, float]:
    """R@1 (%) image→text (any of the item's captions ranked first) and text→image, over the whole split."""
    dev = runtime.device
    vis: list[Tensor] = []
    txt: list[Tensor] = []
    owners: list[Tensor] = []
    items: list[Tensor] = []
    for batch in eval_batches(
        data, batch_size=batch_size, rank=runtime.rank, world_size=runtime.world_size
    ):
        assert isinstance(batch, VisualTextBatch)
        v = model.visual_features(
            batch.pixels.to(dev), task_type=spec.type, task=spec.name
        ).features
        t = model.target_features(
            batch.text_ids.to(dev),
            batch.text_padding.to(dev),
            kind="captions",
            task=f"{spec.name}.captions",
        ).features
        vis.append(torch.nn.functional.normalize(v, dim=-1).cpu())
        txt.append(torch.nn.functional.normalize(t, dim=-1).cpu())
        items.append(batch.indices)
        owners.append(batch.indices[batch.text_owner])
    all_v = _gather_rows(torch.cat(vis), runtime)
    all_t = _gather_rows(torch.cat(txt), runtime)
    item_ids = _gather_rows(torch.cat(items), runtime)
    owner_ids = _gather_rows(torch.cat(owners), runtime)
    sim = all_v @ all_t.t()  # (N_items, N_captions)
    i2t = (owner_ids[sim.argmax(dim=1)] == item_ids).float().mean()
    t2i = (item_ids[sim.argmax(dim=0)] == owner_ids).float().mean()
    return {
        "i2t_r1": 100.0 * float(i2t),
        "t2i_r1": 100.0 * float(t2i),
        "count": float(item_ids.numel()),
    }


@torch.no_grad()
def cloze_accuracy(
    model: UniPerceiver,
    spec: Any,
    data: TaskData,
    words: tuple[str, ...],
    *,
    batch_size: int,
    runtime: Runtime,
    head: torch.nn.Module | None = None,
) -> dict[str, float]:
    """Accuracy (%) of a text-classification task: argmax over the encoded label words."""
    dev = runtime.device
    tokens = tokenize_names(list(words))
    labels_f, _ = encode_bucketed(
        model, tokens.ids.to(dev), tokens.padding.to(dev), kind="labels", task=f"{spec.name}.labels"
    )
    correct = total = 0.0
    for batch in eval_batches(
        data, batch_size=batch_size, rank=runtime.rank, world_size=runtime.world_size
    ):
        assert isinstance(batch, TextClassificationBatch)
        scores = model.cloze_logits(
            batch.ids.to(dev), batch.padding.to(dev), labels_f, task_type=spec.type, task=spec.name
        )
        logits = scores.logits if head is None else head(scores.logits, scores.features)
        correct += float((logits.argmax(-1).cpu() == batch.labels).sum())
        total += batch.batch_size
    correct, total = _reduce_counts(correct, total, runtime)
    return {"acc1": 100.0 * correct / max(1.0, total), "count": total}


def validate(
    model: UniPerceiver,
    tasks: Mapping[str, tuple[Any, TaskData, Any]],
    *,
    batch_size: int,
    runtime: Runtime,
    heads: Mapping[str, torch.nn.Module] | None = None,
) -> dict[str, float]:
    """Run the built-in validation of every task that has eval data.

    Args:
        model: the (unwrapped, replicated) model; switched to eval mode and back.
        tasks: task name -> (spec, eval data, train-time objective with class names / label words).
        batch_size: evaluation batch size.
        runtime: the run's runtime.
        heads: prompt-tuning heads by task name.

    Returns:
        Flat metrics `val/<task>/<metric>`.
    """
    was_training = model.training
    model.eval()
    out: dict[str, float] = {}
    try:
        for name, (spec, data, objective) in tasks.items():
            head = (heads or {}).get(name)
            if spec.type in ("image_classification", "video_classification"):
                names = objective.class_names if objective is not None else None
                if names is None:
                    names = data.class_names
                assert names is not None
                res = classification_accuracy(
                    model, spec, data, names, batch_size=batch_size, runtime=runtime, head=head
                )
            elif spec.type in ("image_retrieval", "video_retrieval"):
                res = retrieval_recall(model, spec, data, batch_size=batch_size, runtime=runtime)
            elif spec.type == "text_classification":
                words = data.label_words or (
                    objective.label_words if objective is not None else None
                )
                assert words is not None
                res = cloze_accuracy(
                    model, spec, data, words, batch_size=batch_size, runtime=runtime, head=head
                )
            else:
                continue
            for k, v in res.items():
                out[f"val/{name}/{k}"] = v
    finally:
        model.train(was_training)
    return out
