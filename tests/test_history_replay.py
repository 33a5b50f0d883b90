"""History's replay and comparison, called directly (no browser): a run routed with no
budget is replayed with a warning naming the budget the slider stands in with (and its link
carries none), every note says "no budget" where it said "budget None"; a failed Compare
clears the previous comparison first; a run of a controller this version does not know is
not replayed; a failed run's note says so in words, with the log's error; the comparison
names each run's cost model where they differ; and the header words a log file deleted
while open as what it is, with one period."""

from __future__ import annotations

import json
import sys
import warnings
from types import SimpleNamespace
from urllib.parse import parse_qsl, urlsplit

import gradio as gr
import pytest
from helpers import callbacks, routed_tiny, synthetic_trace, tiny_page

from metaattn_viz import store
from metaattn_viz.app import display
from metaattn_viz.app.engine import Engine
from metaattn_viz.app.requests import parse_request, parse_settings
from metaattn_viz.app.routing_controls import on_step

PROMPT = "The quick brown fox jumps over the lazy dog. "
VISITOR = SimpleNamespace(session_hash="visitor-1", headers={"referer": "http://127.0.0.1:7860/"})


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page over a tiny model, its components by elem_id."""
    with tiny_page(tmp_path_factory.mktemp("history-replay"), spread=3.0) as demo:
        yield demo


def _fn(demo, name: str):
    (block,) = callbacks(demo, name)
    return block


def _generate(demo, budget: float | None = 0.5, max_new: int = 3):
    settings = parse_settings(budget)
    req = parse_request(PROMPT, settings, max_new_tokens=max_new, quality=False, chat=False)
    trace = demo.engine.generations.generate(req)
    demo.engine.history.flush()
    return trace


def _said(warned) -> str:
    return " ".join(str(w.message) for w in warned)


def _state(demo):
    """The Live tab's trace (the gr.State a replay sets)."""
    refresh = callbacks(demo, "refresh")[0]
    (state,) = [b for b in refresh.inputs if isinstance(b, gr.State)]
    return state


def _link(demo, trace, budget) -> dict:
    """The share link the Export panel shows for `trace` with the budget slider at `budget`
    (the other controls at their values), as its query's parameters."""
    refresh = callbacks(demo, "refresh")[0]
    c = demo.components
    data = {block: getattr(block, "value", None) for block in refresh.inputs}
    data[_state(demo)], data[c["budget"]] = trace, budget
    out = refresh.fn(data, VISITOR)
    return dict(parse_qsl(urlsplit(out[c["share-link"]]).query))


def _log(demo, trace, status: str, error: str | None = None) -> str:
    """`trace` logged again as a run that ended `status` (with `error`); its run id."""
    run_log = demo.engine.history.run_log
    run_id = run_log.start_run(trace, "generate")
    run_log.finish(run_id, trace, status, error=error)
    run_log.flush()
    return run_id


