"""The page in a real browser: Debian's Chromium driven by Playwright against a real server
on 127.0.0.1, with every request to any other host aborted (the page must work offline).

Type a prompt, generate, see both maps fill in while tokens stream; drag the budget slider
and see the map and the cost meter change; click a token and see the ternary plot and the
bertviz views render inside their iframes (whichever tab shows, in any order: issue 16);
open History and replay the run; the SQL console's table is labelled before the first
query; Stop logs the run as "stopped"; bad input gives a plain message; the figures follow
the light or dark theme; the trace's JSON and the maps' HTML page download and open (the
page offline); a shared link opens the same run in a new page. Screenshots go to the
test's tmp folder; with
METAATTN_UPDATE_SCREENSHOT=1 the live page is also copied to assets/screenshot.png
(the README's picture)."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import zipfile
from pathlib import Path
from urllib.parse import unquote

import pytest
from helpers import ROOT, AppServer

from metaattn_viz.app.plots.style import THEMES, strip_text
from metaattn_viz.app.tab_history import DEFAULT_SQL_COLUMNS
from metaattn_viz.core.trace import RoutingTrace

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = ROOT / "assets" / "screenshot.png"
# Requests to any host but the test server's (aborted: the page must work offline). Only
# these are routed: a route handler of Playwright's sync API runs only while the test is
# inside a Playwright call, so routing the page's own requests too would hold each one
# the page sends while the test waits elsewhere (time.sleep, a gradio_client query) and
# the server would never see it (a click "lost" until the next Playwright call).
OUTSIDE = re.compile(r"^(?!http://127\.0\.0\.1:|data:|blob:|about:)")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not Path(CHROMIUM).exists(), reason="Debian chromium missing: apt-get install chromium"
    ),
]

# The live maps: one plotly figure drawn in place in #routing-maps (heatmap 0 = experts,
# heatmap 1 = uncertainty); every other figure (posterior, sweep, History comparison) is a
# plotly view too, its graph div found as `.js-plotly-plot`.
MAP_LEN = """(which) => {
  const d = document.querySelector('#routing-maps .metaattn-plot');
  if (!d || !d.data) return -1;
  const h = d.data.filter(t => t.type === 'heatmap')[which];
  return h && h.x ? h.x.length : 0;
}"""
MAP_Z = """() => {
  const d = document.querySelector('#routing-maps .metaattn-plot');
  const h = d && d.data ? d.data.find(t => t.type === 'heatmap') : null;
  if (!h) return null;
  // a base64 typed-array spec {dtype, bdata} as sent, or nested arrays: either way a string
  return JSON.stringify(h.z, (k, v) => ArrayBuffer.isView(v) ? Array.from(v) : v);
}"""
PLOT_LEN = """(sel) => {
  const d = document.querySelector(sel + ' .js-plotly-plot');
  if (!d || !d.data) return -1;
  const h = d.data.find(t => t.type === 'heatmap');
  return h && h.x ? h.x.length : 0;
}"""
RECORDER = """() => {
  window.__seen = [];
  const len = (which) => {
    const d = document.querySelector('#routing-maps .metaattn-plot');
    const h = d && d.data ? d.data.filter(t => t.type === 'heatmap')[which] : null;
    return h && h.x ? h.x.length : 0;
  };
  window.__recorder = setInterval(() => {
    const s = document.querySelector('#run-status');
    if (s && s.innerText.trim().startsWith('Generating'))
      window.__seen.push([len(0), len(1)]);
  }, 100);
}"""
COST_METER = """() => {
  const m = document.querySelector('#meters [data-meter=cost]');
  return m && m.dataset.value !== undefined ? parseFloat(m.dataset.value) : null;
}"""
KL_METER = """() => {
  const m = document.querySelector('#meters [data-meter=kl]');
  return m && m.dataset.value !== undefined ? parseFloat(m.dataset.value) : null;
}"""
TRACE_TYPES = """(sel) => {
  const d = document.querySelector(sel + ' .js-plotly-plot');
  return d && d.data ? d.data.map(t => t.type) : [];
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with AppServer(tmp_path_factory.mktemp("app-browser")) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture()
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1700})
    outside = []

    def abort_outside(route):
        outside.append(route.request.url)
        route.abort()

    context.route(OUTSIDE, abort_outside)
    pg = context.new_page()
    pg.outside_requests = outside
    pg.goto(server.url)
    pg.wait_for_selector("#prompt textarea", timeout=60_000)
    pg.wait_for_function(
        "() => document.querySelector('#model-status').innerText.includes('ready')", timeout=120_000
    )
    yield pg
    context.close()


def _set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def _status(page) -> str:
    return page.inner_text("#run-status")


def _wait_status(page, prefix: str, timeout: float = 180_000) -> None:
    page.wait_for_function(
        "(p) => document.querySelector('#run-status').innerText.trim().startsWith(p)",
        arg=prefix,
        timeout=timeout,
    )


def _drag_slider(page, elem_id: str, lo: float, hi: float, value: float) -> None:
    """A real pointer drag of a range input from its thumb to `value`."""
    track = page.locator(f"#{elem_id} input[type=range]")
    track.scroll_into_view_if_needed()
    box = track.bounding_box()
    current = float(track.input_value())

    def x_of(v):
        return box["x"] + box["width"] * (v - lo) / (hi - lo)

    y = box["y"] + box["height"] / 2
    page.mouse.move(x_of(current), y)
    page.mouse.down()
    for f in (0.33, 0.66, 1.0):
        page.mouse.move(x_of(current + f * (value - current)), y, steps=3)
    page.mouse.up()


