"""MoE layer speed against dense baselines measured in the same run (ratios, interleaved).

Parts (all by default, or pick with --parts):

* `attribute`: an attribute-routed linear (D -> F) at eval (cached plan, merged weights) against
  an `nn.Linear` of the same shape and a dense linear on ours' GEMM, on one segment (image) and on
  two segments (caption), with plain matmuls (the default) and with the batch-invariant mode opted
  in, plus ours on torch's BLAS and the reference's split (`F.linear` per segment slice, then
  `torch.cat`, SPEC §2.5) so each ratio can be read with the same GEMM on both sides.
* `eval`: a token- and a context-routed FFN at eval without gradients (dropless), batch-invariant
  mode against plain matmuls and a dense FFN, float32 and bf16 autocast.
* `token`: forward+backward of a token-routed FFN, `ffn_in` (gate owner, top-K, capacity) ->
  GELU -> `ffn_out` (reuses the decision), in training mode, against a dense FFN of the same D and
  F (FLOP floor K) and against DeepSpeed's `deepspeed.moe.layer.MoE` with the same D, F, E, K and
  capacity factor (optional dependency: the column is skipped with a note when it does not
  import), in float32 and in bfloat16 autocast. `--naive` adds a GShard-style dense (N, E, C)
  one-hot dispatch of the same routing. The "expert FFNs" candidates run the opt-in
  `moe.expert_ffn` mode (each expert a whole FFN, mixed once after `ffn_out`): the function
  DeepSpeed's layer computes, unlike the default per-linear mixing (SPEC §2.5-§2.6).
* `experts`: token-routed FFN time against dense for E = 1, 2, 4, ..., 64.
* `tokens`: the same for N = 1k ... 16k tokens.

Each measurement is a median over --reps rounds; within a round every candidate runs once, in
turn, so drift of the shared machine hits all of them alike. The fwd+bwd candidates of `token` run
each in its own process (as a training job would), driven in rounds from this one, so that a
model's page faults come from its own allocations and not from holes another model left in a
shared glibc heap (a fresh 4 KiB page costs ~1.3 us; a 75 MB stacked expert gradient that finds no
hole costs ~24 ms). Each process first runs --token-warmup steps on its own, and the table prints
the median minor page faults of the timed steps.

Run (the allocator setting must be in the environment before Python starts, PERF.md):
    GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 \\
        python benchmarks/moe_layer.py [--parts token] [--reps 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import multiprocessing
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from uniperceiver_cli.model.config import ModelConfig, MoEConfig, RoutingStrategy
from uniperceiver_cli.model.gemm import GemmBackend, GemmLinear, linear, resolve_backend
from uniperceiver_cli.model.moe import SegmentRoutedLinear, TokenRoutedLinear, build_routed_linears
from uniperceiver_cli.model.moe.dispatch import DispatchPlan
from uniperceiver_cli.model.moe.experts import INVARIANT_CHUNK
from uniperceiver_cli.model.moe.fold import fold
from uniperceiver_cli.model.routing import RoutingContext, Segment, input_segments

Step = Callable[[], None]

#: (start, end, merged dense linear) of each non-empty segment (the reference's split).
Segments = list[tuple[int, int, nn.Linear]]

#: Candidates of `token_steps`.
DENSE = "dense FFN"
DENSE_GEMM = "dense FFN, same GEMM as ours"
OURS = "ours: sort + grouped matmul"
OURS_BLAS = "ours, torch's BLAS (as DeepSpeed)"
OURS_FFN = "ours, expert FFNs mixed once (moe.expert_ffn, DeepSpeed's function)"
OURS_FFN_BLAS = "ours, expert FFNs, torch's BLAS"
DEEPSPEED = "DeepSpeed MoE"
DENSE_LINEAR_GEMM = "dense linear, same GEMM as ours"
DENSE_LINEAR = "dense nn.Linear (torch's BLAS)"
ATTRIBUTE = "attribute-routed (eval, default)"
ATTRIBUTE_INVARIANT = "attribute-routed (eval, batch-invariant opt-in)"
ATTRIBUTE_BLAS = "attribute-routed (eval, default), torch's BLAS"
REFERENCE_SPLIT = "the reference's split: F.linear per segment slice + torch.cat (torch's BLAS)"
DEEPSPEED_GEMM = "DeepSpeed MoE, experts on the same GEMM as ours"
UNFUSED = "ours, unfused (gather / grouped / combine)"
NAIVE = "ours, one-hot (N, E, C) dispatch"


def interleaved(candidates: dict[str, Step], reps: int, warmup: int) -> dict[str, float]:
    """Median seconds of each candidate; every round runs all candidates once, in turn."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def isolated(
    names: list[str], spec: dict[str, Any], reps: int, warmup: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median seconds and minor page faults of `token_steps` candidates, one process each.

    The processes are built one after the other and then driven in rounds: a step of each in
    turn, never two at once, so they share the machine's drift but not a heap.

    Args:
        names: candidates of `token_steps`.
        spec: `token_steps` arguments (n, dim, ffn, experts, top_k, capacity, dtype) and
            `threads`.
        reps: timed rounds.
        warmup: steps each process runs before the timed rounds.

    Returns:
        Median seconds and median minor page faults per step of every candidate.
    """
    context = multiprocessing.get_context("spawn")
    workers: dict[str, tuple[Any, Any]] = {}
    try:
        for name in names:
            conn, child = context.Pipe()
            proc = context.Process(target=_token_worker, args=(child, {**spec, "name": name}))
            proc.start()
            child.close()  # the worker holds its end; a dead worker then reads as EOF here
            workers[name] = (proc, conn)
            try:
                conn.recv()
            except EOFError:
                raise RuntimeError(
                    f"the {name!r} process exited while building (see above)"
                ) from None

        def step(name: str) -> tuple[float, int]:
            conn = workers[name][1]
            conn.send("step")
            result: tuple[float, int] = conn.recv()
            return result

        for _ in range(warmup):
            for name in names:
                step(name)
        times: dict[str, list[float]] = {name: [] for name in names}
        faults: dict[str, list[int]] = {name: [] for name in names}
        for _ in range(reps):
            for name in names:
                seconds, faulted = step(name)
                times[name].append(seconds)
                faults[name].append(faulted)
    finally:
        for proc, conn in workers.values():
            with contextlib.suppress(OSError):
                conn.send("stop")
            proc.join(timeout=60)
    return (
        {name: statistics.median(ts) for name, ts in times.items()},
        {name: statistics.median(fs) for name, fs in faults.items()},
    )


def _token_worker(conn: Any, spec: dict[str, Any]) -> None:
    """Child process of `isolated`: build one candidate, then time one step per request."""
    torch.set_num_threads(spec["threads"])
    name = spec["name"]
    with quiet():
        steps = token_steps(
            spec["n"],
            spec["dim"],
            spec["ffn"],
            spec["experts"],
            spec["top_k"],
            spec["capacity"],
            spec["dtype"],
            with_deepspeed=name in (DEEPSPEED, DEEPSPEED_GEMM),
            with_naive=name == NAIVE,
            with_unfused=name == UNFUSED,
            fresh_inputs=spec["fresh_inputs"],
        )
        fn = steps[name]
        conn.send("ready")
        while conn.recv() == "step":
            first_fault = minor_faults()
            start = time.perf_counter()
            fn()
            conn.send((time.perf_counter() - start, minor_faults() - first_fault))


def minor_faults() -> int:
    """Minor page faults of this process so far (fresh pages touched for the first time)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def table(
    title: str,
    medians: dict[str, float],
    base: str,
    note: str = "",
    faults: dict[str, float] | None = None,
) -> None:
    """Print a markdown table of medians and ratios against `base` (and page faults if given)."""
    print(f"\n{title}")
    extra = " page faults |" if faults else ""
    print("| variant | median | vs " + base + " |" + extra)
    print("| --- | --- | --- |" + (" --- |" if faults else ""))
    for name, seconds in medians.items():
        cell = f" {faults[name]:.0f} |" if faults else ""
        print(f"| {name} | {seconds * 1e3:.1f} ms | {seconds / medians[base]:.3f}x |{cell}")
    if note:
        print(note)


