"""The three attention experts as the routing policy sees them: id, name, letter, cost.

Ids and names are the kernels' (`metaattn_kernels.experts`, the mechanics), imported
here so that the routing weights' last axis means the same thing on both sides. What
only the policy and its views need lives here, once: the paper's notional costs (they
drive the prior, and the budget under the default cost model; docs/method.md, "Experts")
and the one-letter symbols of terminal route strings. Never: behaviour, torch, or anything
about real FLOPs (those are counted by `metaattn_kernels.flops`).
"""

from __future__ import annotations

from metaattn_kernels.experts import EXPERTS, FULL, LINEAR, LOCAL

K = len(EXPERTS)
# Notional cost c_k of each expert, in id order (docs/method.md, "Experts").
COSTS = (1.00, 0.15, 0.30)
MIN_COST = min(COSTS)
# One character per expert for route strings ("FLW": W for window, since L is linear);
# lower case marks a hedged decision. The store's `experts.symbol` column holds these.
LETTERS = "FLW"

if len(COSTS) != K or len(LETTERS) != K:  # a new expert must be given a cost and a letter
    raise ImportError(f"core.experts: COSTS and LETTERS must have one entry per expert {EXPERTS}")


def route_string(routes, hedged) -> str:
    """One letter per decision (e.g. the layers of one token); lower case = hedged."""
    routes = routes.tolist() if hasattr(routes, "tolist") else list(routes)  # numpy: plain ints
    hedged = hedged.tolist() if hasattr(hedged, "tolist") else list(hedged)
    return "".join(LETTERS[r].lower() if h else LETTERS[r] for r, h in zip(routes, hedged, strict=True))


__all__ = ["EXPERTS", "FULL", "LINEAR", "LOCAL", "K", "COSTS", "MIN_COST", "LETTERS", "route_string"]
