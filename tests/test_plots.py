"""plots.py and attention_maps.py: figures are pure functions of a trace, checked against
the trace's own numbers; the palette against a simulation of colour-vision deficiency; the
attention patterns against the kernels' reference implementation."""

from __future__ import annotations

import html
import json
import re

import numpy as np
import pytest
import torch
from helpers import CVD_SIMULATIONS, cvd_distance

from metaattn_viz.app import attention_maps, plots
from metaattn_viz.core.settings import COSTS, EXPERTS, UNCERTAINTY_MEASURES, RoutingSettings
from metaattn_viz.core.trace import RoutingTrace


def make_trace(L=4, T=9, seed=0, controller="bayes", budget=0.5, kl=True) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    conc = rng.gamma(2.0, 1.0, size=(L, T, 3)).astype(np.float32) + 0.05
    routes = rng.integers(0, 3, size=(L, T)).astype(np.int8)
    hedged = (rng.random((L, T)) < 0.2) & (routes != 0)
    weights = np.eye(3, dtype=np.float32)[routes]
    weights[hedged] = np.array([0.2, 0.5, 0.3], np.float32)
    cost = ((weights > 0) * np.array(COSTS, np.float32)).sum(-1).astype(np.float32)
    tokens = ["The", " cat", "\n", " sat", " ", "\u732b", "\t", " on", "!"][:T]
    tr = RoutingTrace(
        model="m",
        controller=controller,
        controller_id="c",
        controller_trained=True,
        settings=RoutingSettings(budget=budget, window=3, n_sink=1),
        n_layers=L,
        head_dim=16,
        token_ids=list(range(T)),
        tokens=tokens,
        n_prompt_tokens=5,
        concentration=conc,
        routes=routes,
        hedged=hedged,
        weights=weights,
        cost=cost,
        lam=np.zeros((L, T), np.float32),
        kl_to_dense=rng.random(T).astype(np.float32) if kl else None,
        timings={"tokens_per_s": 12.5},
    )
    return tr


def _heatmap(fig):
    return next(t for t in fig.data if t.type == "heatmap")


# -- maps ---------------------------------------------------------------------------------
def test_expert_map_sends_int8_routes_hover_numbers_and_hedge_marks():
    tr = make_trace()
    fig = plots.expert_map(tr)
    hm = _heatmap(fig)
    z = np.asarray(hm.z)
    assert z.dtype == np.int8 and np.array_equal(z, tr.routes)
    assert len(hm.x) == tr.n_tokens and len(set(hm.x)) == tr.n_tokens  # unique labels
    cd = np.asarray(hm.customdata)
    assert cd.shape == (tr.n_layers, tr.n_tokens, 8) and cd.dtype == np.float32
    np.testing.assert_allclose(cd[..., :3], tr.concentration, rtol=1e-6)
    np.testing.assert_allclose(
        cd[..., 3:6], tr.concentration / tr.concentration.sum(-1, keepdims=True), rtol=1e-5
    )
    np.testing.assert_allclose(cd[..., 6], tr.uncertainty("total"), rtol=1e-5)
    np.testing.assert_allclose(cd[..., 7], tr.cost)
    names = np.asarray(hm.text, dtype=object)
    assert names[0, 0].split()[0] == EXPERTS[tr.routes[0, 0]]
    assert all("+hedge" in n for n in names[tr.hedged])
    marks = [t for t in fig.data if t.type == "scatter"]
    assert len(marks) == 1 and len(marks[0].x) == int(tr.hedged.sum())
    lay, pos = np.nonzero(tr.hedged)
    assert list(marks[0].y) == lay.tolist()
    assert list(marks[0].x) == [hm.x[p] for p in pos]
    assert fig.layout.uirevision == plots.UIREVISION
    assert not fig.layout.annotations  # no per-cell annotations
    # the prompt / generation boundary
    assert [s.x0 for s in fig.layout.shapes] == [tr.n_prompt_tokens - 0.5]
    # compact on the wire: numpy arrays become base64 typed arrays
    payload = json.loads(fig.to_json())
    assert payload["data"][0]["z"]["dtype"] == "i1"
    assert "bdata" in payload["data"][0]["customdata"]


