"""Where the computation runs: device, precision, the process group from torchrun's environment.

`init_runtime` reads `RANK`/`WORLD_SIZE`/`LOCAL_RANK` once and returns a `Runtime` that the rest of the engine
receives explicitly; nothing else in the package looks at the environment or at CUDA. Collective helpers used by
the losses (`gather_with_grad`) and by the loop (`all_reduce_mean`, `broadcast_object`) live here too, and are
no-ops in a single process.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

logger = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16", "fp16"]


class RuntimeSetupError(RuntimeError):
    """The requested device or distributed set-up cannot be provided on this machine."""


@dataclass(frozen=True)
class Runtime:
    """One process's view of the run.

    Attributes:
        device: where the model and batches live.
        precision: autocast precision (`fp32` = no autocast).
        rank: global rank (0 in a single process).
        world_size: number of processes.
        local_rank: rank on this node.
        distributed: a process group was initialised by us.
    """

    device: torch.device
    precision: Precision = "fp32"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the only process that renders, logs metrics and writes files."""
        return self.rank == 0

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """dtype of autocast regions, or None for fp32."""
        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Context manager for the forward pass under the requested precision."""
        dtype = self.autocast_dtype
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def barrier(self) -> None:
        """Wait for every rank (no-op in one process)."""
        if self.distributed:
            dist.barrier()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError as e:
        raise RuntimeSetupError(
            f"environment variable {name}={value!r} must be an integer (torchrun sets it)"
        ) from e


def init_runtime(
    device: Literal["auto", "cpu", "cuda"] = "auto",
    precision: Precision = "fp32",
    *,
    threads: int | None = None,
) -> Runtime:
    """Initialise the device and, under torchrun, the process group (gloo on CPU, NCCL on CUDA).

    Args:
        device: `auto` = CUDA when available, else CPU.
        precision: autocast precision.
        threads: CPU threads for torch (None leaves torch's choice).

    Returns:
        The `Runtime`.

    Raises:
        RuntimeSetupError: CUDA requested but absent, or a bad torchrun environment.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeSetupError(
            "runtime.device is 'cuda' but no CUDA device is visible; set runtime.device to 'cpu' or 'auto'"
        )
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank % max(1, torch.cuda.device_count()))
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device("cpu")
    if precision == "fp16" and dev.type == "cpu":
        logger.warning("fp16 autocast on CPU is slow and poorly supported; bf16 is the CPU choice")
    initialised = False
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        initialised = True
    elif dist.is_initialized():
        initialised = True
    return Runtime(
        device=dev,
        precision=precision,
        rank=rank,
        world_size=world,
        local_rank=local_rank,
        distributed=initialised and world > 1,
    )


def shutdown_runtime(runtime: Runtime) -> None:
    """Tear down the process group we created (every rank must call it)."""
    if runtime.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient of a shard onto its owner.

    torch's `distributed.nn.functional.all_gather` emulates reduce-scatter with list all-to-all,
    which gloo lacks; an all-reduce of the full gradient followed by a slice works on every backend.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, rank: int, world: int) -> Tensor:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        total = grad.contiguous().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        start = ctx.rank * ctx.rows
        return total[start : start + ctx.rows], None, None


def gather_with_grad(x: Tensor, runtime: Runtime) -> Tensor:
    """Concatenate `x` (B, ...) of every rank along dim 0, with gradients flowing back to each owner.

    Every rank must pass the same shape. The backward sums the gradients all ranks computed for a
    shard onto its owner, so a loss computed on local rows against the gathered tensor, averaged over
    local rows, gives (after DDP's gradient averaging) exactly the single-process global-batch gradient.

    Args:
        x: local tensor (B, ...).
        runtime: the run's runtime.

    Returns:
        (W*B, ...) in rank order.
    """
    if not runtime.distributed:
        return x
    out: Tensor = _GatherWithGrad.apply(x, runtime.rank, runtime.world_size)  # type: ignore[no-untyped-call]
    return out


def gather_no_grad(x: Tensor, runtime: Runtime) -> Tensor:
    """Concatenate equally shaped tensors of every rank along dim 0 (no autograd)."""
    if not runtime.distributed:
        return x
    parts = [torch.empty_like(x) for _ in range(runtime.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def all_reduce_mean(x: Tensor, runtime: Runtime) -> Tensor:
    """Average a tensor over ranks (a copy; no autograd)."""
    if not runtime.distributed:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y / runtime.world_size


def all_reduce_max(x: Tensor, runtime: Runtime) -> Tensor:
    """Maximum of a tensor over ranks (a copy; no autograd)."""
    if not runtime.distributed:
        return x
    y = x.detach().clone()
    dist.all_reduce(y, op=dist.ReduceOp.MAX)
    return y


def broadcast_object(obj: Any, runtime: Runtime, src: int = 0) -> Any:
    """Send a picklable object from `src` to every rank and return it."""
    if not runtime.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@contextlib.contextmanager
def main_first(runtime: Runtime) -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks (e.g. creating folders)."""
    if not runtime.is_main:
        runtime.barrier()
    yield
    if runtime.is_main:
        runtime.barrier()