# -- 1. a run with no budget ---------------------------------------------------------------
def test_a_run_with_no_budget_replays_with_a_warning_and_its_link_carries_no_budget(page):
    """The slider was set to 1, the note said "budget None", the link carried budget=1 and
    Generate made a dense run of a run that spent 0.29: now the slider stands at the run's
    realised cost, a warning names it, and the link has no budget."""
    c = page.components
    trace = _generate(page, budget=None)
    assert trace.settings.budget is None and trace.run_id
    slider = c["budget"]
    stand_in = on_step(trace.realized_cost, slider.minimum, slider.maximum, slider.step)
    assert stand_in < 1.0
    with pytest.warns(UserWarning, match="no budget") as warned:
        out = _fn(page, "replay").fn(trace.run_id, "total", VISITOR)
    assert out[slider] == pytest.approx(stand_in)
    said = _said(warned)
    assert "cannot express" in said and f"Generate and a re-route use budget {stand_in:g}" in said
    status = out[c["run-status"]]
    assert "no budget" in status and "None" not in status
    # a commit that moves nothing (Tab through the budget box) does not re-route it
    reroute = _fn(page, "live_reroute")
    data = {block: out.get(block, getattr(block, "value", None)) for block in reroute.inputs}
    assert reroute.fn(data, VISITOR) == gr.skip()
    # its link: no budget (the slider's value is not the run's), the run's other settings
    params = _link(page, out[_state(page)], out[slider])
    assert "budget" not in params and params["run"] == trace.run_id and params["controller"] == "bayes"
    # opening it: the run replays, with the same warning and the same stand-in
    open_link = _fn(page, "open_link").fn
    with pytest.warns(UserWarning, match="no budget"):
        opened = open_link(SimpleNamespace(query_params=params, session_hash="visitor-2"))
    assert opened[slider] == pytest.approx(stand_in)
    opened_note = opened[c["run-status"]]
    assert opened_note.startswith("Opened a shared link") and "no budget" in opened_note
    # a run with a budget: no warning, its own budget in its link
    kept = _generate(page, budget=0.4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = _fn(page, "replay").fn(kept.run_id, "total", VISITOR)
    assert again[slider] == 0.4 and _link(page, kept, 0.7)["budget"] == "0.4"


def test_a_run_between_the_sliders_steps_replays_at_the_nearest_step_with_a_warning(page):
    """A run made through the API or the CLI (budget 0.151, threshold 0.333, window 13) was
    shown as typed; the page's snapping then made a commit that moved nothing (Tab through a
    box) re-route it to 0.15 / 0.33 / 16 and log a run, and Generate silently made another.
    The sliders show the nearest step, a warning says so, and such a commit re-routes nothing."""
    c = page.components
    settings = parse_settings(0.151, hedge_policy="full", hedge_threshold=0.333, window=13)
    req = parse_request(PROMPT, settings, max_new_tokens=3, quality=False, chat=False)
    trace = page.engine.generations.generate(req)
    page.engine.history.flush()
    with pytest.warns(UserWarning, match="values the sliders cannot hold") as warned:
        out = _fn(page, "replay").fn(trace.run_id, "total", VISITOR)
    said = _said(warned)
    for typed, shown in (("budget 0.151", "0.15"), ("threshold 0.333", "0.33"), ("window 13", "16")):
        assert f"{typed} is shown as {shown}" in said
    assert (out[c["budget"]], out[c["hedge-threshold"]], out[c["window"]]) == (0.15, 0.33, 16)
    reroute = _fn(page, "live_reroute")
    data = {block: out.get(block, getattr(block, "value", None)) for block in reroute.inputs}
    assert reroute.fn(data, VISITOR) == gr.skip()  # nothing moved: no re-route, no run logged


def test_the_notes_and_titles_say_no_budget_where_they_said_budget_none(page):
    a = synthetic_trace(n_layers=2, n_tokens=6, seed=1, budget=None)
    b = synthetic_trace(n_layers=2, n_tokens=6, seed=2)
    a.run_id = "r1"
    assert display.replay_note(a).endswith("bayes controller, no budget.")
    assert display.compare_title("A", a, b) == "A: no budget, bayes"
    assert display.compare_title("B", b, a) == "B: budget 0.5, bayes"
    history = page.engine.history
    ra, rb = _log(page, a, "done"), _log(page, b, "done")
    ta, tb, df = history.compare(ra, rb)
    note = display.compare_note(ta, tb, df)
    assert f"Run A `{ra}` (bayes, no budget, cost" in note
    assert f"run B `{rb}` (bayes, budget 0.5, cost" in note
    assert "None" not in note


# -- 2. a failed Compare --------------------------------------------------------------------
def test_a_failed_compare_clears_the_previous_comparison_first(page):
    """Run B emptied (or unknown) after a comparison: the toast said so, and the earlier
    note (naming the old run B), both maps and the table stayed on the page."""
    started, compare = _fn(page, "compare_started"), _fn(page, "compare")
    # a step of its own, not queued, before the comparison (as sql_started)
    assert started.queue is False and compare.trigger_after == started._id
    assert list(started.outputs) == list(compare.outputs)
    a, b = _generate(page, max_new=2), _generate(page, max_new=4)
    note, fa, fb, table = compare.fn(a.run_id, b.run_id, VISITOR)
    assert b.run_id in note and len(table) > 0
    cleared_note, ca, cb, cleared = started.fn()
    assert cleared_note == "" and cleared.empty and list(cleared.columns) == list(store.COMPARE_COLUMNS)
    for blank, drawn in ((ca, fa), (cb, fb)):  # the maps the tab opens with: no run's
        figure = json.loads(blank)
        assert figure["data"] == [] and json.loads(drawn)["data"]
        assert "Nothing routed yet" in [a["text"] for a in figure["layout"]["annotations"]]
    for bad in ("", "no-such-run"):
        with pytest.raises(gr.Error):
            compare.fn(a.run_id, bad, VISITOR)


# -- 3. a controller this version does not know -----------------------------------------------
def test_a_run_of_a_controller_this_version_does_not_know_is_not_replayed(page):
    """A log row with controller 'mystery' was replayed anyway: Gradio's raw "Value:
    'mystery' ... is not in the list of choices", no link or downloads refreshed, no
    controller checked. Now it is refused as any run this version cannot read is: a sentence
    naming the run and the value (the shared link opens on its settings instead)."""
    trace = _generate(page, max_new=2)
    cur = page.engine.history.run_log.fresh_cursor()
    cur.execute("UPDATE runs SET controller = 'mystery' WHERE run_id = $r", {"r": trace.run_id})
    cur.close()
    with pytest.raises(gr.Error) as err:
        _fn(page, "replay").fn(trace.run_id, "total", VISITOR)
    message = str(err.value.message)
    assert trace.run_id in message and "'mystery'" in message and "cannot be replayed" in message
    assert "bayes, priorfree" in message
    with pytest.raises(gr.Error, match="mystery"):
        _fn(page, "compare").fn(trace.run_id, trace.run_id, VISITOR)
    opened = _fn(page, "open_link").fn(SimpleNamespace(query_params={"run": trace.run_id}, session_hash=None))
    status = opened[page.components["run-status"]]
    assert "'mystery'" in status and "link's settings" in status


def test_the_store_refuses_to_decode_a_controller_it_does_not_know(tmp_path):
    import duckdb

    path = tmp_path / "log.duckdb"
    trace = synthetic_trace(n_layers=2, n_tokens=5)
    with store.RunLog(path) as log:
        run_id = log.start_run(trace)
        log.finish(run_id, trace)
    with duckdb.connect(str(path)) as con:
        con.execute("UPDATE runs SET controller = 'oracle' WHERE run_id = $r", {"r": run_id})
    with store.RunLog(path) as log, pytest.raises(store.StoreUnavailable, match="controller 'oracle'"):
        log.load_trace(run_id)


# -- 5. a failed run's note and the cost models of a comparison -------------------------------
def test_a_failed_run_replays_saying_it_failed_and_the_logs_error(page):
    """It read "the run was failed: the tokens logged before the failure", without the
    error the log holds."""
    trace = _generate(page, max_new=2)
    run_id = _log(page, trace, "failed", error="RuntimeError: the GPU fell over")
    status = _fn(page, "replay").fn(run_id, "total", VISITOR)[page.components["run-status"]]
    assert "was failed" not in status
    assert "the run failed: these are the tokens logged before the failure." in status
    assert status.endswith("The log says why: `RuntimeError: the GPU fell over`.")
    # an interrupted run's error says why, where the note guessed the server went away
    lost = _log(page, trace, "interrupted", error="a write to the routing log failed")
    status = _fn(page, "replay").fn(lost, "total", VISITOR)[page.components["run-status"]]
    assert "server went away" not in status and "`a write to the routing log failed`" in status
    # a done run says nothing of errors; a long or odd error is cut and kept in its code span
    assert "says why" not in display.replay_note(trace, "done", "ignored")
    odd = display.replay_note(trace, "failed", "Bad `thing`\n" + "x" * 1000)
    shown = odd.split("The log says why: ")[1]
    assert shown.startswith("`Bad 'thing' x") and shown.endswith("\u2026`.")
    assert len(shown) == display.ERROR_CHARS + len("``.")


def test_the_comparison_names_the_cost_models_where_they_differ(page):
    """A notional "cost 0.501" beside a FLOPs "cost 1.000", with nothing saying the two
    costs count different things."""
    a = synthetic_trace(n_layers=2, n_tokens=6, seed=3)
    b = synthetic_trace(n_layers=2, n_tokens=6, seed=4)
    b.settings = b.settings.with_(cost_model="flops")
    ra, rb = _log(page, a, "done"), _log(page, b, "done")
    ta, tb, df = page.engine.history.compare(ra, rb)
    note = display.compare_note(ta, tb, df)
    assert f"`{ra}` (notional costs; bayes, budget 0.5" in note
    assert f"`{rb}` (costs in attention FLOPs; bayes, budget 0.5" in note
    assert display.compare_title("B", tb, ta) == "B: budget 0.5, bayes, costs in attention FLOPs"
    assert display.compare_title("A", ta, ta) == "A: budget 0.5, bayes"  # the same: not named


# -- 4. the header after the log's file is deleted ---------------------------------------------
@pytest.mark.skipif(sys.platform == "win32", reason="Windows refuses to delete an open file")
def test_the_header_words_a_deleted_log_file_on_its_own_with_one_period(tmp_path):
    """It read "Runs logged to X, but the last write failed. Runs are not being logged: the
    routing log's file was deleted while it was open… (restart to log again).." where no
    write had failed."""
    db = tmp_path / "log.duckdb"
    e = Engine(routed=routed_tiny(), db=str(db))
    try:
        full_disk = {**e.status(), "log_problem": "Runs are not being logged: No space left on device."}
        written = display.status_markdown(full_disk)
        assert "the last write failed" in written and ".." not in written  # a failed write as before
        for f in tmp_path.glob("log.duckdb*"):
            f.unlink()
        header = display.status_markdown(e.status())
        assert "last write failed" not in header and "Runs logged to" not in header
        assert (
            f"Runs are not being logged to `{db}`: the routing log's file was deleted while it was "
            "open, so runs are not kept (restart to log again). At most" in header
        )
        assert ".." not in header
    finally:
        e.close()
