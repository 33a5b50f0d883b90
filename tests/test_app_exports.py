"""The page's exports, shareable links, defaults, About tab and `serve --mcp`, without a
browser: a tiny random routed model and a temporary routing log (tests/test_ui_engine.py's
set-up). The trace's JSON reads back into an equal trace; a figure's page holds plotly.js
itself (it opens offline); a run's rows are that run's only and only for a visitor who may
read it; a link's settings (the run's model among them) survive the round trip and bad
values are left out with a sentence; a replay or a link puts the run's model on the
dropdown where the server offers it, and says so where it does not; the page and /generate
share one set of defaults; a generation that ends at once says why."""

from __future__ import annotations

import asyncio
import inspect
import io
import json
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from helpers import routed_tiny

from metaattn_viz.app import about, display, share
from metaattn_viz.app.deployment import Deployment
from metaattn_viz.app.engine import Engine
from metaattn_viz.app.errors import AppError
from metaattn_viz.app.exports import PREVIOUS_MAX, PREVIOUS_S, Downloads
from metaattn_viz.app.models import model_id
from metaattn_viz.app.plots.style import THEMES, base_layout
from metaattn_viz.app.requests import GENERATION, GenerateRequest, parse_request, parse_settings
from metaattn_viz.core.trace import RoutingTrace

PROMPT = "The quick brown fox jumps over the lazy dog. "


@pytest.fixture()
def routed():
    return routed_tiny(spread=3.0)


@pytest.fixture()
def engine(routed, tmp_path):
    e = Engine(routed=routed, db=str(tmp_path / "log.duckdb"))
    yield e
    e.close()


def _generate(engine, prompt=PROMPT, max_new=4, owner=None, **kw):
    req = parse_request(prompt, parse_settings(0.4), max_new_tokens=max_new, quality=False, **kw)
    return engine.generations.generate(req, owner=owner)


def _api(demo, name: str):
    """The function behind a named endpoint of the page."""
    return next(d.fn for d in demo.fns.values() if d.api_name == name)


def _rows(archive, table: str) -> int:
    """Rows of `table` in an export zip (Parquet or CSV files under table/day=...)."""
    n = 0
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            if not name.startswith(table + "/"):
                continue
            data = zf.read(name)
            if name.endswith(".parquet"):
                n += pq.read_table(io.BytesIO(data)).num_rows
            else:
                n += data.decode().count("\n") - 1
    return n


# -- defaults and the empty generation -----------------------------------------------------
def test_the_page_and_generate_share_one_set_of_defaults(engine, tmp_path):
    from metaattn_viz.app.ui import build_app

    demo = build_app(engine=engine, downloads=Downloads(tmp_path / "dl"))
    params = inspect.signature(_api(demo, "generate")).parameters
    for name in ("max_new_tokens", "controller", "temperature", "top_p", "seed", "chat", "quality"):
        assert params[name].default == getattr(GENERATION, name), name
    assert GENERATION.chat is True  # the instruct model answers a plain prompt with end-of-text
    # the page's controls start there too
    values = {
        c.elem_id: getattr(c, "value", None) for c in demo.blocks.values() if getattr(c, "elem_id", None)
    }
    assert values["chat"] is GENERATION.chat and values["max-new"] == GENERATION.max_new_tokens
    assert values["controller"] == GENERATION.controller
    req = GenerateRequest("hi", parse_settings())
    assert (req.chat, req.max_new_tokens, req.quality) == (GENERATION.chat, GENERATION.max_new_tokens, True)


def test_a_generation_that_ends_at_once_says_why(routed, engine, tmp_path):
    first = _generate(engine, max_new=1)
    assert first.n_tokens == first.n_prompt_tokens + 1
    # make the model's greedy first token its end-of-text: the answer ends at once
    routed.model.generation_config.eos_token_id = int(first.token_ids[-1])
    job = engine.generations.start(
        parse_request(PROMPT, parse_settings(0.4), max_new_tokens=5, quality=False, chat=False)
    )
    trace = job.result(60)
    assert trace.n_tokens == trace.n_prompt_tokens
    note = display.empty_generation_note(trace, 5, chat=False)
    assert note and "ended its answer at once (end-of-text)" in note and "chat template" in note
    assert "another prompt" in display.empty_generation_note(trace, 5, chat=True)
    assert note in display.run_status(job, trace)
    # nothing asked for, or tokens generated: nothing to explain
    assert display.empty_generation_note(trace, 0, chat=False) is None
    assert display.empty_generation_note(first, 1, chat=False) is None
    # the API's answer says it in its notes
    from metaattn_viz.app.ui import build_app

    demo = build_app(engine=engine, downloads=Downloads(tmp_path / "dl"))
    out = asyncio.run(_api(demo, "generate")(prompt=PROMPT, max_new_tokens=5, chat=False, quality=False))
    assert out["tokens"] == trace.tokens and note in out["notes"]


