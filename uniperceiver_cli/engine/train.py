"""The training loop of `pretrain`, `finetune` and `prompt-tune`, written out from top to bottom.

`train(loaded, ...)`:

1. runtime (device, precision, process group from torchrun) and seeds;
2. the model (preset or `init_from`, stage-2 resolution), prompt-tuning freezing and heads;
3. data per task and its objective; the task sampler;
4. AdamW with the SPEC §4.1 groups; DDP or FSDP2; activation checkpointing and `torch.compile` on request;
5. resume from `<run>/checkpoints/LATEST` when asked;
6. the loop: pick a task, fetch its batch, forward, loss × weight + MoE aux losses, backward (accumulated),
   clip, step; NaN/Inf steps are skipped (stop after `max_bad_steps` in a row); metrics every step,
   validation and checkpoints at their cadences; SIGINT saves and stops;
7. a final checkpoint and validation, returned as a `TrainResult`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import torch
from torch import nn
from torch.amp.grad_scaler import GradScaler

from uniperceiver_cli.data.build import (
    MultiTaskStream,
    bad_data_monitor,
    build_loader,
    data_fraction_subset,
)
from uniperceiver_cli.data.errors import DataError
from uniperceiver_cli.data.sampler import TaskSampler, mix_seed
from uniperceiver_cli.engine.build import build_run_model
from uniperceiver_cli.engine.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
)
from uniperceiver_cli.engine.data import (
    CLASSIFICATION_TYPES,
    PathContext,
    TaskData,
    TaskDataError,
    open_task_data,
)
from uniperceiver_cli.engine.expert_parallel import ExpertParallel, setup_expert_parallel
from uniperceiver_cli.engine.freeze import (
    ParamRow,
    freeze_for_prompt_tuning,
    parameter_table,
)
from uniperceiver_cli.engine.optim import build_optimizer, lr_at, set_lr
from uniperceiver_cli.engine.reporting import Reporter
from uniperceiver_cli.engine.run_files import resolve_run_dir as resolve_run_dir
from uniperceiver_cli.engine.run_files import write_run_files
from uniperceiver_cli.engine.runtime import (
    Runtime,
    all_reduce_max,
    broadcast_object,
    init_runtime,
    shutdown_runtime,
)
from uniperceiver_cli.engine.seed import (
    restore_rng_state,
    seed_everything,
    step_generator,
)
from uniperceiver_cli.engine.tasks import (
    LinearHead,
    StepContext,
    TaskObjective,
    TrainingModule,
    build_objective,
)
from uniperceiver_cli.engine.train_state import (
    bad_data_summary,
    load_run_state,
    save_run_state,
)
from uniperceiver_cli.engine.train_types import RunFolderInUseError as RunFolderInUseError
from uniperceiver_cli.engine.train_types import TrainingDivergedError as TrainingDivergedError
from uniperceiver_cli.engine.train_types import TrainingError as TrainingError
from uniperceiver_cli.engine.train_types import TrainingInterrupted as TrainingInterrupted
from uniperceiver_cli.engine.train_types import TrainResult as TrainResult
from uniperceiver_cli.engine.train_types import user_errors as user_errors
from uniperceiver_cli.engine.validation import VALIDATED_TYPES, validate
from uniperceiver_cli.engine.wrap import (
    apply_activation_checkpointing,
    compile_blocks,
    sync_ignored_grads,
    wrap_parallel,
)
from uniperceiver_cli.model.gemm import resolve_backend, set_cpu_gemm
from uniperceiver_cli.model.moe.telemetry import MoEAux

logger = logging.getLogger(__name__)


class _Interrupt:
    """SIGINT latch: the first Ctrl-C asks the loop to save and stop; handlers are restored on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        del signum, frame
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning(
            "interrupt received: saving a checkpoint at the end of this step (Ctrl-C again to abort)"
        )

    @contextlib.contextmanager
    def installed(self) -> Iterator[_Interrupt]:
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread (e.g. inside a test runner thread)
            self._old = None
        try:
            yield self
        finally:
            if self._old is not None:
                signal.signal(signal.SIGINT, self._old)


def _few_shot(name: str, data: TaskData, fraction: float, seed: int) -> TaskData:
    """The prompt-tuning `data_fraction` subset of a task's data (SPEC §5.2), the same on every rank."""
    if isinstance(data.dataset, torch.utils.data.IterableDataset):
        raise TaskDataError(
            f"task {name!r}: prompt.data_fraction {fraction:g} needs a map-style dataset, but the data is a "
            "stream (webdataset); use data.max_samples instead"
        )
    subset = data_fraction_subset(data.dataset, fraction, seed=seed)
    logger.info(
        "task %s: training on %d of %d samples (data_fraction %g)",
        name,
        len(subset),
        len(data.dataset),  # type: ignore[arg-type]
        fraction,
    )
    return data.replace_dataset(subset)


