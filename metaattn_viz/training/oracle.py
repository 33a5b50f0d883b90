"""The oracle per-token router: the ceiling of per-token routing at equal cost
(docs/method.md, "Budget", "Uncertainty").

It knows, for every token-layer decision of the text being scored, how far a cheap expert's
output departs from full attention, and spends the budget where the departure is largest.
The departure is the relative L2 error per query head, averaged over the heads,

    e = mean_h ||o_cheap - o_full|| / ||o_full||,

the measure evaluate.py's uncertainty diagnosis uses. It is measured on the DENSE pass:
every layer's q, k, v as the unrouted model computes them, so a decision's error is its own
and not the echo of cheap decisions below it. That pass runs through an attention function
registered with transformers under ``ERRORS_NAME``: plain causal SDPA (the dense model's
output), plus the local and linear experts of metaattn_kernels.reference on the same q, k, v.

Routing, per window and globally across layers: with N = L x T decisions, the
``units_within(budget, N)`` decisions of largest local error go full and the rest local, so
the mean notional cost is the budget (rounded down, by less than one decision's cost).
Below the local cost, local and linear: the decisions where linear departs most beyond
local (e_linear - e_local) go local, the rest linear.

It is an oracle: it reads the validation text's own errors, which no deployable router can;
its rows are named "oracle-tokens" and flagged ``"oracle": true``. Never: run outside
evaluation (its pass swaps the model's attention implementation and is not thread-safe),
or route from a controller's posterior.
"""

from __future__ import annotations

import torch

from metaattn_viz import paths
from metaattn_viz.core.experts import FULL
from metaattn_viz.training.baselines import units_within

paths.ensure_kernels_importable()
from metaattn_kernels import reference  # noqa: E402
from metaattn_kernels.feature_maps import FeatureMap  # noqa: E402

ERRORS_NAME = "metaattn_oracle_errors"  # transformers attention function of the errors pass
ERRORS_FROM = "dense pass"  # where the q, k, v of the errors come from, for the JSON rows
_state: dict = {}


def relative_error(o: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """o, full [B, Hq, T, D] -> mean over heads of ||o - full|| / ||full||, [B, T] float32."""
    o, full = o.float(), full.float()
    return ((o - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12)).mean(1)


def _errors_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Dense attention [B, T, Hq, D], recording the local and linear experts' errors against it."""
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    gqa = query.shape[1] != key.shape[1]
    full = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, is_causal=query.shape[2] > 1, scale=scale, enable_gqa=gqa
    )  # [B, Hq, T, D]
    layer = module.layer_idx
    maps = _state["feature_maps"]
    local = reference.local_attention(query, key, value, _state["window"], _state["n_sink"], scale)
    linear, _ = reference.linear_attention(
        query, key, value, feature_map=None if maps is None else maps[layer]
    )
    _state["errors"][layer] = (relative_error(local, full).cpu(), relative_error(linear, full).cpu())
    return full.transpose(1, 2).contiguous(), None


def expert_errors(
    model,
    input_ids: torch.Tensor,
    window: int,
    n_sink: int,
    feature_maps: list[FeatureMap] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The local and linear experts' relative errors on the dense pass of `input_ids` [B, T]:
    two tensors [L, B, T] float32 (CPU). ``feature_maps``: the linear expert's map per layer
    (None: elu + 1, what routed sessions use unless given maps)."""
    _, local_err, linear_err = dense_pass_errors(model, input_ids, window, n_sink, feature_maps)
    return local_err, linear_err


def dense_pass_errors(
    model,
    input_ids: torch.Tensor,
    window: int,
    n_sink: int,
    feature_maps: list[FeatureMap] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``expert_errors`` plus that pass's logits [B, T, V] (the dense model's, on its device):
    (logits, local errors [L, B, T], linear errors [L, B, T]). Calibration reads both from
    one pass (the auxiliary target of training/calibrate.py)."""
    from transformers import AttentionInterface

    n_layers = model.config.num_hidden_layers
    AttentionInterface.register(ERRORS_NAME, _errors_attention)
    previous = model.config._attn_implementation
    _state.update(errors=[None] * n_layers, window=window, n_sink=n_sink, feature_maps=feature_maps)
    model.set_attn_implementation(ERRORS_NAME)
    try:
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(model.device), use_cache=False).logits
        errors = _state["errors"]
        if any(e is None for e in errors):
            raise RuntimeError("the errors pass did not reach every attention layer")
        return logits, torch.stack([e[0] for e in errors]), torch.stack([e[1] for e in errors])
    finally:
        model.set_attn_implementation(previous)
        _state.clear()


def oracle_routes(local_err: torch.Tensor, linear_err: torch.Tensor, budget: float) -> torch.Tensor | None:
    """Routes (same shape as the errors, long) spending `budget` where the cheap expert
    departs most, across all the decisions given (the module docstring); None below the
    cheapest cost."""
    split = units_within(budget, local_err.numel())
    if split is None:
        return None
    hi, lo, k = split
    gain = local_err if hi == FULL else linear_err - local_err  # what the expensive expert repairs
    routes = torch.full(local_err.shape, lo, dtype=torch.long)
    routes.view(-1)[gain.reshape(-1).topk(k).indices] = hi
    return routes
