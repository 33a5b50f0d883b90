"""The routing maps: layers x tokens, the expert each decision chose (Okabe-Ito colours,
safe for the common colour-vision deficiencies; hedged decisions marked), and how uncertain
each decision was (measure selectable), stacked on one token axis. `expert_map` is the top
map alone (History).

With ``relative=True`` the expert map shows each decision against its layer's usual expert
(core.variety.layer_majority): a decision equal to it is grey, one that differs keeps its
expert's colour, so the token-level part of the routing stands out of the per-layer stripes.
A trace whose controllers are untrained says UNTRAINED in every map's title (`titled`).

Live updates stay cheap: the route matrix goes out as int8 and the hover numbers as one
float32 array, no per-cell annotations, a constant uirevision.
Never imports gradio, torch or the model."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go

from metaattn_viz.app.plots.style import (
    EXPERT_COLOURS,
    MEASURE_LABELS,
    base_layout,
    empty,
    figure,
    token_labels,
)
from metaattn_viz.core.settings import EXPERTS, UNCERTAINTY_MEASURES
from metaattn_viz.core.trace import RoutingTrace
from metaattn_viz.core.variety import layer_majority, routing_variety

# A decision equal to its layer's usual expert, in the relative map: a neutral grey that
# stays apart from every expert colour under colour-vision deficiencies (tests/test_plots_variety.py).
USUAL_COLOUR = "#A0A0A0"
USUAL = len(EXPERTS)  # its code in the relative map's z (the experts are 0..K-1)
USUAL_LABEL = "layer's usual"
UNTRAINED_TITLE = "UNTRAINED controllers (routing not calibrated)"


def titled(trace: RoutingTrace, title: str) -> str:
    """The title of a figure that shows `trace`: marked UNTRAINED when its controllers are
    not trained (a trace with no tokens shows nothing, so it is left as is)."""
    if trace.n_tokens and not trace.controller_trained:
        return f"\u26a0 {UNTRAINED_TITLE} \u2014 {title}"
    return title


def relative_routes(trace: RoutingTrace) -> tuple[np.ndarray, np.ndarray]:
    """([L, T] int8, [L]): each decision's expert where it differs from its layer's majority
    expert and USUAL where it equals it; and each layer's majority expert."""
    majority = layer_majority(trace.routes)  # [L]
    routes = trace.routes.astype(np.int8)
    z = np.where(routes == majority[:, None], np.int8(USUAL), routes).astype(np.int8)
    return z, majority


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


def expert_names(trace: RoutingTrace, majority: np.ndarray | None = None) -> np.ndarray:
    """[L, T] object array: the chosen expert's name, '+hedge' where the decision was hedged;
    with `majority` ([L], relative map) also whether it is the layer's usual expert."""
    experts = np.array(EXPERTS, dtype=object)
    names = experts[trace.routes.astype(np.intp)]
    if trace.hedged.any():
        names = np.where(trace.hedged, names + " +hedge", names)
    if majority is not None:
        usual = experts[np.asarray(majority, np.intp)][:, None]  # [L, 1]
        same = trace.routes == np.asarray(majority)[:, None]
        names = np.where(same, names + f" ({USUAL_LABEL})", names + " (the layer's usual: " + usual + ")")
    return names


def _band_scale(colours: list[str]) -> list[list]:
    """A colorscale of equal flat bands, one per category code 0..n-1."""
    n = len(colours)
    scale: list[list] = []
    for k, c in enumerate(colours):
        scale += [[k / n, c], [(k + 1) / n, c]]
    return scale