def _moe_metrics(aux: list[object]) -> dict[str, float]:
    out: dict[str, float] = {}
    for a in aux:
        if isinstance(a, MoEAux):
            for k, v in a.metrics().items():
                out[k] = out.get(k, 0.0) + v
    return out


def train(
    loaded: Any,
    *,
    output_dir: Path | None = None,
    resume: bool = True,
    progress: bool | None = None,
) -> TrainResult:
    """Train from a loaded recipe (`pretrain`, `finetune` or `prompt_tune`).

    Args:
        loaded: `LoadedRecipe` from `uniperceiver_cli.recipe.load.load_recipe`.
        output_dir: run folder (overrides the recipe).
        resume: continue from the run folder's latest checkpoint when there is one.
        progress: force the progress bar on/off (default: on in a terminal).

    Returns:
        The `TrainResult`.

    Raises:
        TrainingInterrupted: after SIGINT (a checkpoint was saved).
        TrainingDivergedError: after `schedule.max_bad_steps` non-finite steps in a row.
        TrainingError: other runtime failures.
    """
    recipe = loaded.recipe
    command = loaded.command
    rt_spec = recipe.runtime
    runtime = init_runtime(rt_spec.device, rt_spec.precision, threads=rt_spec.threads)
    try:
        result = _train(loaded, recipe, command, runtime, output_dir, resume, progress)
        result.rank = runtime.rank
        return result
    except TrainingInterrupted as stop:
        stop.result.rank = runtime.rank
        raise
    finally:
        shutdown_runtime(runtime)


