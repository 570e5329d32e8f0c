"""Saving and restoring a training run's state, and the run's bad-data accounting.

`save_run_state` gathers the full model and optimizer state (FSDP2 and expert-parallel shards
included), the sampler and stream positions, the RNG state and the bad-data counts of every rank,
and writes a checkpoint (rank 0; `engine.checkpoint`); `load_run_state` puts a loaded checkpoint
back into the (wrapped) model, the optimizer and the gradient scaler. `bad_data_summary` sums the
bad-data monitors over ranks for the end-of-run summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.amp.grad_scaler import GradScaler

from uniperceiver_cli.data.build import MultiTaskStream
from uniperceiver_cli.data.health import merge_monitor_states
from uniperceiver_cli.engine.checkpoint import (
    CheckpointPayload,
    TrainingCheckpointError,
    TrainingState,
    save_checkpoint,
)
from uniperceiver_cli.engine.data import TaskData
from uniperceiver_cli.engine.expert_parallel import ExpertParallel
from uniperceiver_cli.engine.freeze import delta_metadata
from uniperceiver_cli.engine.run_files import recipe_text
from uniperceiver_cli.engine.runtime import Runtime
from uniperceiver_cli.engine.seed import capture_rng_state
from uniperceiver_cli.engine.tasks import TrainingModule
from uniperceiver_cli.engine.wrap import is_fsdp


def bad_data_summary(
    stream: MultiTaskStream, datasets: dict[str, TaskData], runtime: Runtime | None
) -> dict[str, Any]:
    """Per-task bad-data counts, summed over ranks when `runtime` is given (a collective).

    The counts are the monitors' (every batch served); the broken files also include those a reader in
    this process met without serving a batch (the one that stopped the run past `max_bad_fraction`).

    Returns:
        `{"lines": one log line per task, "skip_events": total, "broken": distinct broken files,
        "record": the metrics.jsonl fields}`.
    """
    local = {name: m.summary() for name, m in stream.monitors.items()}
    for name, summ in local.items():
        known = {f["name"] for f in summ["bad_files"]}
        for item in getattr(datasets[name].dataset, "bad_items", ()):
            if item.name not in known:
                known.add(item.name)
                summ["bad_files"].append({"name": item.name, "reason": item.reason})
    everyone = [local]
    if runtime is not None and runtime.distributed:
        import torch.distributed as dist

        gathered: list[Any] = [None] * runtime.world_size
        dist.all_gather_object(gathered, local)
        everyone = gathered
    tasks: dict[str, dict[str, Any]] = {}
    for per_rank in everyone:
        for name, summ in per_rank.items():
            row = tasks.setdefault(
                name, {"served": 0, "skip_events": 0, "bad_files": {}, "max_bad_fraction": 0.0}
            )
            row["served"] += int(summ["served"])
            row["skip_events"] += int(summ["skip_events"])
            row["max_bad_fraction"] = float(summ["max_bad_fraction"])
            for f in summ["bad_files"]:
                row["bad_files"].setdefault(f["name"], f["reason"])
    lines: list[str] = []
    record: dict[str, Any] = {}
    total = broken = 0
    for name, row in tasks.items():
        files = list(row["bad_files"])
        total += row["skip_events"]
        broken += len(files)
        shown = ", ".join(files[:20]) + (f" and {len(files) - 20} more" if len(files) > 20 else "")
        lines.append(
            f"{name}: {row['served']} samples served, {row['skip_events']} skips of {len(files)} distinct "
            f"broken items" + (f": {shown}" if files else "")
        )
        record[f"bad_data/{name}/served"] = row["served"]
        record[f"bad_data/{name}/skip_events"] = row["skip_events"]
        record[f"bad_data/{name}/distinct_bad"] = len(files)
        record[f"bad_data/{name}/files"] = files
    return {"lines": lines, "skip_events": total, "broken": broken, "record": record}


def full_state(
    wrapped: nn.Module,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    ep: ExpertParallel | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Full (unsharded) model and optimizer state dicts (a collective: every rank calls it).

    Replicated runs use the native `state_dict()`s (exact: parameters without Adam state stay without).
    Expert-parallel runs gather the expert shards (and their Adam moments) along the expert axis.
    FSDP2 gathers full tensors with `torch.distributed.checkpoint.state_dict`, keyed by parameter names.
    """
    if not is_fsdp(module):
        msd = {k: v.detach().to("cpu") for k, v in module.state_dict().items()}
        osd = optimizer.state_dict()
        if ep is not None:
            msd = ep.gather_model_state(msd, "model.")
            osd = ep.gather_optimizer_state(osd, optimizer)
        return msd, osd
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return dict(get_model_state_dict(module, options=opts)), dict(
        get_optimizer_state_dict(module, optimizer, options=opts)
    )


