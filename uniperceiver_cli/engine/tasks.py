"""One training objective per task type (SPEC §1.10), and the module DDP/FSDP wrap.

`TaskObjective.loss(model, batch, ...)` encodes a typed batch and its candidates and returns the task's loss
(times its loss weight) with the logged parts. `TrainingModule` owns the model plus the optional prompt-tuning
linear heads and dispatches on the task name in `forward`, so data-parallel wrappers see one forward per step.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from uniperceiver_cli.data.samples import (
    ClassificationBatch,
    MLMBatch,
    TextClassificationBatch,
    VisualTextBatch,
    VQABatch,
)
from uniperceiver_cli.engine.candidates import (
    TokenizedSet,
    encode_set,
    tokenize_names,
    vocab_candidates,
    vocabulary_pool,
)
from uniperceiver_cli.engine.losses import (
    retrieval_loss,
    smoothed_cross_entropy,
    soft_target_cross_entropy,
    summed_cross_entropy,
)
from uniperceiver_cli.engine.runtime import Runtime, gather_with_grad
from uniperceiver_cli.model.moe.telemetry import MoEAux, total_aux_loss
from uniperceiver_cli.model.uniperceiver import UniPerceiver
from uniperceiver_cli.recipe.tasks import DEFAULT_TEMPERATURE

#: Shard a candidate set across ranks from this many entries on (smaller sets: every rank encodes all).
SHARD_MIN_CANDIDATES = 1024


@dataclass
class StepResult:
    """What one task step computed.

    Attributes:
        loss: weighted task loss plus MoE auxiliary losses (0-dim, with graph).
        parts: detached values to log (`loss`, `i2t`, `t2i`, `aux`, ...).
        aux: MoE aux records of every encoder call of the step.
        tokens: sequence positions processed (throughput).
        samples: samples in the batch.
    """

    loss: Tensor
    parts: dict[str, float] = field(default_factory=dict)
    aux: list[object] = field(default_factory=list)
    tokens: int = 0
    samples: int = 0


@dataclass
class StepContext:
    """Per-step inputs every objective may use.

    Attributes:
        generator: step-seeded generator (temporal offsets, mixup, synonyms, vocabulary negatives).
        runtime: the run's runtime.
        single_task: the recipe has one task (retrieval gathers global negatives, SPEC §1.10.2).
    """

    generator: torch.Generator
    runtime: Runtime
    single_task: bool


class LinearHead(nn.Module):
    """Prompt-tuning linear classifier (SPEC §5.1 `fc_prompt`): `w_sim · cos-logits + fc(z)`, fc zero-init.

    Attributes:
        fc: Linear(D, C), zero weight and bias.
        similarity_weight: learnable scalar, init 1.
    """

    def __init__(self, dim: int, num_classes: int) -> None:
        """Create a zero-initialised head for `num_classes` classes."""
        super().__init__()
        self.fc = nn.Linear(dim, num_classes)
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        self.similarity_weight = nn.Parameter(torch.ones(()))

    def forward(self, logits: Tensor, features: Tensor) -> Tensor:
        """Combine (B, C) cosine logits with the linear scores of (B, D) features."""
        out: Tensor = self.similarity_weight * logits + self.fc(features)
        return out


class TaskObjective:
    """Base: a task's spec, its data-derived candidates and its loss.

    Args:
        spec: the recipe task section.
        class_names: class synonyms (classification) or None.
        label_words: label words (text classification) or None.
        paths_resolve: resolves recipe paths (vocabulary files).
    """

    def __init__(
        self,
        spec: Any,
        *,
        class_names: tuple[tuple[str, ...], ...] | None = None,
        label_words: tuple[str, ...] | None = None,
        vocabulary_pool: Tensor | None = None,
    ) -> None:
        self.spec = spec
        self.name: str = spec.name
        self.type: str = spec.type
        self.temperature: str = spec.temperature or DEFAULT_TEMPERATURE[spec.type]
        self.class_names = class_names
        self.label_words = label_words
        self.pool = vocabulary_pool
        self._tokenized: TokenizedSet | None = None
        self._synonym_sets: list[TokenizedSet] | None = None

    @property
    def num_classes(self) -> int | None:
        """Number of classes / label words (None for token-level tasks)."""
        if self.class_names is not None:
            return len(self.class_names)
        if self.label_words is not None:
            return len(self.label_words)
        return None

    def candidate_names(self, generator: torch.Generator | None) -> TokenizedSet:
        """Tokenised class names (one synonym per class drawn per step when there are several)."""
        if self.class_names is None:
            if self.label_words is None:
                raise ValueError(f"task {self.name!r} has no candidate names")
            if self._tokenized is None:
                self._tokenized = tokenize_names(self.label_words)
            return self._tokenized
        if all(len(s) == 1 for s in self.class_names) or generator is None:
            if self._tokenized is None:
                self._tokenized = tokenize_names([s[0] for s in self.class_names])
            return self._tokenized
        picks = [s[int(torch.randint(len(s), (1,), generator=generator))] for s in self.class_names]
        return tokenize_names(picks)

    def loss(
        self, model: UniPerceiver, heads: Mapping[str, nn.Module], batch: Any, ctx: StepContext
    ) -> StepResult:
        """Compute the weighted loss of one batch."""
        raise NotImplementedError


def _finish(
    loss: Tensor,
    weight: float,
    parts: dict[str, Tensor],
    aux: list[object],
    *,
    shown: Tensor | None = None,
) -> StepResult:
    """Weight the task loss, add the MoE auxiliary losses, detach the parts for logging.

    Args:
        loss: the task loss (with graph).
        weight: the task's loss weight.
        parts: values to log.
        aux: MoE aux records.
        shown: the value of `loss` to log when it differs from the tensor that carries the gradient
            (token-level losses in DDP, see `global_token_mean`).
    """
    total = loss * weight
    logged = {k: float(v.detach()) for k, v in parts.items()}
    extra = total_aux_loss([a for a in aux if isinstance(a, MoEAux)])
    shown_total = (shown if shown is not None else loss).detach() * weight
    if extra is not None:
        total = total + extra
        logged["aux"] = float(extra.detach())
        shown_total = shown_total + extra.detach()
    logged["loss"] = float(shown_total)
    return StepResult(loss=total, parts=logged, aux=aux)


def global_token_mean(
    logits: Tensor, target: Tensor, smoothing: float, runtime: Runtime
) -> tuple[Tensor, Tensor]:
    """Token-level cross-entropy averaged over the valid tokens of the global batch (all ranks).

    Each rank returns `local_sum · W / N_global`; DDP (and FSDP) average gradients over the W ranks, so
    the update is that of `Σ_ranks local_sum / N_global`, the mean over every valid token of the global
    batch, as one process with the global batch computes it (SPEC §1.10.3-4). A per-rank mean would
    weight the tokens of a rank with few valid tokens more.

    Args:
        logits: (N, C) this rank's token logits.
        target: (N,) targets, -1 = no target.
        smoothing: label smoothing ε.
        runtime: the run's runtime.

    Returns:
        `(loss, mean)`: the tensor to backpropagate and the global mean (detached, for logging).
    """
    total, count = summed_cross_entropy(logits, target, smoothing)
    if not runtime.distributed:
        mean = total / count.clamp(min=1).to(total.dtype)
        return mean, mean.detach()
    import torch.distributed as dist

    stats = torch.stack([count.to(torch.float64), total.detach().to(torch.float64)])
    dist.all_reduce(stats)
    tokens = stats[0].clamp(min=1.0)
    loss = total * (runtime.world_size / tokens).to(total.dtype)
    return loss, (stats[1] / tokens).to(total.dtype)


class ClassificationObjective(TaskObjective):
    """Image/video classification against encoded class names: LS-CE, or soft CE with Mixup/CutMix."""

    def loss(
        self, model: UniPerceiver, heads: Mapping[str, nn.Module], batch: Any, ctx: StepContext
    ) -> StepResult:
        """See `TaskObjective.loss`."""
        assert isinstance(batch, ClassificationBatch)
        dev = ctx.runtime.device
        pixels, labels = batch.pixels.to(dev), batch.labels.to(dev)
        soft: Tensor | None = None
        mix = getattr(self.spec, "mixup", None)
        if mix is not None and pixels.dim() == 4:
            from uniperceiver_cli.data.transforms import BatchMixer

            mixer = BatchMixer(
                self.num_classes or 0,
                mixup_alpha=mix.mixup_alpha,
                cutmix_alpha=mix.cutmix_alpha,
                prob=mix.prob,
                switch_prob=mix.switch_prob,
                label_smoothing=self.spec.label_smoothing,
            )
            pixels, soft = mixer(pixels.cpu(), labels.cpu(), generator=ctx.generator)
            pixels, soft = pixels.to(dev), soft.to(dev)
        inp = model.visual_features(
            pixels, task_type=self.type, task=self.name, generator=ctx.generator
        )
        names = self.candidate_names(ctx.generator)
        cls, cls_aux = encode_set(
            model,
            names,
            kind="classes",
            task=f"{self.name}.classes",
            runtime=ctx.runtime,
            shard=names.size >= SHARD_MIN_CANDIDATES,
        )
        logits = model.head.logits(inp.features, cls, self.temperature)
        head = heads.get(self.name)
        if head is not None:
            logits = head(logits, inp.features)
        if soft is not None:
            loss = soft_target_cross_entropy(logits, soft)
        else:
            loss = smoothed_cross_entropy(logits, labels, self.spec.label_smoothing)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        result = _finish(
            loss, self.spec.loss_weight, {"ce": loss, "acc": acc}, [*inp.aux, *cls_aux]
        )
        result.samples = batch.batch_size
        result.tokens = batch.batch_size * (
            1 + model.embed.grid_size**2 * (pixels.shape[1] if pixels.dim() == 5 else 1)
        )
        return result


class RetrievalObjective(TaskObjective):
    """Image/video-text retrieval: i2t + t2i LS-CE, each times the loss weight (SPEC §1.10.2)."""

    def loss(
        self, model: UniPerceiver, heads: Mapping[str, nn.Module], batch: Any, ctx: StepContext
    ) -> StepResult:
        """See `TaskObjective.loss`."""
        assert isinstance(batch, VisualTextBatch)
        dev = ctx.runtime.device
        pixels = batch.pixels.to(dev)
        inp = model.visual_features(
            pixels, task_type=self.type, task=self.name, generator=ctx.generator
        )
        txt = model.target_features(
            batch.text_ids.to(dev),
            batch.text_padding.to(dev),
            kind="captions",
            task=f"{self.name}.captions",
        )
        scale = model.head.temperature(self.temperature)
        gather = (
            ctx.single_task
            and bool(getattr(self.spec, "gather_features", True))
            and ctx.runtime.distributed
        )
        if gather:
            all_v = gather_with_grad(inp.features, ctx.runtime)
            all_t = gather_with_grad(txt.features, ctx.runtime)
            offset = ctx.runtime.rank * inp.features.shape[0]
            i2t, t2i = retrieval_loss(
                inp.features,
                txt.features,
                scale,
                all_visual=all_v,
                all_text=all_t,
                offset=offset,
                smoothing=self.spec.label_smoothing,
            )
        else:
            i2t, t2i = retrieval_loss(
                inp.features, txt.features, scale, smoothing=self.spec.label_smoothing
            )
        result = _finish(
            i2t + t2i, self.spec.loss_weight, {"i2t": i2t, "t2i": t2i}, [*inp.aux, *txt.aux]
        )
        result.samples = batch.batch_size
        result.tokens = int(inp.hidden.shape[0] * inp.hidden.shape[1] + batch.text_ids.numel())
        return result


class _VocabularyObjective(TaskObjective):
    def _vocab(
        self, model: UniPerceiver, targets: Tensor, ctx: StepContext
    ) -> tuple[Any, Tensor, list[object]]:
        negatives = getattr(self.spec, "vocab_negatives", None)
        cands = vocab_candidates(
            targets,
            vocab_size=model.config.vocab_size,
            negatives=negatives,
            generator=ctx.generator,
            runtime=ctx.runtime,
            pool=self.pool,
        )
        ids = cands.ids.to(ctx.runtime.device)
        from uniperceiver_cli.model.embed import EOT_ID

        seqs = torch.stack([ids, torch.full_like(ids, EOT_ID)], dim=1)  # (C, 2) = [v, EOT]
        feats, aux = encode_set(
            model,
            TokenizedSet(seqs, torch.zeros_like(seqs, dtype=torch.bool)),
            kind="vocabulary",
            task="vocabulary",
            runtime=ctx.runtime,
            shard=cands.full or ids.numel() >= SHARD_MIN_CANDIDATES,
        )
        return cands, feats, aux


class CaptionObjective(_VocabularyObjective):
    """Two-stream caption teacher forcing, CE over vocabulary candidates (SPEC §1.10.4)."""

    def loss(
        self, model: UniPerceiver, heads: Mapping[str, nn.Module], batch: Any, ctx: StepContext
    ) -> StepResult:
        """See `TaskObjective.loss`."""
        assert isinstance(batch, VisualTextBatch)
        dev = ctx.runtime.device
        words = batch.text_ids.to(dev)
        pad = batch.text_padding.to(dev)
        targets = words.masked_fill(pad, -1)
        cands, vocab, vaux = self._vocab(model, targets, ctx)
        scores = model.caption_logits(
            batch.pixels.to(dev),
            words,
            pad,
            vocab,
            task_type=self.type,
            task=self.name,
            generator=ctx.generator,
        )
        cols = cands.columns(targets)
        loss, mean = global_token_mean(
            scores.logits.reshape(-1, scores.logits.shape[-1]),
            cols.reshape(-1),
            self.spec.label_smoothing,
            ctx.runtime,
        )
        result = _finish(
            loss, self.spec.loss_weight, {"ce": mean}, [*scores.aux, *vaux], shown=mean
        )
        result.samples = batch.batch_size
        result.tokens = int(words.numel() * 2 + batch.batch_size)
        return result


class MLMObjective(_VocabularyObjective):
    """Masked language modelling against vocabulary candidates (SPEC §1.10.3)."""

    def loss(
        self, model: UniPerceiver, heads: Mapping[str, nn.Module], batch: Any, ctx: StepContext
    ) -> StepResult:
        """See `TaskObjective.loss`."""
        assert isinstance(batch, MLMBatch)
        dev = ctx.runtime.device
        ids, pad, labels = batch.ids.to(dev), batch.padding.to(dev), batch.labels.to(dev)
        masked = labels != -1
        cands, vocab, vaux = self._vocab(model, labels, ctx)
        scores = model.mlm_logits(ids, pad, masked, vocab, task_type=self.type, task=self.name)
        cols = cands.columns(labels[masked])
        loss, mean = global_token_mean(scores.logits, cols, self.spec.label_smoothing, ctx.runtime)
        acc = (scores.logits.argmax(dim=1) == cols).float().mean() if cols.numel() else mean * 0
        result = _finish(
            loss,
            self.spec.loss_weight,
            {"ce": mean, "acc": acc},
            [*scores.aux, *vaux],
            shown=mean,
        )
        result.samples = batch.batch_size
        result.tokens = int(ids.numel())
        return result


class TextClassificationObjective(TaskObjective):
    """GLUE-style cloze: output at the in-text SPE slot vs encoded label words (SPEC §1.10.5)."""

    def loss(
        self, model: UniPerceiver, heads: Mapping[str, nn.Module], batch: Any, ctx: StepContext
    ) -> StepResult:
        """See `TaskObjective.loss`."""
        assert isinstance(batch, TextClassificationBatch)
        dev = ctx.runtime.device
        words, waux = encode_set(
            model,
            self.candidate_names(None),
            kind="labels",
            task=f"{self.name}.labels",
            runtime=ctx.runtime,
        )
        scores = model.cloze_logits(
            batch.ids.to(dev), batch.padding.to(dev), words, task_type=self.type, task=self.name
        )
        labels = batch.labels.to(dev)
        logits = scores.logits
        head = heads.get(self.name)
        if head is not None:
            logits = head(logits, scores.features)
        loss = smoothed_cross_entropy(logits, labels, self.spec.label_smoothing)
        acc = (logits.argmax(dim=1) == labels).float().mean()
        result = _finish(
            loss, self.spec.loss_weight, {"ce": loss, "acc": acc}, [*scores.aux, *waux]
        )
        result.samples = batch.batch_size
        result.tokens = int(batch.ids.numel())
        return result


class VQAObjective(TaskObjective):
    """VQA as a cloze over the answer vocabulary (SPEC §1.10.6).

    Image + question + `[SPE, EOT]`; the output at the SPE slot is scored against the encoded answers
    (`[answer, EOT]` each, the `label_words` of this objective); the target is the answer the reader drew
    in proportion to the soft scores (`VQASample.target`, seeded per sample); questions without an answer
    in the vocabulary are ignored. The logged `acc` is the soft VQA accuracy of the argmax answer.
    """

    def loss(
        self, model: UniPerceiver, heads: Mapping[str, nn.Module], batch: Any, ctx: StepContext
    ) -> StepResult:
        """See `TaskObjective.loss`."""
        assert isinstance(batch, VQABatch)
        dev = ctx.runtime.device
        names = self.candidate_names(None)
        answers, aaux = encode_set(
            model,
            names,
            kind="labels",
            task=f"{self.name}.labels",
            runtime=ctx.runtime,
            shard=names.size >= SHARD_MIN_CANDIDATES,
        )
        scores = model.cloze_logits(
            batch.ids.to(dev),
            batch.padding.to(dev),
            answers,
            visual=batch.pixels.to(dev),
            task_type=self.type,
            task=self.name,
        )
        targets = batch.targets.to(dev)
        loss = smoothed_cross_entropy(scores.logits, targets, self.spec.label_smoothing)
        pick = scores.logits.argmax(dim=1).cpu()
        soft = batch.soft_scores(names.size)
        acc = soft[torch.arange(batch.batch_size), pick].mean()
        result = _finish(
            loss, self.spec.loss_weight, {"ce": loss, "acc": acc}, [*scores.aux, *aaux]
        )
        result.samples = batch.batch_size
        result.tokens = int(batch.ids.numel() + batch.batch_size * (1 + model.embed.grid_size**2))
        return result


def build_objective(
    spec: Any,
    *,
    class_names: tuple[tuple[str, ...], ...] | None,
    label_words: tuple[str, ...] | None,
    resolve: Any,
) -> TaskObjective:
    """The objective of a recipe task.

    Args:
        spec: the recipe task section.
        class_names: classification class synonyms from the data.
        label_words: text-classification label words, or the VQA answer vocabulary, from the data.
        resolve: callable resolving recipe paths (vocabulary files).

    Raises:
        ValueError: for a task type without a training objective.
    """
    pool = None
    vfile = getattr(spec, "vocabulary_file", None)
    if vfile:
        pool = vocabulary_pool(resolve(vfile))
    kinds: dict[str, type[TaskObjective]] = {
        "image_classification": ClassificationObjective,
        "video_classification": ClassificationObjective,
        "image_retrieval": RetrievalObjective,
        "video_retrieval": RetrievalObjective,
        "image_caption": CaptionObjective,
        "video_caption": CaptionObjective,
        "mlm": MLMObjective,
        "text_classification": TextClassificationObjective,
        "vqa": VQAObjective,
    }
    cls = kinds.get(spec.type)
    if cls is None:
        raise ValueError(
            f"task {spec.name!r}: type {spec.type!r} has no training objective; supported: {sorted(kinds)}"
        )
    return cls(spec, class_names=class_names, label_words=label_words, vocabulary_pool=pool)


class TrainingModule(nn.Module):
    """The module the loop (and DDP/FSDP) calls: model + prompt heads, one forward per task step.

    Attributes:
        model: the Uni-Perceiver model.
        heads: prompt-tuning linear heads by task name (empty otherwise).
    """

    def __init__(
        self,
        model: UniPerceiver,
        objectives: Mapping[str, TaskObjective],
        heads: Mapping[str, nn.Module] | None = None,
    ) -> None:
        """Wrap `model` with its objectives and optional heads."""
        super().__init__()
        self.model = model
        self.heads = nn.ModuleDict(dict(heads or {}))
        self.objectives = dict(objectives)

    def forward(self, task: str, batch: Any, ctx: StepContext) -> tuple[Tensor, StepResult]:
        """Run one task step; returns the loss tensor (for the wrappers) and the full result."""
        result = self.objectives[task].loss(self.model, dict(self.heads.items()), batch, ctx)
        return result.loss, result
