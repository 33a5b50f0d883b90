"""The Live tab while a generation streams, its callbacks called directly (no browser): a
tiny random routed model, a temporary routing log and the page built over them
(tests/test_page_fixes.py's set-up), a generation driven frame by frame.

While a run streams, the page's trace is still the previous run's until the run's last
frame: Stop says "Stopping the generation…" in a toast (Gradio shows one from a queued
event only); an uncertainty measure or per-token view picked mid-run is drawn by the run's
frames and its end, never over the previous run, and the link follows it; a token clicked
in the streaming text is not the previous run's (the inspector says it works once the run
ends)."""

from __future__ import annotations

import contextlib
import inspect
import json
import types
import warnings
from unittest import mock

import gradio as gr
import pytest
from gradio.context import LocalContext
from helpers import routed_tiny

from metaattn_viz.app import plots
from metaattn_viz.app.engine import Engine
from metaattn_viz.app.exports import Downloads
from metaattn_viz.app.plots.maps import MEASURE_LABELS
from metaattn_viz.app.requests import parse_request, parse_settings

PROMPT = "The quick brown fox jumps over the lazy dog. "
OTHER = "Completely different words here, nothing alike at all. "


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page over a tiny model: its components by elem_id, its callbacks by name."""
    from metaattn_viz.app.ui import build_app

    tmp = tmp_path_factory.mktemp("page")
    engine = Engine(routed=routed_tiny(spread=3.0), db=str(tmp / "log.duckdb"))
    demo = build_app(engine=engine, downloads=Downloads(tmp / "dl"))
    demo.components = {b.elem_id: b for b in demo.blocks.values() if getattr(b, "elem_id", None)}
    yield demo
    engine.close()


def _dep(demo, name: str):
    return next(d for d in demo.fns.values() if d.name == name)


def _request(session: str):
    return types.SimpleNamespace(session_hash=session, headers={}, query_params={}, username=None)


def _call(fn, *args, request=None):
    """`fn(*args)` as Gradio calls it: with the request where it takes one."""
    takes = any(p.annotation in (gr.Request, "gr.Request") for p in inspect.signature(fn).parameters.values())
    return fn(*args, request=request) if takes else fn(*args)


def _generate(demo, prompt=PROMPT, max_new=3):
    req = parse_request(prompt, parse_settings(0.5), max_new_tokens=max_new, quality=False, chat=False)
    return demo.engine.generations.generate(req)


def _stream(demo, session: str, prompt=PROMPT, max_new=6, measure="total", relative=False):
    """live_generate's frames for a Generate in `session` (a generator)."""
    dep = _dep(demo, "live_generate")
    c = demo.components
    data = {block: block.value for block in dep.inputs}
    data.update({c["prompt"]: prompt, c["max-new"]: max_new, c["chat"]: False})
    data.update({c["measure"]: measure, c["relative"]: relative})
    for block in dep.inputs:
        if (getattr(block, "label", "") or "").startswith("Quality meter"):
            data[block] = False
    return dep.fn(data, request=_request(session))


def _view(maps: str) -> tuple[str, bool]:
    """The uncertainty measure (its label) and whether the per-token view a maps frame draws."""
    notes = " ".join(a.get("text", "") for a in json.loads(maps)["layout"].get("annotations", []))
    label = next(lab for lab in MEASURE_LABELS.values() if f"</b>: {lab}" in notes)
    return label, "relative to each layer's usual expert" in notes


def _by_id(out: dict) -> dict:
    return {getattr(c, "elem_id", None) or c: v for c, v in out.items()}


# -- 1. Stop's toast -----------------------------------------------------------------------------
def test_stop_says_stopping_in_a_toast_through_the_queue(page, monkeypatch):
    """Gradio shows gr.Info as a toast only from a queued event (it prints it otherwise):
    Stop's events run as Gradio would, and "Stopping the generation…" reaches the queue."""
    stop_button = page.components["stop"]
    chain = [d for d in page.fns.values() if (stop_button._id, "click") in [tuple(t) for t in d.targets]]
    assert chain and not chain[0].queue  # the stop itself acts at once, queue or not
    for d in chain:  # and what follows it
        chain += [e for e in page.fns.values() if e.trigger_after == d._id and e not in chain]
    stopped = []
    monkeypatch.setattr(page.engine.generations, "stop", lambda key: stopped.append(key) or True)
    queue = mock.Mock()
    values = {}
    for d in chain:
        assert not d.queue or d.concurrency_id != "model"  # never behind a generation
        args = [values.get(b._id) for b in d.inputs]
        with contextlib.ExitStack() as stack:
            if d.queue:  # a queued event runs with its Blocks and event id in context
                blocks = types.SimpleNamespace(_queue=queue)
                tokens = (LocalContext.blocks.set(blocks), LocalContext.event_id.set("e1"))
                stack.callback(
                    lambda t=tokens: (LocalContext.blocks.reset(t[0]), LocalContext.event_id.reset(t[1]))
                )
            out = _call(d.fn, *args, request=_request("stop-session"))
        if len(d.outputs) == 1:
            values[d.outputs[0]._id] = out
    assert stopped == ["stop-session"]
    logged = [c.kwargs.get("log") for c in queue.log_message.call_args_list]
    assert logged == ["Stopping the generation\u2026"]


