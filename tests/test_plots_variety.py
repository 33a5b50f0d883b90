"""The per-token view (issue 14): the expert map drawn relative to each layer's usual expert,
the routing-variety meter, and UNTRAINED on every figure of a trace whose controllers are
not trained. Checked against a hand-made trace whose majorities and variety are worked out
by hand below, not by core.variety."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import plotly.graph_objects as go
import pytest
from helpers import CVD_SIMULATIONS, cvd_distance

from metaattn_viz.app import plots
from metaattn_viz.app.plots.maps import USUAL, USUAL_LABEL
from metaattn_viz.core.settings import COSTS, EXPERTS, RoutingSettings
from metaattn_viz.core.trace import RoutingTrace

F, LIN, LOC = 0, 1, 2
ROUTES = np.array(
    [
        [F, F, F, LOC, F],  # usual: full; differs at token 3
        [LIN, LOC, LOC, LOC, LIN],  # usual: local; differs at tokens 0 and 4
        [LOC, LOC, LIN, LIN, F],  # tie local/linear: the lower id (linear); differs at 0, 1, 4
    ],
    np.int8,
)
# the decisions that differ from their layer's usual expert, by hand
DIFFERS = np.array(
    [
        [0, 0, 0, 1, 0],
        [1, 0, 0, 0, 1],
        [1, 1, 0, 0, 1],
    ],
    bool,
)
VARIETY = 6 / 15


def hand_trace(routes=ROUTES, trained=True) -> RoutingTrace:
    L, T = routes.shape
    weights = np.eye(3, dtype=np.float32)[routes]
    return RoutingTrace(
        model="m",
        controller="bayes",
        controller_id="c",
        controller_trained=trained,
        settings=RoutingSettings(budget=0.5),
        n_layers=L,
        head_dim=16,
        token_ids=list(range(T)),
        tokens=["a", " b", " c", " d", " e"][:T],
        n_prompt_tokens=2,
        concentration=np.full((L, T, 3), 1.5, np.float32),
        routes=routes,
        hedged=np.zeros((L, T), bool),
        weights=weights,
        cost=np.asarray(COSTS, np.float32)[routes],
        lam=np.zeros((L, T), np.float32),
    )


def _routes_heatmap(fig: go.Figure):
    return next(t for t in fig.data if t.type == "heatmap" and t.name.startswith("routes"))


# -- the relative expert map --------------------------------------------------------------
def test_relative_map_greys_the_layers_usual_expert_and_keeps_the_rest_in_colour():
    tr = hand_trace()
    hm = _routes_heatmap(plots.expert_map(tr, relative=True))
    z = np.asarray(hm.z)
    assert z.dtype == np.int8
    np.testing.assert_array_equal(z == USUAL, ~DIFFERS)  # grey exactly where usual
    np.testing.assert_array_equal(z[DIFFERS], ROUTES[DIFFERS])  # the rest keeps its expert
    # four flat bands: the experts' colours, then grey for USUAL
    bands = [c for _, c in hm.colorscale][::2]
    assert bands == [plots.EXPERT_COLOURS[e] for e in EXPERTS] + [plots.USUAL_COLOUR]
    assert (hm.zmin, hm.zmax) == (-0.5, len(EXPERTS) + 0.5)
    assert list(hm.colorbar.ticktext) == [*EXPERTS, USUAL_LABEL]
    text = np.asarray(hm.text, dtype=object)
    assert text[0, 0] == "full (layer's usual)"
    assert text[0, 3] == "local (the layer's usual: full)"
    assert text[2, 0] == "local (the layer's usual: linear)"  # the tie went to linear


def test_plain_map_is_unchanged_and_relative_note_gives_the_variety():
    tr = hand_trace()
    plain = plots.expert_map(tr)
    np.testing.assert_array_equal(np.asarray(_routes_heatmap(plain).z), ROUTES)
    assert not plain.layout.annotations
    rel = plots.expert_map(tr, relative=True)
    (note,) = rel.layout.annotations
    assert "40.0 %" in note.text and "grey" in note.text


def test_relative_live_maps_keep_the_uncertainty_panel_and_match_their_json():
    tr = hand_trace()
    fig = plots.routing_maps(tr, "total", relative=True)
    top = _routes_heatmap(fig)
    np.testing.assert_array_equal(np.asarray(top.z) == USUAL, ~DIFFERS)
    unc = next(t for t in fig.data if t.type == "heatmap" and t.name == "total")
    np.testing.assert_allclose(np.asarray(unc.z), tr.uncertainty("total"), rtol=1e-6)
    assert any("40.0 %" in a.text for a in fig.layout.annotations)
    assert json.loads(plots.routing_maps_json(tr, "total", relative=True)) == json.loads(fig.to_json())
    maps_json, strip, meters = plots.live_views(tr, "total", relative=True)
    assert json.loads(maps_json) == json.loads(fig.to_json())
    assert [t for t, _ in strip] == tr.tokens and "data-meter='variety'" in meters


def test_a_static_per_layer_map_is_all_grey():
    routes = np.array([[F] * 5, [LOC] * 5, [LIN] * 5], np.int8)
    z = np.asarray(_routes_heatmap(plots.expert_map(hand_trace(routes), relative=True)).z)
    assert (z == USUAL).all()


def test_usual_grey_stays_apart_from_every_expert_colour_under_colour_vision_deficiency():
    for vision in CVD_SIMULATIONS:
        for colour in plots.EXPERT_COLOURS.values():
            assert cvd_distance(plots.USUAL_COLOUR, colour, vision) > 25, (vision, colour)


def test_relative_figures_are_valid_plotly():
    tr = hand_trace()
    for fig in (plots.expert_map(tr, relative=True), plots.routing_maps(tr, "epistemic", relative=True)):
        go.Figure(json.loads(fig.to_json()))  # plotly validates every property


# -- the routing-variety meter ------------------------------------------------------------
def _variety_cell(page: str) -> str:
    m = re.search(r"<div class='meter' data-meter='variety'.*?</div></div>", page)
    assert m, page
    return m.group(0)


def test_variety_meter_shows_the_share_next_to_the_cost_with_its_explanation():
    tr = hand_trace()
    assert plots.meter_values(tr)["routing_variety"] == pytest.approx(VARIETY)
    page = plots.meters(tr)
    cell = _variety_cell(page)
    assert re.search(r"data-value='([0-9.e-]+)'", cell).group(1) == f"{VARIETY:.6g}"
    assert ">40.0 %<" in cell
    # the one-line explanation is shown, not only hovered
    shown = re.search(r"class='meter-note'[^>]*>(.*?)</div>", cell).group(1)
    assert html.unescape(shown) == plots.VARIETY_EXPLANATION
    # next to the cost meter: the cell right after it
    order = re.findall(r"data-meter='(\w+)'", page)
    assert order[:2] == ["cost", "variety"]


def test_variety_meter_of_a_static_map_is_zero_and_of_no_tokens_a_dash():
    static = hand_trace(np.array([[F] * 5, [LOC] * 5, [LIN] * 5], np.int8))
    assert ">0.0 %<" in _variety_cell(plots.meters(static))
    empty = plots.empty_trace()
    assert plots.meter_values(empty)["routing_variety"] is None
    cell = _variety_cell(plots.meters(empty))
    assert "data-value" not in cell and "\u2014" in cell


# -- UNTRAINED on every view of a trace ---------------------------------------------------
def test_every_figure_of_an_untrained_trace_says_untrained():
    untrained, trained = hand_trace(trained=False), hand_trace()

    def titles(tr):
        return [
            plots.expert_map(tr).layout.title.text,
            plots.expert_map(tr, 300, "Run A", relative=True).layout.title.text,
            plots.routing_maps(tr).layout.title.text,
            json.loads(plots.routing_maps_json(tr))["layout"]["title"]["text"],
            plots.ternary(tr, 1).layout.title.text,
        ]

    assert all("UNTRAINED" in t for t in titles(untrained))
    assert not any("UNTRAINED" in t for t in titles(trained))
    assert "Run A" in titles(untrained)[1]
    assert "data-untrained" in plots.meters(untrained) and "UNTRAINED" in plots.meters(untrained)
    assert "UNTRAINED" not in plots.meters(trained)
    # the placeholder before any run has no controllers to speak of
    assert "UNTRAINED" not in plots.routing_maps(plots.empty_trace()).layout.title.text
    assert "UNTRAINED" not in plots.meters(plots.empty_trace())