def test_expert_map_colours_are_told_apart_under_colour_vision_deficiency():
    """Machado et al. (2009) simulation at full severity, CIE76 distance in Lab: every pair of
    expert colours stays far apart (> 25) for normal, protan, deutan and tritan vision."""
    fig = plots.expert_map(make_trace())
    scale = [c for _, c in _heatmap(fig).colorscale]
    assert set(scale) == set(plots.EXPERT_COLOURS.values())
    colours = list(plots.EXPERT_COLOURS.values())
    for name in CVD_SIMULATIONS:
        dists = [cvd_distance(colours[i], colours[j], name) for i in range(3) for j in range(i + 1, 3)]
        assert min(dists) > 25, (name, dists)


@pytest.mark.parametrize("measure", UNCERTAINTY_MEASURES)
def test_routing_maps_stack_experts_over_the_selected_uncertainty(measure):
    tr = make_trace()
    fig = plots.routing_maps(tr, measure)
    top, bottom = [t for t in fig.data if t.type == "heatmap"]
    np.testing.assert_array_equal(np.asarray(top.z), tr.routes)
    np.testing.assert_allclose(np.asarray(bottom.z), tr.uncertainty(measure), rtol=1e-6)
    assert (top.xaxis, top.yaxis, bottom.xaxis, bottom.yaxis) == ("x", "y", "x2", "y2")
    assert list(top.x) == list(bottom.x) == list(plots.token_labels(tr))
    assert fig.layout.xaxis.matches == "x2"  # zooming one map zooms the other
    assert measure in fig.layout.annotations[1].text
    if measure in ("total", "aleatoric"):
        assert bottom.zmax == 1.0
    marks = [t for t in fig.data if t.type == "scatter"]
    assert len(marks[0].x) == int(tr.hedged.sum()) and marks[0].yaxis == "y"
    assert len(fig.layout.shapes) == 2  # the prompt boundary on both maps
    assert fig.layout.uirevision == plots.UIREVISION


def test_routing_maps_json_is_the_figures_json():
    for tr in (make_trace(), make_trace(controller="priorfree")):
        for measure in ("total", "vacuity"):
            assert json.loads(plots.routing_maps_json(tr, measure)) == json.loads(
                plots.routing_maps(tr, measure).to_json()
            )
    empty = RoutingTrace(
        model="m",
        controller="bayes",
        controller_id="c",
        controller_trained=False,
        settings=RoutingSettings(),
        n_layers=2,
        head_dim=8,
    )
    assert "Generate" in plots.routing_maps_json(empty)
    maps, strip, meters = plots.live_views(make_trace(), "epistemic")
    assert json.loads(maps) == json.loads(plots.routing_maps(make_trace(), "epistemic").to_json())
    assert strip == plots.token_strip(make_trace()) and meters == plots.meters(make_trace())


def test_routing_maps_refuse_unknown_measures_and_explain_point_estimates():
    for fn in (plots.routing_maps, plots.routing_maps_json):
        with pytest.raises(ValueError, match="uncertainty measure must be one of"):
            fn(make_trace(), "surprise")
    with pytest.raises(ValueError, match="uncertainty measure must be one of"):
        plots.routing_maps(
            RoutingTrace(
                model="m",
                controller="bayes",
                controller_id="c",
                controller_trained=False,
                settings=RoutingSettings(),
                n_layers=2,
                head_dim=8,
            ),
            "surprise",
        )
    fig = plots.routing_maps(make_trace(controller="priorfree"), "epistemic")
    assert "point estimate" in fig.layout.annotations[-1].text


def test_empty_trace_gives_placeholders_not_errors():
    tr = RoutingTrace(
        model="m",
        controller="bayes",
        controller_id="c",
        controller_trained=False,
        settings=RoutingSettings(),
        n_layers=3,
        head_dim=8,
    )
    placeholders = {
        "Nothing routed yet": plots.expert_map(tr),
        plots.MAPS_EMPTY: plots.routing_maps(tr),
        "Sweep budgets": plots.pareto([]),
    }
    for message, fig in placeholders.items():
        d = json.loads(fig.to_json())
        assert d["data"] == []  # no trace drawn from no tokens
        assert [message in a["text"] for a in d["layout"]["annotations"]] == [True]
    assert plots.empty_trace().n_tokens == 0
    assert json.loads(plots.routing_maps_json(plots.empty_trace())) == json.loads(
        plots.routing_maps(tr).to_json()
    )
    assert "\u2014" in plots.meters(tr)
    assert plots.token_strip(tr) == []
    assert plots.meter_values(tr)["realized_cost"] is None


