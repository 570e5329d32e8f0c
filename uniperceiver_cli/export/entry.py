"""The exported inference entry points, as small `nn.Module`s over a (folded) `UniPerceiver`.

* `ImageEncoder`: images (B, 3, S, S) -> L2-normalised features (B, D);
* `VideoEncoder`: videos (B, T, 3, S, S) -> (B, D);
* `TextEncoder`: token ids (B, L) int64 + padding (B, L) bool (True = padding) -> (B, D), texts encoded as
  candidate sequences `[SPE, tokens]` (the ids should end with EOT, as `tokenizer.encode_batch(...,
  append_eot=True)` gives);
* `Similarity`: features (N, D), (M, D) -> temperature-scaled cosine logits (N, M) for one task's temperature.

They compute exactly what `encode_images`, `encode_videos`, `encode_texts` and `similarity` compute, without the
data-dependent branches of the eager API (the text padding mask is always applied), so the graphs trace with
dynamic batch and sequence sizes. MoE models are exported folded (`fold.py`): routing is resolved statically for
the task's segments in eval mode, so no graph holds a gate or a data-dependent shape.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from uniperceiver_cli.export.errors import ExportInputError
from uniperceiver_cli.export.fold import TASKS, FoldSummary, fold_for_task, task_contexts
from uniperceiver_cli.model.heads import l2_normalize
from uniperceiver_cli.model.moe.layer import SegmentRoutedLinear, TokenRoutedLinear
from uniperceiver_cli.model.moe.router import RoutingError
from uniperceiver_cli.model.uniperceiver import TargetKind, UniPerceiver

logger = logging.getLogger(__name__)

#: Task types whose inputs and candidates the four entry points encode.
ENTRY_TASKS: tuple[str, ...] = (
    "image_retrieval",
    "video_retrieval",
    "image_classification",
    "video_classification",
)


class ImageEncoder(nn.Module):
    """Images (B, 3, S, S), already normalised -> L2-normalised SPE features (B, D)."""

    def __init__(self, model: UniPerceiver, task_type: str = "image_retrieval") -> None:
        super().__init__()
        self.model = model
        self.task_type = task_type

    def forward(self, images: Tensor) -> Tensor:
        """Encode images (B, 3, S, S) -> (B, D)."""
        out = self.model.visual_features(images, task_type=self.task_type)
        return l2_normalize(out.features)


class VideoEncoder(nn.Module):
    """Videos (B, T, 3, S, S), already normalised -> L2-normalised SPE features (B, D)."""

    def __init__(self, model: UniPerceiver, task_type: str = "video_retrieval") -> None:
        super().__init__()
        self.model = model
        self.task_type = task_type

    def forward(self, videos: Tensor) -> Tensor:
        """Encode videos (B, T, 3, S, S) -> (B, D)."""
        out = self.model.visual_features(videos, task_type=self.task_type)
        return l2_normalize(out.features)


class TextEncoder(nn.Module):
    """Candidate texts `[SPE, ids]` -> L2-normalised SPE features (B, D)."""

    def __init__(self, model: UniPerceiver, kind: TargetKind = "captions") -> None:
        super().__init__()
        self.model = model
        self.kind: TargetKind = kind

    def forward(self, ids: Tensor, padding: Tensor) -> Tensor:
        """Encode token ids (B, L) with padding (B, L) bool, True = padding -> (B, D)."""
        m = self.model
        b, n = ids.shape
        x = torch.cat([m.embed.spe(b), m.embed.text(ids, None)], dim=1)  # (B, 1+L, D)
        pad = torch.cat([torch.zeros_like(padding[:, :1]), padding], dim=1).to(torch.bool)
        routing = m.routing_for(self.kind, task=self.kind, text_len=n, target_kind=self.kind)
        out = m.encoder(x, routing, key_padding_mask=pad, target_side=True)
        return l2_normalize(m.head.project(out.hidden[:, 0]))


class Similarity(nn.Module):
    """Temperature-scaled cosine logits between two feature sets (the unified head, SPEC §1.9)."""

    def __init__(self, model: UniPerceiver, task: str = "retrieve") -> None:
        super().__init__()
        self.head = model.head
        self.task = task

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        """Logits (N, M) of features a (N, D) and b (M, D)."""
        return self.head.logits(a, b, self.task)


@dataclass
class EntryPoints:
    """The deployable model and its entry points.

    Attributes:
        model: the eval-mode model the entry points wrap (folded for MoE).
        modules: entry-point name -> module (`image_encoder`, `video_encoder`, `text_encoder`, `similarity`).
        fold: the fold summary (None for a dense model).
        task: the task the entry points serve.
    """

    model: UniPerceiver
    modules: dict[str, nn.Module]
    fold: FoldSummary | None
    task: str


def _has_routed(model: UniPerceiver) -> bool:
    return any(isinstance(m, SegmentRoutedLinear | TokenRoutedLinear) for m in model.modules())


def build_entry_points(model: UniPerceiver, fold_for: str | None = None) -> EntryPoints:
    """Fold (if MoE) and wrap the inference entry points.

    Args:
        model: the loaded model.
        fold_for: the task to fold for and serve, one of `ENTRY_TASKS`; default image-text retrieval (whose
            routing keys also cover video retrieval and image/video classification with attribute routing).

    Returns:
        The entry points. An entry point whose sequences need routing keys the fold dropped is left out.

    Raises:
        ExportInputError: `fold_for` is not a task the entry points serve, or the checkpoint cannot serve it.
    """
    task = fold_for or "image_retrieval"
    if task not in TASKS:
        task_contexts(model, task)  # raises the unknown-task error with the list of tasks
    if task not in ENTRY_TASKS:
        raise ExportInputError(
            f"--fold-for {task!r}: the exported entry points (image/video/text encoders, similarity) serve "
            f"{list(ENTRY_TASKS)}; caption decoding and MLM are not exported"
        )
    video_task = task.replace("image_", "video_")
    image_task = task.replace("video_", "image_")
    kind: TargetKind = "classes" if task.endswith("classification") else "captions"
    summary: FoldSummary | None = None
    deploy = model.eval()
    if _has_routed(model):
        tasks = [task] if fold_for else [image_task, video_task]
        deploy, summary = fold_for_task(model, tasks)
    candidates: dict[str, nn.Module] = {
        "image_encoder": ImageEncoder(deploy, image_task),
        "video_encoder": VideoEncoder(deploy, video_task),
        "text_encoder": TextEncoder(deploy, kind),
        "similarity": Similarity(deploy, task),
    }
    modules: dict[str, nn.Module] = {}
    for name, module in candidates.items():
        try:
            with torch.no_grad():
                module(*example_inputs(deploy, name, batch=1, length=2))
        except RoutingError as e:
            logger.info("%s is not served by the fold for %s: %s", name, task, e)
            continue
        modules[name] = module.eval()
    if not modules:
        raise ExportInputError(f"no entry point can run with the fold for {task!r}")
    return EntryPoints(deploy, modules, summary, task)


def example_inputs(
    model: UniPerceiver, name: str, *, batch: int = 2, length: int = 5, frames: int = 2
) -> tuple[Tensor, ...]:
    """Deterministic example inputs of one entry point.

    Args:
        model: the model (sizes, device).
        name: entry-point name.
        batch: B.
        length: text length L (and M for `similarity`).
        frames: T for videos (capped at the model's `max_frames`).

    Returns:
        The positional inputs.
    """
    cfg = model.config
    s = model.embed.grid_size * cfg.patch_size
    device = model.embed.word.weight.device
    gen = torch.Generator().manual_seed(1234 + 17 * batch + length)
    if name == "image_encoder":
        return (torch.randn(batch, 3, s, s, generator=gen).to(device),)
    if name == "video_encoder":
        t = min(frames, cfg.max_frames)
        return (torch.randn(batch, t, 3, s, s, generator=gen).to(device),)
    if name == "text_encoder":
        ids = torch.randint(0, 49_000, (batch, length), generator=gen)
        ids[:, -1] = 49_407  # EOT
        padding = torch.zeros(batch, length, dtype=torch.bool)
        if batch > 1 and length > 2:
            ids[0, -2:] = torch.tensor([49_407, 0])
            padding[0, -1] = True  # one padded row
        return ids.to(device), padding.to(device)
    if name == "similarity":
        d = cfg.hidden_size
        return (
            torch.randn(batch, d, generator=gen).to(device),
            torch.randn(length, d, generator=gen).to(device),
        )
    raise ExportInputError(f"unknown entry point {name!r}")


def routing_keys_used(entry: EntryPoints) -> list[Hashable]:
    """Routing keys kept by the fold (empty for a dense model)."""
    return list(entry.fold.keys) if entry.fold is not None else []


#: Input names of each entry point (ONNX input names, manifest documentation).
INPUT_NAMES: dict[str, tuple[str, ...]] = {
    "image_encoder": ("images",),
    "video_encoder": ("videos",),
    "text_encoder": ("ids", "padding"),
    "similarity": ("a", "b"),
}

#: Largest dynamic batch / candidate count declared to the exporters.
MAX_BATCH = 1 << 16


def dynamic_shapes(model: UniPerceiver, name: str) -> tuple[dict[int, Any], ...]:
    """`torch.export` dynamic-shape spec of one entry point's inputs.

    Batch is dynamic everywhere; text length up to the position table, video frames up to the temporal table,
    and the candidate count of `similarity`.
    """
    from torch.export import Dim

    cfg = model.config
    batch = Dim("batch", min=1, max=MAX_BATCH)
    if name == "image_encoder":
        return ({0: batch},)
    if name == "video_encoder":
        return ({0: batch, 1: Dim("frames", min=1, max=cfg.max_frames)},)
    if name == "text_encoder":
        length = Dim("length", min=1, max=cfg.max_text_positions)
        return ({0: batch, 1: length}, {0: batch, 1: length})
    if name == "similarity":
        return ({0: batch}, {0: Dim("candidates", min=1, max=MAX_BATCH)})
    raise ExportInputError(f"unknown entry point {name!r}")


def describe(entry: EntryPoints) -> dict[str, Any]:
    """JSON-ready description of the entry points (inputs, outputs, task, temperature, fold)."""
    model = entry.model
    s = model.embed.grid_size * model.config.patch_size
    d = model.config.hidden_size
    shapes = {
        "image_encoder": {"images": ["B", 3, s, s], "output": ["B", d]},
        "video_encoder": {"videos": ["B", "T", 3, s, s], "output": ["B", d]},
        "text_encoder": {"ids": ["B", "L"], "padding": ["B", "L"], "output": ["B", d]},
        "similarity": {"a": ["N", d], "b": ["M", d], "output": ["N", "M"]},
    }
    out: dict[str, Any] = {
        "task": entry.task,
        "entry_points": {n: shapes[n] for n in entry.modules},
        "fold": entry.fold.as_dict() if entry.fold is not None else None,
    }
    sim = entry.modules.get("similarity")
    if isinstance(sim, Similarity):
        out["temperature"] = float(sim.head.temperature(sim.task).detach())
    return out