def autocast(dtype: torch.dtype) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CPU, or nothing for float32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=dtype)


# attribute routing at eval ---------------------------------------------------------------------


def bench_attribute(args: argparse.Namespace) -> None:
    """Attribute-routed linear at eval against a dense linear of the same shape."""
    moe = MoEConfig(routing="attribute", num_experts=8, top_k=2, layers=(0,), sublayers=("ffn_in",))
    config = ModelConfig(
        hidden_size=args.dim, num_heads=1, ffn_size=args.ffn, num_layers=1, moe=moe
    )
    routed = build_routed_linears(config, 0)["ffn_in"]
    assert isinstance(routed, SegmentRoutedLinear)
    routed.eval()
    dense = nn.Linear(args.dim, args.ffn).eval()
    dense_gemm = GemmLinear(args.dim, args.ffn).eval()
    dense_gemm.load_state_dict(dense.state_dict())
    cases = {
        "image (1 segment, 32 x 197)": (
            32,
            RoutingContext("cls", input_segments("image_classification", visual_len=196)),
        ),
        "caption (2 segments, 32 x (197 + 20))": (
            32,
            RoutingContext("cap", input_segments("image_caption", visual_len=196, text_len=20)),
        ),
    }
    for label, (batch, routing) in cases.items():
        x = torch.randn(batch, routing.length, args.dim)

        def run_routed(x: torch.Tensor = x, routing: RoutingContext = routing) -> None:
            routed.invariant_chunk = INVARIANT_CHUNK
            with torch.no_grad():
                routed(x, routing)

        def run_plain(x: torch.Tensor = x, routing: RoutingContext = routing) -> None:
            routed.invariant_chunk = None
            with torch.no_grad():
                routed(x, routing)

        def run_plain_blas(x: torch.Tensor = x, routing: RoutingContext = routing) -> None:
            routed.invariant_chunk = None
            shipped, routed.cpu_gemm = routed.cpu_gemm, "torch"
            try:
                with torch.no_grad():
                    routed(x, routing)
            finally:
                routed.cpu_gemm = shipped

        segments = merged_segments(routed, routing)

        def run_reference(x: torch.Tensor = x, segments: Segments = segments) -> None:
            with torch.no_grad():
                reference_split(x, segments)

        def run_dense(x: torch.Tensor = x) -> None:
            with torch.no_grad():
                dense(x)

        def run_dense_gemm(x: torch.Tensor = x) -> None:
            with torch.no_grad():
                dense_gemm(x)

        with torch.no_grad():
            y, _ = routed(x, routing)
            torch.testing.assert_close(reference_split(x, segments), y, rtol=1e-4, atol=1e-4)
        assert y.shape == (batch, routing.length, args.ffn)
        medians = interleaved(
            {
                DENSE_LINEAR_GEMM: run_dense_gemm,
                DENSE_LINEAR: run_dense,
                ATTRIBUTE_INVARIANT: run_routed,
                ATTRIBUTE: run_plain,
                ATTRIBUTE_BLAS: run_plain_blas,
                REFERENCE_SPLIT: run_reference,
            },
            args.reps * 4,
            args.warmup + 2,
        )
        table(
            f"attribute-routed linear at eval, {label}, D {args.dim} -> {args.ffn}, E 8, top-2; "
            f"float32 GEMM: {resolve_backend('auto')}",
            medians,
            DENSE_LINEAR_GEMM,
            "same GEMM for routed and dense: ours / dense = "
            f"{medians[ATTRIBUTE] / medians[DENSE_LINEAR_GEMM]:.3f}x on ours' GEMM, "
            f"{medians[ATTRIBUTE_BLAS] / medians[DENSE_LINEAR]:.3f}x on torch's BLAS; the "
            "reference's split on torch's BLAS / dense = "
            f"{medians[REFERENCE_SPLIT] / medians[DENSE_LINEAR]:.3f}x; as shipped, ours / "
            f"nn.Linear = {medians[ATTRIBUTE] / medians[DENSE_LINEAR]:.3f}x",
        )