def test_a_cancelled_api_generate_ends_its_generation(engine, tmp_path, monkeypatch):
    """A client that cancels /generate (or drops the connection) ends the generation with
    it: Gradio cancels the call, and the job stops after its current token, logged stopped."""
    from metaattn_viz.app.generation import GenerationJob
    from metaattn_viz.app.ui import build_app

    record = GenerationJob._record

    def slowly(self, trace):  # 256 tokens would take over 10 s: the cancel comes first
        record(self, trace)
        time.sleep(0.05)

    monkeypatch.setattr(GenerationJob, "_record", slowly)
    demo = build_app(engine=engine, downloads=Downloads(tmp_path / "dl"))
    generate = _api(demo, "generate")

    async def cancel_after_the_first_tokens():
        call = asyncio.ensure_future(generate(prompt=PROMPT, max_new_tokens=256, chat=False, quality=True))
        while not any(j.run_id for j in engine.generations._jobs.values()):
            await asyncio.sleep(0.01)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(cancel_after_the_first_tokens())
    (job,) = engine.generations._jobs.values()
    job.result(timeout=10)
    assert job.status == "stopped"
    run = engine.history.run_log.get_run(job.run_id)
    assert run["status"] == "stopped" and run["n_tokens"] < job.request.max_new_tokens
    assert job.result().kl_to_dense is None  # no quality pass for a call nobody waits on


def test_a_server_going_away_overrides_an_earlier_stop(engine, monkeypatch):
    """A job stopped by its caller, then by the closing server before it ended, is logged
    interrupted (the server's word wins), without a quality pass."""
    from metaattn_viz.app.generation import GenerationJob

    record = GenerationJob._record

    def slowly(self, trace):
        record(self, trace)
        time.sleep(0.05)

    monkeypatch.setattr(GenerationJob, "_record", slowly)
    job = engine.generations.start(
        parse_request(PROMPT, parse_settings(0.4), max_new_tokens=256, quality=True, chat=False)
    )
    while job.run_id is None:
        time.sleep(0.01)
    job.stop()
    engine.generations.stop_all()
    trace = job.result(timeout=10)
    assert job.status == "interrupted" and trace.kl_to_dense is None
    assert engine.history.run_log.get_run(job.run_id)["status"] == "interrupted"


# -- exports -------------------------------------------------------------------------------
def test_the_trace_json_reads_back_into_an_equal_trace(engine, tmp_path):
    trace = _generate(engine)
    trace.kl_to_dense = engine.analysis.quality(trace)
    path = Downloads(tmp_path).trace(trace, "sess")
    assert path.name == f"metaattn-trace-{trace.run_id[:8]}.json"
    back = RoutingTrace.from_json(json.loads(path.read_text(encoding="utf-8")))
    assert back.tokens == trace.tokens and back.token_ids == trace.token_ids
    assert back.settings == trace.settings and back.run_id == trace.run_id
    for name in ("concentration", "routes", "hedged", "weights", "cost", "lam", "kl_to_dense"):
        np.testing.assert_array_equal(getattr(back, name), getattr(trace, name), err_msg=name)


def test_a_figures_page_holds_plotly_js_and_the_figure(engine, tmp_path):
    from metaattn_viz.app import plots
    from metaattn_viz.app.plotly_html import PLOTLY_JS

    trace = _generate(engine, prompt="</script><script>alert(1)</script> tokens")
    fig = plots.routing_maps(trace, "vacuity")
    page = Downloads(tmp_path).figure(fig, "sess", "maps", "abc").read_text(encoding="utf-8")
    js = PLOTLY_JS.read_text(encoding="utf-8")
    assert js[:2000] in page and js[-2000:] in page  # the app's plotly.js, inlined
    assert "<script src=" not in page  # nothing to fetch: it opens offline
    assert "Plotly.newPlot" in page and '"type":"heatmap"' in page and "vacuity" in page
    assert "</script><script>alert" not in page  # token text cannot close the script
    assert '"filename": "metaattn-maps-abc"' in page or '"filename":"metaattn-maps-abc"' in page