def test_stop_with_nothing_running_says_nothing(page):
    say = _dep(page, "say_stopping")
    queue = mock.Mock()
    tokens = (LocalContext.blocks.set(types.SimpleNamespace(_queue=queue)), LocalContext.event_id.set("e2"))
    try:
        assert _call(_dep(page, "stop").fn, request=_request("idle-session")) is False
        say.fn(False)
    finally:
        LocalContext.blocks.reset(tokens[0])
        LocalContext.event_id.reset(tokens[1])
    queue.log_message.assert_not_called()


# -- 2. the uncertainty measure and per-token view picked while a run streams -------------------
def test_a_measure_picked_mid_run_is_the_runs_never_the_previous_trace(page):
    redraw = _dep(page, "redraw_maps").fn
    previous = _generate(page, OTHER)  # the page's trace while the new run streams
    session = "measure-mid-run"
    request = _request(session)
    frames = _stream(page, session, measure="total", relative=False)
    try:
        first = next(frames)  # the run has started: "Routing the prompt…"
        assert "routing-maps" not in [getattr(c, "elem_id", None) for c in first]
        # the visitor picks vacuity and the per-token view: the previous run is not drawn
        assert _call(redraw, previous, "vacuity", True, request=request) == gr.skip()
        outs = [_by_id(out) for out in frames]
    finally:
        frames.close()
    drawn = [out["routing-maps"] for out in outs if "routing-maps" in out]
    assert drawn and all(_view(m) == (MEASURE_LABELS["vacuity"], True) for m in drawn)
    final = next(v for out in outs for v in out.values() if hasattr(v, "token_ids"))
    assert drawn[-1] == plots.routing_maps_json(final, "vacuity", relative=True)
    assert final.prompt == PROMPT
    # the run over: a new pick draws the page's trace (now this run) at once
    assert _call(redraw, final, "aleatoric", False, request=request) == plots.routing_maps_json(
        final, "aleatoric", relative=False
    )


def test_a_measure_picked_as_the_last_frame_goes_out_is_drawn_at_the_end(page):
    """The last frame drawn with the old measure while the new one was picked: the run's end
    draws the new one, and the link and the maps' download follow the same measure."""
    redraw = _dep(page, "redraw_maps").fn
    previous = _generate(page, OTHER)
    session = "measure-at-the-end"
    request = _request(session)
    frames = _stream(page, session, measure="total")
    try:
        final = None
        for out in frames:  # up to the last frame, the one that sets the page's trace
            final = next((v for v in out.values() if hasattr(v, "token_ids")), None)
            if final is not None:
                last = _by_id(out)["routing-maps"]
                break
        assert final is not None and _view(last) == (MEASURE_LABELS["total"], False)
        assert _call(redraw, previous, "epistemic", False, request=request) == gr.skip()
        rest = [_by_id(out) for out in frames]
    finally:
        frames.close()
    maps = [out["routing-maps"] for out in rest if "routing-maps" in out]
    assert maps == [plots.routing_maps_json(final, "epistemic", relative=False)]

    # what the export panel makes after the run, from the same dropdown
    refresh = next(d for d in page.fns.values() if d.name == "refresh" and d.trigger_after is not None)
    c = page.components
    data = {b: b.value for b in refresh.inputs}
    data.update({b: final for b in refresh.inputs if isinstance(b, gr.State)})
    data[c["measure"]] = "epistemic"
    out = _by_id(refresh.fn(data, request=request))
    assert "measure=epistemic" in out["share-link"]
    assert MEASURE_LABELS["epistemic"] in open(out["download-maps"].value["path"], encoding="utf-8").read()


# -- 3. a token clicked while the text streams ---------------------------------------------------
def test_a_token_clicked_mid_run_is_never_the_previous_runs(page):
    inspect_token = _dep(page, "inspect_token").fn
    pick_token = _dep(page, "pick_token").fn
    previous = _generate(page, OTHER, max_new=12)  # longer than the streaming text so far
    session = "inspect-mid-run"
    request = _request(session)
    frames = _stream(page, session)
    try:
        next(frames)
        click = gr.SelectData(None, {"index": 2, "value": "x", "selected": True})
        assert _call(pick_token, click, request=request) == gr.skip()  # the slider stays
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            assert _call(inspect_token, previous, 2, request=request) == gr.skip()
        assert any("inspector works" in str(w.message) for w in said)
        outs = [_by_id(out) for out in frames]
    finally:
        frames.close()
    final = next(v for out in outs for v in out.values() if hasattr(v, "token_ids"))
    # the run over: the click inspects its token
    assert _call(pick_token, click, request=request) == 2
    shown = _by_id(_call(inspect_token, final, 2, request=request))
    assert shown["conc-table"].equals(plots.concentration_table(final, 2))