def reference_split(x: torch.Tensor, segments: Segments) -> torch.Tensor:
    """The reference's way (SPEC §2.5): `F.linear` of each segment's slice with its merged
    weights (torch's BLAS), then `torch.cat` along the sequence: (B, L, Din) -> (B, L, Dout).

    Args:
        x: (B, L, Din).
        segments: (start, end, merged linear) of every non-empty segment, in order.
    """
    return torch.cat([F.linear(x[:, a:b], dense.weight, dense.bias) for a, b, dense in segments], 1)


def merged_segments(routed: SegmentRoutedLinear, routing: RoutingContext) -> Segments:
    """(start, end, the merged linear `fold` builds for its key) of every non-empty segment."""
    keys = routed.routing_keys(routing)
    return [
        (start, end, fold(routed, key))
        for key, (start, end) in zip(keys, routing.boundaries(), strict=True)
        if end > start
    ]


# token routing, forward + backward -------------------------------------------------------------


def token_ffn(
    dim: int, ffn: int, experts: int, top_k: int, capacity: float, expert_ffn: bool = False
) -> tuple[TokenRoutedLinear, TokenRoutedLinear]:
    """`ffn_in` and `ffn_out` of one token-routed layer (training mode)."""
    moe = MoEConfig(
        routing="token",
        num_experts=experts,
        top_k=top_k,
        layers=(0,),
        sublayers=("ffn_in", "ffn_out"),
        capacity_factor=capacity,
        expert_ffn=expert_ffn,
    )
    config = ModelConfig(hidden_size=dim, num_heads=1, ffn_size=ffn, num_layers=1, moe=moe)
    modules = build_routed_linears(config, 0)
    ffn_in, ffn_out = modules["ffn_in"], modules["ffn_out"]
    assert isinstance(ffn_in, TokenRoutedLinear) and isinstance(ffn_out, TokenRoutedLinear)
    return ffn_in, ffn_out