def test_a_runs_rows_are_that_run_only_and_only_for_who_may_read_it(routed, tmp_path):
    public = Deployment(public=True)
    e = Engine(routed=routed, db=str(tmp_path / "log.duckdb"), deployment=public)
    dl = Downloads(tmp_path / "dl")
    try:
        a = _generate(e, "Alpha beta.", owner=public.owner("sess-a"))
        _generate(e, "Gamma delta epsilon.", owner=public.owner("sess-a"))
        b = _generate(e, "Another visitor.", owner=public.owner("sess-b"))
        reader_a, reader_b = public.reader("sess-a"), public.reader("sess-b")
        for fmt in ("parquet", "csv"):
            archive = dl.rows(e.history, a.run_id, fmt, reader_a, "sess-a")
            assert archive.name == f"metaattn-run-{a.run_id[:8]}-{fmt}.zip"
            assert _rows(archive, "runs") == 1
            assert _rows(archive, "tokens") == a.n_tokens
            assert _rows(archive, "routes") == a.n_layers * a.n_tokens
        with pytest.raises(AppError, match="no run"):  # another visitor's run: as if missing
            dl.rows(e.history, a.run_id, "csv", reader_b, "sess-b")
        with pytest.raises(AppError, match="no run"):
            dl.rows(e.history, "not-a-run", "csv", reader_a, "sess-a")
        with pytest.raises(AppError, match="Format must be one of"):
            dl.rows(e.history, a.run_id, "xlsx", reader_a, "sess-a")
        assert (
            _rows(dl.rows(e.history, b.run_id, "csv", reader_b, "sess-b"), "routes")
            == b.n_layers * b.n_tokens
        )
    finally:
        e.close()


def test_the_export_endpoints_scope_a_run_and_draw_a_figure(engine, tmp_path):
    from metaattn_viz.app.api import trace_json
    from metaattn_viz.app.ui import build_app

    demo = build_app(engine=engine, downloads=Downloads(tmp_path / "dl"))
    a = _generate(engine, "One run.")
    _generate(engine, "Another run.")
    one = _api(demo, "export")(fmt="csv", run_id=a.run_id)
    assert _rows(one.path, "runs") == 1 and _rows(one.path, "tokens") == a.n_tokens
    assert _rows(_api(demo, "export")(fmt="csv").path, "runs") == 2  # the whole log
    page = _api(demo, "figure")(trace=trace_json(a), measure="epistemic")
    assert page.orig_name.endswith(".html") and "epistemic" in open(page.path, encoding="utf-8").read()
    import gradio as gr

    with pytest.raises(gr.Error, match="Expected a trace"):
        _api(demo, "figure")(trace={"tokens": []})
    with pytest.raises(gr.Error, match="Uncertainty measure must be one of"):
        _api(demo, "figure")(trace=trace_json(a), measure="nope")


def _age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_downloads_replace_a_kinds_earlier_files_once_old_and_forget_visitors_gone(tmp_path):
    dl = Downloads(tmp_path, keep_s=60)
    first = dl.write("sess-a", "maps", "a.html", "1")
    second = dl.write("sess-a", "maps", "b.html", "2")
    # a parallel request's file, just made, is left alone (its link still works)
    assert first.read_text() == "1" and second.read_text() == "2"
    _age(first.parent, PREVIOUS_S + 1)
    third = dl.write("sess-a", "maps", "c.html", "3")
    assert not first.exists() and second.exists() and third.exists()
    other_kind = dl.write("sess-a", "trace", "t.json", "3")
    made = [dl.write("sess-a", "maps", f"{i}.html", str(i)) for i in range(PREVIOUS_MAX + 3)]
    kept = list(made[0].parent.parent.iterdir())
    assert len(kept) == PREVIOUS_MAX + 1 and made[-1].exists()  # the newest, and no more
    assert "sess-a" not in str(second)  # a digest, not the live session id
    gone = dl.write("sess-b", "maps", "c.html", "4")
    visitor_b = gone.parent.parent.parent
    _age(visitor_b, 3600)
    dl.write("sess-a", "maps", "d.html", "5")
    assert not visitor_b.exists() and other_kind.exists()


@pytest.mark.parametrize("kind", ["../x", "rows-/../../x", "a/b", "", ".", "Maps"])
def test_a_kind_of_download_is_a_plain_name(tmp_path, kind):
    with pytest.raises(ValueError, match="plain name"):
        Downloads(tmp_path / "dl").slot("sess", kind)
    assert not (tmp_path / "x").exists()


