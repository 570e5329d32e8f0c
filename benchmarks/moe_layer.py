"""Forward+backward time of a token-routed MoE FFN against a dense FFN and a one-hot dispatch.

All three are timed in the same run, interleaved, on the same input (median of --reps after
--warmup). The MoE FFN is `ffn_in` (gate owner) -> GELU -> `ffn_out` (reuses the decision) from
`build_routed_linears`, training mode, top-k with capacity; the dense FFN has the same D and F, so
the FLOP floor of the MoE/dense ratio is K. The naive baseline computes the same routing with a
dense (N, E, C) one-hot dispatch/combine tensor (GShard einsum style).

Run: GLIBC_TUNABLES=glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736 \
     python benchmarks/moe_layer.py [--tokens 4096 --dim 768 --ffn 3072 --experts 8 --top-k 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from uniperceiver_cli.model.config import ModelConfig, MoEConfig
from uniperceiver_cli.model.moe import TokenRoutedLinear, build_routed_linears
from uniperceiver_cli.model.moe.dispatch import DispatchPlan
from uniperceiver_cli.model.routing import RoutingContext, Segment


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


def timed(fn: Callable[[], None]) -> float:
    """Seconds of one call of `fn`."""
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main() -> None:
    """Parse arguments, build the three FFNs, time them interleaved and print ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--ffn", type=int, default=3072)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-naive", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    moe = MoEConfig(
        routing="token",
        num_experts=args.experts,
        top_k=args.top_k,
        layers=(0,),
        sublayers=("ffn_in", "ffn_out"),
        capacity_factor=args.capacity_factor,
    )
    config = ModelConfig(
        hidden_size=args.dim, num_heads=1, ffn_size=args.ffn, num_layers=1, moe=moe
    )
    modules = build_routed_linears(config, 0)
    ffn_in, ffn_out = modules["ffn_in"], modules["ffn_out"]
    assert isinstance(ffn_in, TokenRoutedLinear) and isinstance(ffn_out, TokenRoutedLinear)
    dense = nn.Sequential(nn.Linear(args.dim, args.ffn), nn.GELU(), nn.Linear(args.ffn, args.dim))
    routing = RoutingContext("bench", (Segment(args.tokens, "image", (0,) * 8),))
    x = torch.randn(1, args.tokens, args.dim, requires_grad=True)

    def moe_out() -> tuple[torch.Tensor, torch.Tensor]:
        h, aux = ffn_in(x, routing)
        y, _ = ffn_out(F.gelu(h), routing)
        assert aux is not None
        return y.reshape(args.tokens, args.dim), aux.loss

    def naive_out() -> tuple[torch.Tensor, torch.Tensor]:
        flat = x.reshape(args.tokens, args.dim)
        route, stats = ffn_in.route(x, None)
        capacity = route.plan.capacity or args.tokens
        h = onehot_linear(flat, route.plan, ffn_in, capacity)
        y = onehot_linear(F.gelu(h), route.plan, ffn_out, capacity)
        return y, moe.balance_loss_weight * stats["balance"]

    def run_moe() -> torch.Tensor:
        y, loss = moe_out()
        return y.sum() + loss

    def run_naive() -> torch.Tensor:
        y, loss = naive_out()
        return y.sum() + loss

    # same routing (no noise) for the correctness check of the naive baseline
    gate = ffn_in.gate
    assert gate is not None
    gate.eval()
    with torch.no_grad():
        ours, _ = moe_out()
        naive, _ = naive_out()
    gate.train()
    diff = float((ours - naive).abs().max())
    print(f"check: max |moe - naive| = {diff:.2e} (output scale {float(ours.abs().max()):.2e})")

    def step(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            for p in [*ffn_in.parameters(), *ffn_out.parameters(), *dense.parameters()]:
                p.grad = None
            fn().backward()  # type: ignore[no-untyped-call]

        return run

    candidates: dict[str, Callable[[], None]] = {
        "dense FFN": step(lambda: dense(x).sum()),
        "MoE (sort + per-expert matmul)": step(run_moe),
    }
    if not args.skip_naive:
        candidates["MoE (one-hot dispatch)"] = step(run_naive)
    results: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(args.warmup):
        for fn in candidates.values():
            fn()
    for _ in range(args.reps):
        for name, fn in candidates.items():
            results[name].append(timed(fn))
    medians = {name: statistics.median(ts) for name, ts in results.items()}
    print(
        f"N={args.tokens} D={args.dim} F={args.ffn} E={args.experts} K={args.top_k} "
        f"capacity_factor={args.capacity_factor} threads={args.threads} reps={args.reps}"
    )
    base = medians["dense FFN"]
    for name, seconds in medians.items():
        print(f"{name:34s} {seconds:8.3f} s   x{seconds / base:5.2f} vs dense")
    if "MoE (one-hot dispatch)" in medians:
        ratio = medians["MoE (one-hot dispatch)"] / medians["MoE (sort + per-expert matmul)"]
        print(f"one-hot / sorted dispatch: x{ratio:.2f}")
    print(f"FLOP floor MoE / dense = K = {args.top_k} (capacity_factor {args.capacity_factor})")


if __name__ == "__main__":
    main()