def onehot_linear(
    x: torch.Tensor, plan: DispatchPlan, module: TokenRoutedLinear, capacity: int
) -> torch.Tensor:
    """GShard-style linear with a dense (N, E, C) dispatch/combine tensor (the naive baseline)."""
    n, k = plan.num_units, plan.top_k
    e = module.moe.num_experts
    with torch.no_grad():
        counts = plan.counts.tolist()
        expert_of = torch.repeat_interleave(torch.arange(e), torch.tensor(counts))
        starts = torch.tensor([0, *counts]).cumsum(0)[:-1]
        position = torch.arange(plan.order.numel()) - starts[expert_of]
        units = plan.units
        slots = plan.order % k
    combine = x.new_zeros((n, e, capacity))
    combine = combine.index_put((units, expert_of, position), plan.weights[units, slots])
    dispatch = (combine > 0).to(x.dtype)
    per_expert = torch.einsum("nec,nd->ecd", dispatch, x)
    out = torch.einsum("ecd,eod->eco", per_expert, module.experts.weight)
    assert module.experts.bias is not None
    out = out + module.experts.bias.unsqueeze(1)
    return torch.einsum("nec,eco->no", combine, out)


_DEEPSPEED: dict[str, Any] = {}


def deepspeed_moe_class() -> tuple[Any, str]:
    """`deepspeed.moe.layer.MoE` with a 1-process gloo group, or (None, why not)."""
    if "cls" in _DEEPSPEED:
        return _DEEPSPEED["cls"], _DEEPSPEED["why"]
    cls: Any = None
    why = ""
    try:
        import torch.distributed as dist

        logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
        from deepspeed.moe.layer import MoE  # type: ignore[import-untyped]

        if not dist.is_initialized():
            init = os.path.join(tempfile.mkdtemp(prefix="moe_bench_"), "init")
            dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=1)
        cls = MoE
    except (ImportError, RuntimeError, OSError, ValueError) as err:  # optional dependency
        why = f"DeepSpeed column skipped: {type(err).__name__}: {err}"
    _DEEPSPEED.update(cls=cls, why=why)
    return cls, why