def test_an_export_format_that_is_a_path_touches_no_folder(engine, tmp_path):
    """/export with a run id used to make a folder named after the format before checking
    it: "/../../victim" made a folder in any directory and emptied its sub-folders."""
    import gradio as gr

    from metaattn_viz.app.ui import build_app

    victim = tmp_path / "victim"
    (victim / "keep" / "deep").mkdir(parents=True)
    (victim / "keep" / "deep" / "f.txt").write_text("a")
    dl = Downloads(tmp_path / "dl")
    demo = build_app(engine=engine, downloads=dl)
    hostile = "/.." * 12 + str(victim)
    for _ in range(2):
        with pytest.raises(gr.Error, match="Format must be one of"):
            _api(demo, "export")(fmt=hostile, run_id="x")
        with pytest.raises(gr.Error, match="Format must be one of"):
            _api(demo, "export")(fmt=hostile)
    assert sorted(p.name for p in victim.iterdir()) == ["keep"]
    assert (victim / "keep" / "deep" / "f.txt").read_text() == "a"


def test_parallel_exports_of_one_visitor_all_arrive(engine, tmp_path):
    """One visitor's exports in parallel threads (a script exporting several runs): none
    removes another's folder while it is written or fetched."""
    from concurrent.futures import ThreadPoolExecutor

    from metaattn_viz.app.ui import build_app

    demo = build_app(engine=engine, downloads=Downloads(tmp_path / "dl"))
    a = _generate(engine, "One run.")
    export = _api(demo, "export")
    with ThreadPoolExecutor(4) as pool:
        files = list(
            pool.map(lambda fmt: export(fmt=fmt, run_id=a.run_id), ["csv", "csv", "csv", "csv", "parquet"])
        )
    for f in files:
        assert _rows(f.path, "runs") == 1


# -- shareable links -----------------------------------------------------------------------
def test_a_link_carries_the_run_its_settings_and_prompt(engine):
    trace = _generate(engine, "Share me, please.")
    values = {"max_new": 4, "temperature": 0.0, "top_p": 0.9, "seed": 7, "chat": False, "measure": "vacuity"}
    query = share.share_query(trace, values)
    link = share.share_link("http://127.0.0.1:7860/?run=old&budget=0.3#frag", query)
    assert link.startswith("http://127.0.0.1:7860/?run=" + trace.run_id)
    from urllib.parse import parse_qsl, urlsplit

    back = share.parse_shared(dict(parse_qsl(urlsplit(link).query)))
    assert back.run_id == trace.run_id and back.prompt == "Share me, please." and back.notes == []
    s = trace.settings
    assert back.values == {
        "model": trace.model,
        "budget": s.budget,
        "controller": trace.controller,
        "scope": s.scope,
        "hedge": s.hedge_policy,
        "threshold": s.hedge_threshold,
        "hedge_measure": s.hedge_measure,
        "window": s.window,
        "cost_model": s.cost_model,
        # how the run was generated (its trace's record), not the page's controls now
        "max_new": 4,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
        "chat": False,  # asked for, but the tiny tokenizer has no chat template: not applied
        "measure": "vacuity",
    }
    assert trace.generation == {
        "max_new_tokens": 4,
        "temperature": 0.0,
        "top_p": 1.0,
        "seed": 0,
        "chat": False,
    }
    # a run whose generation the log did not keep (before schema 6): the controls stand in
    trace.generation = None
    again = share.parse_shared(dict(parse_qsl(urlsplit(share.share_query(trace, values)).query)))
    assert {k: again.values[k] for k in ("max_new", "top_p", "seed", "chat")} == {
        "max_new": 4,
        "top_p": 0.9,
        "seed": 7,
        "chat": False,
    }
    # a long prompt stays out of the link (the run still replays)
    trace.prompt = "x" * (share.MAX_LINK_PROMPT + 1)
    assert "prompt=" not in share.share_query(trace, values)
    assert share.share_link(None, "?run=1") == "?run=1"


def test_a_link_with_bad_values_leaves_them_out_and_says_so():
    assert share.parse_shared({}) is None
    assert share.parse_shared({"__theme": "dark"}) is None  # an ordinary visit
    got = share.parse_shared(
        {"run": "x'; DROP TABLE runs", "budget": "5", "window": "64", "chat": "maybe", "controller": "oracle"}
    )
    assert got.run_id is None and got.values == {"window": 64}
    text = " ".join(got.notes)
    for words in (
        "run id",
        "budget was left out: Budget must be between 0.15 and 1",
        "chat template",
        "controller",
    ):
        assert words in text, words
    cleaned = share.parse_shared({"prompt": "hi\x07"})
    assert cleaned.prompt == "hi" and cleaned.notes == ["Removed 1 control character from the prompt."]
    assert "not in this server's routing log" in share.fallback_note("abc")


