"""Routers: map a gate input to expert logits (SPEC §2.4, §13.1). Routers only score.

Five routers share one noise convention: `vmoe` adds N(0, (noise_std / E)^2) to the logits, `jitter`
multiplies the input of the gate projection `wg` by U(1 - noise_std / E, 1 + noise_std / E)
(Switch-style, scaled like vmoe), `none` adds nothing. Noise is drawn only in training, from the
router's `generator` attribute when it is set, else from the default torch RNG. Logits are computed
in float32 with autocast disabled (the reference keeps `wg` in fp32; unlike the reference, segment
routers also run their tag transform / embedding outside autocast). Top-k selection, capacity and
dispatch live in `dispatch.py`; no expert weights here.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import cast, get_args

import torch
import torch.nn.functional as F
from torch import nn

from uniperceiver_cli.model.config import NoisePolicy, UnseenTaskPolicy
from uniperceiver_cli.model.moe.experts import chunked_linear
from uniperceiver_cli.model.routing import Modality, Segment

#: Modalities known to the modality router, in embedding-row order.
MODALITIES: tuple[str, ...] = tuple(get_args(Modality))


class RoutingError(ValueError):
    """A routed linear received routing information it cannot use."""


class UnseenTaskError(RoutingError):
    """The task router met a task outside `MoEConfig.task_names` with `unseen_task='error'`."""


@dataclass(frozen=True)
class GateOutput:
    """Logits of one gate call.

    Attributes:
        logits: (U, E) float32 logits without noise (used by the router z-loss).
        noisy_logits: (U, E) float32 logits that top-k selection and the softmax use; equal to
            `logits` in eval or with the `none` policy.
    """

    logits: torch.Tensor
    noisy_logits: torch.Tensor


class _NoisyGate(nn.Module):
    """Shared noise handling and the fp32 `wg` projection (Linear(Dg -> E), no bias)."""

    def __init__(
        self, gate_dim: int, num_experts: int, noise: NoisePolicy, noise_std: float
    ) -> None:
        super().__init__()
        if noise not in ("none", "vmoe", "jitter"):
            raise RoutingError(f"noise must be one of none/vmoe/jitter, got {noise!r}")
        self.num_experts = num_experts
        self.noise: NoisePolicy = noise
        self.noise_std = float(noise_std)
        self.wg = nn.Linear(gate_dim, num_experts, bias=False)
        self.generator: torch.Generator | None = None
        nn.init.xavier_uniform_(self.wg.weight)

    @property
    def noise_scale(self) -> float:
        """The vmoe sigma and the jitter half-width: noise_std / E."""
        return self.noise_std / self.num_experts

    def _draw(self, shape: tuple[int, ...], like: torch.Tensor, uniform: bool) -> torch.Tensor:
        device = self.generator.device if self.generator is not None else like.device
        if uniform:
            out = torch.rand(shape, generator=self.generator, device=device, dtype=torch.float32)
        else:
            out = torch.randn(shape, generator=self.generator, device=device, dtype=torch.float32)
        return out.to(like.device)

    def project(
        self, u: torch.Tensor, noisy: bool = True, row_chunk: int | None = None
    ) -> GateOutput:
        """Score gate inputs.

        Args:
            u: (U, Dg) inputs of `wg`.
            noisy: allow noise (it is still drawn only in training); False gives eval logits.
            row_chunk: compute the logits in matmuls of exactly this many rows
                (`experts.chunked_linear`), so each row's logits are bitwise independent of the
                other rows (batch-invariant eval); None for one plain matmul.

        Returns:
            Clean and noisy (U, E) float32 logits.
        """
        noisy_training = noisy and self.training and self.noise != "none" and self.noise_std > 0
        with torch.autocast(device_type=u.device.type, enabled=False):
            u32 = u.float()
            weight = self.wg.weight.float()
            if row_chunk is None:
                logits = F.linear(u32, weight)
            else:
                logits = chunked_linear(u32, weight, None, row_chunk)
            if not noisy_training:
                return GateOutput(logits, logits)
            if self.noise == "vmoe":
                eps = self._draw(tuple(logits.shape), logits, uniform=False)
                return GateOutput(logits, logits + eps * self.noise_scale)
            factor = 1.0 + (2.0 * self._draw(tuple(u32.shape), u32, uniform=True) - 1.0) * (
                self.noise_scale
            )
            return GateOutput(logits, F.linear(u32 * factor, weight))


class TokenRouter(_NoisyGate):
    """Token-level router: the gate input is each token's own hidden state.

    Args:
        in_features: width Din of the routed linear's input.
        num_experts: E.
        noise: noise policy (training only).
        noise_std: noise scale.
    """

    def forward(
        self, x: torch.Tensor, noisy: bool = True, row_chunk: int | None = None
    ) -> GateOutput:
        """Score tokens.

        Args:
            x: (N, Din) token inputs.
            noisy: allow training noise.
            row_chunk: batch-invariant logits in chunks of this many rows (see `project`).

        Returns:
            (N, E) logits.
        """
        assert x.ndim == 2, f"expected (N, Din), got {tuple(x.shape)}"
        return self.project(x, noisy, row_chunk)


class ContextRouter(_NoisyGate):
    """Context-level router: the gate input is the masked mean of a sample's tokens.

    The mean runs over all positions of the sample that are not padding
    (`RoutingContext.padding`); with no padding given every position counts.
    """

    @staticmethod
    def pool(x: torch.Tensor, padding: torch.Tensor | None) -> torch.Tensor:
        """Masked mean over the sequence.

        Args:
            x: (B, L, Din) inputs.
            padding: (B, L) bool, True at padding, or None.

        Returns:
            (B, Din) means (a sample that is all padding gets zeros).
        """
        if padding is None:
            return x.mean(dim=1)
        valid = (~padding).to(x.dtype).unsqueeze(-1)
        total = (x * valid).sum(dim=1)
        count = valid.sum(dim=1).clamp_min(1.0)
        return total / count

    def forward(
        self,
        x: torch.Tensor,
        padding: torch.Tensor | None = None,
        noisy: bool = True,
        row_chunk: int | None = None,
    ) -> GateOutput:
        """Score samples.

        Args:
            x: (B, L, Din) inputs.
            padding: (B, L) bool padding mask or None.
            noisy: allow training noise.
            row_chunk: batch-invariant logits in chunks of this many rows (see `project`).

        Returns:
            (B, E) logits.
        """
        assert x.ndim == 3, f"expected (B, L, Din), got {tuple(x.shape)}"
        return self.project(self.pool(x, padding), noisy, row_chunk)


class SegmentRouter(_NoisyGate):
    """Base of routers whose decision is constant over a segment (modality, task, attribute).

    Subclasses map a segment to a hashable key (`segment_key`) and keys to gate inputs
    (`gate_inputs`). The key `None` means "average all experts uniformly" (unseen-task policy).
    """

    def segment_key(self, segment: Segment, task: str) -> Hashable:
        """Return the routing key of one segment (raises `RoutingError` when unusable)."""
        raise NotImplementedError

    def gate_inputs(self, keys: Sequence[Hashable]) -> torch.Tensor:
        """Return the (R, Dg) inputs of `wg` for R keys."""
        raise NotImplementedError

    def forward(self, keys: Sequence[Hashable], noisy: bool = True) -> GateOutput:
        """Score keys.

        Args:
            keys: R routing keys (none of them None).
            noisy: allow training noise.

        Returns:
            (R, E) logits; noise is drawn once per call per key row.
        """
        # the whole gate (tag transform included) runs in the parameters' precision, so eval
        # decisions, and the plans cached from them, do not depend on the ambient autocast
        with torch.autocast(device_type=self.wg.weight.device.type, enabled=False):
            return self.project(self.gate_inputs(keys), noisy)


class AttributeRouter(SegmentRouter):
    """Attribute-level router of the reference (SPEC §2.4).

    u = LayerNorm(Linear(A -> D)(row)); logits = wg u. Parameter names match the reference
    (`tag_transform.0`, `tag_transform.1`, `wg`).

    Args:
        attribute_length: A, the attribute row width.
        hidden_size: D.
        num_experts: E.
        noise: noise policy.
        noise_std: noise scale.
        ln_eps: LayerNorm epsilon.
    """

    def __init__(
        self,
        attribute_length: int,
        hidden_size: int,
        num_experts: int,
        noise: NoisePolicy,
        noise_std: float,
        ln_eps: float = 1e-5,
    ) -> None:
        super().__init__(hidden_size, num_experts, noise, noise_std)
        self.attribute_length = attribute_length
        tag_linear = nn.Linear(attribute_length, hidden_size)
        nn.init.xavier_uniform_(tag_linear.weight)
        nn.init.zeros_(tag_linear.bias)
        self.tag_transform = nn.Sequential(tag_linear, nn.LayerNorm(hidden_size, eps=ln_eps))

    def segment_key(self, segment: Segment, task: str) -> Hashable:
        """The segment's attribute row."""
        if len(segment.attributes) != self.attribute_length:
            raise RoutingError(
                f"attribute row {segment.attributes} has {len(segment.attributes)} entries, "
                f"expected {self.attribute_length} (MoEConfig.attribute_length); build the "
                "segments with uniperceiver_cli.model.routing.attribute_row"
            )
        return tuple(int(v) for v in segment.attributes)

    def gate_inputs(self, keys: Sequence[Hashable]) -> torch.Tensor:
        """LayerNorm(Linear(rows)), (R, D)."""
        weight = cast(nn.Linear, self.tag_transform[0]).weight
        rows = torch.tensor(
            [list(k) for k in keys],  # type: ignore[call-overload]
            dtype=weight.dtype,
            device=weight.device,
        )
        out: torch.Tensor = self.tag_transform(rows)
        return out