def test_token_strip_is_the_full_attention_share_per_token():
    tr = make_trace()
    strip = plots.token_strip(tr)
    assert [t for t, _ in strip] == [plots.strip_text(t) for t in tr.tokens]
    expected = tr.weights[..., 0].mean(0)
    np.testing.assert_allclose([s for _, s in strip], expected, atol=5e-4)


@pytest.mark.parametrize(
    "text,shown",
    [
        (" the", " the"),
        ("\n", "\u21b5"),
        ("\n\n", "\u21b5\u21b5"),
        ("   ", "\u2423\u2423\u2423"),
        ("\t", "\u21e5"),
        ("\r\n", "\u21b5"),
        ("\r", "\u240d"),  # a lone carriage return is not an empty token
        ("\u3000", "\u2423"),
        ("", "\u2205"),
        ("\u200b", "<U+200B>"),
        ("\u200d\n", "<U+200D>\u21b5"),
        ("\u00e9\u200b", "\u00e9\u200b"),  # a visible character: as the tokenizer gave it
    ],
)
def test_the_strip_shows_a_token_with_nothing_visible_as_glyphs(text, shown):
    assert plots.strip_text(text) == shown


def test_token_labels_are_unique_and_printable():
    labels = plots.token_labels(make_trace())
    assert len(set(labels)) == len(labels)
    assert labels[2] == "2\u2009\\n" and labels[4] == "4\u2009\u2423"
    assert all(lbl.replace("\u2009", " ").isprintable() for lbl in labels)
    assert plots.token_label(3, "x" * 40).endswith("\u2026")


# -- meters -------------------------------------------------------------------------------
def _meter(page: str, key: str):
    m = re.search(rf"data-meter='{key}'([^>]*)>", page)
    attrs = dict(re.findall(r"data-(\w+)='([^']*)'", m.group(1)))
    return {k: float(v) for k, v in attrs.items()}


def test_meters_show_cost_against_budget_flops_speed_and_kl():
    tr = make_trace()
    v = plots.meter_values(tr)
    assert v["realized_cost"] == pytest.approx(float(tr.cost.mean()))
    assert v["flops_ratio"] == pytest.approx(tr.attention_flops_ratio)
    assert v["kl_to_dense"] == pytest.approx(float(tr.kl_to_dense[:-1].mean()), rel=1e-6)
    assert v["tokens_per_s"] == 12.5
    page = plots.meters(tr)
    cost = _meter(page, "cost")
    assert cost["value"] == pytest.approx(v["realized_cost"], rel=1e-5)
    assert cost["budget"] == 0.5 and "budget 0.50" in page
    assert _meter(page, "flops")["value"] == pytest.approx(v["flops_ratio"], rel=1e-5)
    assert _meter(page, "speed")["value"] == 12.5
    assert _meter(page, "kl")["value"] == pytest.approx(v["kl_to_dense"], rel=1e-5)
    bar = re.search(r"width:([0-9.]+)%;height:100%", page)
    assert float(bar.group(1)) == pytest.approx(100 * v["realized_cost"], abs=0.01)
    unmeasured = plots.meters(make_trace(kl=False))
    assert _meter(unmeasured, "kl") == {} and "\u2014" in unmeasured
    assert "no budget" in plots.meters(make_trace(budget=None))
    # at budget near 1 the routed logits equal dense's up to rounding: a mean KL of -5e-9
    # is 0, never "-0.0000"
    near_dense = make_trace()
    near_dense.kl_to_dense = np.full(near_dense.n_tokens, -4.58e-09, np.float32)
    assert plots.meter_values(near_dense)["kl_to_dense"] == 0.0
    assert "-0.0000" not in plots.meters(near_dense)