def _trace_stub(model):
    """What share_query reads of a trace, made by `model`."""
    from types import SimpleNamespace

    return SimpleNamespace(
        settings=parse_settings(0.4),
        run_id="abc",
        generation=None,
        controller="bayes",
        prompt="hi",
        model=model,
    )


def test_a_link_carries_the_runs_model_and_leaves_out_a_bad_one():
    """A link names the model that made the run (a link without it leaves the page's model
    as it is); a name that is no model's name is left out with a note, quoted short."""
    from urllib.parse import parse_qsl

    from metaattn_viz.app.ui_errors import shown

    def back(query: str):
        return share.parse_shared(dict(parse_qsl(query.lstrip("?"))))

    query = share.share_query(_trace_stub("SmolLM2-135M-Instruct"), {"model": "tiny-llama"})
    assert query.startswith("?run=abc&model=SmolLM2-135M-Instruct&budget=")  # the run's, not the control's
    assert back(query).values["model"] == "SmolLM2-135M-Instruct" and back(query).notes == []
    # a trace with no model (an old record): the dropdown's value stands in
    assert back(share.share_query(_trace_stub(""), {"model": "tiny-llama"})).values["model"] == "tiny-llama"
    # links made before links carried the model: as before
    old = share.parse_shared({"run": "abc", "budget": "0.3"})
    assert "model" not in old.values and old.notes == []
    assert share.parse_shared({"model": "tiny-llama"}).values == {"model": "tiny-llama"}
    for hostile in ("<img src=x onerror=alert(1)>", "m" * (share.MODEL_CHARS + 1), "a\u202eb", "a\nb"):
        got = share.parse_shared({"model": hostile, "window": "64"})
        assert got.values == {"window": 64}, hostile
        (note,) = got.notes
        assert note.startswith("The link's model was left out: Model must be a model's name"), note
        assert "<" not in shown(note) and len(note) < 300


def test_a_replay_or_a_link_puts_the_runs_model_on_the_dropdown_where_offered(engine):
    import gradio as gr

    from metaattn_viz.app.models import missing_model_note, offered_model
    from metaattn_viz.app.tab_live import LiveTab

    choices = [
        ("tiny-llama (untrained controllers)", "tiny-llama"),
        ("SmolLM2-135M-Instruct", "smollm2-135m-instruct"),
    ]
    assert offered_model("SmolLM2-135M-Instruct", choices) == "smollm2-135m-instruct"  # a name
    assert offered_model("tiny-llama", choices) == "tiny-llama"  # an id
    assert offered_model("Other-Model", choices) is None and offered_model(None, choices) is None
    assert missing_model_note("X", choices[:1]).endswith("Generate uses tiny-llama (untrained controllers).")
    assert missing_model_note("X", choices).endswith("Generate uses the model picked in the Model list.")
    with gr.Blocks():
        live = LiveTab(gr.State(None), [], choices)
    assert live.model in live.run_outputs and live.link_controls["model"] is live.model
    # a link: an offered model lands on the dropdown; another is left out, saying what Generate uses
    assert live.show_linked({"model": "SmolLM2-135M-Instruct"}) == {live.model: "smollm2-135m-instruct"}
    notes: list[str] = []
    assert live.show_linked({"model": "Other-Model", "budget": 0.3}, notes) == {live.routing.budget: 0.3}
    assert notes == [
        "This server does not offer the model 'Other-Model' that made the run; "
        "Generate uses tiny-llama (untrained controllers)."
    ]
    # a replay: the run's model, where offered
    trace = _generate(engine, "Replay me.")
    trace.model = "SmolLM2-135M-Instruct"
    assert live.show_run(trace, "total")[live.model] == "smollm2-135m-instruct"
    trace.model = "Gone-Model"
    with pytest.warns(
        UserWarning,
        match="does not offer the model 'Gone-Model' that made the run; Generate uses the model picked",
    ):
        out = live.show_run(trace, "total")
    assert live.model not in out and out[live.controller] == trace.controller  # the rest is restored


