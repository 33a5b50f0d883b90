"""The app's figures: pure functions of a RoutingTrace (or of sweep rows) -> plotly figures.

- `routing_maps`    the live maps, stacked on one token axis: layers x tokens, the expert each
                    decision chose (Okabe-Ito colours, safe for the common colour-vision
                    deficiencies; hedged decisions marked), and how uncertain each decision
                    was (measure selectable). `expert_map` is the top map alone (History).
- `token_strip`     the text, each token with the share of layers that gave it full attention
                    (the value of a gr.HighlightedText, which lets a click pick a token).
- `meters`          realised notional cost against the budget, attention-FLOPs ratio,
                    tokens/s, KL to the dense model (an HTML panel: cheap to redraw).
- `ternary`         one token's posterior mean in every layer on the simplex.
- `concentration_table`  the same token's numbers, one row per layer.
- `pareto`          KL against realised cost across budgets, per policy.

Live updates stay cheap: the route matrix goes out as int8 and the hover numbers as one
float32 array (plotly serialises numpy arrays as base64 typed arrays), there are no
per-cell annotations, and `layout.uirevision` is constant so a redraw keeps the user's
zoom. Never imports gradio, torch or the model (the trace computes its own uncertainties).
"""

from __future__ import annotations

import html
import math

import numpy as np
import plotly.graph_objects as go

from metaattn_viz.core.settings import EXPERTS, UNCERTAINTY_MEASURES, RoutingSettings
from metaattn_viz.core.trace import RoutingTrace

# Okabe & Ito (2008): vermillion, sky blue, yellow stay apart in luminance and hue under
# protanopia, deuteranopia and tritanopia.
EXPERT_COLOURS = {"full": "#D55E00", "linear": "#56B4E9", "local": "#F0E442"}
UIREVISION = "metaattn-routing"  # constant: Plotly.react keeps zoom/pan across updates
MEASURE_LABELS = {
    "total": "total uncertainty (entropy of the posterior mean, share of log 3)",
    "aleatoric": "aleatoric uncertainty (expected entropy, share of log 3)",
    "epistemic": "epistemic uncertainty (mutual information, nats)",
    "vacuity": "vacuity (K / sum of concentrations)",
}
OPEN_BOX, THIN_SPACE = "\u2423", "\u2009"
_FONT = dict(family="Inter, Helvetica, Arial, sans-serif", size=12)


def token_label(pos: int, text: str, width: int = 12) -> str:
    """A unique, printable axis label for the token at `pos`."""
    shown = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    shown = "".join(c if c.isprintable() else "\ufffd" for c in shown)
    if len(shown) > width:
        shown = shown[: width - 1] + "\u2026"
    if not shown.strip():
        shown = shown.replace(" ", OPEN_BOX) or OPEN_BOX
    return f"{pos}{THIN_SPACE}{shown}"


def token_labels(trace: RoutingTrace) -> np.ndarray:
    """[T] object array of axis labels (arrays, not lists: plotly deep-copies lists element
    by element when it builds and serialises a figure)."""
    return np.array([token_label(t, s) for t, s in enumerate(trace.tokens)], dtype=object)


def _layout(title: str, height: int, **extra) -> dict:
    """The common layout: no template (the default one adds ~6 KB to every frame), constant
    uirevision, white background."""
    layout = dict(
        template="none",
        title=dict(text=title, x=0.01, font=dict(size=14)),
        height=height,
        margin=dict(l=56, r=16, t=40, b=40),
        uirevision=UIREVISION,
        font=_FONT,
        plot_bgcolor="white",
        paper_bgcolor="white",
    )
    layout.update(extra)
    return layout


def _figure(data: list[dict], layout: dict) -> go.Figure:
    """A figure from plain dicts, skipping plotly's per-element validation (it walks every
    list element in Python: ~90 ms for one layers x tokens map, 10x the rest of a frame).
    tests/test_plots.py validates each figure's JSON with plotly instead."""
    return go.Figure(data=data, layout=layout, _validate=False)


