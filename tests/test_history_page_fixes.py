"""History tab and figure fixes, called directly (no server): Replay run A is refused while
the tab's generation streams (and queues behind it), the SQL console's table never shows
the default query's columns over a refused query, and on a phone a figure's placeholder
message wraps inside the figure (the plotly view's script, in Chromium on a standalone
page) and the ternary's corner label keeps clear of its colorbar."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
from helpers import callbacks, synthetic_trace, tiny_page

from metaattn_viz.app import plots
from metaattn_viz.app.plotly_html import PLOTLY_JS, PLOTLY_VIEW_JS, figure_value
from metaattn_viz.app.requests import parse_request, parse_settings
from metaattn_viz.app.tab_history import DEFAULT_SQL_COLUMNS

PROMPT = "The quick brown fox jumps over the lazy dog. "
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page over a tiny model, its components by elem_id."""
    with tiny_page(tmp_path_factory.mktemp("history-page")) as demo:
        yield demo


def _fn(demo, name: str):
    return callbacks(demo, name)[0]


def _request(max_new=3):
    return parse_request(PROMPT, parse_settings(0.5), max_new_tokens=max_new, quality=False, chat=False)


# -- 4. Replay run A while a generation streams -------------------------------------------
def test_replay_is_refused_while_the_tabs_generation_streams(page):
    engine = page.engine
    done = engine.generations.generate(_request())
    engine.history.flush()
    replay = _fn(page, "replay")
    visitor = SimpleNamespace(session_hash="visitor-1")

    # a generation of this tab, held after its first snapshot
    routed = engine.host.routed_model()
    release, streaming = threading.Event(), threading.Event()
    stream = routed.stream

    def held(*args, **kwargs):
        for n, trace in enumerate(stream(*args, **kwargs)):
            if n == 1:
                streaming.set()
                release.wait(30)
            yield trace

    routed.stream = held
    try:
        job = engine.generations.start(_request(max_new=6), key=visitor.session_hash)
        assert streaming.wait(30) and engine.generations.running(visitor.session_hash)
        with pytest.warns(UserWarning, match="A generation is running: stop it first"):
            out = replay.fn(done.run_id, "total", visitor)
        assert out == gr.skip()  # nothing on the page changes, and no switch to Live
        # another visitor's replay is not held up by this one's generation
        other = replay.fn(done.run_id, "total", SimpleNamespace(session_hash="visitor-2"))
        assert isinstance(other, dict) and any(getattr(v, "token_ids", None) for v in other.values())
    finally:
        release.set()
        routed.stream = stream
    job.result(30)
    out = replay.fn(done.run_id, "total", visitor)  # the generation over: replayed
    assert page.components["prompt"] in out and page.components["run-status"] in out


# -- 6. the SQL console after a refused query ---------------------------------------------
def test_a_refused_query_leaves_no_columns_of_a_query_that_was_not_run(page):
    table = page.components["sql-result"]
    started = _fn(page, "sql_started")
    # before the first query: the default query's columns, with no rows
    assert table.get_config()["value"]["headers"] == DEFAULT_SQL_COLUMNS
    assert table.get_config()["value"]["data"] == []
    # a query's answer, then a refused query: its table goes, and with it any columns
    run_sql = _fn(page, "run_sql")
    df, _ = run_sql.fn("SELECT 1 AS one, 2 AS two", None)
    assert table.postprocess(df).headers == ["one", "two"]
    with pytest.raises(gr.Error, match="only one"):
        run_sql.fn("SELECT 1; SELECT 2", None)
    cleared, note = started.fn()
    shown = table.postprocess(cleared)
    assert shown.data == [] and note == ""
    assert shown.headers == []  # were the default query's: layer, full_share, mean_uncertainty
    # an answer with no rows keeps its own columns
    empty, _ = run_sql.fn("SELECT run_id FROM runs WHERE false", None)
    assert table.postprocess(empty).headers == ["run_id"]


# -- 5. on a phone: placeholders wrap, the ternary's label clears its colorbar -------------
def _standalone(figures: list, width: int) -> str:
    """A page drawing each figure with the plotly view's script, in a box `width` px wide."""
    views = []
    for i, fig in enumerate(figures):
        views.append(
            f"<div id='v{i}' style='width:{width}px'>"
            "<div class='metaattn-plot' style='width:100%;min-height:300px'></div></div>"
            f"<script>(() => {{ const element = document.getElementById('v{i}');"
            f" const props = {{value: {json.dumps(figure_value(fig))}}}; const watch = () => {{}};"
            f" const FILENAME = 'f{i}';\n{PLOTLY_VIEW_JS}\n}})();</script>"
        )
    return (
        f"<html><head><script src='{PLOTLY_JS.as_uri()}'></script></head>"
        f"<body style='margin:32px'>{''.join(views)}</body></html>"
    )


# where each view's annotations and the ternary's labels lie, in px from the view's edges
EXTENTS = """() => [...document.querySelectorAll('[id^=v]')].map((v) => {
  const r = v.getBoundingClientRect();
  const box = (e) => {
    const q = e.getBoundingClientRect();
    return {left: q.left - r.left, right: q.right - r.left};
  };
  return {
    width: r.width,
    notes: [...v.querySelectorAll('.annotation-text')].map(box),
    corner: [...v.querySelectorAll('text.ctitle')].map(box),  // the ternary's "local"
    ticks: [...v.querySelectorAll('.colorbar text')]
      .filter((t) => !/title/.test(t.getAttribute('class') || '')).map(box),
  };
})"""


@pytest.fixture(scope="module")
def phone_views(tmp_path_factory):
    """Two placeholders and a ternary drawn by the plotly view's script at a phone's width
    (Chromium, one standalone page): where their texts lie (EXTENTS)."""
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian chromium missing")
    from playwright.sync_api import sync_playwright

    from metaattn_viz.app.plots.inspector import ternary_placeholder

    figures = [ternary_placeholder(), plots.pareto([]), plots.ternary(synthetic_trace(n_tokens=8), 3)]
    page_file = tmp_path_factory.mktemp("phone") / "views.html"
    page_file.write_text(_standalone(figures, 326))  # a 390 px phone, less the page's padding
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files"],
        )
        try:
            tab = browser.new_page(viewport={"width": 390, "height": 480})
            tab.goto(page_file.as_uri())
            drawn = "(n) => [...document.querySelectorAll('.metaattn-plot')].filter((d) => d._fullLayout)"
            tab.wait_for_function(drawn + ".length === n", arg=len(figures), timeout=30_000)
            return tab.evaluate(EXTENTS)
        finally:
            browser.close()


def test_on_a_phone_a_placeholders_message_wraps_inside_the_figure(phone_views):
    for view in phone_views[:2]:  # ran past both edges (only left-anchored notes wrapped)
        (note,) = view["notes"]
        assert note["left"] >= 0 and note["right"] <= view["width"], view


def test_on_a_phone_the_ternarys_corner_label_clears_its_colorbar(phone_views):
    ternary = phone_views[2]
    assert ternary["corner"] and ternary["ticks"], ternary
    corner = max(c["right"] for c in ternary["corner"])
    assert corner + 4 < min(t["left"] for t in ternary["ticks"]), ternary
