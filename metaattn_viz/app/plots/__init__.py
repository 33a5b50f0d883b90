"""The app's figures: pure functions of a RoutingTrace (or of sweep rows) -> plotly figures.

- `maps`       `routing_maps` (the live maps, expert + uncertainty), `expert_map` (History);
               `relative=True` draws each decision against its layer's usual expert;
               `titled` marks the title of a trace with untrained controllers
- `meters`     `meters` (cost, routing variety, FLOPs, tokens/s, KL panel), `token_strip`
- `inspector`  `ternary`, `concentration_table` (one token, every layer)
- `sweep`      `pareto` (KL against cost across budgets, per policy)
- `style`      what every figure shares (colours, layout, token labels, placeholders)

Never imports gradio, torch or the model (the trace computes its own uncertainties).
"""

from __future__ import annotations

from metaattn_viz.app.plots.inspector import (
    concentration_columns,
    concentration_table,
    ternary,
    ternary_placeholder,
)
from metaattn_viz.app.plots.maps import (
    MAPS_EMPTY,
    USUAL_COLOUR,
    expert_map,
    relative_routes,
    routing_maps,
    routing_maps_json,
    titled,
)
from metaattn_viz.app.plots.meters import VARIETY_EXPLANATION, meter_values, meters, token_strip
from metaattn_viz.app.plots.style import EXPERT_COLOURS, UIREVISION, strip_text, token_label, token_labels
from metaattn_viz.app.plots.sweep import POLICY_STYLES, pareto, pareto_front
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.core.trace import RoutingTrace


def live_views(trace: RoutingTrace, measure: str = "total", relative: bool = False):
    """Everything the live tab redraws on a new trace: (both maps as figure JSON, the expert
    map relative to each layer's usual expert if `relative`; token strip; meters HTML)."""
    return routing_maps_json(trace, measure, relative=relative), token_strip(trace), meters(trace)


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
    "MAPS_EMPTY",
    "POLICY_STYLES",
    "UIREVISION",
    "USUAL_COLOUR",
    "VARIETY_EXPLANATION",
    "concentration_columns",
    "concentration_table",
    "empty_trace",
    "expert_map",
    "live_views",
    "meter_values",
    "meters",
    "pareto",
    "pareto_front",
    "relative_routes",
    "routing_maps",
    "routing_maps_json",
    "ternary",
    "ternary_placeholder",
    "titled",
    "strip_text",
    "token_label",
    "token_labels",
    "token_strip",
]