# -- inspector ----------------------------------------------------------------------------
def test_ternary_places_each_layer_at_its_posterior_mean():
    tr = make_trace()
    fig = plots.ternary(tr, 3)
    t = fig.data[0]
    m = tr.concentration[:, 3] / tr.concentration[:, 3].sum(-1, keepdims=True)
    np.testing.assert_allclose(np.stack([t.a, t.b, t.c], -1), m, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(t.a) + np.asarray(t.b) + np.asarray(t.c), 1, rtol=1e-5)
    assert list(t.marker.color) == list(range(tr.n_layers))
    np.testing.assert_allclose(np.asarray(t.customdata)[:, :3], tr.concentration[:, 3])
    for bad in (-1, tr.n_tokens, 1.5, True):
        with pytest.raises(ValueError, match="token position"):
            plots.ternary(tr, bad)


def test_concentration_table_has_a_row_per_layer_with_the_trace_numbers():
    tr = make_trace()
    df = plots.concentration_table(tr, 2)
    assert list(df.columns) == plots.concentration_columns()
    assert len(df) == tr.n_layers
    np.testing.assert_allclose(df["\u03b1 linear"], tr.concentration[:, 2, 1], atol=1e-4)
    np.testing.assert_allclose(df["epistemic"], tr.uncertainty("epistemic")[:, 2], atol=1e-4)
    assert list(df["expert"]) == [EXPERTS[r] for r in tr.routes[:, 2]]
    assert list(df["hedged"]) == tr.hedged[:, 2].tolist()


# -- sweep --------------------------------------------------------------------------------
def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(3)
    pts = [(float(c), float(k)) for c, k in rng.random((40, 2))]
    front = plots.pareto_front(pts)
    dominated = {
        p
        for p in pts
        for q in pts
        if q != p and q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1])
    }
    assert set(front) == set(pts) - dominated
    assert [p[0] for p in front] == sorted(p[0] for p in front)


def test_pareto_plot_has_a_series_per_policy():
    rows = [
        {"policy": p, "budget": b, "realized_cost": b, "kl_to_dense": 1 - b, "label": None}
        for p in ("bayes", "priorfree", "random", "salience")
        for b in (0.2, 0.5)
    ]
    rows += [
        {
            "policy": "static",
            "budget": None,
            "realized_cost": 0.15,
            "kl_to_dense": 2.0,
            "label": "all-linear",
        },
        {"policy": "dense", "budget": 1.0, "realized_cost": 1.0, "kl_to_dense": 0.0, "label": "dense"},
    ]
    fig = plots.pareto(rows)
    assert fig.layout.xaxis.range[1] == pytest.approx(1.05)
    # a soft-hedged point above dense (up to 1.45) stays on the plot
    rows.append({"policy": "bayes", "budget": 0.9, "realized_cost": 1.4, "kl_to_dense": 0.0, "label": None})
    assert plots.pareto(rows).layout.xaxis.range[1] == pytest.approx(1.45)
    names = [t.name for t in fig.data]
    for policy in ("bayes", "priorfree", "random", "salience", "static", "dense"):
        assert plots.POLICY_STYLES[policy]["name"] in names
    assert "Pareto front" in names


