"""Real attention FLOPs of routed attention, per query token and per head: the one model
of it that the trace, the evaluation and the app all call.

Counts the multiply-adds the experts actually perform (2 FLOPs each, for q k^T and for
p v): full 4 d (p + 1), local 4 d (keys in window + sinks), linear about 4 d^2 (the
state product and its update), summed over every expert a token is routed to (weight
> 0). Works on torch tensors and on numpy arrays (the trace holds numpy and must not
need torch); counts are whole numbers held in float64, so sums are exact in any order.
The notional costs of the paper live with the routing policy, not here.
Never: depend on a backend, time anything, or import torch at module level.
"""

from __future__ import annotations

import numpy as np

from metaattn_kernels.experts import EXPERTS, FULL, LINEAR, LOCAL


def _is_torch(x) -> bool:
    return type(x).__module__.split(".", 1)[0] == "torch"


def expert_flops(positions, window: int, n_sink: int, head_dim: int):
    """positions [..., T] absolute positions -> [..., T, K] FLOPs each expert would spend
    on each query token (per head); float64, of positions' kind (torch or numpy)."""
    d = float(head_dim)
    if _is_torch(positions):
        import torch

        seen = positions.to(torch.float64) + 1  # keys j <= p
        # the window's keys, then the sinks that fall outside it
        local = seen.clamp(max=window) + (seen - window).clamp(min=0, max=n_sink)
        linear, stack = torch.full_like(seen, 4 * d * d), torch.stack
    else:
        seen = np.asarray(positions, np.float64) + 1
        local = np.minimum(seen, window) + np.clip(seen - window, 0, n_sink)
        linear, stack = np.full_like(seen, 4 * d * d), np.stack
    per_expert: list = [None] * len(EXPERTS)
    per_expert[FULL] = 4 * d * seen
    per_expert[LINEAR] = linear
    per_expert[LOCAL] = 4 * d * local
    return stack(per_expert, -1)  # [..., T, K]


def attention_flops(positions, weights, window: int, n_sink: int, head_dim: int):
    """positions [..., T] absolute positions, weights [..., T, K] (broadcast against each
    other) -> FLOPs per token and head [..., T]: every expert with weight > 0 is paid."""
    return (expert_flops(positions, window, n_sink, head_dim) * (weights > 0)).sum(-1)


def attention_flops_totals(
    positions, weights, window: int, n_sink: int, head_dim: int
) -> tuple[float, float]:
    """(routed, dense): FLOPs summed over every decision in weights [..., T, K] (positions
    [..., T] broadcast against it), and what all-full attention would have cost."""
    per_expert = expert_flops(positions, window, n_sink, head_dim)  # [..., T, K]
    routed = float((per_expert * (weights > 0)).sum())
    full = per_expert[..., FULL]  # [..., T]
    decisions = tuple(np.broadcast_shapes(tuple(full.shape), tuple(weights.shape[:-1])))
    every = full.expand(decisions) if _is_torch(full) else np.broadcast_to(full, decisions)
    return routed, float(every.sum())


def attention_flops_ratio(positions, weights, window: int, n_sink: int, head_dim: int) -> float:
    """Routed over all-full attention FLOPs of the decisions in weights [..., T, K]; NaN
    when there are none."""
    routed, dense = attention_flops_totals(positions, weights, window, n_sink, head_dim)
    return routed / dense if dense else float("nan")


def lowest_flops_ratio(positions, window: int, n_sink: int, head_dim: int) -> float:
    """The lowest routed-over-dense FLOPs ratio any routing of query tokens at `positions`
    [T] can reach: every token to its cheapest expert. Below the window local attention
    costs what full does and linear more, so a short text cannot get cheaper than dense.
    NaN when there are no positions."""
    per_expert = expert_flops(positions, window, n_sink, head_dim)  # [T, K]
    dense = float(per_expert[..., FULL].sum())
    return float(per_expert.min(-1).sum()) / dense if dense else float("nan")
