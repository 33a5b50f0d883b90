"""Real attention FLOPs of routed attention, per query token and per head.

Counts the multiply-adds the experts actually perform (2 FLOPs each, for q k^T and for
p v): full 4 d (p + 1), local 4 d (keys in window + sinks), linear about 4 d^2 (the
state product and its update), summed over every expert a token is routed to (weight
> 0). The notional costs of the paper live with the routing policy, not here.
Never: depend on a backend or time anything.
"""

from __future__ import annotations

import torch

from metaattn_kernels.experts import FULL, LINEAR, LOCAL


def attention_flops(positions: torch.Tensor, weights: torch.Tensor, window: int, n_sink: int,
                    head_dim: int) -> torch.Tensor:
    """positions [..., T] absolute positions, weights [..., T, 3] -> FLOPs per token and head [..., T]."""
    p = positions.to(torch.float64)
    seen = p + 1  # keys j <= p
    in_window = torch.clamp(seen, max=window)
    sinks = torch.clamp(seen - window, min=0).clamp(max=n_sink)  # sinks outside the window
    d = float(head_dim)
    per_expert = [None] * 3
    per_expert[FULL] = 4 * d * seen
    per_expert[LINEAR] = torch.full_like(p, 4 * d * d)
    per_expert[LOCAL] = 4 * d * (in_window + sinks)
    return (torch.stack(per_expert, dim=-1) * (weights > 0)).sum(-1)  # [..., T]
