"""One token inspected: its posterior mean in every layer on the (full, linear, local)
simplex, and its numbers one row per layer. Never imports gradio, torch or the model."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from metaattn_viz.app.plots.maps import titled
from metaattn_viz.app.plots.style import EXPERT_COLOURS, empty, styled, token_label
from metaattn_viz.core.settings import EXPERTS, UNCERTAINTY_MEASURES
from metaattn_viz.core.trace import RoutingTrace


def _check_pos(trace: RoutingTrace, pos: int) -> int:
    if (
        isinstance(pos, bool)
        or not isinstance(pos, (int, np.integer))
        or not (0 <= int(pos) < trace.n_tokens)
    ):
        raise ValueError(f"token position must be a whole number in [0, {trace.n_tokens - 1}], got {pos!r}")
    return int(pos)


def ternary(trace: RoutingTrace, pos: int, height: int = 440) -> go.Figure:
    """The posterior mean of token `pos` in every layer on the (full, linear, local) simplex,
    coloured by layer; marker size grows with the total concentration (evidence)."""
    pos = _check_pos(trace, pos)
    m = trace.posterior_mean[:, pos]  # [L, K]
    conc = trace.concentration[:, pos]  # [L, K]
    strength = conc.sum(-1)
    size = 8 + 10 * np.log1p(strength) / np.log1p(max(float(strength.max()), 1.0))
    unc = trace.uncertainty("total")[:, pos]
    layers = np.arange(trace.n_layers)
    names = np.array(EXPERTS, dtype=object)[trace.routes[:, pos].astype(np.intp)]
    custom = np.concatenate([conc, unc[:, None], strength[:, None]], -1).astype(np.float32)
    fig = go.Figure(
        go.Scatterternary(
            a=m[:, 0],
            b=m[:, 1],
            c=m[:, 2],
            mode="markers+lines",
            line=dict(color="rgba(80,80,80,0.35)", width=1),
            marker=dict(
                color=layers,
                colorscale="Viridis",
                size=size,
                showscale=True,
                colorbar=dict(title="layer", thickness=12),
                line=dict(width=1, color="#333"),
            ),
            text=[f"layer {i}: {n}" for i, n in enumerate(names.tolist())],
            customdata=custom,
            hovertemplate=(
                "%{text}<br>mean full %{a:.2f}, linear %{b:.2f}, local %{c:.2f}<br>"
                "concentration %{customdata[0]:.3g}, %{customdata[1]:.3g}, "
                "%{customdata[2]:.3g} (sum %{customdata[4]:.3g})<br>"
                "uncertainty %{customdata[3]:.2f}<extra></extra>"
            ),
            name="posterior mean",
        )
    )
    fig.update_layout(
        ternary=dict(
            sum=1,
            aaxis=dict(title="full", color=EXPERT_COLOURS["full"], min=0),
            baxis=dict(title="linear", color="#1f77b4", min=0),
            caxis=dict(title="local", color="#8a7d00", min=0),
        )
    )
    what = "Posterior mean" if not trace.point_estimate else "Controller probabilities"
    label = token_label(pos, trace.tokens[pos], 24)
    return styled(fig, titled(trace, f"{what} by layer \u2014 token {label}"), height)


def concentration_columns() -> list[str]:
    """The columns of `concentration_table`, in order."""
    return (
        ["layer", "expert", "hedged"]
        + [f"\u03b1 {e}" for e in EXPERTS]
        + [f"mean {e}" for e in EXPERTS]
        + list(UNCERTAINTY_MEASURES)
        + [f"weight {e}" for e in EXPERTS]
        + ["cost", "\u03bb"]
    )


def ternary_placeholder(height: int = 440) -> go.Figure:
    return empty(
        "Posterior mean by layer", "Click a token in the text (or pick a position and press Inspect)", height
    )


def concentration_table(trace: RoutingTrace, pos: int):
    """One row per layer for token `pos`: expert chosen, hedged, concentrations, posterior
    mean, uncertainties, weights applied, cost, lambda (a pandas DataFrame)."""
    import pandas as pd

    pos = _check_pos(trace, pos)
    conc = trace.concentration[:, pos]
    mean = trace.posterior_mean[:, pos]
    rows = {
        "layer": np.arange(trace.n_layers),
        "expert": np.array(EXPERTS, dtype=object)[trace.routes[:, pos].astype(np.intp)],
        "hedged": trace.hedged[:, pos],
    }
    for k, e in enumerate(EXPERTS):
        rows[f"\u03b1 {e}"] = np.round(conc[:, k].astype(np.float64), 4)
    for k, e in enumerate(EXPERTS):
        rows[f"mean {e}"] = np.round(mean[:, k].astype(np.float64), 3)
    for measure in UNCERTAINTY_MEASURES:
        rows[measure] = np.round(trace.uncertainty(measure)[:, pos].astype(np.float64), 4)
    for k, e in enumerate(EXPERTS):
        rows[f"weight {e}"] = np.round(trace.weights[:, pos, k].astype(np.float64), 3)
    rows["cost"] = np.round(trace.cost[:, pos].astype(np.float64), 3)
    rows["\u03bb"] = np.round(trace.lam[:, pos].astype(np.float64), 4)
    return pd.DataFrame(rows, columns=concentration_columns())
