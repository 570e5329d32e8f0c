"""Recipe schema: the sections and the per-command roots (torch-free).

A recipe is a YAML file whose top-level `command` key says which command it drives. Every field carries its
documentation in `Field(description=...)`; `docs/recipes.md` is generated from these models. Defaults mirror the
reference (SPEC §4-§7).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import Field

from uniperceiver_cli.model.config import expert_ffn_problems
from uniperceiver_cli.recipe.base import (
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    Section,
    as_number,
)
from uniperceiver_cli.recipe.tasks import TaskSpec

SCHEMA_VERSION = 1

Preset = Literal["tiny", "small", "base", "large"]
Sublayer = Literal["qkv", "attn_out", "ffn_in", "ffn_out"]
LayerPlacement = Literal["every_other", "all", "every_fourth"]

Beta = Annotated[float, Field(ge=0, lt=1)]


def _get(obj: Any, key: str) -> Any:
    """Read `key` from a raw mapping or a validated section alike."""
    if isinstance(obj, Mapping):
        return obj.get(key)
    return getattr(obj, key, None)


#: Number of layers of each preset (kept here so validation needs no torch; a test checks it against the presets).
PRESET_LAYERS: dict[str, int] = {"tiny": 2, "small": 12, "base": 12, "large": 24}


class RunSpec(Section):
    """Where results go and how the run is seeded."""

    name: str = Field(
        description="Run name; also the default output folder `runs/<name>`.",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
    )
    output_dir: str | None = Field(
        None,
        description="Output folder (checkpoints, metrics, logs); default `runs/<name>`. `--output-dir` wins.",
    )
    seed: int = Field(
        0, ge=0, description="Seed of every random generator (per rank: seed + rank)."
    )
    data_root: str | None = Field(
        None,
        description="Folder that relative data paths resolve against (before the recipe's folder); "
        "default: the UNIPERCEIVER_DATA_ROOT environment variable.",
    )


class MoESpec(Section):
    """Conditional mixture of experts (SPEC §2, §13.1)."""

    routing: Literal["token", "context", "modality", "task", "attribute"] = Field(
        "attribute",
        description="Gate input: token hidden state, pooled context, modality, task or attribute row.",
    )
    num_experts: int = Field(8, ge=1, le=512, description="Experts per routed linear (E).")
    top_k: int = Field(2, ge=1, description="Experts combined per decision (K): 1 or 2.")
    layers: LayerPlacement | list[NonNegativeInt] = Field(
        "every_other",
        description="Routed layers: `every_other` (0-based even indices, as the reference), `all`, "
        "`every_fourth`, or an explicit list of 0-based indices.",
    )
    sublayers: list[Sublayer] = Field(
        ["qkv", "attn_out", "ffn_in", "ffn_out"],
        min_length=1,
        description="Which linears of a routed layer become MoE linears.",
    )
    noise: Literal["none", "vmoe", "jitter"] = Field(
        "vmoe",
        description="Router noise in training: none, V-MoE Gaussian (σ = noise_std/E), or input jitter.",
    )
    noise_std: PositiveFloat = Field(
        1.0, description="Noise scale (vmoe σ = noise_std / num_experts)."
    )
    capacity_factor: PositiveFloat = Field(
        3.0, description="Token-dispatch capacity factor in training (token/context routing)."
    )
    eval_capacity_factor: PositiveFloat | None = Field(
        None,
        description="Capacity factor at evaluation; null = dropless (every token is processed).",
    )
    batch_prioritized: bool = Field(
        True,
        description="Batch-prioritised routing: tokens with the highest gate values fill capacity first.",
    )
    balance_loss_weight: NonNegativeFloat = Field(
        0.01, description="GShard load-balance loss weight."
    )
    z_loss_weight: NonNegativeFloat = Field(0.001, description="Router z-loss weight.")
    importance_loss_weight: NonNegativeFloat = Field(0.0, description="Importance loss weight.")
    expert_parallel_size: PositiveInt = Field(
        1,
        description="Ranks sharing one set of experts (token/context routing); must divide num_experts.",
    )
    unseen_task: Literal["error", "uniform", "fallback"] = Field(
        "error",
        description="Task routing only: what a task the router was not trained on does (stop, average the "
        "experts uniformly, or borrow `fallback_task`'s routing).",
    )
    fallback_task: str | None = Field(
        None, description="Task whose routing an unseen task borrows."
    )
    expert_ffn: bool = Field(
        False,
        description="Token/context routing with ffn_in and ffn_out routed: each expert's two linears "
        "form one FFN (GELU inside the expert) and the experts' outputs are mixed once, after "
        "ffn_out (as GShard, V-MoE and DeepSpeed); false mixes after each linear, as the reference.",
    )

    @classmethod
    def cross_field_problems(cls, values: Mapping[str, Any]) -> list[str]:
        """Rules between fields: top_k vs num_experts, expert-parallel size, fallback task, duplicates."""
        problems: list[str] = []
        top_k = as_number(values.get("top_k", 2))
        experts = as_number(values.get("num_experts", 8))
        ep = as_number(values.get("expert_parallel_size", 1))
        routing = values.get("routing", "attribute")
        if top_k is not None and experts is not None and top_k > experts:
            problems.append(f"top_k ({top_k:g}) must be <= num_experts ({experts:g})")
        if top_k is not None and top_k > 2:
            problems.append(
                f"top_k ({top_k:g}) must be 1 or 2 (top-1 and top-2 routing are implemented)"
            )
        if ep is not None and experts is not None and ep >= 1 and experts % ep != 0:
            problems.append(f"expert_parallel_size ({ep:g}) must divide num_experts ({experts:g})")
        if ep is not None and ep > 1 and routing not in ("token", "context"):
            problems.append(
                f"expert_parallel_size ({ep:g}) > 1 needs routing token or context, not {routing!r} "
                "(segment-constant routing merges weights and has no dispatch)"
            )
        if values.get("expert_ffn") is True:
            sublayers = values.get("sublayers", cls.model_fields["sublayers"].default)
            listed = sublayers if isinstance(sublayers, list) else []
            problems.extend(expert_ffn_problems(routing, listed))
        if values.get("unseen_task") == "fallback" and values.get("fallback_task") is None:
            problems.append("unseen_task ('fallback') needs fallback_task to name a task")
        layers = values.get("layers")
        if isinstance(layers, list) and len({str(x) for x in layers}) != len(layers):
            problems.append(f"layers ({layers}) lists a layer twice")
        sublayers = values.get("sublayers")
        if isinstance(sublayers, list) and len({str(x) for x in sublayers}) != len(sublayers):
            problems.append(f"sublayers ({sublayers}) lists a sublayer twice")
        return problems


class ModelSpec(Section):
    """Architecture: a named size plus explicit overrides, dense or MoE."""

    preset: Preset = Field(
        "tiny", description="Named size: tiny (tests), small, base, large (SPEC §1.2)."
    )
    hidden_size: PositiveInt | None = Field(None, description="Override the width D.")
    num_layers: PositiveInt | None = Field(None, description="Override the number of layers L.")
    num_heads: PositiveInt | None = Field(
        None, description="Override the number of heads (D must divide)."
    )
    ffn_size: PositiveInt | None = Field(None, description="Override the FFN width F.")
    image_size: PositiveInt | None = Field(
        None, description="Override the image side S the model is built for."
    )
    patch_size: PositiveInt | None = Field(None, description="Override the patch side P.")
    max_frames: PositiveInt | None = Field(
        None, description="Override the rows of the temporal table."
    )
    pos_embed_scale: PositiveFloat | None = Field(
        None, description="Sin-cos position scale (160/224 in the reference's 224 px models)."
    )
    drop_path: float | None = Field(
        None, ge=0, lt=1, description="Fixed drop-path rate of every layer."
    )
    layer_scale_init: PositiveFloat | None = Field(None, description="Initial layer-scale γ.")
    moe: MoESpec | None = Field(None, description="Conditional MoE; null = dense model.")
    init_from: str | None = Field(
        None,
        description="Checkpoint to start from: a run folder, a checkpoint folder, a bundle or a released "
        "reference `.pth` file.",
    )

    @classmethod
    def cross_field_problems(cls, values: Mapping[str, Any]) -> list[str]:
        """Rules between fields: divisibility of sizes and MoE layer indices within the layer count."""
        problems: list[str] = []
        hidden, heads = as_number(values.get("hidden_size")), as_number(values.get("num_heads"))
        if hidden and heads and hidden % heads:
            problems.append(f"hidden_size ({hidden:g}) must be divisible by num_heads ({heads:g})")
        image, patch = as_number(values.get("image_size")), as_number(values.get("patch_size"))
        if image and patch and image % patch:
            problems.append(f"image_size ({image:g}) must be a multiple of patch_size ({patch:g})")
        moe = values.get("moe")
        layers = moe.get("layers") if isinstance(moe, Mapping) else getattr(moe, "layers", None)
        if isinstance(layers, list):
            preset = values.get("preset", "tiny")
            n_layers = as_number(values.get("num_layers")) or PRESET_LAYERS.get(str(preset))
            bad = [i for i in layers if n_layers is not None and (as_number(i) or 0) >= n_layers]
            if bad:
                problems.append(
                    f"moe.layers ({bad}) out of range for num_layers ({n_layers:g}, preset {preset!r})"
                )
        return problems


class OptimSpec(Section):
    """AdamW with the reference's parameter-group rules (SPEC §4.1)."""

    lr: PositiveFloat = Field(1e-3, description="Peak learning rate.")
    min_lr: NonNegativeFloat = Field(1e-6, description="Floor of the cosine schedule.")
    betas: tuple[Beta, Beta] = Field((0.9, 0.95), description="AdamW (β1, β2), each in [0, 1).")
    eps: PositiveFloat = Field(1e-6, description="AdamW ε.")
    weight_decay: NonNegativeFloat = Field(
        0.05, description="Decay of matrices (norms, biases, embeddings: 0)."
    )
    grad_clip: NonNegativeFloat = Field(0.1, description="Global gradient-norm clip; 0 = off.")

    @classmethod
    def cross_field_problems(cls, values: Mapping[str, Any]) -> list[str]:
        """min_lr must not exceed lr."""
        lr, min_lr = as_number(values.get("lr", 1e-3)), as_number(values.get("min_lr", 1e-6))
        if lr is not None and min_lr is not None and min_lr > lr:
            return [f"min_lr ({min_lr:g}) must be <= lr ({lr:g})"]
        return []