def _train(
    loaded: Any,
    recipe: Any,
    command: str,
    runtime: Runtime,
    output_dir: Path | None,
    resume: bool,
    progress: bool | None,
) -> TrainResult:
    seed = int(recipe.run.seed)
    seed_everything(seed, runtime.rank, deterministic=recipe.runtime.deterministic)
    run_dir = resolve_run_dir(recipe, output_dir)
    existing = latest_checkpoint(run_dir)
    if existing is not None and not resume:
        raise RunFolderInUseError(
            f"{run_dir} already holds checkpoints (latest: {existing.name}); starting over would overwrite them. "
            "Choose another --output-dir, or continue the run with --resume"
        )
    sched = recipe.schedule
    optim_spec = recipe.optim
    task_specs = list(recipe.tasks)
    task_names = [t.name for t in task_specs]
    prompt = getattr(recipe, "prompt", None) if command == "prompt_tune" else None

    # --- model ---------------------------------------------------------------------------------------------
    model = build_run_model(recipe.model, task_names=task_names, prompt=prompt)
    # one matmul library on every rank: `auto` is decided by a timing, so rank 0 decides for all
    set_cpu_gemm(model, broadcast_object(resolve_backend(recipe.runtime.cpu_gemm), runtime))
    table: list[ParamRow] | None = None
    heads: dict[str, nn.Module] = {}
    if prompt is not None:
        freeze_for_prompt_tuning(model, prompt.train)

    # --- data and objectives -------------------------------------------------------------------------------
    from uniperceiver_cli.recipe.paths import data_root

    paths = PathContext(data_root(recipe.run.data_root), loaded.path.parent.resolve())
    image_size = model.config.image_size
    train_data: dict[str, TaskData] = {}
    eval_data: dict[str, TaskData] = {}
    objectives: dict[str, TaskObjective] = {}
    for spec in task_specs:
        data = open_task_data(
            spec,
            spec.data,
            train=True,
            paths=paths,
            model_image_size=image_size,
            rank=runtime.rank,
            world_size=runtime.world_size,
            seed=seed,
        )
        if prompt is not None and prompt.data_fraction < 1.0:
            data = _few_shot(spec.name, data, prompt.data_fraction, seed)
        train_data[spec.name] = data
        objectives[spec.name] = build_objective(
            spec,
            class_names=data.class_names,
            label_words=data.label_words if spec.type != "vqa" else data.answers,
            resolve=paths.resolve,
        )
        if spec.eval_data is not None and spec.type in VALIDATED_TYPES:
            # Periodic validation runs on rank 0 over the whole split (see `run_validation`).
            eval_data[spec.name] = open_task_data(
                spec,
                spec.eval_data,
                train=False,
                paths=paths,
                model_image_size=image_size,
                seed=seed,
            )
        if (
            prompt is not None
            and "linear_head" in prompt.train
            and (spec.type in CLASSIFICATION_TYPES or spec.type == "text_classification")
            and objectives[spec.name].num_classes
        ):
            heads[spec.name] = LinearHead(
                model.config.hidden_size, int(objectives[spec.name].num_classes or 0)
            )

    module = TrainingModule(model, objectives, heads)
    if prompt is not None:
        table = parameter_table([("model", model), ("heads", module.heads)])
    module.to(runtime.device)
    total_params = sum(p.numel() for p in module.parameters())
    trainable_params = sum(p.numel() for p in module.parameters() if p.requires_grad)
    ep = setup_expert_parallel(model, runtime)
    if recipe.runtime.activation_checkpointing:
        apply_activation_checkpointing(module)
    if recipe.runtime.compile:
        compile_blocks(model)

    # --- optimizer, scaler, wrapper --------------------------------------------------------------------------
    wrapped = wrap_parallel(module, runtime, recipe.runtime.distributed, ep)
    optimizer, groups = build_optimizer(
        module,
        lr=optim_spec.lr,
        weight_decay=optim_spec.weight_decay,
        betas=(float(optim_spec.betas[0]), float(optim_spec.betas[1])),
        eps=optim_spec.eps,
    )
    logger.debug("parameter groups: %s", groups.counts())
    scaler = GradScaler(runtime.device.type, enabled=runtime.precision == "fp16")
    sampler = TaskSampler({t.name: t.sampling_weight for t in task_specs}, seed=seed)
    stream_seeds = {t.name: mix_seed(seed, i, 77) for i, t in enumerate(task_specs)}
    positions = dict.fromkeys(task_names, 0)

    # --- resume ----------------------------------------------------------------------------------------------
    step = 0
    bad_steps = 0
    resumed_from: Path | None = None
    rng_to_restore: dict[str, Any] | None = None
    ckpt_path = existing if resume else None
    if ckpt_path is not None:
        ck = load_checkpoint(ckpt_path, runtime.rank)
        if ck.state.world_size != runtime.world_size:
            logger.warning(
                "resuming a %d-process checkpoint with %d processes: data order will differ",
                ck.state.world_size,
                runtime.world_size,
            )
        load_run_state(wrapped, module, optimizer, scaler, ck, ep)
        sampler.load_state_dict(ck.state.sampler)
        for name, st in ck.state.streams.items():
            if name in positions:
                positions[name] = int(st["position"])
        step = ck.state.step
        bad_steps = ck.state.bad_steps
        rng_to_restore = ck.rng_state
        resumed_from = ckpt_path
        if runtime.is_main:
            logger.info("resuming from %s (step %d)", ckpt_path, step)
    stream = MultiTaskStream(
        {
            t.name: build_loader(
                train_data[t.name].dataset,
                batch_size=t.batch_size,
                train=True,
                seed=stream_seeds[t.name],
                rank=runtime.rank,
                world_size=runtime.world_size,
                num_workers=recipe.runtime.num_workers,
                pin_memory=runtime.device.type == "cuda",
                position=positions[t.name],
                collate_fn=train_data[t.name].collate,
            )
            for t in task_specs
        },
        sampler,
        {t.name: t.batch_size for t in task_specs},
        monitors={t.name: bad_data_monitor(train_data[t.name].dataset, t.name) for t in task_specs},
    )
    stream.consumed = dict(positions)
    if ckpt_path is not None and runtime.is_main:
        # The counts so far (all ranks) continue on rank 0; the final summary sums the ranks.
        for name, state in (ck.state.bad_data or {}).items():
            if name in stream.monitors:
                stream.monitors[name].load_state_dict(state)
    if runtime.is_main:
        write_run_files(run_dir, loaded, runtime, seed)
    runtime.barrier()

    reporter = Reporter(
        run_dir,
        max_steps=sched.max_steps,
        log_every=sched.log_every,
        start_step=step,
        enabled=runtime.is_main,
        resume_step=step if resumed_from is not None else None,
        progress=progress,
    )
    if rng_to_restore is not None:
        restore_rng_state(rng_to_restore)

    def save(at_step: int) -> Path:
        return save_run_state(
            run_dir,
            wrapped,
            module,
            optimizer,
            scaler,
            loaded,
            runtime,
            at_step,
            stream,
            stream_seeds,
            bad_steps,
            sched.keep_last,
            prompt,
            model,
            command,
            ep,
        )

    def run_validation(at_step: int) -> dict[str, float]:
        if not eval_data:
            return {}
        tasks = {n: (objectives[n].spec, d, objectives[n]) for n, d in eval_data.items()}
        metrics = _validate(model, module, wrapped, tasks, loaded, runtime, ep)
        if metrics:
            reporter.event({"step": at_step, "event": "validation", **metrics})
        return metrics

    def report_bad_data(at_step: int, *, collective: bool) -> None:
        summary = bad_data_summary(stream, train_data, runtime if collective else None)
        if runtime.is_main:
            if summary["skip_events"] or summary["broken"]:
                for line in summary["lines"]:
                    logger.warning("bad-data summary: %s", line)
            else:
                logger.info("bad-data summary: no broken items were skipped")
            reporter.event({"step": at_step, "event": "bad_data", **summary["record"]})

    last_ckpt: Path | None = resumed_from
    last_saved_step = step if resumed_from is not None else -1
    losses: dict[str, list[float]] = {}
    metrics: dict[str, float] = {}
    latch = _Interrupt()
    t_start = time.perf_counter()
    accum = sched.grad_accum_steps
    clip = optim_spec.grad_clip
    trainable = [p for p in module.parameters() if p.requires_grad]
    single_task = len(task_specs) == 1

    def finish(*, interrupted: bool = False) -> TrainResult:
        return _result(
            run_dir,
            command,
            step,
            sched.max_steps,
            last_ckpt,
            resumed_from,
            metrics,
            losses,
            t_start,
            trainable_params,
            total_params,
            table,
            interrupted=interrupted,
        )

    try:
        with latch.installed():
            wrapped.train()
            while step < sched.max_steps:
                t0 = time.perf_counter()
                lr = lr_at(
                    step,
                    base_lr=optim_spec.lr,
                    min_lr=optim_spec.min_lr,
                    warmup_steps=sched.warmup_steps,
                    max_steps=sched.max_steps,
                    decay=sched.decay,
                )
                set_lr(optimizer, lr)
                optimizer.zero_grad(set_to_none=True)
                record: dict[str, Any] = {"step": step + 1, "lr": lr}
                tokens = 0
                finite = True
                step_aux: list[object] = []
                tasks_run: list[str] = []
                for micro in range(accum):
                    task, batch = next(stream)
                    tasks_run.append(task)
                    ctx = StepContext(
                        generator=step_generator(seed, step, micro, 0xC0FFEE),
                        runtime=runtime,
                        single_task=single_task,
                    )
                    sync = micro == accum - 1 or not hasattr(wrapped, "no_sync")
                    sync_ctx = contextlib.nullcontext() if sync else wrapped.no_sync()  # type: ignore[operator]
                    with sync_ctx:
                        with runtime.autocast():
                            loss, result = wrapped(task, batch, ctx)
                        scaler.scale(loss / accum).backward()
                    finite = finite and math.isfinite(result.parts.get("loss", float("nan")))
                    tokens += result.tokens
                    step_aux.extend(result.aux)
                    for k, v in result.parts.items():
                        record[f"{k}/{task}"] = v
                    losses.setdefault(task, []).append(result.parts.get("loss", float("nan")))
                record["task"] = tasks_run[-1] if len(set(tasks_run)) == 1 else ",".join(tasks_run)
                record["loss"] = float(sum(record.get(f"loss/{t}", 0.0) for t in set(tasks_run)))
                sync_ignored_grads(module, runtime)
                if ep is not None:
                    ep.reduce_expert_grads()
                scaler.unscale_(optimizer)
                if ep is not None:
                    grad_norm = ep.clip_grad_norm(trainable, clip if clip > 0 else float("inf"))
                else:
                    grad_norm = torch.nn.utils.clip_grad_norm_(
                        trainable, clip if clip > 0 else float("inf")
                    )
                gn = float(grad_norm)
                bad = not finite or (not math.isfinite(gn) and runtime.precision != "fp16")
                bad = bool(
                    all_reduce_max(torch.tensor(float(bad), device=runtime.device), runtime) > 0
                )
                if bad:
                    bad_steps += 1
                    optimizer.zero_grad(set_to_none=True)
                    logger.warning(
                        "step %d: non-finite loss or gradient (task %s); skipped (%d in a row, limit %d)",
                        step + 1,
                        record["task"],
                        bad_steps,
                        sched.max_bad_steps,
                    )
                    if bad_steps >= sched.max_bad_steps:
                        raise TrainingDivergedError(
                            f"{bad_steps} consecutive steps had a non-finite loss or gradient (last at step "
                            f"{step + 1}, task {record['task']}); the run stopped. Lower optim.lr, raise "
                            "optim.grad_clip or use precision fp32/bf16, then resume from the last checkpoint"
                        )
                    scaler.update()
                else:
                    bad_steps = 0
                    scaler.step(optimizer)
                    scaler.update()
                step += 1
                elapsed = time.perf_counter() - t0
                record["grad_norm"] = gn
                record["tokens_per_s"] = tokens * runtime.world_size / max(elapsed, 1e-9)
                record["step_time_s"] = elapsed
                record.update(_moe_metrics(step_aux))
                for name, monitor in stream.monitors.items():
                    if monitor.events:
                        record[f"bad_data/{name}"] = monitor.distinct_bad
                reporter.step(record)
                if sched.eval_every and step % sched.eval_every == 0 and step < sched.max_steps:
                    metrics = run_validation(step)
                stop = latch.requested
                if runtime.distributed:
                    stop = bool(
                        all_reduce_max(torch.tensor(float(stop), device=runtime.device), runtime)
                        > 0
                    )
                if (sched.checkpoint_every and step % sched.checkpoint_every == 0) or stop:
                    last_ckpt = save(step)
                    last_saved_step = step
                if stop:
                    raise TrainingInterrupted(finish(interrupted=True))
            if last_saved_step != step:
                last_ckpt = save(step)
            metrics = run_validation(step) or metrics
            report_bad_data(step, collective=True)
    except DataError:
        # Too much broken data (or a broken file with on_error: raise): say what was skipped, then stop.
        report_bad_data(step, collective=False)
        raise
    finally:
        reporter.close()
    return finish()