class ModalityRouter(SegmentRouter):
    """Modality-level router: a learned D-wide embedding per modality (image, video, text)."""

    def __init__(
        self, hidden_size: int, num_experts: int, noise: NoisePolicy, noise_std: float
    ) -> None:
        super().__init__(hidden_size, num_experts, noise, noise_std)
        self.embedding = nn.Embedding(len(MODALITIES), hidden_size)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def segment_key(self, segment: Segment, task: str) -> Hashable:
        """The segment's modality."""
        if segment.modality not in MODALITIES:
            raise RoutingError(
                f"unknown modality {segment.modality!r}; the modality router knows {MODALITIES}"
            )
        return segment.modality

    def gate_inputs(self, keys: Sequence[Hashable]) -> torch.Tensor:
        """Embedding rows of the modalities, (R, D)."""
        index = torch.tensor(
            [MODALITIES.index(str(k)) for k in keys], device=self.embedding.weight.device
        )
        out: torch.Tensor = self.embedding(index)
        return out


class TaskRouter(SegmentRouter):
    """Task-level router: a learned D-wide embedding per task of `task_names`.

    A task outside `task_names` is handled by `unseen_task`: `error` raises `UnseenTaskError`,
    `uniform` averages all experts with weight 1/E (key None), `fallback` borrows the routing of
    `fallback_task`.
    """

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        noise: NoisePolicy,
        noise_std: float,
        task_names: Sequence[str],
        unseen_task: UnseenTaskPolicy = "error",
        fallback_task: str | None = None,
    ) -> None:
        super().__init__(hidden_size, num_experts, noise, noise_std)
        if not task_names:
            raise RoutingError(
                "task routing needs MoEConfig.task_names (one embedding row per task); got none"
            )
        if len(set(task_names)) != len(task_names):
            raise RoutingError(f"MoEConfig.task_names has duplicates: {tuple(task_names)}")
        if unseen_task == "fallback" and fallback_task not in task_names:
            raise RoutingError(
                f"unseen_task='fallback' needs fallback_task in task_names {tuple(task_names)}, "
                f"got {fallback_task!r}"
            )
        self.task_names = tuple(task_names)
        self.unseen_task: UnseenTaskPolicy = unseen_task
        self.fallback_task = fallback_task
        self.embedding = nn.Embedding(len(task_names), hidden_size)
        nn.init.normal_(self.embedding.weight, std=0.02)

    def task_key(self, task: str) -> str | None:
        """Canonical key of a task name (None = uniform average of experts)."""
        if task in self.task_names:
            return task
        if self.unseen_task == "uniform":
            return None
        if self.unseen_task == "fallback":
            return self.fallback_task
        raise UnseenTaskError(
            f"task {task!r} is not one of the routed tasks {self.task_names}; add it to "
            "moe.task_names (and train), or set moe.unseen_task to 'uniform' or 'fallback'"
        )

    def segment_key(self, segment: Segment, task: str) -> Hashable:
        """The (canonical) task name; every segment of a call shares it."""
        return self.task_key(task)

    def gate_inputs(self, keys: Sequence[Hashable]) -> torch.Tensor:
        """Embedding rows of the tasks, (R, D)."""
        index = torch.tensor(
            [self.task_names.index(str(k)) for k in keys], device=self.embedding.weight.device
        )
        out: torch.Tensor = self.embedding(index)
        return out