class ScheduleSpec(Section):
    """Length of training and its cadences (SPEC §4.2)."""

    max_steps: PositiveInt = Field(description="Optimizer steps in total.")
    warmup_steps: NonNegativeInt = Field(
        0, description="Linear warm-up steps before the cosine decay."
    )
    decay: Literal["cosine", "constant"] = Field("cosine", description="Shape after warm-up.")
    grad_accum_steps: PositiveInt = Field(
        1, description="Micro-batches accumulated per optimizer step."
    )
    log_every: PositiveInt = Field(10, description="Steps between progress/log lines.")
    eval_every: PositiveInt | None = Field(
        None, description="Steps between evaluations; null = only at the end."
    )
    checkpoint_every: PositiveInt | None = Field(
        None, description="Steps between checkpoints; null = only at the end."
    )
    keep_last: PositiveInt = Field(3, description="Checkpoints kept (older ones are deleted).")
    max_bad_steps: PositiveInt = Field(
        5,
        description="Consecutive NaN/Inf-loss steps tolerated (each skipped) before the run stops.",
    )

    @classmethod
    def cross_field_problems(cls, values: Mapping[str, Any]) -> list[str]:
        """Warm-up must end before training does."""
        warmup, steps = as_number(values.get("warmup_steps", 0)), as_number(values.get("max_steps"))
        if warmup is not None and steps is not None and warmup >= steps:
            return [f"warmup_steps ({warmup:g}) must be < max_steps ({steps:g})"]
        return []


