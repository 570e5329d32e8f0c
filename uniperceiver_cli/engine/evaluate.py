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
import logging
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from uniperceiver_cli.engine.eval_outputs import EvalResult as EvalResult
from uniperceiver_cli.engine.eval_outputs import FailUnder as FailUnder
from uniperceiver_cli.engine.eval_outputs import TaskResult as TaskResult
from uniperceiver_cli.engine.eval_outputs import check_fail_under as check_fail_under
from uniperceiver_cli.engine.eval_outputs import failed_thresholds as failed_thresholds
from uniperceiver_cli.engine.eval_outputs import parse_fail_under as parse_fail_under
from uniperceiver_cli.engine.eval_outputs import task_result_dict as task_result_dict
from uniperceiver_cli.engine.eval_outputs import write_outputs as write_outputs
from uniperceiver_cli.engine.eval_runners import decode_captions as decode_captions
from uniperceiver_cli.engine.eval_runners import (
    eval_caption,
    eval_classification,
    eval_cloze,
    eval_retrieval,
)
from uniperceiver_cli.engine.eval_runners import rank_retrieval as rank_retrieval
from uniperceiver_cli.engine.eval_tasks import CAPTION_TYPES as CAPTION_TYPES
from uniperceiver_cli.engine.eval_tasks import CLASSIFICATION_TYPES as CLASSIFICATION_TYPES
from uniperceiver_cli.engine.eval_tasks import METRICS_BY_TYPE as METRICS_BY_TYPE
from uniperceiver_cli.engine.eval_tasks import RANKS_KEPT as RANKS_KEPT
from uniperceiver_cli.engine.eval_tasks import RETRIEVAL_TYPES as RETRIEVAL_TYPES
from uniperceiver_cli.engine.eval_tasks import TEXT_TYPES as TEXT_TYPES
from uniperceiver_cli.engine.eval_tasks import VOCAB_CACHE_ENV as VOCAB_CACHE_ENV
from uniperceiver_cli.engine.eval_tasks import EvalError as EvalError
from uniperceiver_cli.engine.eval_tasks import EvalTask as EvalTask
from uniperceiver_cli.engine.eval_tasks import Precision as Precision
from uniperceiver_cli.engine.eval_tasks import Protocol as Protocol
from uniperceiver_cli.engine.eval_tasks import open_eval_data as open_eval_data
from uniperceiver_cli.engine.eval_tasks import resolve_tasks as resolve_tasks
from uniperceiver_cli.engine.eval_tasks import tasks_from_recipe as tasks_from_recipe
from uniperceiver_cli.engine.eval_vocab import checkpoint_sha256 as checkpoint_sha256
from uniperceiver_cli.engine.eval_vocab import default_cache_dir as default_cache_dir
from uniperceiver_cli.engine.eval_vocab import (
    vocabulary_features_cached as vocabulary_features_cached,
)
from uniperceiver_cli.model.gemm import GemmBackend, resolve_backend, set_cpu_gemm
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
    cpu_gemm: GemmBackend = getattr(getattr(recipe, "runtime", None), "cpu_gemm", "auto")
    set_cpu_gemm(model, cpu_gemm)
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
        "cpu_gemm": resolve_backend(cpu_gemm) if dev.type == "cpu" else None,
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
                    res = eval_classification(model, task, dev)
                elif task.type in RETRIEVAL_TYPES:
                    res = eval_retrieval(model, task, dev)
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
                    res = eval_caption(model, task, dev, vocab)
                elif task.type in TEXT_TYPES:
                    res = eval_cloze(model, task, dev)
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