def build_deepspeed(
    dim: int, ffn: int, experts: int, top_k: int, capacity: float, same_gemm: bool = False
) -> Any:
    """DeepSpeed MoE with FFN experts of the same shape, its default gate settings.

    `same_gemm` builds the experts from `GemmLinear`, so their float32 matmuls run on the
    library ours picks (`runtime.cpu_gemm: auto`) instead of torch's BLAS.
    """
    cls, _ = deepspeed_moe_class()
    linear_cls = GemmLinear if same_gemm else nn.Linear
    expert = nn.Sequential(linear_cls(dim, ffn), nn.GELU(), linear_cls(ffn, dim))
    return cls(
        hidden_size=dim,
        expert=expert,
        num_experts=experts,
        ep_size=1,
        k=top_k,
        capacity_factor=capacity,
        eval_capacity_factor=capacity,
    )


def token_steps(
    n: int,
    dim: int,
    ffn: int,
    experts: int,
    top_k: int,
    capacity: float,
    dtype: torch.dtype,
    *,
    with_deepspeed: bool = False,
    with_naive: bool = False,
    with_unfused: bool = False,
    fresh_inputs: int = 1,
) -> dict[str, Step]:
    """Forward+backward steps of the dense FFN, our token-routed FFN and optional baselines.

    `fresh_inputs` > 1 cycles through that many random inputs, so routing (and so every
    expert's row count) changes from step to step as in training; 1 repeats one input.
    """
    torch.manual_seed(0)
    ffn_in, ffn_out = token_ffn(dim, ffn, experts, top_k, capacity)
    dense = nn.Sequential(nn.Linear(dim, ffn), nn.GELU(), nn.Linear(ffn, dim))
    routing = RoutingContext("bench", (Segment(n, "image", (0,) * 8),))
    inputs = [torch.randn(1, n, dim, requires_grad=True) for _ in range(fresh_inputs)]
    params = [*ffn_in.parameters(), *ffn_out.parameters(), *dense.parameters()]
    turn = [0]

    def step(
        loss_fn: Callable[[torch.Tensor], torch.Tensor], extra: Sequence[torch.Tensor]
    ) -> Step:
        def run() -> None:
            x = inputs[turn[0] % len(inputs)]
            turn[0] += 1
            x.grad = None
            for p in [*params, *extra]:
                p.grad = None
            with autocast(dtype):
                loss = loss_fn(x)
            loss.backward()  # type: ignore[no-untyped-call]

        return run

    def dense_loss(x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = dense(x).float().sum()
        return out

    def dense_gemm_loss(x: torch.Tensor) -> torch.Tensor:
        first, last = dense[0], dense[2]
        assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
        h = F.gelu(linear(x, first.weight, first.bias, ffn_in.cpu_gemm))
        out: torch.Tensor = linear(h, last.weight, last.bias, ffn_in.cpu_gemm).float().sum()
        return out

    def moe_loss(x: torch.Tensor) -> torch.Tensor:
        h, aux = ffn_in(x, routing)
        y, _ = ffn_out(F.gelu(h), routing)
        assert aux is not None
        total: torch.Tensor = y.float().sum() + aux.loss
        return total

    def blas_loss(x: torch.Tensor) -> torch.Tensor:
        ffn_in.cpu_gemm = ffn_out.cpu_gemm = "torch"
        try:
            return moe_loss(x)
        finally:
            ffn_in.cpu_gemm = ffn_out.cpu_gemm = "auto"

    torch.manual_seed(0)
    pair_in, pair_out = token_ffn(dim, ffn, experts, top_k, capacity, expert_ffn=True)
    pair_params = [*pair_in.parameters(), *pair_out.parameters()]

    def expert_ffn_loss(x: torch.Tensor, gemm: GemmBackend = "auto") -> torch.Tensor:
        pair_in.cpu_gemm = gemm
        y, aux = pair_in.expert_ffn(x, pair_out, routing)
        total: torch.Tensor = y.float().sum() + aux.loss
        return total

    steps: dict[str, Step] = {
        DENSE: step(dense_loss, []),
        DENSE_GEMM: step(dense_gemm_loss, []),
        OURS: step(moe_loss, []),
        OURS_BLAS: step(blas_loss, []),
        OURS_FFN: step(expert_ffn_loss, pair_params),
        OURS_FFN_BLAS: step(lambda x: expert_ffn_loss(x, "torch"), pair_params),
    }
    if with_unfused:

        def unfused_loss(x: torch.Tensor) -> torch.Tensor:
            ffn_in.fused_dispatch = ffn_out.fused_dispatch = False
            try:
                return moe_loss(x)
            finally:
                ffn_in.fused_dispatch = ffn_out.fused_dispatch = True

        steps[UNFUSED] = step(unfused_loss, [])
    if with_deepspeed:
        for name, same_gemm in ((DEEPSPEED, False), (DEEPSPEED_GEMM, True)):
            ds = build_deepspeed(dim, ffn, experts, top_k, capacity, same_gemm)

            def ds_loss(x: torch.Tensor, ds: Any = ds) -> torch.Tensor:
                y, l_aux, _ = ds(x)
                loss: torch.Tensor = y.float().sum() + l_aux
                return loss

            steps[name] = step(ds_loss, list(ds.parameters()))
    if with_naive:

        def naive_loss(x: torch.Tensor) -> torch.Tensor:
            flat = x.reshape(n, dim)
            route, stats = ffn_in.route(x, None)
            cap = route.plan.capacity or n
            h = onehot_linear(flat, route.plan, ffn_in, cap)
            y = onehot_linear(F.gelu(h), route.plan, ffn_out, cap)
            return y.float().sum() + ffn_in.moe.balance_loss_weight * stats["balance"]

        steps[NAIVE] = step(naive_loss, [])
    return steps


def bench_token(args: argparse.Namespace) -> None:
    """Token-routed FFN against dense and DeepSpeed, float32 and bf16 autocast."""
    cls, why = deepspeed_moe_class() if not args.no_deepspeed else (None, "skipped by flag")
    names = [DENSE, DENSE_GEMM, OURS, OURS_BLAS, OURS_FFN, OURS_FFN_BLAS]
    names += [UNFUSED] if args.unfused else []
    names += [DEEPSPEED, DEEPSPEED_GEMM] if cls is not None else []
    names += [NAIVE] if args.naive else []
    for dtype in args.dtypes:
        spec = {
            "n": args.tokens,
            "dim": args.dim,
            "ffn": args.ffn,
            "experts": args.experts,
            "top_k": args.top_k,
            "capacity": args.capacity_factor,
            "dtype": dtype,
            "threads": args.threads,
            "fresh_inputs": args.fresh_inputs,
        }
        medians, faults = isolated(names, spec, args.reps, args.token_warmup)
        note = (
            f"FLOP floor vs dense: K = {args.top_k}; one process per candidate; "
            f"{args.fresh_inputs} input(s) in turn; ours' float32 GEMM: "
            f"{resolve_backend('auto')}; ours / dense on the same GEMM = "
            f"{medians[OURS] / medians[DENSE_GEMM]:.3f}x; expert FFNs / dense on the same GEMM = "
            f"{medians[OURS_FFN] / medians[DENSE_GEMM]:.3f}x; all on torch's BLAS: ours / dense "
            f"= {medians[OURS_BLAS] / medians[DENSE]:.3f}x, expert FFNs / dense = "
            f"{medians[OURS_FFN_BLAS] / medians[DENSE]:.3f}x"
        )
        if DEEPSPEED in medians:
            note += (
                f"; DeepSpeed / ours = {medians[DEEPSPEED] / medians[OURS]:.3f}x"
                f"; DeepSpeed / ours on torch's BLAS = "
                f"{medians[DEEPSPEED] / medians[OURS_BLAS]:.3f}x"
                f"; DeepSpeed / ours, both on ours' GEMM = "
                f"{medians[DEEPSPEED_GEMM] / medians[OURS]:.3f}x"
                f"; same function (expert FFNs): DeepSpeed / ours = "
                f"{medians[DEEPSPEED] / medians[OURS_FFN]:.3f}x, both on torch's BLAS "
                f"{medians[DEEPSPEED] / medians[OURS_FFN_BLAS]:.3f}x, both on ours' GEMM "
                f"{medians[DEEPSPEED_GEMM] / medians[OURS_FFN]:.3f}x"
            )
        elif why:
            note += f"; {why}"
        table(
            f"token-routed FFN fwd+bwd, {dtype_name(dtype)}, N {args.tokens}, D {args.dim}, "
            f"F {args.ffn}, E {args.experts}, top-{args.top_k}, capacity {args.capacity_factor}",
            medians,
            DENSE,
            note,
            faults,
        )


def eval_steps(
    args: argparse.Namespace, routing_name: RoutingStrategy, dtype: torch.dtype
) -> dict[str, Step]:
    """No-grad steps of a dense FFN and of a routed FFN with and without the invariant mode."""
    torch.manual_seed(0)
    moe = MoEConfig(
        routing=routing_name,
        num_experts=args.experts,
        top_k=args.top_k,
        layers=(0,),
        sublayers=("ffn_in", "ffn_out"),
    )
    config = ModelConfig(
        hidden_size=args.dim, num_heads=1, ffn_size=args.ffn, num_layers=1, moe=moe
    )
    modules = build_routed_linears(config, 0)
    ffn_in, ffn_out = modules["ffn_in"], modules["ffn_out"]
    assert isinstance(ffn_in, TokenRoutedLinear) and isinstance(ffn_out, TokenRoutedLinear)
    ffn_in.eval()
    ffn_out.eval()
    dense = nn.Sequential(nn.Linear(args.dim, args.ffn), nn.GELU(), nn.Linear(args.ffn, args.dim))
    # 32 samples of N / 32 tokens: context routing needs several samples
    length = max(args.tokens // 32, 1)
    routing = RoutingContext("bench", (Segment(length, "image", (0,) * 8),))
    x = torch.randn(args.tokens // length, length, args.dim)

    def routed(chunk: int | None, expert_ffn: bool = False) -> Step:
        def run() -> None:
            ffn_in.invariant_chunk = ffn_out.invariant_chunk = chunk
            with torch.no_grad(), autocast(dtype):
                if expert_ffn:  # the same weights as whole-FFN experts (moe.expert_ffn)
                    ffn_in.expert_ffn(x, ffn_out, routing)
                else:
                    h, _ = ffn_in(x, routing)
                    ffn_out(F.gelu(h), routing)

        return run

    def run_dense() -> None:
        with torch.no_grad(), autocast(dtype):
            dense(x)

    def run_dense_gemm() -> None:
        first, last = dense[0], dense[2]
        assert isinstance(first, nn.Linear) and isinstance(last, nn.Linear)
        with torch.no_grad(), autocast(dtype):
            h = F.gelu(linear(x, first.weight, first.bias, ffn_in.cpu_gemm))
            linear(h, last.weight, last.bias, ffn_in.cpu_gemm)

    return {
        DENSE: run_dense,
        DENSE_GEMM: run_dense_gemm,
        "routed, plain matmuls": routed(None),
        "routed, batch-invariant (default)": routed(INVARIANT_CHUNK),
        "routed, expert FFNs, plain matmuls": routed(None, expert_ffn=True),
        "routed, expert FFNs, batch-invariant (default)": routed(INVARIANT_CHUNK, expert_ffn=True),
    }


def bench_eval(args: argparse.Namespace) -> None:
    """Token/context-routed FFN at eval: batch-invariant mode vs plain matmuls vs dense."""
    routings: tuple[RoutingStrategy, ...] = ("token", "context")
    for routing_name in routings:
        for dtype in args.dtypes:
            steps = eval_steps(args, routing_name, dtype)
            medians = interleaved(steps, args.reps * 2, args.warmup)
            ratio = medians["routed, batch-invariant (default)"] / medians["routed, plain matmuls"]
            table(
                f"{routing_name}-routed FFN at eval (no grad, dropless), {dtype_name(dtype)}, "
                f"N {args.tokens}, D {args.dim}, F {args.ffn}, E {args.experts}, "
                f"top-{args.top_k}",
                medians,
                DENSE,
                f"batch-invariant / plain = {ratio:.3f}x",
            )


def bench_sweep(args: argparse.Namespace, over: str) -> None:
    """MoE / dense ratio over the number of experts or of tokens (float32)."""
    values = args.expert_sweep if over == "experts" else args.token_sweep
    print(f"\ntoken-routed FFN fwd+bwd vs dense FFN over {over} (float32, top-{args.top_k})")
    print(f"| {over} | dense (same GEMM) | ours | ours / dense |")
    print("| --- | --- | --- | --- |")
    for value in values:
        experts = value if over == "experts" else args.experts
        tokens = value if over == "tokens" else args.tokens
        top_k = min(args.top_k, experts)
        steps = token_steps(
            tokens, args.dim, args.ffn, experts, top_k, args.capacity_factor, torch.float32
        )
        chosen = {name: steps[name] for name in (DENSE_GEMM, OURS)}
        medians = interleaved(chosen, max(args.reps - 2, 1), args.warmup)
        dense, ours = medians[DENSE_GEMM], medians[OURS]
        print(f"| {value} | {dense * 1e3:.0f} ms | {ours * 1e3:.0f} ms | {ours / dense:.3f}x |")


def dtype_name(dtype: torch.dtype) -> str:
    """float32 or bf16 autocast."""
    return "float32" if dtype == torch.float32 else "bf16 autocast"


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence library warnings while measuring."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def main() -> None:
    """Parse arguments and run the chosen parts."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--parts", default="attribute,token,eval,experts,tokens")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--dtype", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--expert-sweep", default="1,2,4,8,16,32,64")
    parser.add_argument("--token-sweep", default="1024,2048,4096,8192,16384")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--token-warmup", type=int, default=4, help="untimed steps of each `token` process"
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--fresh-inputs",
        type=int,
        default=1,
        help="`token`: cycle through this many inputs, so routing changes every step",
    )
    parser.add_argument("--no-deepspeed", action="store_true")
    parser.add_argument("--naive", action="store_true", help="add the one-hot dispatch baseline")
    parser.add_argument("--unfused", action="store_true", help="add our unfused dispatch path")
    args = parser.parse_args()
    args.dtypes = [
        {"fp32": torch.float32, "bf16": torch.bfloat16}[d] for d in args.dtype.split(",")
    ]
    args.expert_sweep = [int(v) for v in args.expert_sweep.split(",")]
    args.token_sweep = [int(v) for v in args.token_sweep.split(",")]
    torch.set_num_threads(args.threads)
    tunables = os.environ.get("GLIBC_TUNABLES", "(unset: see PERF.md)")
    print(
        f"torch {torch.__version__}, threads {args.threads}, reps {args.reps}, "
        f"GLIBC_TUNABLES={tunables}"
    )
    parts = args.parts.split(",")
    with quiet():
        if "attribute" in parts:
            bench_attribute(args)
        if "token" in parts:
            bench_token(args)
        if "eval" in parts:
            bench_eval(args)
        if "experts" in parts:
            bench_sweep(args, "experts")
        if "tokens" in parts:
            bench_sweep(args, "tokens")


if __name__ == "__main__":
    main()