class RuntimeSpec(Section):
    """Where and how the computation runs."""

    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="auto = CUDA when available, else CPU."
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32", description="Autocast precision (fp16 uses a gradient scaler)."
    )
    deterministic: bool = Field(
        False, description="Deterministic algorithms (slower; bitwise repeatable runs)."
    )
    compile: bool = Field(False, description="Wrap the model in torch.compile.")
    activation_checkpointing: bool = Field(
        False, description="Recompute block activations in backward."
    )
    num_workers: NonNegativeInt = Field(0, description="DataLoader worker processes per rank.")
    distributed: Literal["ddp", "fsdp2"] = Field(
        "ddp", description="Data-parallel wrapper under torchrun."
    )
    threads: PositiveInt | None = Field(
        None, description="CPU threads for torch; default: torch's choice."
    )
    cpu_gemm: Literal["auto", "onednn", "torch"] = Field(
        "auto",
        description="Library of the model's float32 CPU matmuls: auto = oneDNN where a one-off "
        "timing finds it faster than torch's BLAS (docs/moe.md), onednn, or torch.",
    )


class PromptSpec(Section):
    """Prompt tuning: what trains and on how much data (SPEC §5)."""

    length: PositiveInt = Field(10, description="Deep key/value prompt length per layer.")
    target_prompts: bool = Field(
        False,
        description="Separate deep prompts for target-side sequences (captions, class names).",
    )
    train: list[Literal["deep_prompts", "layer_norms", "ln_post", "spe_bias", "linear_head"]] = (
        Field(
            ["deep_prompts", "layer_norms", "ln_post", "spe_bias"],
            min_length=1,
            description="Parameter families that train; everything else stays frozen.",
        )
    )
    data_fraction: float = Field(
        0.01, gt=0, le=1, description="Fraction of the training data used (stratified)."
    )