def test_historys_replay_and_a_shared_link_set_the_model_dropdown(engine, tmp_path):
    from types import SimpleNamespace

    from metaattn_viz.app.ui import build_app

    demo = build_app(engine=engine, downloads=Downloads(tmp_path / "dl"))
    (model,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model"]
    assert len(model.choices) > 1  # the tiny model and the shipped one: the dropdown shows
    trace = _generate(engine, "Replay me.")
    engine.history.flush()
    (replay,) = [d for d in demo.fns.values() if d.name == "replay"]
    assert model in replay.outputs
    out = replay.fn(trace.run_id, "total", None)
    assert out[model] == model_id(trace.model) == "tiny-llama"
    # a link whose run is not in this log: its model still lands on the dropdown
    (open_link,) = [d.fn for d in demo.fns.values() if d.name == "open_link"]
    link = SimpleNamespace(
        query_params={"run": "elsewhere", "model": "SmolLM2-135M-Instruct"}, session_hash=None
    )
    assert open_link(link)[model] == "smollm2-135m-instruct"


def test_a_links_value_is_quoted_back_short_and_shown_as_text():
    """A crafted link's value reaches a toast, which renders HTML: it is quoted back cut
    short, and every toast is escaped (review 55: a link drew a heading and a link to
    another site in the warning)."""
    from metaattn_viz.app.errors import QUOTED_CHARS
    from metaattn_viz.app.ui_errors import shown

    evil = "x'.</p><h1>Session expired</h1><a href='https://evil.example/login'>Sign in again</a><p>"
    got = share.parse_shared({"controller": evil, "budget": "9" * 5000, "chat": "<b>" * 100})
    assert len(got.notes) == 3
    for note in got.notes:
        assert len(note) < 200 + QUOTED_CHARS, note
        assert "\u2026" in note  # cut, and said to be
    page = [shown(n) for n in got.notes]
    assert not any("<" in n or ">" in n for n in page), page
    (controller,) = [n for n in page if "controller" in n]
    assert "&lt;/p&gt;&lt;h1&gt;" in controller and "'" in controller  # quotes stay as they are


# -- theme, About, MCP ---------------------------------------------------------------------
def test_figures_are_built_light_and_the_page_knows_both_palettes():
    from metaattn_viz.app.plotly_html import plotly_view
    from metaattn_viz.app.theme import THEME_JS

    layout = base_layout("t", 100)
    assert (layout["paper_bgcolor"], layout["plot_bgcolor"]) == (
        THEMES["light"]["paper"],
        THEMES["light"]["plot"],
    )
    assert json.dumps(THEMES) in THEME_JS and THEMES["dark"]["paper"] != THEMES["light"]["paper"]
    import plotly.graph_objects as go

    view = plotly_view(go.Figure(), "x", 100)
    assert 'const FILENAME = "metaattn-x"' in view.js_on_load and "metaattnThemed" in view.js_on_load


def test_the_about_tab_cites_the_paper_and_the_software_without_inventing_authors():
    from metaattn_viz import __version__

    text = about.about_markdown()
    assert "https://arxiv.org/abs/2605.28384" in text and about.PAPER_TITLE in text
    paper = about.paper_bibtex()
    assert "eprint        = {2605.28384}" in paper and "archivePrefix = {arXiv}" in paper
    assert "author        = {Ferrari, A.}" in paper  # as docs/method.md gives it, nothing more
    software = about.software_bibtex()
    assert "author" not in software and f"version      = {{{__version__}}}" in software
    assert paper.count("{") == paper.count("}") and software.count("{") == software.count("}")


def test_serve_mcp_without_gradios_mcp_extra_is_refused_in_words(capsys):
    from metaattn_viz.app import server
    from metaattn_viz.cli import main

    if server.mcp_available():
        pytest.skip("Gradio's MCP extra is installed here")
    with pytest.raises(RuntimeError, match=r'pip install "gradio\[mcp\]"'):
        server.serve(port=1, mcp=True)  # refused before anything starts
    assert main(["serve", "--mcp", "--port", "1"]) == 2
    assert "needs Gradio's MCP support" in capsys.readouterr().err
    server.check_mcp(False)  # no --mcp: nothing to check


def test_serve_mcp_is_refused_where_visitors_runs_are_kept_apart(monkeypatch, capsys):
    """Gradio's MCP server calls the app through one shared client (one session): on a
    public server or a Space every MCP caller would read the others' runs. Refused there,
    installed extra or not; a shared log (every run visible on purpose) may offer it."""
    from metaattn_viz.app import server
    from metaattn_viz.cli import main

    monkeypatch.setattr(server, "mcp_available", lambda: True)
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("METAATTN_SHARED_LOG", raising=False)
    assert server.mcp_problem(True) is None  # local: one person's runs
    assert server.mcp_problem(True, public=True) == server.MCP_SCOPED
    with pytest.raises(RuntimeError, match="one shared client"):
        server.serve(port=1, public=True, mcp=True)  # refused before anything starts
    assert main(["serve", "--mcp", "--public", "--port", "1"]) == 2
    assert "every MCP caller would be the same visitor" in capsys.readouterr().err
    monkeypatch.setenv("SPACE_ID", "someone/space")
    assert server.mcp_problem(True) == server.MCP_SCOPED
    monkeypatch.setenv("METAATTN_SHARED_LOG", "1")
    assert server.mcp_problem(True) is None


@pytest.mark.parametrize("empty", [None, "", "  "])
def test_an_empty_number_box_is_said_as_empty(empty):
    """A Seed (or any number) box left empty: a sentence, not "got None"."""
    with pytest.raises(AppError, match=r"^Seed is empty: give a number between 0 and 2,147,483,647\.$"):
        parse_request(PROMPT, parse_settings(0.4), max_new_tokens=5, quality=False, chat=False, seed=empty)
    with pytest.raises(AppError, match=r"^Max new tokens is empty: give a number between 0 and "):
        parse_request(PROMPT, parse_settings(0.4), max_new_tokens=empty, quality=False, chat=False)


def test_a_links_values_land_on_the_controls_within_their_ranges():
    import gradio as gr

    from metaattn_viz.app.tab_live import WINDOW_MAX, LiveTab

    with gr.Blocks():
        live = LiveTab(gr.State(None), [])
    assert set(live.link_controls) == set(share.PARAMETERS)  # every parameter has its control
    shown = live.show_linked(
        {"window": 1000, "top_p": 0.01, "budget": 0.3, "chat": False, "measure": "vacuity"}
    )
    assert shown[live.routing.window] == WINDOW_MAX and shown[live.top_p] == live.top_p.minimum
    assert (
        shown[live.routing.budget] == 0.3 and shown[live.chat] is False and shown[live.measure] == "vacuity"
    )
    # a value moved into range is said: the next Generate uses the control's value, not the link's
    notes: list[str] = []
    live.show_linked({"window": 4, "top_p": 0.5, "budget": 0.3}, notes)
    lowest = live.routing.window.minimum
    assert notes == [
        f"Local window 4 is outside the page's range ({lowest:g}-{WINDOW_MAX:g}): set to {lowest:g}."
    ]


# -- exports on a full disk, and runs the log cannot replay ----------------------------------
def _disk_full_while_zipping(monkeypatch):
    """The zip's second file fails as on a full disk (after the first was written)."""
    import errno

    write, calls = zipfile.ZipFile.write, {"n": 0}

    def full(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "write", full)


def test_an_export_that_fills_the_disk_says_so_and_leaves_nothing(engine, tmp_path, monkeypatch):
    """The zip of the log or of a run's rows failing on a full disk: the sentence of a failed
    copy (the log is unchanged), and neither the unzipped folder nor the partial zip stays
    to keep the disk full. A run's rows leave no unzipped folder on success either."""
    a = _generate(engine, "One run.")
    dl = Downloads(tmp_path / "dl")
    archive = dl.rows(engine.history, a.run_id, "csv", None, "sess")
    assert sorted(p.name for p in archive.parent.iterdir()) == [archive.name]  # no rows/ beside it
    _disk_full_while_zipping(monkeypatch)
    for export in (
        lambda: dl.log(engine.history, "parquet", None, "sess"),
        lambda: dl.rows(engine.history, a.run_id, "parquet", None, "sess"),
    ):
        with pytest.raises(AppError) as err:
            export()
        msg = str(err.value)
        assert "could not be written (No space left on device)" in msg and "log is unchanged" in msg
    slots = [p for p in dl.root.rglob("*") if p.parent.name in ("log-parquet", "rows-parquet")]
    assert len(slots) == 2 and all(list(slot.iterdir()) == [] for slot in slots)  # nothing kept
    monkeypatch.undo()
    assert _rows(dl.log(engine.history, "csv", None, "sess"), "runs") == 1  # the log reads as before


@pytest.mark.parametrize("fails", ["mkdir", "write_text"])
def test_a_download_the_disk_cannot_take_is_a_sentence_and_leaves_no_file(tmp_path, monkeypatch, fails):
    """A trace or figure download whose folder or file cannot be written (a full disk): the
    failed-export sentence, not "Something went wrong (OSError)", and no partial file."""
    import errno
    import pathlib

    dl = Downloads(tmp_path / "dl")
    dl.write("sess", "trace", "first.json", "{}")  # the visitor's folder exists already
    real = getattr(pathlib.Path, fails)

    def full(self, *args, **kwargs):
        if self.name == "second.json" or (fails == "mkdir" and self.parent.name == "trace"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, fails, full)
    with pytest.raises(AppError, match=r"could not be written \(No space left on device\); nothing"):
        dl.write("sess", "trace", "second.json", "{}")
    monkeypatch.undo()
    assert [p.name for p in dl.root.rglob("*.json")] == ["first.json"]


def test_a_run_the_log_cannot_replay_is_a_sentence_and_its_link_falls_back(engine, tmp_path):
    """A run whose settings this version rejects (an old or hand-edited log): History's
    replay says which run and value, and a shared link to it opens on the link's settings,
    saying why, rather than failing."""
    from types import SimpleNamespace

    from metaattn_viz.app.ui import build_app

    demo = build_app(engine=engine, downloads=Downloads(tmp_path / "dl"))
    trace = _generate(engine, "Edit me.")
    engine.history.flush()
    cur = engine.history.run_log.fresh_cursor()
    cur.execute("UPDATE runs SET scope = 'zzz' WHERE run_id = $r", {"r": trace.run_id})
    cur.close()
    with pytest.raises(AppError) as err:
        engine.history.replay(trace.run_id)
    assert trace.run_id in str(err.value) and "'zzz'" in str(err.value)
    (open_link,) = [d.fn for d in demo.fns.values() if d.name == "open_link"]
    (status,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "run-status"]
    link = SimpleNamespace(query_params={"run": trace.run_id, "budget": "0.3"}, session_hash=None)
    note = open_link(link)[status]
    assert "'zzz'" in note and "link's settings" in note and "not in this server's routing log" not in note


def test_a_link_to_a_logged_run_of_a_model_not_offered_warns_once(tmp_path):
    """The link's model and then the replayed run's model each warned that the server does
    not offer it, naming two different models Generate would use (review 65): the run's
    own model speaks for a run that replays."""
    import warnings
    from types import SimpleNamespace

    from metaattn_viz.app.ui import build_app

    e = Engine(routed=routed_tiny(spread=3.0), db=str(tmp_path / "log.duckdb"))
    try:
        demo = build_app(engine=e, downloads=Downloads(tmp_path / "dl"))
        trace = e.generations.generate(parse_request("Hello there.", parse_settings(0.4), max_new_tokens=2))
        e.history.flush()
        cur = e.history.run_log.fresh_cursor()
        cur.execute("UPDATE runs SET model = 'Gone-Model' WHERE run_id = $r", {"r": trace.run_id})
        cur.close()
        (open_link,) = [d.fn for d in demo.fns.values() if d.name == "open_link"]
        link = SimpleNamespace(query_params={"run": trace.run_id, "model": "Gone-Model"}, session_hash=None)
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            open_link(link)
        said = [str(w.message) for w in got if "Gone-Model" in str(w.message)]
        assert len(said) == 1, said
    finally:
        e.close()


def test_an_export_behind_a_busy_log_says_so_not_that_the_disk_failed(tmp_path, monkeypatch):
    """Waiting for the log's writer raises TimeoutError, an OSError on Python 3.11: it read
    as "the export could not be written" (review 65)."""
    from helpers import synthetic_trace

    from metaattn_viz.app import exports
    from metaattn_viz.app.history import RunHistory

    h = RunHistory(str(tmp_path / "log.duckdb"))
    try:
        t = synthetic_trace(n_layers=2, n_tokens=4)
        rid = h.run_log.start_run(t)
        h.run_log.finish(rid, t, "done")
        h.flush()
        monkeypatch.setattr(exports, "EXPORT_TIMEOUT_S", 0.2)
        h._writer.submit(time.sleep, 1.5)  # the writer busy with a long write of another run
        with pytest.raises(AppError) as err:
            exports.run_rows(h, rid, "csv", None, tmp_path / "slot")
        assert str(err.value) == exports.LOG_BUSY
        assert not (tmp_path / "slot" / "rows").exists()
    finally:
        h.close()
