"""The budget sweep's figure: KL against realised cost across budgets, one line per policy,
with the Pareto front. Never imports gradio, torch or the model."""

from __future__ import annotations

import plotly.graph_objects as go

from metaattn_viz.app.plots.style import empty, styled

POLICY_STYLES = {
    "bayes": dict(color="#D55E00", symbol="circle", dash="solid", name="Bayesian controller"),
    "priorfree": dict(color="#0072B2", symbol="square", dash="solid", name="prior-free controller"),
    "random": dict(color="#999999", symbol="triangle-up", dash="dot", name="random routing"),
    "salience": dict(color="#009E73", symbol="diamond", dash="dot", name="salience top-k (MoD-like)"),
    "static": dict(color="#CC79A7", symbol="star", dash="dot", name="all-linear / all-local"),
    "dense": dict(color="#000000", symbol="x", dash="dot", name="dense"),
}


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-dominated (cost, kl) points, by increasing cost: nothing else is both
    cheaper-or-equal and better-or-equal with one strict."""
    front, best = [], float("inf")
    for cost, kl in sorted(points, key=lambda p: (p[0], p[1])):
        if kl < best:
            front.append((cost, kl))
            best = kl
    return front


# the x axis, per the rows' cost model (under "flops" every row is at its FLOPs share)
SWEEP_COST_WORDS = {
    "notional": "realised notional cost per decision",
    "flops": "realised share of dense attention FLOPs",
}


def pareto(rows: list[dict], height: int = 440) -> go.Figure:
    """KL to dense against realised cost; `rows` have policy, budget, realized_cost,
    cost_model, kl_to_dense (analysis.Analysis.sweep)."""
    title = "Budget sweep: quality against cost (lower left is better)"
    if not rows:
        return empty(
            title, "Press \u201cSweep budgets\u201d to route the current text at several budgets", height
        )
    fig = go.Figure()
    for policy, style in POLICY_STYLES.items():
        sel = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["realized_cost"])
        if not sel:
            continue
        fig.add_trace(
            go.Scatter(
                x=[r["realized_cost"] for r in sel],
                y=[r["kl_to_dense"] for r in sel],
                mode="lines+markers" if policy in ("bayes", "priorfree", "random", "salience") else "markers",
                name=style["name"],
                line=dict(color=style["color"], dash=style["dash"]),
                marker=dict(symbol=style["symbol"], size=10, color=style["color"]),
                text=[
                    r.get("label") or (f"budget {r['budget']}" if r.get("budget") is not None else policy)
                    for r in sel
                ],
                hovertemplate="%{text}<br>cost %{x:.3f}<br>KL %{y:.4f} nats/token<extra>"
                + style["name"]
                + "</extra>",
            )
        )
    front = pareto_front([(r["realized_cost"], r["kl_to_dense"]) for r in rows])
    if len(front) > 1:
        fig.add_trace(
            go.Scatter(
                x=[p[0] for p in front],
                y=[p[1] for p in front],
                mode="lines",
                name="Pareto front",
                line=dict(color="rgba(0,0,0,0.25)", width=8),
                hoverinfo="skip",
            )
        )
    cost_model = next((r.get("cost_model") for r in rows if r.get("cost_model")), "notional")
    # soft hedging can spend above dense (1.45 at most): the axis reaches every point
    right = max(1.05, max(r["realized_cost"] for r in rows) + 0.05)
    fig.update_xaxes(
        title_text=SWEEP_COST_WORDS.get(cost_model, cost_model), range=[0, right], gridcolor="#eee"
    )
    fig.update_yaxes(
        title_text="KL(dense \u2016 routed), nats per token", rangemode="tozero", gridcolor="#eee"
    )
    fig.update_layout(legend=dict(orientation="h", y=-0.2))
    return styled(fig, title, height)