class EvaluationSpec(Section):
    """Evaluation protocol (SPEC §6-§7)."""

    batch_size: PositiveInt = Field(64, description="Samples per evaluation batch.")
    metrics: list[str] | None = Field(
        None, description="Metrics to report; default: the task type's standard set."
    )
    beam_size: PositiveInt = Field(2, description="Caption beam size (1 = greedy).")
    max_len: PositiveInt = Field(21, description="Caption decoding length in tokens.")
    length_penalty: NonNegativeFloat = Field(
        0.0,
        description="Beam ranking divides by (#tokens + 1)^length_penalty (2.0 in zero-shot configs).",
    )
    temporal_views: PositiveInt = Field(
        1, description="Temporal clips per video (Kinetics-400: 4)."
    )
    spatial_crops: Literal[1, 3] = Field(1, description="Spatial crops per clip (Kinetics-400: 3).")
    view_mode: Literal["uniform", "interleaved"] = Field(
        "uniform",
        description="How temporal views are cut: clip starts spread from frame 0 (uniform), or T·V frames at "
        "stride/V dealt out to V interleaved clips (interleaved, the Kinetics-400 protocol).",
    )
    caption_metrics: Literal["builtin", "coco"] = Field(
        "builtin",
        description="Caption metric implementation: builtin (pure Python, no Java) or coco (pycocoevalcap, "
        "needs Java).",
    )


class _RecipeBase(Section):
    schema_version: Literal[1] = Field(1, description="Recipe schema version.")
    run: RunSpec = Field(description="Run name, output folder, seed, data root.")
    model: ModelSpec = Field(default_factory=ModelSpec, description="Architecture.")
    tasks: list[TaskSpec] = Field(min_length=1, description="Tasks, discriminated on `type`.")
    runtime: RuntimeSpec = Field(
        default_factory=RuntimeSpec, description="Device, precision, workers."
    )
    evaluation: EvaluationSpec = Field(
        default_factory=EvaluationSpec, description="Evaluation protocol."
    )

    @classmethod
    def cross_field_problems(cls, values: Mapping[str, Any]) -> list[str]:
        """Task names are unique; the MoE fallback task is one of them."""
        problems: list[str] = []
        names = [_get(t, "name") for t in values.get("tasks") or [] if _get(t, "name") is not None]
        dupes = sorted({str(n) for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"tasks (names) must be unique; repeated: {', '.join(dupes)}")
        fallback = _get(_get(values.get("model"), "moe"), "fallback_task")
        if fallback is not None and fallback not in names:
            problems.append(
                f"model.moe.fallback_task ({fallback!r}) is not a task of this recipe ({', '.join(map(str, names))})"
            )
        return problems


class _TrainingBase(_RecipeBase):
    optim: OptimSpec = Field(default_factory=OptimSpec, description="Optimizer.")
    schedule: ScheduleSpec = Field(description="Steps, warm-up and cadences.")


class PretrainRecipe(_TrainingBase):
    """`uniperceiver pretrain`: multi-task training from scratch or from `model.init_from`."""

    command: Literal["pretrain"] = Field(description="Which command this recipe drives.")


class FinetuneRecipe(_TrainingBase):
    """`uniperceiver finetune`: single-task full fine-tuning (SPEC §4.4)."""

    command: Literal["finetune"] = Field(description="Which command this recipe drives.")
    tasks: list[TaskSpec] = Field(min_length=1, max_length=1, description="Exactly one task.")


class PromptTuneRecipe(_TrainingBase):
    """`uniperceiver prompt-tune`: train deep prompts and norms of a frozen model (SPEC §5)."""

    command: Literal["prompt_tune"] = Field(description="Which command this recipe drives.")
    prompt: PromptSpec = Field(
        default_factory=PromptSpec, description="What trains and on how much data."
    )

    @classmethod
    def cross_field_problems(cls, values: Mapping[str, Any]) -> list[str]:
        """Prompt tuning needs a base checkpoint."""
        problems = super().cross_field_problems(values)
        if _get(values.get("model"), "init_from") is None:
            problems.append(
                "model.init_from (None) must name the checkpoint whose prompts are tuned"
            )
        return problems


class EvalRecipe(_RecipeBase):
    """`uniperceiver eval`: evaluate a checkpoint with the paper's protocols (SPEC §7)."""

    command: Literal["eval"] = Field(description="Which command this recipe drives.")


class ZeroShotRecipe(_RecipeBase):
    """`uniperceiver zero-shot`: evaluate task types the checkpoint never trained on (SPEC §6)."""

    command: Literal["zero_shot"] = Field(description="Which command this recipe drives.")


Recipe = Annotated[
    PretrainRecipe | FinetuneRecipe | PromptTuneRecipe | EvalRecipe | ZeroShotRecipe,
    Field(discriminator="command"),
]

#: The root model of each recipe command.
ROOTS: dict[str, type[_RecipeBase]] = {
    "pretrain": PretrainRecipe,
    "finetune": FinetuneRecipe,
    "prompt_tune": PromptTuneRecipe,
    "eval": EvalRecipe,
    "zero_shot": ZeroShotRecipe,
}