def gathered_bad_data(stream: MultiTaskStream, runtime: Runtime) -> dict[str, dict[str, Any]]:
    """Every task's bad-data monitor state summed over ranks (a collective under torchrun)."""
    local = {name: m.state_dict() for name, m in stream.monitors.items()}
    everyone = [local]
    if runtime.distributed:
        import torch.distributed as dist

        gathered: list[Any] = [None] * runtime.world_size
        dist.all_gather_object(gathered, local)
        everyone = gathered
    return {
        name: merge_monitor_states(per_rank[name] for per_rank in everyone if name in per_rank)
        for name in local
    }


def save_run_state(
    run_dir: Path,
    wrapped: nn.Module,
    module: TrainingModule,
    optimizer: torch.optim.Optimizer,
    scaler: GradScaler,
    loaded: Any,
    runtime: Runtime,
    step: int,
    stream: MultiTaskStream,
    stream_seeds: dict[str, int],
    bad_steps: int,
    keep_last: int,
    prompt: Any,
    model: nn.Module,
    command: str,
    ep: ExpertParallel | None,
) -> Path:
    msd, osd = full_state(wrapped, module, optimizer, ep)
    bad_data = gathered_bad_data(stream, runtime)
    rng = capture_rng_state()
    payload: CheckpointPayload | None = None
    if runtime.is_main:
        model_state = {k[len("model.") :]: v for k, v in msd.items() if k.startswith("model.")}
        heads_state = {k[len("heads.") :]: v for k, v in msd.items() if k.startswith("heads.")}
        optim_state: dict[str, Any] = {"optimizer": osd}
        if scaler.is_enabled():
            optim_state["scaler"] = scaler.state_dict()
        state = TrainingState(
            step=step,
            sampler=stream.sampler.state_dict(),
            streams={
                n: {"seed": stream_seeds[n], "position": int(c)} for n, c in stream.consumed.items()
            },
            bad_steps=bad_steps,
            world_size=runtime.world_size,
            extra={"command": command, "run": loaded.recipe.run.name},
            bad_data=bad_data,
        )
        delta = None
        if prompt is not None:
            keys = [n for n, p in model.named_parameters() if p.requires_grad]
            tensors = {k: model_state[k] for k in keys}
            from uniperceiver_cli.api import resolve_checkpoint

            base = resolve_checkpoint(loaded.recipe.model.init_from)
            delta = (tensors, delta_metadata(base, keys, list(prompt.train)))
            model_state = {}
        payload = CheckpointPayload(
            model_state=model_state,
            model_config=module.model.config,
            optimizer_state=optim_state,
            state=state,
            recipe_text=recipe_text(loaded),
            heads_state=heads_state or None,
            delta=delta,
        )
    return save_checkpoint(run_dir, payload, rng, runtime, keep_last=keep_last)


def load_run_state(
    wrapped: nn.Module,
    module: TrainingModule,
    optimizer: torch.optim.Optimizer,
    scaler: GradScaler,
    ck: Any,
    ep: ExpertParallel | None = None,
) -> None:
    """Load a checkpoint's weights (full or prompt delta), heads and optimizer state into the run.

    Checkpoints always hold full expert tensors; an expert-parallel run takes its shard of them.
    """
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    full: dict[str, Any] = {}
    weights = ck.model_state if ck.model_state is not None else ck.delta
    for k, v in weights.items():
        full[f"model.{k}"] = v
    for k, v in (ck.heads_state or {}).items():
        full[f"heads.{k}"] = v
    own = set(module.state_dict())
    unknown = sorted(set(full) - own)
    if unknown:
        raise TrainingCheckpointError(
            f"{ck.path}: tensors {unknown[:6]} do not belong to this run's model; resume with the recipe that "
            "wrote the checkpoint, or pass --no-resume"
        )
    if ck.model_state is not None and own - set(full):
        missing = sorted(own - set(full))
        raise TrainingCheckpointError(
            f"{ck.path}: missing tensors {missing[:6]}; the checkpoint is incomplete"
        )
    if not is_fsdp(module):
        optim_state = ck.optimizer_state["optimizer"]
        if ep is not None:
            full = ep.slice_model_state(full, "model.")
            optim_state = ep.slice_optimizer_state(optim_state, optimizer)
        with torch.no_grad():
            own_state = module.state_dict()
            for k, v in full.items():
                if own_state[k].shape != v.shape:
                    raise TrainingCheckpointError(
                        f"{ck.path}: {k} has shape {tuple(v.shape)}, the run expects "
                        f"{tuple(own_state[k].shape)}; resume with the recipe that wrote the checkpoint"
                    )
                own_state[k].copy_(v)
        optimizer.load_state_dict(optim_state)
    else:
        set_model_state_dict(
            module, full, options=StateDictOptions(full_state_dict=True, strict=False)
        )
        set_optimizer_state_dict(
            module,
            optimizer,
            ck.optimizer_state["optimizer"],
            options=StateDictOptions(full_state_dict=True, strict=False),
        )
    if "scaler" in ck.optimizer_state and scaler.is_enabled():
        scaler.load_state_dict(ck.optimizer_state["scaler"])
