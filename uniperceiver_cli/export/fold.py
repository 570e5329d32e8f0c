"""`--fold-for TASK`: a deployable copy of an MoE model with experts folded for one task (SPEC §2.8).

With segment-constant routing (attribute, modality, task) the eval decision of a routed linear depends only on
the segment's routing key, so each routed linear equals one dense `nn.Linear` per key. `fold_for_task` finds the
keys a task's sequences use (its input segments and its candidate side), replaces every `SegmentRoutedLinear` by a
`FoldedLinear` holding one merged linear per key, and drops the experts and gates. For the released base MoE model
and image-text retrieval this is 2 merged sets per MoE linear: 422.67M parameters as released (with the dead gates)
become 167.27M deployed.

A folded model serves exactly the folded task: a sequence whose routing key was not folded raises `RoutingError`.
Token- and context-routed linears cannot be folded.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from uniperceiver_cli.export.errors import ExportInputError
from uniperceiver_cli.model.build import count_parameters
from uniperceiver_cli.model.moe.fold import FoldError, fold
from uniperceiver_cli.model.moe.layer import SHARED_PAIRS, SegmentRoutedLinear, TokenRoutedLinear
from uniperceiver_cli.model.moe.router import RoutingError, SegmentRouter
from uniperceiver_cli.model.routing import RoutingContext
from uniperceiver_cli.model.uniperceiver import TargetKind, UniPerceiver

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TaskSequences:
    """The sequences a task type encodes, for routing purposes.

    Attributes:
        visual: the input holds visual tokens.
        text: the input holds text tokens.
        target: candidate kind encoded on the target side.
        video: the visual input is video.
    """

    visual: bool
    text: bool
    target: TargetKind
    video: bool = False


#: Task types `--fold-for` accepts and the sequences each encodes (SPEC §1.10, §2.3). VQA is absent: the
#: reference attribute table has no VQA row, so a released MoE checkpoint cannot serve it.
TASKS: dict[str, TaskSequences] = {
    "image_classification": TaskSequences(True, False, "classes"),
    "video_classification": TaskSequences(True, False, "classes", video=True),
    "image_retrieval": TaskSequences(True, False, "captions"),
    "video_retrieval": TaskSequences(True, False, "captions", video=True),
    "image_caption": TaskSequences(True, True, "vocabulary"),
    "video_caption": TaskSequences(True, True, "vocabulary", video=True),
    "mlm": TaskSequences(False, True, "vocabulary"),
    "text_classification": TaskSequences(False, True, "labels"),
}


def task_contexts(model: UniPerceiver, task: str) -> list[RoutingContext]:
    """Routing contexts of the sequences `task` encodes, exactly as the model builds them.

    Args:
        model: the model (for its routing conventions).
        task: a task type of `TASKS`.

    Returns:
        The input-side context and the candidate-side context.

    Raises:
        ExportInputError: for a task type outside `TASKS`.
    """
    spec = TASKS.get(task)
    if spec is None:
        hint = (
            "; VQA has no row in the reference attribute table, so MoE checkpoints cannot serve it"
            if task == "vqa"
            else ""
        )
        raise ExportInputError(
            f"unknown task {task!r} for --fold-for; expected one of {sorted(TASKS)}{hint}"
        )
    visual_len = 1 if spec.visual else 0
    text_len = 1 if spec.text else 0
    inp = model.routing_for(task, visual_len=visual_len, text_len=text_len)
    target = model.routing_for(spec.target, task=spec.target, text_len=2, target_kind=spec.target)
    return [inp, target]


class FoldedLinear(nn.Module):
    """The dense linears a segment-routed linear computes for a fixed set of routing keys.

    Called like a routed linear, `y, aux = module(x, routing)` with `aux = None`: each segment is multiplied by
    the merged weight of its key (runs of equal keys share one matmul).

    Args:
        linears: key -> merged `nn.Linear`.
        router: the original router, used only to map segments to keys (not registered, no parameters kept).
        task: the task the linears were folded for (error messages).
        layer_index: encoder layer (error messages).
        sublayer: sublayer name (error messages).
    """

    def __init__(
        self,
        linears: dict[Hashable, nn.Linear],
        router: SegmentRouter,
        *,
        task: str,
        layer_index: int,
        sublayer: str,
    ) -> None:
        super().__init__()
        self.keys: list[Hashable] = list(linears)
        self.linears = nn.ModuleList(linears.values())
        self._index = {k: i for i, k in enumerate(self.keys)}
        self._router: tuple[SegmentRouter, ...] = (router,)
        self.task = task
        self.layer_index = layer_index
        self.sublayer = sublayer
        first = self.linears[0]
        assert isinstance(first, nn.Linear)
        self.in_features = first.in_features
        self.out_features = first.out_features

    def _linear(self, key: Hashable) -> nn.Linear:
        index = self._index.get(key)
        if index is None:
            raise RoutingError(
                f"layers.{self.layer_index}.{self.sublayer} was folded for {self.task!r} (routing keys "
                f"{self.keys}); this sequence needs key {key!r}; export again with --fold-for the task "
                "you run, or without folding"
            )
        linear = self.linears[index]
        assert isinstance(linear, nn.Linear)
        return linear

    def forward(self, x: torch.Tensor, routing: RoutingContext) -> tuple[torch.Tensor, None]:
        """Apply the folded weights segment by segment.

        Args:
            x: (B, L, Din).
            routing: segments covering the L positions.

        Returns:
            (B, L, Dout) and None (no aux record).
        """
        router = self._router[0]
        keys = [router.segment_key(seg, routing.task) for seg in routing.segments]
        runs: list[tuple[Hashable, int, int]] = []
        start = 0
        for key, seg in zip(keys, routing.segments, strict=True):
            end = start + seg.length
            if runs and runs[-1][0] == key:
                runs[-1] = (key, runs[-1][1], end)
            else:
                runs.append((key, start, end))
            start = end
        if len(runs) == 1:
            lin = self._linear(runs[0][0])
            return F.linear(x, lin.weight, lin.bias), None
        parts = []
        for key, begin, end in runs:
            lin = self._linear(key)
            parts.append(F.linear(x[:, begin:end], lin.weight, lin.bias))
        return torch.cat(parts, dim=1), None

    def extra_repr(self) -> str:
        """Summary line."""
        return (
            f"layer={self.layer_index}, sublayer={self.sublayer}, task={self.task!r}, "
            f"keys={len(self.keys)}, in={self.in_features}, out={self.out_features}"
        )


@dataclass
class FoldSummary:
    """What folding did.

    Attributes:
        tasks: the task types folded for.
        keys: distinct routing keys kept (one merged set each per routed linear).
        params_before: parameters + buffers of the routed model as stored by us.
        params_after: parameters + buffers of the folded model.
        dead_gate_params: parameters of the gates of decision-reusing linears, which released reference files
            also store and our import drops (SPEC §2.6); `params_before + dead_gate_params` is the released count.
        routed_linears: routed linears replaced.
        experts_dropped: expert weight sets removed (E per routed linear).
    """

    tasks: list[str]
    keys: list[Hashable] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    dead_gate_params: int = 0
    routed_linears: int = 0
    experts_dropped: int = 0

    @property
    def released_params(self) -> int:
        """Parameters of the released reference file layout (with the dead gates)."""
        return self.params_before + self.dead_gate_params

    def as_dict(self) -> dict[str, object]:
        """JSON-ready summary."""
        return {
            "tasks": self.tasks,
            "routing_keys": [list(k) if isinstance(k, tuple) else k for k in self.keys],
            "params_before": self.params_before,
            "params_released": self.released_params,
            "params_after": self.params_after,
            "routed_linears": self.routed_linears,
            "experts_dropped": self.experts_dropped,
        }


def dead_gate_parameters(model: UniPerceiver) -> int:
    """Parameters a reference MoE file stores for the gates our import drops (SPEC §2.6).

    Each follower linear of a routed pair (attention output after qkv, FFN output after FFN input) has a gate
    in the reference layout with the leader's shape.
    """
    moe = model.config.moe
    if moe is None or moe.routing in ("token", "context"):
        return 0
    total = 0
    for block in model.encoder.blocks():
        for lead, follow in SHARED_PAIRS:
            leader = getattr(block, lead)
            if (
                isinstance(leader, SegmentRoutedLinear)
                and leader.gate is not None
                and isinstance(getattr(block, follow), SegmentRoutedLinear)
            ):
                total += sum(p.numel() for p in leader.gate.parameters())
    return total


def routing_keys_for_tasks(model: UniPerceiver, tasks: Sequence[str]) -> list[Hashable]:
    """Distinct routing keys the routed linears see for `tasks` (in first-use order).

    Raises:
        ExportInputError: for an unknown task, or one the model's router cannot serve (e.g. a task outside the
            task router's names with `unseen_task='error'`).
        FoldError: when the model has token/context-routed linears.
    """
    keys: list[Hashable] = []
    routed = [m for m in model.modules() if isinstance(m, SegmentRoutedLinear | TokenRoutedLinear)]
    if any(isinstance(m, TokenRoutedLinear) for m in routed):
        raise FoldError(
            "the model has token- or context-routed linears, which choose experts from the hidden states; "
            "only modality, task and attribute routing can be folded"
        )
    segment_routed = [m for m in routed if isinstance(m, SegmentRoutedLinear)]
    for task in tasks:
        for ctx in task_contexts(model, task):
            if not segment_routed:
                continue
            try:
                found = segment_routed[0].routing_keys(ctx)
            except RoutingError as e:
                raise ExportInputError(f"this checkpoint cannot serve task {task!r}: {e}") from e
            for key in found:
                if key not in keys:
                    keys.append(key)
    return keys


def fold_for_task(
    model: UniPerceiver, tasks: str | Sequence[str]
) -> tuple[UniPerceiver, FoldSummary]:
    """Return a copy of `model` whose routed linears are folded for `tasks`, and a summary.

    The input model is not changed. A dense model comes back as an eval-mode copy with equal counts.

    Args:
        model: the (MoE) model.
        tasks: one task type or several (their keys are merged).

    Returns:
        The folded model (eval mode) and the `FoldSummary`.

    Raises:
        ExportInputError: unknown task or one the checkpoint cannot serve.
        FoldError: token/context routing.
    """
    names = [tasks] if isinstance(tasks, str) else list(tasks)
    keys = routing_keys_for_tasks(model, names)
    summary = FoldSummary(tasks=names, keys=keys)
    summary.params_before = count_parameters(model, include_buffers=True)
    summary.dead_gate_params = dead_gate_parameters(model)
    folded = copy.deepcopy(model).eval()
    label = "+".join(names)
    for block in folded.encoder.blocks():
        for name in ("qkv", "attn_out", "ffn_in", "ffn_out"):
            module = getattr(block, name)
            if not isinstance(module, SegmentRoutedLinear):
                continue
            canonical: dict[Hashable, nn.Linear] = {}
            for key in keys:
                with torch.no_grad():
                    canonical[key] = fold(module, key)
            setattr(
                block,
                name,
                FoldedLinear(
                    canonical,
                    module.router,
                    task=label,
                    layer_index=module.layer_index,
                    sublayer=module.sublayer,
                ),
            )
            summary.routed_linears += 1
            summary.experts_dropped += module.experts.num_local
    summary.params_after = count_parameters(folded, include_buffers=True)
    logger.info(
        "folded %d routed linears for %s: %d routing keys, %.2fM -> %.2fM parameters",
        summary.routed_linears,
        label,
        len(keys),
        summary.params_before / 1e6,
        summary.params_after / 1e6,
    )
    return folded, summary


def folded_parameter_counts(model: UniPerceiver, tasks: str | Sequence[str]) -> FoldSummary:
    """Parameter counts before/after folding without building the folded weights (meta-device models work).

    Args:
        model: the model (any device, including `meta`).
        tasks: task type(s) to fold for.

    Returns:
        A `FoldSummary` with the counts (no model is built).
    """
    from uniperceiver_cli.model.moe.fold import fold_report

    names = [tasks] if isinstance(tasks, str) else list(tasks)
    keys = routing_keys_for_tasks(model, names)
    report = fold_report(model, keys)
    buffers = sum(b.numel() for b in model.buffers())
    experts = sum(
        m.experts.num_local for m in model.modules() if isinstance(m, SegmentRoutedLinear)
    )
    return FoldSummary(
        tasks=names,
        keys=keys,
        params_before=report.params_before + buffers,
        params_after=report.params_after + buffers,
        dead_gate_params=dead_gate_parameters(model),
        routed_linears=report.routed_linears,
        experts_dropped=experts,
    )
