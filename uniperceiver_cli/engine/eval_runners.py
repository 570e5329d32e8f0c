"""Per-task-type evaluators: classification, retrieval, captioning and cloze (SPEC §6-§7)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from uniperceiver_cli.data.samples import (
    ClassificationBatch,
    TextClassificationBatch,
    VisualTextBatch,
)
from uniperceiver_cli.engine.candidates import encode_bucketed, tokenize_names
from uniperceiver_cli.engine.data import eval_batches
from uniperceiver_cli.engine.eval_outputs import TaskResult
from uniperceiver_cli.engine.eval_tasks import RANKS_KEPT, EvalError, EvalTask
from uniperceiver_cli.model.embed import EOT_ID
from uniperceiver_cli.model.heads import l2_normalize
from uniperceiver_cli.model.uniperceiver import UniPerceiver


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


def eval_classification(model: UniPerceiver, task: EvalTask, device: torch.device) -> TaskResult:
    """Classification: logits against every encoded class name (`acc1`, `acc5`; videos mean over views)."""
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


def eval_retrieval(model: UniPerceiver, task: EvalTask, device: torch.device) -> TaskResult:
    """Retrieval: encode every item and caption once, then rank both ways (`r1_i2t` ... `rsum`)."""
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


def eval_caption(
    model: UniPerceiver, task: EvalTask, device: torch.device, vocab: Tensor
) -> TaskResult:
    """Captioning: beam search over the encoded vocabulary `vocab` (V, D), then caption metrics."""
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


def eval_cloze(model: UniPerceiver, task: EvalTask, device: torch.device) -> TaskResult:
    """Text classification (GLUE) as cloze: the SPE slot against the encoded label words."""
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