def _styled(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(**_layout(title, height))
    return fig


def _empty(title: str, message: str, height: int = 300) -> go.Figure:
    note = dict(
        text=message,
        showarrow=False,
        x=0.5,
        y=0.5,
        xref="paper",
        yref="paper",
        font=dict(size=14, color="#666"),
    )
    return _figure(
        [], _layout(title, height, annotations=[note], xaxis=dict(visible=False), yaxis=dict(visible=False))
    )


def _boundary(trace: RoutingTrace, xref: str = "x", yref: str = "paper") -> list[dict]:
    """A dashed line between the prompt and the generated tokens."""
    if not 0 < trace.n_prompt_tokens < trace.n_tokens:
        return []
    x = trace.n_prompt_tokens - 0.5
    return [
        dict(
            type="line",
            x0=x,
            x1=x,
            y0=0,
            y1=1,
            xref=xref,
            yref=yref,
            line=dict(color="#222", width=1.5, dash="dash"),
        )
    ]


_TOKEN_AXIS = dict(type="category", tickangle=-60, showgrid=False, automargin=True)
_LAYER_AXIS = dict(dtick=5, showgrid=False, zeroline=False)


def hover_data(trace: RoutingTrace, unc: np.ndarray) -> np.ndarray:
    """[L, T, 8] float32: concentrations (3), posterior mean (3), total uncertainty, cost."""
    return np.concatenate(
        [trace.concentration, trace.posterior_mean, unc[..., None], trace.cost[..., None]], -1
    ).astype(np.float32)


def expert_names(trace: RoutingTrace) -> np.ndarray:
    """[L, T] object array: the chosen expert's name, '+hedge' where the decision was hedged."""
    names = np.array(EXPERTS, dtype=object)[trace.routes.astype(np.intp)]
    if trace.hedged.any():
        names = np.where(trace.hedged, names + " +hedge", names)
    return names


def _expert_panel(
    trace: RoutingTrace,
    labels: np.ndarray,
    colorbar: dict,
    xaxis: str = "x",
    yaxis: str = "y",
    unc_total: np.ndarray | None = None,
) -> list[dict]:
    """The expert heatmap (int8 routes, hover numbers) and the hedge marks."""
    if unc_total is None:
        unc_total = trace.uncertainty("total")
    n = len(EXPERTS)
    scale = []
    for k, e in enumerate(EXPERTS):
        scale += [[k / n, EXPERT_COLOURS[e]], [(k + 1) / n, EXPERT_COLOURS[e]]]
    data = [
        dict(
            type="heatmap",
            name="routes",
            z=trace.routes.astype(np.int8),
            x=labels,
            y=np.arange(trace.n_layers, dtype=np.int16),
            zmin=-0.5,
            zmax=n - 0.5,
            colorscale=scale,
            xaxis=xaxis,
            yaxis=yaxis,
            colorbar=dict(
                title=dict(text="expert"),
                tickvals=list(range(n)),
                ticktext=list(EXPERTS),
                thickness=14,
                **colorbar,
            ),
            customdata=hover_data(trace, unc_total),
            text=expert_names(trace),
            hovertemplate=(
                "token %{x}<br>layer %{y}: <b>%{text}</b><br>"
                "concentration (full, linear, local): %{customdata[0]:.3g}, "
                "%{customdata[1]:.3g}, %{customdata[2]:.3g}<br>"
                "posterior mean: %{customdata[3]:.2f}, %{customdata[4]:.2f}, "
                "%{customdata[5]:.2f}<br>uncertainty (total): %{customdata[6]:.2f}"
                "<br>cost: %{customdata[7]:.2f}<extra></extra>"
            ),
        )
    ]
    lay, pos = np.nonzero(trace.hedged)
    if len(lay):
        data.append(
            dict(
                type="scatter",
                x=labels[pos],
                y=lay.astype(np.int16),
                xaxis=xaxis,
                yaxis=yaxis,
                mode="markers",
                name="hedged",
                hoverinfo="skip",
                showlegend=False,
                marker=dict(symbol="x-thin", size=6, line=dict(width=1.5, color="#000")),
            )
        )
    return data


def _uncertainty_panel(
    trace: RoutingTrace,
    measure: str,
    z: np.ndarray,
    labels: np.ndarray,
    colorbar: dict,
    xaxis: str = "x",
    yaxis: str = "y",
) -> list[dict]:
    zmax = 1.0 if measure in ("total", "aleatoric") else max(float(np.nanmax(z)), 1e-6)
    return [
        dict(
            type="heatmap",
            name=measure,
            z=z.astype(np.float32),
            x=labels,
            y=np.arange(trace.n_layers, dtype=np.int16),
            zmin=0.0,
            zmax=zmax,
            colorscale="Viridis",
            xaxis=xaxis,
            yaxis=yaxis,
            colorbar=dict(title=dict(text=measure), thickness=14, **colorbar),
            hovertemplate="token %{x}<br>layer %{y}<br>" + measure + ": %{z:.3f}<extra></extra>",
        )
    ]


def expert_map(trace: RoutingTrace, height: int = 420, title: str | None = None) -> go.Figure:
    """Layers x tokens heatmap of the expert each decision chose; hedged cells carry a mark."""
    title = title or "Expert per decision (layers \u00d7 tokens)"
    if trace.n_tokens == 0:
        return _empty(title, "Nothing routed yet", height)
    data = _expert_panel(trace, token_labels(trace), dict(len=0.9))
    return _figure(
        data,
        _layout(
            title,
            height,
            shapes=_boundary(trace),
            xaxis=dict(_TOKEN_AXIS, title=dict(text="token")),
            yaxis=dict(_LAYER_AXIS, title=dict(text="layer")),
        ),
    )


def _check_measure(measure: str) -> None:
    if measure not in UNCERTAINTY_MEASURES:
        raise ValueError(f"uncertainty measure must be one of {UNCERTAINTY_MEASURES}, got {measure!r}")


def _routing_maps_parts(trace: RoutingTrace, measure: str, height: int):
    _check_measure(measure)
    labels = token_labels(trace)
    unc_total = trace.uncertainty("total")
    z = unc_total if measure == "total" else trace.uncertainty(measure)
    data = _expert_panel(trace, labels, dict(len=0.45, y=0.78), "x", "y", unc_total) + _uncertainty_panel(
        trace, measure, z, labels, dict(len=0.45, y=0.22), "x2", "y2"
    )
    notes = [
        dict(
            text="<b>expert</b> (vermillion full, yellow local, blue linear; x = hedged)",
            x=0,
            y=1.0,
            xref="paper",
            yref="paper",
            xanchor="left",
            yanchor="bottom",
            showarrow=False,
            font=dict(size=12),
        ),
        dict(
            text=f"<b>uncertainty</b>: {MEASURE_LABELS[measure]}",
            x=0,
            y=0.46,
            xref="paper",
            yref="paper",
            xanchor="left",
            yanchor="bottom",
            showarrow=False,
            font=dict(size=12),
        ),
    ]
    if trace.point_estimate and measure in ("epistemic", "vacuity"):
        notes.append(
            dict(
                text="prior-free controller: a point estimate has no " + measure,
                x=0.5,
                y=0.22,
                xref="paper",
                yref="paper",
                showarrow=False,
                font=dict(size=13, color="#fff"),
            )
        )
    layout = _layout(
        MAPS_TITLE,
        height,
        annotations=notes,
        shapes=_boundary(trace, "x", "y domain") + _boundary(trace, "x2", "y2 domain"),
        xaxis=dict(_TOKEN_AXIS, anchor="y", showticklabels=False, matches="x2"),
        xaxis2=dict(_TOKEN_AXIS, anchor="y2", title=dict(text="token")),
        yaxis=dict(_LAYER_AXIS, domain=[0.56, 1.0], title=dict(text="layer")),
        yaxis2=dict(_LAYER_AXIS, domain=[0.0, 0.44], title=dict(text="layer")),
    )
    return data, layout


MAPS_TITLE = "Routing: expert per decision (top) and its uncertainty (bottom)"
MAPS_EMPTY = "Type a prompt and press Generate: the maps fill in as tokens stream"


def routing_maps(trace: RoutingTrace, measure: str = "total", height: int = 780) -> go.Figure:
    """The two live maps in one figure, stacked on a shared token axis: the expert of each
    decision (top) and its uncertainty under `measure` (bottom). One figure, not two, because
    a browser redraws each plot on every update (~0.1-0.2 s per plot on a slow CPU whatever
    its size), and zooming one map zooms the other."""
    if trace.n_tokens == 0:
        _check_measure(measure)
        return _empty(MAPS_TITLE, MAPS_EMPTY, height)
    return _figure(*_routing_maps_parts(trace, measure, height))


def routing_maps_json(trace: RoutingTrace, measure: str = "total", height: int = 780) -> str:
    """`routing_maps(...).to_json()` without building a plotly Figure (which deep-copies the
    label arrays element by element, twice): the live stream's frame, ~2x cheaper."""
    if trace.n_tokens == 0:
        return routing_maps(trace, measure, height).to_json()
    from _plotly_utils.utils import convert_to_base64  # what Figure.to_dict applies
    from plotly.io.json import to_json_plotly

    data, layout = _routing_maps_parts(trace, measure, height)
    fig = {"data": data, "layout": layout}
    convert_to_base64(fig)  # numpy arrays -> {dtype, bdata} typed-array specs, in place
    return to_json_plotly(fig)


def token_strip(trace: RoutingTrace) -> list[tuple[str, float]]:
    """(token text, share of layers giving it full attention) per token, for a
    gr.HighlightedText: the darker a token, the more layers attended to it in full."""
    shares = trace.full_share_per_token()
    return [(text, round(float(s), 3)) for text, s in zip(trace.tokens, shares.tolist(), strict=True)]


def _finite(x) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def meter_values(trace: RoutingTrace) -> dict:
    """The numbers behind the meters (None where not measured)."""
    kl = trace.kl_to_dense
    kl_mean = None
    if kl is not None and len(kl) > 1:
        kl_mean = _finite(np.nanmean(np.asarray(kl, np.float64)[:-1]))  # last: no next token
    return {
        "budget": trace.settings.budget,
        "realized_cost": _finite(trace.realized_cost) if trace.n_tokens else None,
        "flops_ratio": _finite(trace.attention_flops_ratio) if trace.n_tokens else None,
        "tokens_per_s": _finite(trace.timings.get("tokens_per_s")),
        "kl_to_dense": kl_mean,
        "n_tokens": trace.n_tokens,
    }


def _fmt(value, fmt: str) -> str:
    return "\u2014" if value is None else format(value, fmt)


def meters(trace: RoutingTrace) -> str:
    """The meters as a small HTML panel (plain DOM: cheap to redraw four times a second):
    realised notional cost as a bar with the budget as a tick, attention-FLOPs ratio,
    tokens/s, KL(dense || routed) per token. Each value is also in a data- attribute."""
    v = meter_values(trace)
    cost, budget = v["realized_cost"], v["budget"]
    top = max(1.0, cost or 0.0, budget or 0.0)
    bar = 0.0 if cost is None else 100 * cost / top
    tick = (
        ""
        if budget is None
        else (
            f"<div title='budget' style='position:absolute;left:{100 * budget / top:.2f}%;"
            "top:-4px;bottom:-4px;width:3px;background:#000'></div>"
        )
    )
    budget_text = "no budget" if budget is None else f"budget {budget:.2f}"

    def cell(key, label, value, fmt, hint):
        data = "" if value is None else f" data-value='{value:.6g}'"
        return (
            f"<div class='meter' data-meter='{key}'{data} title='{html.escape(hint)}' "
            "style='flex:1;min-width:120px;padding:4px 10px'>"
            f"<div style='font-size:12px;color:#555'>{label}</div>"
            f"<div style='font-size:22px;font-weight:600'>{_fmt(value, fmt)}</div></div>"
        )

    cost_data = "" if cost is None else f" data-value='{cost:.6g}'"
    budget_data = "" if budget is None else f" data-budget='{budget:.6g}'"
    return (
        "<div class='metaattn-meters' style='display:flex;flex-wrap:wrap;gap:8px;"
        "align-items:center;font-family:Inter,Helvetica,Arial,sans-serif;color:#111'>"
        f"<div class='meter' data-meter='cost'{cost_data}{budget_data} "
        "style='flex:2;min-width:260px;padding:4px 10px'>"
        f"<div style='font-size:12px;color:#555'>realised cost per decision ({budget_text})"
        f"</div><div style='display:flex;align-items:center;gap:10px'>"
        f"<div style='position:relative;flex:1;height:14px;background:#eef2f6;"
        f"border-radius:3px'><div style='width:{bar:.2f}%;height:100%;border-radius:3px;"
        f"background:{EXPERT_COLOURS['full']}'></div>{tick}</div>"
        f"<div style='font-size:22px;font-weight:600'>{_fmt(cost, '.3f')}</div></div></div>"
        + cell(
            "flops",
            "attention FLOPs / dense",
            v["flops_ratio"],
            ".2f",
            "real attention FLOPs of the decisions taken, relative to all-full attention",
        )
        + cell(
            "speed",
            "tokens / s",
            v["tokens_per_s"],
            ".1f",
            "generation speed (after a re-route: the re-route's own rate)",
        )
        + cell(
            "kl",
            "KL to dense (nats/token)",
            v["kl_to_dense"],
            ".4f",
            "mean KL(dense || routed) of the next-token distribution, from a dense shadow pass",
        )
        + "</div>"
    )


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
    return _styled(fig, f"{what} by layer \u2014 token {label}", height)


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
    return _empty(
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


def pareto(rows: list[dict], height: int = 440) -> go.Figure:
    """KL to dense against realised cost; `rows` have policy, budget, realized_cost,
    kl_to_dense (analysis.Analysis.sweep)."""
    title = "Budget sweep: quality against cost (lower left is better)"
    if not rows:
        return _empty(
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
    fig.update_xaxes(title_text="realised notional cost per decision", range=[0, 1.05], gridcolor="#eee")
    fig.update_yaxes(
        title_text="KL(dense \u2016 routed), nats per token", rangemode="tozero", gridcolor="#eee"
    )
    fig.update_layout(legend=dict(orientation="h", y=-0.2))
    return _styled(fig, title, height)


def live_views(trace: RoutingTrace, measure: str = "total"):
    """Everything the live tab redraws on a new trace: (both maps as figure JSON, token
    strip, meters HTML)."""
    return routing_maps_json(trace, measure), token_strip(trace), meters(trace)


def empty_trace() -> RoutingTrace:
    """A trace with no tokens: what the views draw (as placeholders) before the first run."""
    return RoutingTrace(
        model="",
        controller="bayes",
        controller_id="",
        controller_trained=False,
        settings=RoutingSettings(),
        n_layers=1,
        head_dim=64,
    )


__all__ = [
    "EXPERT_COLOURS",
    "UIREVISION",
    "expert_map",
    "routing_maps",
    "routing_maps_json",
    "token_strip",
    "token_label",
    "token_labels",
    "meters",
    "meter_values",
    "ternary",
    "ternary_placeholder",
    "concentration_table",
    "concentration_columns",
    "pareto",
    "pareto_front",
    "live_views",
    "empty_trace",
]