def test_live_page_stream_reroute_inspect_history(page, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    page.fill(
        "#prompt textarea",
        "Once upon a time, in a small village by the sea, there lived an old lighthouse keeper who",
    )
    page.locator("#chat input[type=checkbox]").uncheck()
    _set_number(page, "max-new", 64)
    # record, inside the page, the length of both maps whenever the status says "Generating"
    page.evaluate(RECORDER)
    page.click("#generate")

    # -- both maps fill in while the tokens stream --------------------------------------
    _wait_status(page, "Done", 240_000)
    seen = page.evaluate("() => window.__seen")
    assert _status(page).startswith("Done"), _status(page)
    final = page.locator("#strip span.token").count()
    assert final > 20
    # the page draws the newest frame once the previous draw is done: wait for the last one
    page.wait_for_function(f"() => ({MAP_LEN})(0) === {final} && ({MAP_LEN})(1) === {final}", timeout=60_000)
    growing_e = {e for e, u in seen if 0 < e < final}
    growing_u = {u for e, u in seen if 0 < u < final}
    assert len(growing_e) >= 2 and len(growing_u) >= 2, seen  # two partial maps, then final
    page.wait_for_function(f"() => ({KL_METER})() !== null", timeout=60_000)
    page.set_viewport_size({"width": 1400, "height": 2150})
    page.screenshot(path=str(shots / "01-live.png"))
    page.set_viewport_size({"width": 1400, "height": 1700})
    page.screenshot(path=str(shots / "01-live-full.png"), full_page=True)
    if os.environ.get("METAATTN_UPDATE_SCREENSHOT") == "1":  # refresh the README's picture
        shutil.copyfile(shots / "01-live.png", SCREENSHOT)

    # -- dragging the budget re-routes: the map and the cost meter follow ---------------
    z_before = page.evaluate(MAP_Z)
    cost_before = page.evaluate(COST_METER)
    assert cost_before == pytest.approx(0.5, abs=0.05)
    _drag_slider(page, "budget", 0.15, 1.0, 0.25)
    _wait_status(page, "Re-routed", 120_000)
    page.wait_for_function(f"() => Math.abs(({COST_METER})() - {cost_before}) > 0.05", timeout=60_000)
    budget = float(page.locator("#budget input[type=range]").input_value())
    assert 0.15 <= budget < 0.4
    assert page.evaluate(COST_METER) == pytest.approx(budget, abs=0.06)
    page.wait_for_function(f"() => ({MAP_Z})() !== {json.dumps(z_before)}", timeout=60_000)
    assert page.evaluate(MAP_LEN, 0) == final
    page.screenshot(path=str(shots / "02-rerouted.png"))

    # -- inspector: ternary plot, concentration table, bertviz in its iframes ------------
    page.locator("#strip span.token").nth(8).click()
    page.wait_for_function(
        "(s) => { const d = document.querySelector(s + ' .js-plotly-plot');"
        " return d && d.data && d.data.some(t => t.type === "
        "'scatterternary') }",
        arg="#ternary",
        timeout=120_000,
    )
    assert "scatterternary" in page.evaluate(TRACE_TYPES, "#ternary")
    assert (
        page.locator("#conc-table").inner_text().count("linear")
        + page.locator("#conc-table").inner_text().count("full")
        > 0
    )
    page.wait_for_selector("#head-view iframe", timeout=120_000)
    head = page.frame_locator("#head-view iframe")
    head.locator("svg text").first.wait_for(timeout=60_000)
    assert head.locator("svg text").count() >= 2 * 9  # tokens on both sides
    assert head.locator("#layer option").count() == 30
    page.locator("#head-view iframe").scroll_into_view_if_needed()
    time.sleep(0.5)
    page.screenshot(path=str(shots / "03-inspector.png"))
    page.get_by_role("tab", name="bertviz model view").click()
    model = page.frame_locator("#model-view iframe")
    model.locator("rect.attn_background").first.wait_for(timeout=60_000)
    assert model.locator("rect.attn_background").count() == 30 * 9  # a thumbnail per head
    page.locator("#model-view iframe").scroll_into_view_if_needed()
    time.sleep(0.5)
    page.screenshot(path=str(shots / "04-model-view.png"))

    # -- the uncertainty measure is selectable; the budget sweep draws its Pareto plot -----
    page.locator("#measure input").click()
    page.get_by_role("option", name="vacuity").click()
    page.wait_for_function(
        "() => { const d = document.querySelector('#routing-maps "
        ".metaattn-plot'); return d && d.layout && d.layout.annotations"
        ".some(a => a.text.includes('vacuity')) }",
        timeout=30_000,
    )
    page.get_by_text("Budget sweep: quality against cost").click()
    page.click("#sweep-button")
    page.wait_for_function(
        "() => { const d = document.querySelector('#pareto .js-plotly-plot');"
        " return d && d.data && d.data.length >= 6 }",
        timeout=180_000,
    )
    names = page.evaluate("() => document.querySelector('#pareto .js-plotly-plot').data.map(t => t.name)")
    assert {
        "Bayesian controller",
        "prior-free controller",
        "random routing",
        "salience top-k (MoD-like)",
    } <= set(names), names
    page.locator("#pareto").scroll_into_view_if_needed()
    page.screenshot(path=str(shots / "05-sweep.png"))

    # -- History: the runs are there; replay the generation into the live views ----------
    # (the controls changed since: the replay puts the run's prompt and generation back)
    prompt = page.input_value("#prompt textarea")
    page.fill("#prompt textarea", "Something else entirely.")
    _set_number(page, "max-new", 5)
    page.get_by_role("tab", name="History").click()
    page.click("#history-refresh")
    rows = page.locator("#runs [role=row]:has([role=gridcell])")
    rows.nth(1).wait_for(timeout=60_000)
    texts = [rows.nth(i).inner_text() for i in range(rows.count())]
    gen_row = next(i for i, t in enumerate(texts) if "\ngenerate\n" in t)
    assert any("\nreroute\n" in t for t in texts), texts
    assert all("\ndone\n" in t for t in texts), texts
    rows.nth(gen_row).locator("[role=gridcell]").first.click()
    page.wait_for_function(
        "() => document.querySelector('#run-a textarea, #run-a input').value.length > 10", timeout=30_000
    )
    page.screenshot(path=str(shots / "06-history.png"))
    page.click("#replay")
    _wait_status(page, "Replayed run", 60_000)
    page.wait_for_function(f"() => ({MAP_Z})() === {json.dumps(z_before)}", timeout=60_000)
    assert page.evaluate(MAP_LEN, 0) == final  # the generation, budget 0.5, again
    assert float(page.locator("#budget input[type=range]").input_value()) == pytest.approx(0.5)
    assert page.input_value("#prompt textarea") == prompt
    assert page.locator("#max-new input[type=number]").input_value() == "64"
    assert not page.locator("#chat input[type=checkbox]").is_checked()
    page.screenshot(path=str(shots / "07-replayed.png"))

    # -- compare two runs, the read-only SQL console, the download ------------------------
    page.get_by_role("tab", name="History").click()
    rows = page.locator("#runs [role=row]:has([role=gridcell])")
    rows.nth(1).wait_for(timeout=30_000)
    other = next(i for i in range(rows.count()) if i != gen_row)
    rows.nth(other).locator("[role=gridcell]").first.click()
    page.wait_for_function(
        "() => document.querySelector('#run-b textarea, #run-b input').value.length > 10", timeout=30_000
    )
    page.click("#compare")
    page.get_by_text("the same expert in").first.wait_for(timeout=60_000)
    assert page.evaluate(PLOT_LEN, "#compare-a") == final
    assert page.evaluate(PLOT_LEN, "#compare-b") == final
    page.screenshot(path=str(shots / "08-compare.png"), full_page=True)
    page.get_by_text("Read-only SQL console").click()
    # before any query the table is labelled with the default query's columns (issue 16:
    # Gradio's placeholder columns "1 2 3" were shown)
    headers = page.locator("#sql-result [role=columnheader]")
    headers.first.wait_for(timeout=30_000)
    assert [h.inner_text().strip() for h in headers.all()] == DEFAULT_SQL_COLUMNS
    assert page.locator("#sql-result [role=gridcell]").count() == 0
    page.click("#sql-run")
    page.get_by_text("30 rows in").first.wait_for(timeout=30_000)
    assert page.locator("#sql-result [role=gridcell]").count() > 0
    # a refused query says why and leaves no earlier answer standing as if it were its own
    page.locator("#sql .cm-content").click()
    page.keyboard.press("Control+A")
    page.keyboard.type("SELECT 1; SELECT 2")
    page.click("#sql-run")
    _toast(page, "only one is allowed")
    page.wait_for_function(
        "() => document.querySelectorAll('#sql-result [role=gridcell]').length === 0", timeout=30_000
    )
    assert "rows in" not in page.locator("#sql-note").inner_text()  # nor the earlier answer's note
    page.screenshot(path=str(shots / "08b-sql-refused.png"), full_page=True)
    _dismiss_toasts(page)
    page.get_by_text("Download the routing log").click()
    page.click("#export")
    page.locator("#export-file a").first.wait_for(timeout=60_000)
    assert ".zip" in page.locator("#export-file").inner_text()

    assert not [u for u in page.outside_requests if "cdnjs" in u or "cdn." in u], page.outside_requests
    print(f"screenshots in {shots}")


def _toast(page, text: str, timeout: float = 60_000) -> None:
    page.get_by_text(text, exact=False).first.wait_for(timeout=timeout)


def _dismiss_toasts(page) -> None:
    for close in page.locator(".toast-close").all():
        try:
            close.click(timeout=2_000)
        except Exception:  # already gone
            pass


def test_bad_input_in_the_page(page, server, tmp_path):
    page.fill("#prompt textarea", "   ")
    page.click("#generate")
    _toast(page, "The prompt is empty")
    page.fill("#prompt textarea", "x" * 100_000)
    page.click("#generate")
    _toast(page, "the app takes at most 16,000")
    page.screenshot(path=str(tmp_path / "bad-input.png"))
    _set_number(page, "max-new", 2)
    page.fill(
        "#prompt textarea",
        "Bonjour\x07 le monde \u2014 \u4f60\u597d\u4e16\u754c \u041f\u0440\u0438\u0432\u0435\u0442",
    )
    page.click("#generate")
    _toast(page, "Removed 1 control character")
    _wait_status(page, "Done", 120_000)
    assert page.evaluate(MAP_LEN, 0) > 5

    # Stop ends a long generation early; the run is logged as "stopped" (issue 16), which
    # History and /sql both show
    _dismiss_toasts(page)
    _set_number(page, "max-new", 256)
    page.locator("#chat input[type=checkbox]").uncheck()  # a continuation, not a short answer
    page.fill("#prompt textarea", "Chapter one. It was a long and quiet winter, and")
    page.click("#generate")
    _wait_status(page, "Generating", 120_000)
    page.click("#stop")
    _wait_status(page, "Stopped", 60_000)
    assert 0 < page.evaluate(MAP_LEN, 0) < 200
    run_id = re.search(r"run ([0-9a-f-]{36})", _status(page)).group(1)
    page.get_by_role("tab", name="History").click()
    page.click("#history-refresh")
    row = page.locator("#runs [role=row]", has_text=run_id)
    row.first.wait_for(timeout=60_000)
    assert "\nstopped\n" in row.first.inner_text()
    client = server.client()
    deadline = time.time() + 30
    while True:  # the log's writer commits the run's end in the background
        rows = client.predict(query=f"SELECT status FROM runs WHERE run_id = '{run_id}'", api_name="/sql")
        if rows["rows"] == [["stopped"]] or time.time() > deadline:
            break
        time.sleep(0.5)
    assert rows["rows"] == [["stopped"]], rows

    # a second Generate while a run streams stops that run and makes the new one (docs/ui.md;
    # Gradio used to drop the click while the first event was pending)
    page.get_by_role("tab", name="Live").click()
    first, second = "Chapter two. The snow had not stopped for days, and", "Say hello in French."
    page.fill("#prompt textarea", first)
    page.click("#generate")
    _wait_status(page, "Generating", 120_000)
    _set_number(page, "max-new", 3)
    page.fill("#prompt textarea", second)
    page.click("#generate")
    _wait_status(page, "Done", 120_000)
    assert page.input_value("#prompt textarea") == second
    query = f"SELECT prompt, status FROM runs WHERE prompt IN ('{first}', '{second}') ORDER BY created_at"
    deadline = time.time() + 30
    while True:
        rows = client.predict(query=query, api_name="/sql")
        if rows["rows"] == [[first, "stopped"], [second, "done"]] or time.time() > deadline:
            break
        time.sleep(0.5)
    assert rows["rows"] == [[first, "stopped"], [second, "done"]], rows
    assert server.alive()


COST_MODEL_SHOWN = "() => document.querySelector('#meters [data-meter=cost]')?.dataset.costModel ?? null"


def test_the_cost_model_and_hedge_measure_radios_reroute(page, server, tmp_path):
    """A click on the cost model's or the hedge measure's radio re-routes the run with it:
    the cost meter names the cost model, and the routing log holds the re-routes with the
    settings clicked (issue 14)."""
    page.fill("#prompt textarea", "The budget counts notional costs or the FLOPs of dense attention.")
    page.locator("#chat input[type=checkbox]").uncheck()
    _set_number(page, "max-new", 4)
    page.click("#generate")
    _wait_status(page, "Done", 180_000)
    assert page.evaluate(COST_MODEL_SHOWN) == "notional"
    run_id = re.search(r"run ([0-9a-f-]{36})", _status(page)).group(1)
    page.locator("#cost-model").get_by_text("attention FLOPs").click()
    page.wait_for_function(f"() => ({COST_MODEL_SHOWN})() === 'flops'", timeout=120_000)
    assert "FLOPs" in page.locator("#meters [data-meter=cost]").inner_text()
    # a text shorter than the window cannot spend less than dense FLOPs: the status says so
    _wait_status(page, "Re-routed", 60_000)
    assert "out of reach" in _status(page), _status(page)
    page.screenshot(path=str(tmp_path / "cost-model-flops.png"))
    client = server.client()
    query = (
        "SELECT cost_model, hedge_measure FROM runs WHERE kind = 'reroute' AND created_at >= "
        f"(SELECT created_at FROM runs WHERE run_id = '{run_id}') ORDER BY created_at"
    )

    def logged(row, timeout=120):  # the log's writer commits the re-routes in the background
        deadline = time.time() + timeout
        while True:
            rows = client.predict(query=query, api_name="/sql")["rows"]
            if row in rows or time.time() > deadline:
                return rows
            time.sleep(0.5)

    logged(["flops", "total"])
    # the quality meter of the first re-route runs after it (.then): let the page settle
    page.wait_for_function("() => !document.querySelector('.pending, .generating')", timeout=60_000)
    radio = page.locator("#hedge-measure")
    radio.get_by_text("epistemic").click()
    rows = logged(["flops", "epistemic"])
    assert rows[0] == ["flops", "total"] and ["flops", "epistemic"] in rows, rows
    page.screenshot(path=str(tmp_path / "hedge-measure-epistemic.png"))
    assert page.evaluate(COST_MODEL_SHOWN) == "flops"


CONC_TEXT = "() => document.querySelector('#conc-table').innerText"


def test_the_budget_commits_from_the_keyboard_and_the_inspector_follows(page, server):
    """Enter in the budget's box and the arrow keys on its slider re-route once each (only a
    release did); an empty box says so and goes back to the maps' budget (it was Gradio's
    internal preprocessing error); leaving the box unchanged logs no run; the inspected
    token's table follows each re-route (it stayed on the old decisions)."""
    page.fill("#prompt textarea", "Keys commit the budget.")
    page.locator("#chat input[type=checkbox]").uncheck()
    _set_number(page, "max-new", 2)
    page.click("#generate")
    _wait_status(page, "Done", 180_000)
    run_id = re.search(r"run ([0-9a-f-]{36})", _status(page)).group(1)
    page.locator("#strip span.token").nth(3).click()
    page.wait_for_function("() => document.querySelectorAll('#conc-table [role=gridcell]').length > 0")
    table = page.evaluate(CONC_TEXT)

    _set_number(page, "budget", 0.3)  # typed, then Enter
    page.wait_for_function(STATUS_HAS, arg="budget 0.30", timeout=60_000)
    page.wait_for_function(f"(t) => ({CONC_TEXT})() !== t", arg=table, timeout=120_000)
    page.locator("#budget input[type=range]").focus()
    for _ in range(5):
        page.keyboard.press("ArrowLeft")
    page.wait_for_function(STATUS_HAS, arg="budget 0.25", timeout=60_000)

    box = page.locator("#budget input[type=number]")
    box.fill("")
    box.press("Enter")
    _toast(page, "The budget box is empty: type a number from 0.15 to 1.")
    page.wait_for_function("() => document.querySelector('#budget input[type=number]').value === '0.25'")
    box.focus()
    page.keyboard.press("Tab")  # through the box, nothing changed
    time.sleep(3)
    client = server.client()
    query = (
        "SELECT budget FROM runs WHERE kind = 'reroute' AND created_at > "
        f"(SELECT created_at FROM runs WHERE run_id = '{run_id}') ORDER BY created_at"
    )
    deadline = time.time() + 30
    while True:  # the log's writer commits the re-routes in the background
        rows = client.predict(query=query, api_name="/sql")["rows"]
        if len(rows) >= 2 or time.time() > deadline:
            break
        time.sleep(0.5)
    assert rows == [[0.3], [0.25]], rows  # one re-route per commit, none for the rest
    # six routing controls in one row squeezed the threshold's label into five lines
    assert page.locator("#hedge-threshold label").first.bounding_box()["height"] < 60


# -- bertviz views: drawn whichever tab shows when the content arrives (issue 16) -----------
# Inside a view's frame: its SVG, how many elements it holds and its size.
VIEW_SVG = """() => {
  const s = document.querySelector('svg');
  if (!s) return null;
  const b = s.getBoundingClientRect();
  return {n: s.querySelectorAll('*').length, w: b.width, h: b.height};
}"""


def _drawn(page, elem_id: str, min_elements: int, not_height=None, timeout: float = 60.0) -> dict:
    """Wait until the frame in #elem_id holds a drawn view: an SVG of at least
    `min_elements` elements with a non-zero size (and, for a new token's view, a height
    other than `not_height`). Returns {n, w, h}."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        handle = page.query_selector(f"#{elem_id} iframe")
        frame = handle.content_frame() if handle is not None else None
        try:
            last = frame.evaluate(VIEW_SVG) if frame is not None else None
        except Exception:  # the frame is being replaced by the new view
            last = None
        if last and last["n"] >= min_elements and last["w"] > 0 and last["h"] > 0 and last["h"] != not_height:
            return last
        time.sleep(0.25)
    raise AssertionError(f"#{elem_id} not drawn after {timeout} s: {last}")


def _show(page, view: str) -> None:
    page.get_by_role("tab", name=f"bertviz {view} view").click()


# 30 layers x 9 heads: the model view draws a thumbnail (and its lines) per head; the
# head view two columns of token labels and a line per token pair.
MODEL_MIN, HEAD_MIN = 2 * 30 * 9, 20


def test_bertviz_views_draw_whichever_tab_shows_in_every_order(page, tmp_path):
    page.fill("#prompt textarea", "The capital of France is Paris. The capital of Italy is")
    page.locator("#chat input[type=checkbox]").uncheck()
    _set_number(page, "max-new", 4)
    page.click("#generate")
    _wait_status(page, "Done", 180_000)
    page.locator("#inspector").scroll_into_view_if_needed()

    # 1. the model view tab opened right after clicking Inspect (the last token)
    page.click("#inspect")
    _show(page, "model")
    model = _drawn(page, "model-view", MODEL_MIN)
    _show(page, "head")
    head = _drawn(page, "head-view", HEAD_MIN)
    page.screenshot(path=str(tmp_path / "bertviz-1.png"))

    # 2. a new token from the head view tab; the model view opened once the head view is drawn
    page.locator("#strip span.token").nth(4).click()
    head = _drawn(page, "head-view", HEAD_MIN, not_height=head["h"])
    _show(page, "model")
    model = _drawn(page, "model-view", MODEL_MIN, not_height=model["h"])
    page.screenshot(path=str(tmp_path / "bertviz-2.png"))

    # 3. the model view already showing when another token is inspected
    page.locator("#strip span.token").nth(8).click()
    model = _drawn(page, "model-view", MODEL_MIN, not_height=model["h"])
    _show(page, "head")
    _drawn(page, "head-view", HEAD_MIN, not_height=head["h"])
    page.screenshot(path=str(tmp_path / "bertviz-3.png"))
    assert not [u for u in page.outside_requests if "cdn" in u], page.outside_requests


# -- theme, exports, shared links (issue 15) ------------------------------------------------
# A plotly view's drawn layout (what plotly made of it), and the meters' text colour.
PAPER = """(sel) => {
  const d = document.querySelector(sel + ' .js-plotly-plot');
  return d && d._fullLayout ? d._fullLayout.paper_bgcolor : null;
}"""
FONT = """(sel) => document.querySelector(sel + ' .js-plotly-plot')._fullLayout.font.color"""
METER_INK = """() => getComputedStyle(document.querySelector('#meters .meter div')).color"""
SVG = """(sel) => Plotly.toImage(document.querySelector(sel + ' .js-plotly-plot'), {format: 'svg'})"""
TOKENS = """() => Array.from(document.querySelectorAll('#strip span.token')).map(t => t.innerText)"""
LINK = """() => { const t = document.querySelector('#share-link textarea, #share-link input');
  return t ? t.value : ''; }"""
# the titles of a figure's toolbar buttons (plotly.js draws them hidden until hovered)
TOOLBAR = """(sel) => [...document.querySelectorAll(sel + ' .modebar-btn')]
  .map((b) => b.getAttribute('data-title'))"""
STATUS_HAS = """(s) => { const e = document.querySelector('#run-status');
  return !!e && e.innerText.includes(s); }"""


def _download(page, elem_id: str, to: Path) -> Path:
    with page.expect_download(timeout=60_000) as d:
        page.click(f"#{elem_id}")
    d.value.save_as(to)
    return to


def _theme(page, dark: bool) -> None:
    """Switch the page's theme as Gradio does (?__theme=dark, its settings, the system's
    preference): the `dark` class on <body>."""
    page.evaluate("(on) => document.body.classList.toggle('dark', on)", dark)


def test_the_figures_follow_the_theme_exports_open_and_a_shared_link_replays(page, browser, server, tmp_path):
    page.fill("#prompt textarea", "The capital of France is Paris.\n\nThe capital of Italy is")
    page.locator("#chat input[type=checkbox]").uncheck()
    _set_number(page, "max-new", 6)
    page.click("#generate")
    _wait_status(page, "Done", 180_000)
    tokens = page.evaluate(TOKENS)
    # every token can be seen and named: the blank line's two tokens show their newline as a glyph
    assert tokens[7:9] == ["\u21b5", "\u21b5"] and all(t.strip() for t in tokens), tokens
    names = page.locator("#strip").aria_snapshot()
    assert 'button "\u21b5"' in names and 'button ""' not in names, names
    page.wait_for_function(f"() => ({MAP_LEN})(0) === {len(tokens)}", timeout=60_000)

    # -- the theme: every figure and the meters follow it, both ways ----------------------
    light, dark = THEMES["light"], THEMES["dark"]
    for sel in ("#routing-maps", "#ternary"):
        assert page.evaluate(PAPER, sel) == light["paper"], sel
    ink = page.evaluate(METER_INK)
    _theme(page, True)
    for sel in ("#routing-maps", "#ternary"):
        page.wait_for_function(f"(s) => ({PAPER})(s) === '{dark['paper']}'", arg=sel, timeout=10_000)
    assert page.evaluate(FONT, "#routing-maps") == dark["font"]
    assert page.evaluate(METER_INK) != ink
    page.screenshot(path=str(tmp_path / "dark.png"))
    for sel in ("#routing-maps", "#ternary"):  # no button that uploads a visitor's chart to Plotly's cloud
        titles = page.evaluate(TOOLBAR, sel)
        assert "Download plot as an SVG" in titles and not any("Share chart" in t for t in titles), titles
    svg = page.evaluate(SVG, "#routing-maps")  # the toolbar's SVG, drawn in the browser
    assert svg.startswith("data:image/svg+xml") and "fill: rgb(11, 15, 25)" in unquote(svg)  # dark paper
    _theme(page, False)
    page.wait_for_function(f"() => ({PAPER})('#routing-maps') === '{light['paper']}'", timeout=10_000)
    assert page.evaluate(METER_INK) == ink

    # -- downloads: the trace's JSON reads back; the maps' page opens offline --------------
    page.wait_for_function(f"() => ({LINK})().includes('run=')", timeout=60_000)
    link = page.evaluate(LINK)
    trace = RoutingTrace.from_json(
        _download(page, "download-trace", tmp_path / "trace.json").read_text("utf-8")
    )
    assert [strip_text(t) for t in trace.tokens] == tokens
    assert trace.run_id and f"run={trace.run_id}" in link
    maps = _download(page, "download-maps", tmp_path / "maps.html")
    offline = browser.new_context()
    fetched = []

    def files_only(route):
        fetched.append(route.request.url)
        route.continue_() if route.request.url.startswith("file:") else route.abort()

    offline.route("**/*", files_only)
    alone = offline.new_page()
    alone.goto(maps.as_uri())
    alone.wait_for_selector(".js-plotly-plot .main-svg", timeout=30_000)
    assert alone.evaluate(MAP_LEN.replace("#routing-maps .metaattn-plot", ".js-plotly-plot"), 0) == len(
        tokens
    )
    assert all(u.startswith("file:") for u in fetched), fetched
    titles = alone.evaluate(TOOLBAR, "")
    assert "Download plot as a PNG" in titles and not any("Share chart" in t for t in titles), titles
    offline.close()
    with zipfile.ZipFile(_download(page, "download-rows-csv", tmp_path / "rows.zip")) as zf:
        runs_csv = [zf.read(n).decode() for n in zf.namelist() if n.startswith("runs/")]
    assert len(runs_csv) == 1 and runs_csv[0].count(trace.run_id) == 1

    # -- the shared link opens the same run in a new page; an unknown run falls back ------
    shared = page.context.new_page()
    shared.goto(link)
    shared.wait_for_function(STATUS_HAS, arg="Opened a shared link", timeout=60_000)
    assert shared.evaluate(TOKENS) == tokens
    shared.wait_for_function(f"() => ({MAP_LEN})(0) === {len(tokens)}", timeout=60_000)
    assert shared.locator("#prompt textarea").input_value() == trace.prompt
    assert shared.locator("#chat input[type=checkbox]").is_checked() is False
    shared.screenshot(path=str(tmp_path / "shared.png"))
    elsewhere = page.context.new_page()
    elsewhere.goto(
        server.url + "?run=00000000-0000-4000-8000-000000000000&budget=0.3&prompt=Bonjour&max_new=7"
    )
    elsewhere.wait_for_function(STATUS_HAS, arg="not in this server's routing log", timeout=60_000)
    assert elsewhere.locator("#prompt textarea").input_value() == "Bonjour"
    assert float(elsewhere.locator("#budget input[type=number]").input_value()) == pytest.approx(0.3)
    assert elsewhere.evaluate(TOKENS) == []
    assert not [u for u in page.outside_requests if "cdn" in u], page.outside_requests


def test_an_example_run_shows_before_the_model(browser, tmp_path):
    """A server whose model is not there (it can never load) still opens on a shipped
    example run at once: the maps, the token strip and the meters replay it with no model,
    and the status line says it is an example."""
    from metaattn_viz.app import examples

    shipped = examples.initial_trace()
    assert shipped is not None
    missing = ["--model", str(tmp_path / "no-such-model")]
    (tmp_path / "srv").mkdir()
    with AppServer(tmp_path / "srv", args=missing, wait_for_model=False) as srv:
        assert not srv.status()["model_ready"]
        context = browser.new_context(viewport={"width": 1400, "height": 1200})
        context.route(OUTSIDE, lambda route: route.abort())
        pg = context.new_page()
        pg.goto(srv.url)
        pg.wait_for_function(f"({MAP_LEN})(0) === {shipped.n_tokens}", timeout=60_000)
        assert "An example run" in pg.inner_text("#run-status")
        assert pg.inner_text("#meters").strip()
        assert not srv.status()["model_ready"]  # shown without the model
        pg.screenshot(path=str(tmp_path / "example-before-model.png"))
        context.close()


# the boxes of the maps' title and its two notes, and of the plot itself (CSS px)
MAP_TEXT_BOXES = """() => {
  const div = document.querySelector('#routing-maps .js-plotly-plot');
  const box = (el) => { const r = el.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
  return {
    plot: box(div),
    title: box(div.querySelector('.gtitle')),
    notes: [...div.querySelectorAll('.annotation-text')].map(box),
    toolbar: box(div.querySelector('.modebar')),
    colorbars: [...div.querySelectorAll('.colorbar')].map(box),
  };
}"""


def test_on_a_phone_the_maps_title_and_notes_fit_and_do_not_overlap(browser, server, tmp_path):
    """At 390 px the title and the one-line notes of the maps ran past the right edge and
    under the toolbar; they are broken into lines that fit, the title above the notes, and
    the toolbar has a strip of its own above the title, clear of the colorbars. Views side by
    side on a wide screen (the posterior plot and its table, History's two maps) are one above
    the other."""
    context = browser.new_context(viewport={"width": 390, "height": 1600})
    context.route(OUTSIDE, lambda route: route.abort())
    pg = context.new_page()
    try:
        pg.goto(server.url)
        pg.wait_for_function("() => document.querySelector('#routing-maps .gtitle')", timeout=90_000)
        pg.wait_for_function(f"() => ({MAP_LEN})(0) > 0", timeout=90_000)  # the example run
        boxes = pg.evaluate(MAP_TEXT_BOXES)
        left, top, right, bottom = boxes["plot"]
        assert right - left < 400
        for box in [boxes["title"], *boxes["notes"]]:
            assert left - 1 <= box[0] and box[2] <= right + 1, (box, boxes["plot"])
        first_note = min(boxes["notes"], key=lambda b: b[1])
        assert boxes["title"][3] <= first_note[1] + 1, boxes  # the title ends above the first note
        # the toolbar has a strip of its own: above the title, clear of the colorbars (upright
        # at the right, it covered their labels)
        assert boxes["colorbars"], boxes
        toolbar = boxes["toolbar"]
        for box in [boxes["title"], *boxes["notes"], *boxes["colorbars"]]:
            apart = box[2] <= toolbar[0] + 1 or toolbar[2] <= box[0] + 1
            assert apart or box[3] <= toolbar[1] + 1 or toolbar[3] <= box[1] + 1, (box, toolbar)
        pg.locator("#routing-maps").screenshot(path=str(tmp_path / "phone-maps.png"))

        # side-by-side views wrap one above the other, each readable (they were 124-160 px)
        def box(elem_id):
            return pg.locator(f"#{elem_id}").bounding_box()

        for upper, lower in (("ternary", "conc-table"), ("measure", "relative")):
            a, b = box(upper), box(lower)
            assert a["y"] + a["height"] <= b["y"] + 1 and min(a["width"], b["width"]) >= 300, (a, b)
        assert pg.locator("#relative label").first.bounding_box()["height"] < 60  # one word a line
        pg.get_by_role("tab", name="History").click()
        pg.locator("#compare-a").wait_for()
        a, b = box("compare-a"), box("compare-b")
        assert a["y"] + a["height"] <= b["y"] + 1 and min(a["width"], b["width"]) >= 300, (a, b)
    finally:
        context.close()


# -- keyboard and screen-reader users (a review of the page) ------------------------------
# The focused element: its tag, type, name, the id of its nearest block and its outline.
FOCUSED = """() => {
  const a = document.activeElement, s = getComputedStyle(a);
  return {tag: a.tagName, type: a.type, name: a.name, block: (a.closest('[id]') || {}).id,
          outline: s.outlineStyle, width: s.outlineWidth, color: s.outlineColor};
}"""
# The theme's accent colour as the page computes it (Gradio's --color-accent, light or dark).
ACCENT = """() => {
  const d = document.createElement('div');
  d.style.color = 'var(--color-accent)';
  document.querySelector('.gradio-container').appendChild(d);
  const c = getComputedStyle(d).color;
  d.remove();
  return c;
}"""
# Gradio's red "Error" badges on components (a failed event's outputs), toasts left out.
ERROR_BADGES = """() => [...document.querySelectorAll('.error')]
  .filter((e) => e.offsetParent && !e.closest('.toast-wrap') && e.innerText.trim() === 'Error')
  .map((e) => (e.closest('[id]') || {}).id)"""
LIVE_REGION = """() => {
  const r = document.querySelector('#run-status [role=status]');
  return r ? {live: r.getAttribute('aria-live'), text: r.innerText,
              timer: !!r.querySelector('[data-testid=status-tracker]')} : null;
}"""
RADIO_NAMES = """(sel) => [...document.querySelectorAll(sel + ' input[type=radio]')].map((r) => r.name)"""


def _tab_to(page, test: str, presses: int = 6) -> dict:
    """Press Tab until the focused element passes `test` (a JS predicate on FOCUSED's dict)."""
    for _ in range(presses):
        page.keyboard.press("Tab")
        focused = page.evaluate(FOCUSED)
        if page.evaluate(f"(f) => ({test})(f)", focused):
            return focused
    raise AssertionError(f"Tab never reached {test}: {focused}")


def test_keyboard_and_screen_reader_users_see_focus_hear_the_status_and_know_each_control(page, tmp_path):
    """Sliders and radio buttons showed no focus (Gradio 6's CSS); the status line was never
    announced; the plots had no name; the seven reset buttons had one name; each radio button
    was a group of its own (arrow keys did nothing, each a Tab stop); a window typed between
    the slider's steps was routed as typed while the handle showed another value."""
    # -- a focus ring in the accent colour, light and dark ----------------------------------
    page.locator("#budget input[type=number]").focus()
    ring = _tab_to(page, "(f) => f.type === 'range'")
    accent = page.evaluate(ACCENT)
    assert (ring["outline"], ring["width"], ring["color"]) == ("solid", "2px", accent), ring
    page.locator("#budget").screenshot(path=str(tmp_path / "focus-slider.png"))
    ring = _tab_to(page, "(f) => f.type === 'radio'")
    assert ring["block"] == "controller" and (ring["outline"], ring["color"]) == ("solid", accent), ring
    _theme(page, True)
    dark = page.evaluate(FOCUSED)
    assert (dark["outline"], dark["color"]) == ("solid", page.evaluate(ACCENT)), dark
    page.locator("#controller").screenshot(path=str(tmp_path / "focus-radio-dark.png"))
    _theme(page, False)

    # -- each radio group is one group: one Tab stop, the arrow keys move the choice ----------
    for sel in ("#controller", "#cost-model", "#hedge-measure"):
        names = page.evaluate(RADIO_NAMES, sel)
        assert len(names) >= 2 and len(set(names)) == 1, (sel, names)
    page.locator("#controller input[type=radio]:checked").focus()
    page.keyboard.press("ArrowRight")
    assert page.evaluate("() => document.activeElement.value") == "priorfree"
    assert page.locator("#controller input[value=priorfree]").is_checked()
    _wait_status(page, "Re-routed", 120_000)  # a change, as a click is: the run re-routed
    page.keyboard.press("Shift+Tab")  # out of the group, not to its other button
    assert page.evaluate(FOCUSED)["block"] != "controller"

    # -- every reset button names its slider --------------------------------------------------
    resets = page.evaluate(
        "() => [...document.querySelectorAll('button.reset-button')].map((b) => b.getAttribute('aria-label'))"
    )
    assert len(resets) >= 6 and len(set(resets)) == len(resets), resets
    for name in (
        "Max new tokens",
        "Temperature",
        "Top-p",
        "Compute budget",
        "Hedge threshold",
        "Local window",
    ):
        assert f"Reset {name} to its default value" in resets, resets

    # -- every plot is an image named by its title --------------------------------------------
    plots = page.evaluate(
        "() => [...document.querySelectorAll('.metaattn-plot')]"
        ".map((d) => [d.getAttribute('role'), d.getAttribute('aria-label')])"
    )
    assert plots and all(role == "img" and label for role, label in plots), plots
    assert ["img", "Routing: expert per decision (top) and its uncertainty (bottom)"] in plots, plots

    # -- a window between the slider's steps: routed, and shown, at the nearest step ----------
    _set_number(page, "window", 13)
    page.wait_for_function("() => document.querySelector('#window input[type=number]').value === '16'")
    assert page.locator("#window input[type=range]").input_value() == "16"

    # -- the status line is a polite live region, without Gradio's timer, after a run too -----
    region = page.evaluate(LIVE_REGION)
    assert region and region["live"] == "polite" and not region["timer"], region
    page.fill("#prompt textarea", "A status line to hear.")
    page.locator("#chat input[type=checkbox]").uncheck()
    _set_number(page, "max-new", 2)
    page.click("#generate")
    _wait_status(page, "Done", 180_000)
    region = page.evaluate(LIVE_REGION)
    assert region and region["live"] == "polite" and region["text"].startswith("Done"), region
    assert len(set(page.evaluate(RADIO_NAMES, "#controller"))) == 1  # still one group


def test_a_refused_generate_says_so_in_a_toast_and_marks_no_view(page, tmp_path):
    """A prompt of spaces put red "Error" badges on the meters, the status line, the maps, the
    strip and the inspector's position, over the previous run's views; a seed of -1 got
    Gradio's own sentence."""
    shown = _status(page)
    page.fill("#prompt textarea", "   ")
    page.click("#generate")
    _toast(page, "The prompt is empty")
    time.sleep(3)  # the generation's event would have failed by now
    assert page.evaluate(ERROR_BADGES) == []
    assert _status(page) == shown
    page.screenshot(path=str(tmp_path / "refused-generate.png"))
    _dismiss_toasts(page)
    page.fill("#prompt textarea", "A seed below zero.")
    page.get_by_label("Seed").fill("-1")
    page.click("#generate")
    _toast(page, "Seed must be a whole number between 0 and 2,147,483,647, got -1.")
    time.sleep(2)
    assert page.evaluate(ERROR_BADGES) == [] and _status(page) == shown


COMPARE_ROWS = "#compare-table [role=row]:has([role=gridcell])"


def test_a_run_with_no_budget_replays_as_such_and_a_failed_compare_leaves_no_old_one(page, server, tmp_path):
    """Replaying a run routed with no budget set the slider to 1 (Generate then made a dense
    run of a run that spent 0.29), said "budget None" and put budget=1 in its link; Run B set
    to an unknown id after a comparison left the earlier note (naming the old run B), both
    maps and the table standing under the "Error" badge."""
    client = server.client()
    ask = dict(api_name="/generate", max_new_tokens=2, chat=False, quality=False)
    free = client.predict(prompt="The capital of France is", budget=None, **ask)
    kept = client.predict(prompt="The capital of Italy is", budget=0.4, **ask)
    assert free["budget"] is None and kept["budget"] == 0.4
    page.get_by_role("tab", name="History").click()
    page.fill("#run-a textarea, #run-a input", free["run_id"])
    page.fill("#run-b textarea, #run-b input", kept["run_id"])
    page.click("#compare")
    page.get_by_text("the same expert in").first.wait_for(timeout=60_000)
    note = page.inner_text("#compare-note")
    assert "no budget" in note and "None" not in note and kept["run_id"] in note
    assert page.evaluate(PLOT_LEN, "#compare-a") > 0 and page.locator(COMPARE_ROWS).count() > 0
    # run B unknown: the toast says so, and nothing of the earlier comparison stays
    page.fill("#run-b textarea, #run-b input", "no-such-run")
    page.click("#compare")
    _toast(page, "There is no run")
    # (the note's block then holds only the failed event's "Error" badge)
    page.wait_for_function(
        "() => !document.querySelector('#compare-note').innerText.includes('the same expert')", timeout=30_000
    )
    assert "Run A" not in page.inner_text("#compare-note") and page.locator(COMPARE_ROWS).count() == 0
    assert page.evaluate(PLOT_LEN, "#compare-a") <= 0 and page.evaluate(PLOT_LEN, "#compare-b") <= 0
    page.screenshot(path=str(tmp_path / "failed-compare.png"), full_page=True)
    _dismiss_toasts(page)
    # replay the run with no budget: a warning names the budget the slider stands in with
    page.click("#replay")
    _toast(page, "was routed with no budget")
    page.wait_for_function(STATUS_HAS, arg="Replayed run", timeout=60_000)
    assert "no budget" in _status(page) and "None" not in _status(page)
    budget = float(page.locator("#budget input[type=number]").input_value())
    assert budget == pytest.approx(min(max(free["realized_cost"], 0.15), 1.0), abs=0.0051)
    warned = page.locator(".toast-body", has_text="was routed with no budget").first.inner_text()
    assert f"set to {budget:g}" in warned and f"use budget {budget:g}" in warned
    page.wait_for_function(f"() => ({LINK})().includes('run={free['run_id']}')", timeout=60_000)
    assert "budget=" not in page.evaluate(LINK)
    page.screenshot(path=str(tmp_path / "no-budget-replay.png"), full_page=True)
