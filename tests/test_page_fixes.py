"""The Live tab's callbacks called directly (no browser): a tiny random routed model, a
temporary routing log and the page built over them (tests/test_app_exports.py's set-up).

The token slider spans the example run shown before any run; the inspector and the budget
sweep follow a new trace (the same token inspected again after a re-route, cleared for
another text); a committed budget re-routes from its box and keys, an empty box gets a
sentence and a value beyond the ends is clamped with the maps following; nothing is
re-routed or logged when the settings did not change; on a phone the inspector's and
History's side-by-side views wrap one above the other."""

from __future__ import annotations

import gradio as gr
import pytest
from helpers import callbacks, controls_at, tiny_page

from metaattn_viz.app import examples, live_inspector, plots
from metaattn_viz.app.errors import AppError
from metaattn_viz.app.live_inspector import PICK_A_TOKEN
from metaattn_viz.app.requests import parse_request, parse_settings

PROMPT = "The quick brown fox jumps over the lazy dog. "
READABLE_PX = 300  # the least width a figure or table of the page is readable at


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page over a tiny model: its components by elem_id, its callbacks by name."""
    with tiny_page(tmp_path_factory.mktemp("page"), spread=3.0) as demo:
        yield demo


def _fns(demo, name: str) -> list:
    return callbacks(demo, name)


def _fn(demo, name: str):
    return _fns(demo, name)[0].fn


def _generate(demo, prompt=PROMPT, max_new=3):
    req = parse_request(prompt, parse_settings(0.5), max_new_tokens=max_new, quality=False, chat=False)
    return demo.engine.generations.generate(req)


def _by_id(out: dict) -> dict:
    """A callback's dict of updates keyed by the components' elem_ids (where they have one)."""
    return {getattr(c, "elem_id", None) or c: v for c, v in out.items()}


def _reroute_data(demo, trace, **values) -> dict:
    """live_reroute's inputs: the controls at the trace's settings, then `values` (by the
    controls' elem_ids; helpers.controls_at)."""
    return controls_at(demo, _fns(demo, "live_reroute")[0], trace, measure="total", relative=False, **values)


# -- 1. the token slider on the shipped example run ------------------------------------------
def test_the_token_slider_spans_the_example_run_shown_before_any_run(page):
    shipped = examples.initial_trace()
    assert shipped is not None and shipped.n_tokens > 20
    pos = page.components["inspect-pos"]
    assert pos.maximum == shipped.n_tokens - 1 and pos.value == shipped.n_tokens - 1
    # clicking token 20 of the example was refused: "Value 20 is greater than maximum value 1."
    assert pos.preprocess(20) == 20


# -- 2. the inspector follows a new trace -----------------------------------------------------
def test_the_inspector_follows_a_reroute_and_clears_for_another_text(page):
    refresh = _fn(page, "refresh_after_trace")
    inspect_token = _fn(page, "inspect_token")
    trace = _generate(page)
    pos = 5
    shown = _by_id(inspect_token(trace, pos, None))
    inspected = next(v for k, v in shown.items() if isinstance(v, tuple))
    assert inspected[0] == pos
    assert shown["conc-table"].equals(plots.concentration_table(trace, pos))

    # the same trace again (a re-route that changed nothing): nothing to redraw
    assert refresh(trace, inspected, None, None) == gr.skip()

    # a re-route: the same token, inspected again with the new decisions
    low = page.engine.analysis.reroute(trace, parse_settings(0.15), log_run=False)
    assert not plots.concentration_table(low, pos).equals(plots.concentration_table(trace, pos))
    out = _by_id(refresh(low, inspected, None, None))
    assert out["conc-table"].equals(plots.concentration_table(low, pos))
    assert out["inspect-pos"] == pos and "Token" in out["inspect-note"]

    # another text: back to the inspector before any pick
    other = _generate(page, "Completely different words here, nothing alike. ")
    assert other.token_ids[: pos + 1] != trace.token_ids[: pos + 1]
    out = _by_id(refresh(other, inspected, None, None))
    assert PICK_A_TOKEN in out["head-view"] and PICK_A_TOKEN in out["model-view"]
    assert out["conc-table"].empty and out["inspect-note"] == ""
    assert any(v is None for v in out.values())  # the inspected token is forgotten


def test_the_inspector_and_sweep_refresh_after_every_event_that_brings_a_trace(page):
    parents = {page.fns[d.trigger_after].name for d in _fns(page, "refresh_after_trace")}
    # generation, re-route, History's replay
    assert parents == {"live_generate", "live_reroute", "replay"}
    # the quality meter measures after a re-route, and after a run where it was ticked mid-run
    after_reroute = [d for d in _fns(page, "measure_quality") if d.trigger_after is not None]
    assert [page.fns[d.trigger_after].name for d in after_reroute] == ["live_reroute"]
    after_run = _fns(page, "measure_after_run")
    assert [page.fns[d.trigger_after].name for d in after_run] == ["live_generate"]


def test_the_exports_refresh_once_after_a_run_and_after_a_re_route(page):
    """The Export and share panel's downloads are rebuilt after the quality meter's step
    that follows a run or a re-route (it may add the KL), not also before it."""
    parents = [page.fns[d.trigger_after].name for d in _fns(page, "refresh") if d.trigger_after is not None]
    assert parents.count("measure_after_run") == 1  # after a generation
    assert parents.count("measure_quality") == 2  # after a re-route, and a tick of the box
    assert "live_generate" not in parents and "live_reroute" not in parents
    assert parents.count("replay") == 1 and parents.count("redraw_maps") == 1


# -- 6. the sweep of another text goes ---------------------------------------------------------
def test_a_sweep_is_cleared_when_another_text_comes(page):
    refresh = _fn(page, "refresh_after_trace")
    trace = _generate(page)
    swept = tuple(trace.token_ids)
    assert PROMPT.strip()[:20] in live_inspector.sweep_note(trace)
    low = page.engine.analysis.reroute(trace, parse_settings(0.3), log_run=False)
    assert refresh(low, None, swept, None) == gr.skip()  # the same text: the sweep stays
    other = _generate(page, "Another text entirely. ")
    out = _by_id(refresh(other, None, swept, None))
    assert out["sweep-note"] == "" and any(v is None for v in out.values())
    assert out["pareto"] == plots.pareto([]).to_json()
    assert len([v for v in out.values() if hasattr(v, "empty") and v.empty]) == 1  # the table


# -- 3. and 4. committing the budget ------------------------------------------------------------
def test_every_committed_slider_value_reroutes_once(page):
    (reroute,) = _fns(page, "live_reroute")
    c = page.components
    triggers = {(page.blocks[i].elem_id, event) for i, event in reroute.targets}
    assert {("budget", "release"), ("hedge-threshold", "release"), ("window", "release")} <= triggers
    assert ("commit-keys", "click") in triggers  # Enter in a box, arrow keys on a slider
    # a value committed while a re-route runs is routed after it, not dropped
    assert reroute.trigger_mode == "always_last"
    # an empty box or a number beyond the ends reach the callback as sent, not Gradio's
    # preprocessing (its internal "Could not preprocess" error, "Value 5 is greater than ...")
    assert reroute.preprocess is False
    for name in ("budget", "hedge-threshold", "window"):
        assert c[name] in reroute.inputs


def test_a_budget_beyond_the_ends_is_clamped_and_an_empty_box_gets_a_sentence(page):
    live_reroute = _fn(page, "live_reroute")
    trace = _generate(page)
    page.engine.history.flush()
    out = _by_id(live_reroute(_reroute_data(page, trace, budget=5.0), None))
    new = next(v for v in out.values() if hasattr(v, "token_ids"))
    assert new.settings.budget == 1.0 and new.realized_cost == pytest.approx(1.0)  # the maps follow
    assert "budget 1.00" in out["run-status"]
    out = _by_id(live_reroute(_reroute_data(page, trace, budget=-1.0), None))
    assert next(v for v in out.values() if hasattr(v, "token_ids")).settings.budget == 0.15

    with pytest.warns(UserWarning, match="The budget box is empty: type a number from 0.15 to 1"):
        out = _by_id(live_reroute(_reroute_data(page, trace, budget=None), None))
    assert out == {"budget": trace.settings.budget}  # the box back at the maps' budget
    with pytest.raises(AppError, match="local window box is empty"):
        _settings(page, trace, window=None)


def _settings(page, trace, **values):
    """RoutingControls.settings over live_reroute's inputs (what Generate and the sweep read)."""
    from metaattn_viz.app.routing_controls import RoutingControls

    c = page.components
    data = _reroute_data(page, trace, **values)
    labelled = {getattr(b, "label", None): b for b in data}
    controls = RoutingControls(
        c["budget"],
        labelled["Budget scope"],
        labelled["Hedge policy"],
        c["hedge-threshold"],
        c["window"],
        c["hedge-measure"],
        c["cost-model"],
    )
    return controls.settings(data)


def test_an_unchanged_setting_neither_reroutes_nor_logs_a_run(page):
    live_reroute = _fn(page, "live_reroute")
    trace = _generate(page)
    page.engine.history.flush()
    runs = len(page.engine.history.runs())
    # Tab through the budget box, or release a slider where it was: the trace's own settings
    assert live_reroute(_reroute_data(page, trace), None) == gr.skip()
    examples_run = examples.initial_trace()  # kept resolved (linear_map "learned"): still equal
    assert live_reroute(_reroute_data(page, examples_run), None) == gr.skip()
    page.engine.history.flush()
    assert len(page.engine.history.runs()) == runs
    out = _by_id(live_reroute(_reroute_data(page, trace, budget=0.3), None))
    assert "budget 0.30" in out["run-status"]


# -- 5. a phone's width: side-by-side views wrap ------------------------------------------------
def test_side_by_side_views_wrap_one_above_the_other_on_a_phone(page):
    """Two views in a row wrap when their column's min_width does not fit: 390 px showed the
    posterior plot and the table at 124 and 160 px, History's maps at 155 px each."""
    for elem_id in ("ternary", "conc-table", "compare-a", "compare-b"):
        parent = page.components[elem_id].parent
        assert isinstance(parent, gr.Column) and parent.min_width >= READABLE_PX > 390 / 2, elem_id
    # the hedge threshold's label took five lines at 1280 px in a row of six controls
    threshold = page.components["hedge-threshold"]
    assert len(threshold.parent.children) <= 3
    column = page.components["relative"].parent
    while not isinstance(column, gr.Column):  # (Gradio puts form components in a gr.Form)
        column = column.parent
    assert column.min_width >= READABLE_PX  # a checkbox's own min_width is ignored