def _expert_panel(
    trace: RoutingTrace,
    labels: np.ndarray,
    colorbar: dict,
    xaxis: str = "x",
    yaxis: str = "y",
    unc_total: np.ndarray | None = None,
    relative: bool = False,
) -> list[dict]:
    """The expert heatmap (int8 routes, hover numbers) and the hedge marks; `relative`:
    decisions equal to their layer's usual expert in grey (code USUAL)."""
    if unc_total is None:
        unc_total = trace.uncertainty("total")
    colours = [EXPERT_COLOURS[e] for e in EXPERTS]
    ticks = list(EXPERTS)
    if relative:
        z, majority = relative_routes(trace)
        colours, ticks = colours + [USUAL_COLOUR], ticks + [USUAL_LABEL]
    else:
        z, majority = trace.routes.astype(np.int8), None
    n = len(colours)
    data = [
        dict(
            type="heatmap",
            name="routes relative to each layer's usual expert" if relative else "routes",
            z=z,
            x=labels,
            y=np.arange(trace.n_layers, dtype=np.int16),
            zmin=-0.5,
            zmax=n - 0.5,
            colorscale=_band_scale(colours),
            xaxis=xaxis,
            yaxis=yaxis,
            colorbar=dict(
                title=dict(text="expert"),
                tickvals=list(range(n)),
                ticktext=ticks,
                thickness=14,
                **colorbar,
            ),
            customdata=hover_data(trace, unc_total),
            text=expert_names(trace, majority),
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


def relative_note(trace: RoutingTrace) -> str:
    """What the relative map shows, with the trace's routing variety."""
    share = routing_variety(trace.routes) if trace.n_tokens else 0.0
    return (
        f"grey: the layer's usual expert; colour: a decision that differs ({100 * share:.1f} % "
        "of decisions, the routing variety)"
    )


def expert_map(
    trace: RoutingTrace, height: int = 420, title: str | None = None, relative: bool = False
) -> go.Figure:
    """Layers x tokens heatmap of the expert each decision chose; hedged cells carry a mark.
    `relative`: each decision against its layer's usual expert (grey where equal)."""
    title = title or "Expert per decision (layers \u00d7 tokens)"
    if trace.n_tokens == 0:
        return empty(title, "Nothing routed yet", height)
    data = _expert_panel(trace, token_labels(trace), dict(len=0.9), relative=relative)
    notes = []
    if relative:
        notes.append(
            dict(
                text=relative_note(trace),
                x=0,
                y=1.0,
                xref="paper",
                yref="paper",
                xanchor="left",
                yanchor="bottom",
                showarrow=False,
                font=dict(size=11),
            )
        )
    return figure(
        data,
        base_layout(
            titled(trace, title),
            height,
            annotations=notes,
            shapes=_boundary(trace),
            xaxis=dict(_TOKEN_AXIS, title=dict(text="token")),
            yaxis=dict(_LAYER_AXIS, title=dict(text="layer")),
        ),
    )


def _check_measure(measure: str) -> None:
    if measure not in UNCERTAINTY_MEASURES:
        raise ValueError(f"uncertainty measure must be one of {UNCERTAINTY_MEASURES}, got {measure!r}")


def _routing_maps_parts(trace: RoutingTrace, measure: str, height: int, relative: bool = False):
    _check_measure(measure)
    labels = token_labels(trace)
    unc_total = trace.uncertainty("total")
    z = unc_total if measure == "total" else trace.uncertainty(measure)
    data = _expert_panel(
        trace, labels, dict(len=0.45, y=0.78), "x", "y", unc_total, relative
    ) + _uncertainty_panel(trace, measure, z, labels, dict(len=0.45, y=0.22), "x2", "y2")
    what = (
        f"relative to each layer's usual expert ({relative_note(trace)}; x = hedged)"
        if relative
        else "(vermillion full, yellow local, blue linear; x = hedged)"
    )
    notes = [
        dict(
            text=f"<b>expert</b> {what}",
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
    layout = base_layout(
        titled(trace, MAPS_TITLE),
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


def routing_maps(
    trace: RoutingTrace, measure: str = "total", height: int = 780, relative: bool = False
) -> go.Figure:
    """The two live maps in one figure, stacked on a shared token axis: the expert of each
    decision (top; `relative`: against its layer's usual expert) and its uncertainty under
    `measure` (bottom). One figure, not two, because a browser redraws each plot on every
    update (~0.1-0.2 s per plot on a slow CPU whatever its size), and zooming one map zooms
    the other."""
    if trace.n_tokens == 0:
        _check_measure(measure)
        return empty(MAPS_TITLE, MAPS_EMPTY, height)
    return figure(*_routing_maps_parts(trace, measure, height, relative))


def routing_maps_json(
    trace: RoutingTrace, measure: str = "total", height: int = 780, relative: bool = False
) -> str:
    """`routing_maps(...).to_json()` without building a plotly Figure (which deep-copies the
    label arrays element by element, twice): the live stream's frame, ~2x cheaper."""
    if trace.n_tokens == 0:
        return routing_maps(trace, measure, height, relative).to_json()
    from _plotly_utils.utils import convert_to_base64  # what Figure.to_dict applies
    from plotly.io.json import to_json_plotly

    data, layout = _routing_maps_parts(trace, measure, height, relative)
    fig = {"data": data, "layout": layout}
    convert_to_base64(fig)  # numpy arrays -> {dtype, bdata} typed-array specs, in place
    return to_json_plotly(fig)