# -- attention maps -----------------------------------------------------------------------
def test_mixed_pattern_times_values_is_the_routed_output():
    """The implicit attention of the three experts, mixed by the router's weights, applied
    to v, gives kernels.reference's routed output: the pattern is what the token used."""
    from metaattn_kernels.reference import routed_attention_reference

    g = torch.Generator().manual_seed(0)
    Hq, Hkv, T, D, window, n_sink = 6, 2, 13, 8, 4, 2
    q = torch.randn(1, Hq, T, D, generator=g, dtype=torch.float64)
    k = torch.randn(1, Hkv, T, D, generator=g, dtype=torch.float64)
    v = torch.randn(1, Hkv, T, D, generator=g, dtype=torch.float64)
    w = torch.rand(1, T, 3, generator=g, dtype=torch.float64)
    w[0, ::3] = torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)  # some pure linear rows
    w = w / w.sum(-1, keepdim=True)
    scale = D**-0.5
    y, _ = routed_attention_reference(q, k, v, w, window=window, n_sink=n_sink, scale=scale)
    pat = attention_maps.mixed_pattern(
        q[0], k[0], scale, torch.arange(T), w[0].numpy(), window, n_sink
    )  # [Hq, T, T]
    out = pat @ v[0].repeat_interleave(Hq // Hkv, 0)
    torch.testing.assert_close(out, y[0], rtol=1e-5, atol=1e-6)
    assert torch.all(pat.triu(1) == 0)  # causal
    torch.testing.assert_close(pat.sum(-1), torch.ones(Hq, T, dtype=torch.float64), rtol=1e-5, atol=1e-5)


def test_local_expert_pattern_sees_only_window_and_sinks():
    q = torch.randn(2, 10, 4, dtype=torch.float64)
    k = torch.randn(2, 10, 4, dtype=torch.float64)
    pats = attention_maps.expert_patterns(q, k, 0.5, torch.arange(10), window=3, n_sink=1)
    local = pats[2][0]  # head 0, [10, 10]
    row = local[9]
    assert (row[[0, 7, 8, 9]] > 0).all() and (row[1:7] == 0).all()


@pytest.mark.parametrize(
    "pos,n_sink,cap,expected",
    [
        (3, 4, 24, [0, 1, 2, 3]),
        (30, 4, 8, [0, 1, 2, 3, 27, 28, 29, 30]),
        (30, 0, 4, [27, 28, 29, 30]),
        (5, 4, 6, [0, 1, 2, 3, 4, 5]),
        (9, 10, 5, [0, 1, 2, 3, 9]),
    ],
)
def test_view_positions_keep_sinks_and_the_tail(pos, n_sink, cap, expected):
    assert attention_maps.view_positions(pos, n_sink, cap) == expected


def _view(T=6, L=2, Hq=3):
    att = np.random.default_rng(0).random((L, Hq, T, T))
    return attention_maps.AttentionView(att, [f"t{i}" for i in range(T)], list(range(T)), T - 1, 1.0)


def test_bertviz_pages_use_the_vendored_scripts_and_no_cdn():
    view = _view()
    for page in (attention_maps.head_view_page(view), attention_maps.model_view_page(view)):
        assert "cdnjs" not in page
        assert not re.findall(r"[\"']https?://", page)  # nothing loaded from the internet
        urls = re.findall(r"gradio_api/file=([^\"' ?]+?)(?:\.js)?(?:\?[^\"']*)?['\"]", page)
        assert len(urls) == 3, urls
        for url in urls:
            path = url if url.endswith(".js") else url + ".js"
            assert attention_maps.VENDOR_DIR.as_posix() in path
            assert (attention_maps.VENDOR_DIR / path.split("/vendor/")[1]).is_file(), path


def test_each_bertviz_view_loads_its_scripts_under_its_own_urls_and_never_gives_up():
    """Issue 16: the two views arrive together; loading the same script URLs, the shown
    one waited on the hidden one past require.js's 7 s timeout and stayed blank."""
    view = _view()
    for name, page in (
        ("head", attention_maps.head_view_page(view)),
        ("model", attention_maps.model_view_page(view)),
    ):
        require_at = page.index(f"requirejs-2.3.6/require.js?view={name}")
        config = re.search(r"<script>require\.config\((\{.*?\})\);</script>", page)
        assert config is not None and config.start() > require_at
        assert json.loads(config.group(1)) == {"waitSeconds": 0, "urlArgs": f"view={name}"}
        assert config.start() < page.index("requirejs(['jquery', 'd3']")  # before bertviz's own


def test_iframe_embeds_the_page_escaped_and_sandboxed():
    page = '<html><body><script>var s = "it\'s & <b>";</script></body></html>'
    frame = attention_maps.iframe(page, 300)
    assert "sandbox='allow-scripts'" in frame and "allow-same-origin" not in frame
    srcdoc = re.search(r'srcdoc="([^"]*)"', frame).group(1)
    assert html.unescape(srcdoc) == page
    assert "height:300px" in frame


def test_every_figure_is_valid_plotly():
    """Figures are built without plotly's per-element validation (speed); validate them here:
    plotly raises on any unknown property or bad value."""
    import plotly.graph_objects as go

    tr = make_trace()
    figs = [
        plots.expert_map(tr),
        plots.expert_map(tr, 300, "A"),
        plots.ternary(tr, 2),
        plots.ternary_placeholder(),
        plots.pareto([]),
        plots.routing_maps(make_trace(controller="priorfree"), "vacuity"),
        *(plots.routing_maps(tr, m) for m in UNCERTAINTY_MEASURES),
    ]
    for fig in figs:
        go.Figure(json.loads(fig.to_json()))  # validates
        assert json.loads(fig.to_json())["layout"]["uirevision"] == plots.UIREVISION