def _result(
    run_dir: Path,
    command: str,
    step: int,
    max_steps: int,
    ckpt: Path | None,
    resumed_from: Path | None,
    metrics: dict[str, float],
    losses: dict[str, list[float]],
    t_start: float,
    trainable: int,
    total: int,
    table: list[ParamRow] | None,
    *,
    interrupted: bool = False,
) -> TrainResult:
    recent = {t: sum(v[-10:]) / len(v[-10:]) for t, v in losses.items() if v}
    return TrainResult(
        run_dir=run_dir,
        command=command,
        step=step,
        max_steps=max_steps,
        checkpoint=ckpt,
        resumed_from=resumed_from,
        metrics=metrics,
        losses=recent,
        seconds=time.perf_counter() - t_start,
        trainable_parameters=trainable,
        total_parameters=total,
        parameter_table=table,
        interrupted=interrupted,
    )


def _validate(
    model: nn.Module,
    module: TrainingModule,
    wrapped: nn.Module,
    tasks: dict[str, Any],
    loaded: Any,
    runtime: Runtime,
    ep: ExpertParallel | None,
) -> dict[str, float]:
    """Periodic evaluation on rank 0 while the other ranks wait at a barrier.

    FSDP2 parameters are gathered on every rank first. With expert parallelism every rank runs the same
    evaluation over the whole split (the experts' all-to-all needs every rank of a group), and rank 0's
    numbers are reported.
    """
    recipe = loaded.recipe
    fsdp = runtime.distributed and recipe.runtime.distributed == "fsdp2"
    unshard = getattr(wrapped, "unshard", None)
    if fsdp and callable(unshard):
        unshard()
    try:
        metrics: dict[str, float] = {}
        if runtime.is_main or ep is not None:
            alone = dataclasses.replace(runtime, rank=0, world_size=1, distributed=False)
            metrics = _evaluate_here(model, module, tasks, loaded, alone)
        runtime.barrier()
        return metrics if runtime.is_main else {}
    finally:
        reshard = getattr(wrapped, "reshard", None)
        if fsdp and callable(reshard):
            reshard()


def _evaluate_here(
    model: nn.Module,
    module: TrainingModule,
    tasks: dict[str, Any],
    loaded: Any,
    runtime: Runtime,
) -> dict[str, float]:
    """The evaluation engine when installed, else (and with prompt-tuning heads) the built-in validation."""
    recipe = loaded.recipe
    if not len(module.heads):
        import importlib.util

        if importlib.util.find_spec("uniperceiver_cli.engine.evaluate") is not None:
            from uniperceiver_cli.engine import evaluate as evaluation

            fn = getattr(evaluation, "evaluate_tasks", None)
            if callable(fn):
                try:
                    out = fn(model, loaded, recipe_dir=loaded.path.parent.resolve())
                    if isinstance(out, dict):
                        return {str(k): float(v) for k, v in out.items()}
                # The evaluation engine is optional during training: any failure falls back, saying why.
                except Exception as e:  # noqa: BLE001
                    logger.warning(
                        "evaluation engine failed (%s); using the built-in validation", e
                    )
    return validate(
        model,  # type: ignore[arg-type]
        tasks,
        batch_size=recipe.evaluation.batch_size,
        runtime=runtime,
        heads=dict(module.heads.items()),
    )
