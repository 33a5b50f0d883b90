"""The Live tab while a generation streams, its callbacks called directly (no browser): a
tiny random routed model, a temporary routing log and the page built over them
(tests/test_page_fixes.py's set-up), a generation driven frame by frame.

While a run streams, the page's trace is still the previous run's until the run's last
frame: Stop says "Stopping the generation…" in the status line, outside the queue (which
may be full), until the run's end; an uncertainty measure or per-token view picked mid-run,
while the run waits for its model or while Generate waits in the queue, is drawn by the
run's frames and its end (or, for a run that draws none, on the page's trace), never over
the previous run, and the link follows it; a token clicked in the streaming text is not the
previous run's (the inspector says it works once the run ends); a replay, a re-route or an
inspection is refused until the run's last frame is out, even after its job ended. Stop
also stops a Generate still waiting in the queue (as it starts), says nothing during the
quality meter (which it does not stop), and a run that fails before its first frame says so
in the status line; an older run of the session still ending counts as going on but never
draws over the newer one."""

from __future__ import annotations

import inspect
import json
import threading
import types
import warnings

import gradio as gr
import pytest
from helpers import callbacks, tiny_page

from metaattn_viz.app import gradio_queue, live_stream, plots, tab_live
from metaattn_viz.app.errors import AppError
from metaattn_viz.app.history import RunRecorder
from metaattn_viz.app.live_inspector import sweep_note
from metaattn_viz.app.live_stream import GENERATION_RUNNING, STOPPING
from metaattn_viz.app.plots.maps import MEASURE_LABELS
from metaattn_viz.app.requests import parse_request, parse_settings

PROMPT = "The quick brown fox jumps over the lazy dog. "
OTHER = "Completely different words here, nothing alike at all. "


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page over a tiny model: its components by elem_id, its callbacks by name."""
    with tiny_page(tmp_path_factory.mktemp("page"), spread=3.0) as demo:
        yield demo


def _dep(demo, name: str):
    return callbacks(demo, name)[0]


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


def _hold_after_first_frame(page, monkeypatch) -> threading.Event:
    """The routed model's stream yields its first trace (the prompt's), then waits until the
    returned event is set (30 s at most) before it goes on."""
    routed = page.engine.host.routed_model()
    real_stream, release = routed.stream, threading.Event()

    def held(*args, **kwargs):
        for n, trace in enumerate(real_stream(*args, **kwargs)):
            yield trace
            if n == 0:
                release.wait(30)

    monkeypatch.setattr(routed, "stream", held)
    return release


# -- 1. Stop's word --------------------------------------------------------------------------------
def _stop_chain(demo) -> list:
    """The events a click on Stop runs: its own and those that follow it."""
    button = demo.components["stop"]
    chain = [d for d in demo.fns.values() if (button._id, "click") in [tuple(t) for t in d.targets]]
    for d in chain:
        chain += [e for e in demo.fns.values() if e.trigger_after == d._id and e not in chain]
    return chain


def test_stop_says_stopping_in_the_status_line_without_the_queue(page, monkeypatch):
    """Stop acts and answers outside the queue: a queued event (a toast's) was refused with
    "This application is currently busy" when the queue was full, though the run stopped."""
    chain = _stop_chain(page)
    assert [d.name for d in chain] == ["stop"] and not chain[0].queue
    assert chain[0].outputs == [page.components["run-status"]]
    stopped = []
    monkeypatch.setattr(page.engine.generations, "stop", lambda key: stopped.append(key) or True)
    assert _call(chain[0].fn, request=_request("stop-session")) == STOPPING
    assert stopped == ["stop-session"]


def test_stop_with_nothing_running_says_nothing(page):
    assert _call(_dep(page, "stop").fn, request=_request("idle-session")) == gr.skip()


def test_after_stop_the_status_line_says_stopping_until_the_run_ends(page, monkeypatch):
    """A frame drawn after Stop while the run still decodes says "Stopping…" (not
    "Generating…" over Stop's own line); the run's last frame says it stopped."""
    release = _hold_after_first_frame(page, monkeypatch)  # the next token on release
    real_finish, finished = RunRecorder.finish, threading.Event()

    def finish(self, *args, **kwargs):  # the run stopped, its end not yet out
        finished.wait(30)
        return real_finish(self, *args, **kwargs)

    monkeypatch.setattr(RunRecorder, "finish", finish)
    session = "stopping"
    frames = _stream(page, session, max_new=20)
    try:
        status = [_by_id(next(frames))["run-status"], _by_id(next(frames))["run-status"]]
        assert status[1].startswith("Generating")
        assert _call(_dep(page, "stop").fn, request=_request(session)) == STOPPING
        release.set()
        assert _by_id(next(frames))["run-status"] == STOPPING  # the token after the stop
        finished.set()
        rest = [_by_id(out) for out in frames]
    finally:
        release.set()
        finished.set()
        frames.close()
    assert rest[-1]["run-status"].startswith("Stopped: ")


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


# -- 4. a pick before the run's first frame ------------------------------------------------------
def test_a_measure_picked_while_the_run_waits_for_its_model_is_drawn_when_it_fails(page, monkeypatch):
    """The run fails before its first frame (the model never loaded): the maps, which the
    pick left to the run, show the page's trace in the picked view (the dropdown's)."""
    redraw = _dep(page, "redraw_maps").fn
    previous = _generate(page, OTHER)
    go = threading.Event()

    def loading(*args, **kwargs):
        go.wait(30)
        raise AppError("The model is still loading; try again in a few seconds.")

    monkeypatch.setattr(page.engine.host, "routed_model", loading)
    session = "fails-early"
    frames = _stream(page, session, measure="total", relative=False)
    outs = []
    try:
        outs.append(_by_id(next(frames)))  # "Routing the prompt…"
        assert _call(redraw, previous, "vacuity", True, request=_request(session)) == gr.skip()
        go.set()
        with pytest.raises(gr.Error, match="still loading"):
            for out in frames:
                outs.append(_by_id(out))
    finally:
        go.set()
        frames.close()
    maps = [out["routing-maps"] for out in outs if "routing-maps" in out]
    assert maps == [plots.routing_maps_json(previous, "vacuity", relative=True)]


def test_a_measure_picked_while_generate_waits_in_the_queue_is_the_runs(page):
    """Gradio takes Generate's inputs (the measure among them) when it is pressed: a measure
    picked while it waits in the queue is drawn over the page's trace at once, and the run's
    frames draw it too; one picked before the press is the press's own."""
    redraw = _dep(page, "redraw_maps").fn
    stop_previous = _dep(page, "stop_previous").fn
    previous = _generate(page, OTHER)
    session = "queued"
    request = _request(session)
    _call(redraw, previous, "aleatoric", False, request=request)  # before the press
    _call(stop_previous, request=request)  # Generate pressed with "epistemic" (say, a link's)
    picked = _call(redraw, previous, "vacuity", True, request=request)  # while it waits
    assert picked == plots.routing_maps_json(previous, "vacuity", relative=True)
    outs = [_by_id(out) for out in _stream(page, session, measure="epistemic", relative=False)]
    drawn = [out["routing-maps"] for out in outs if "routing-maps" in out]
    assert drawn and all(_view(m) == (MEASURE_LABELS["vacuity"], True) for m in drawn)

    _call(redraw, previous, "aleatoric", False, request=request)  # the run over: before a press
    _call(stop_previous, request=request)
    outs = [_by_id(out) for out in _stream(page, session, measure="epistemic", relative=False)]
    drawn = [out["routing-maps"] for out in outs if "routing-maps" in out]
    assert drawn and all(_view(m) == (MEASURE_LABELS["epistemic"], False) for m in drawn)

    # Generate pressed while a run streams, a pick as that run ends: the new run's too
    ending = _stream(page, session, measure="total")
    next(ending)
    _call(stop_previous, request=request)  # ends the run streaming
    assert _call(redraw, previous, "aleatoric", True, request=request) == gr.skip()
    drawn = [out["routing-maps"] for out in map(_by_id, ending) if "routing-maps" in out]
    assert drawn and _view(drawn[-1]) == (MEASURE_LABELS["aleatoric"], True)
    outs = [_by_id(out) for out in _stream(page, session, measure="total", relative=False)]
    drawn = [out["routing-maps"] for out in outs if "routing-maps" in out]
    assert drawn and all(_view(m) == (MEASURE_LABELS["aleatoric"], True) for m in drawn)


# -- 5. the run's job over, its last frame not yet out -------------------------------------------
def test_a_run_is_going_on_until_its_last_frame_is_out(page, monkeypatch):
    """The job ends before the stream sends its last frame (which puts the run on the page):
    meanwhile a replay (drawn over by that frame), a re-route and an inspection are refused,
    each with the same first sentence."""
    engine = page.engine
    done = _generate(page, OTHER)
    engine.history.flush()
    release = _hold_after_first_frame(page, monkeypatch)
    session = "last-frame-pending"
    request = _request(session)
    reroute = _dep(page, "live_reroute")
    data = {block: block.value for block in reroute.inputs}
    data.update({block: done for block in reroute.inputs if isinstance(block, gr.State)})
    data[page.components["budget"]] = 0.3  # done was routed at 0.5
    frames = _stream(page, session, max_new=4)
    try:
        while "routing-maps" not in _by_id(next(frames)):  # the prompt's frame is drawn
            pass
        release.set()
        for _ in range(600):  # the job ends; the stream has not sent its last frame
            if not engine.generations.running(session):
                break
            threading.Event().wait(0.05)
        assert not engine.generations.running(session)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            assert _call(_dep(page, "replay").fn, done.run_id, "total", request=request) == gr.skip()
            assert reroute.fn(data, request=request) == gr.skip()
            assert _call(_dep(page, "inspect_token").fn, done, 0, request=request) == gr.skip()
        rest = [_by_id(out) for out in frames]
    finally:
        release.set()
        frames.close()
    messages = [str(w.message) for w in said]
    assert len(messages) == 3 and all(m.startswith(f"{GENERATION_RUNNING}: ") for m in messages)
    final = next(v for out in rest for v in out.values() if hasattr(v, "token_ids"))
    assert final.prompt == PROMPT  # the last frame: the run, which no replay was drawn under
    # the last frame out: replayed
    assert page.components["prompt"] in _call(_dep(page, "replay").fn, done.run_id, "total", request=request)


# -- 6. Stop before the first frame, in the queue, during the quality meter ----------------------
def _status_lines(outs) -> list[str]:
    return [out["run-status"] for out in outs if "run-status" in out]


def test_a_run_stopped_then_failing_before_its_first_frame_says_it_failed(page, monkeypatch):
    """Stop while the run waits for its model, which then fails to load: no frame was
    drawn, and the status line said "Stopping…" to the end (only a toast said it failed)."""
    go = threading.Event()

    def loading(*args, **kwargs):
        go.wait(30)
        raise AppError("The model is still loading; try again in a few seconds.")

    monkeypatch.setattr(page.engine.host, "routed_model", loading)
    session = "stopped-then-fails"
    frames = _stream(page, session)
    outs = []
    try:
        outs.append(_by_id(next(frames)))  # "Routing the prompt…"
        outs.append({"run-status": _call(_dep(page, "stop").fn, request=_request(session))})
        assert outs[-1]["run-status"] == STOPPING
        go.set()
        with pytest.raises(gr.Error, match="still loading"):
            for out in frames:
                outs.append(_by_id(out))
    finally:
        go.set()
        frames.close()
    assert _status_lines(outs)[-1] == "The generation failed."


def test_stop_while_generate_waits_in_the_queue_stops_that_run(page):
    """Stop pressed while this tab's Generate waits in the queue (nothing running): the run
    is stopped as it starts (it ran to "Done", Stop said nothing); a later Generate runs."""
    session = "stop-in-queue"
    request = _request(session)
    _call(_dep(page, "stop_previous").fn, request=request)  # Generate pressed, queued
    assert _call(_dep(page, "stop").fn, request=request) == STOPPING
    status = _status_lines([_by_id(out) for out in _stream(page, session, max_new=4)])
    assert status[0] == STOPPING and status[-1].startswith("Stopped: ")
    _call(_dep(page, "stop_previous").fn, request=request)  # the next Generate is not stopped
    assert _status_lines([_by_id(out) for out in _stream(page, session, max_new=4)])[-1].startswith("Done")


def test_stop_while_generate_waits_behind_the_run_it_ended_stops_the_queued_run(page, monkeypatch):
    """Generate B pressed while run A streams (stop_previous ends A), Stop while B waits:
    the Stop went to A, already stopping, and B ran to "Done"."""
    release = _hold_after_first_frame(page, monkeypatch)
    session = "stop-behind"
    request = _request(session)
    a = _stream(page, session, prompt=OTHER, max_new=20)
    try:
        while "routing-maps" not in _by_id(next(a)):
            pass
        _call(_dep(page, "stop_previous").fn, request=request)  # Generate B, queued
        assert _call(_dep(page, "stop").fn, request=request) == STOPPING
        release.set()
        a_out = [_by_id(out) for out in a]
    finally:
        release.set()
        a.close()
    monkeypatch.undo()  # B streams unheld
    assert _status_lines(a_out)[-1].startswith("Stopped: ")
    b_status = _status_lines([_by_id(out) for out in _stream(page, session, max_new=4)])
    assert b_status[-1].startswith("Stopped: ")


def test_a_generate_the_queue_refused_leaves_no_run_waiting(page, monkeypatch):
    """A Generate the full queue refused never ran: a Stop after it said "Stopping…" until
    the next Generate, and that Generate's run took the refused one's place in the order (a
    Stop while it waited stopped nothing). With nothing of the session in Gradio's queue
    REFUSED_AFTER_S after its press, it is forgotten."""
    pending: dict[str, bool] = {}
    monkeypatch.setattr(tab_live, "session_pending", lambda session: pending.get(session))
    session = "refused-by-the-queue"
    request = _request(session)
    pending[session] = False  # pressed; its generation is not in the queue (yet)
    _call(_dep(page, "stop_previous").fn, request=request)
    assert _call(_dep(page, "stop").fn, request=request) == STOPPING  # just pressed: it may be queued yet
    monkeypatch.setattr(live_stream, "REFUSED_AFTER_S", -1.0)  # ... long ago: it was refused
    assert _call(_dep(page, "stop").fn, request=request) == gr.skip()
    _call(_dep(page, "stop_previous").fn, request=_request("another-session"))  # never forgotten
    pending["another-session"] = None  # where Gradio's queue cannot be read
    assert _call(_dep(page, "stop").fn, request=_request("another-session")) == STOPPING

    # a refused Generate, then one that runs, with a Stop while it waits: that run stops
    _call(_dep(page, "stop_previous").fn, request=request)  # refused
    pending[session] = True  # the next one is queued
    _call(_dep(page, "stop_previous").fn, request=request)
    assert _call(_dep(page, "stop").fn, request=request) == STOPPING
    status = _status_lines([_by_id(out) for out in _stream(page, session, max_new=4)])
    assert status[-1].startswith("Stopped: ")


def test_the_quality_meters_mid_run_ticks_keep_at_most_max_sessions():
    """A session that ticked the quality meter mid-run is remembered until its run ends: one
    whose page closed first stayed for the server's life; the oldest now go first."""
    from metaattn_viz.app.live_quality import QualityMeter

    meter = QualityMeter()
    for i in range(live_stream.MAX_SESSIONS + 5):
        meter._remember(f"s{i}")
    meter._remember("s10")  # ticked again: the newest
    assert len(meter.pending) == live_stream.MAX_SESSIONS
    assert "s0" not in meter.pending and list(meter.pending)[-1] == "s10"


def test_session_pending_reads_the_pages_gradio_queue(page):
    """What gradio_queue reads of the pinned Gradio's queue is where it reads it."""
    from gradio.context import LocalContext

    assert gradio_queue.session_pending("queue-reader") is None  # outside an event: cannot tell
    token = LocalContext.blocks.set(page)
    try:
        assert gradio_queue.session_pending("queue-reader") is False
        page._queue.pending_event_ids_session["queue-reader"] = {"an-event"}
        assert gradio_queue.session_pending("queue-reader") is True
    finally:
        page._queue.pending_event_ids_session.pop("queue-reader", None)
        LocalContext.blocks.reset(token)


def test_stop_during_the_quality_meter_says_nothing(page, monkeypatch):
    """The text is complete and the quality meter runs: Stop stops nothing there, and said
    "Stopping…" for the whole pass, then "Done"."""
    real_quality, go, measuring = page.engine.analysis.quality, threading.Event(), threading.Event()

    def slow_quality(trace):
        measuring.set()
        go.wait(30)
        return real_quality(trace)

    monkeypatch.setattr(page.engine.analysis, "quality", slow_quality)
    session = "stop-in-quality"
    dep = _dep(page, "live_generate")
    c = page.components
    data = {block: block.value for block in dep.inputs}
    data.update({c["prompt"]: PROMPT, c["max-new"]: 3, c["chat"]: False})
    data.update({b: True for b in dep.inputs if (getattr(b, "label", "") or "").startswith("Quality meter")})
    frames = dep.fn(data, request=_request(session))
    status = []
    try:
        for out in frames:
            status += _status_lines([_by_id(out)])
            if measuring.is_set() and status[-1].startswith("Measuring quality"):
                break
        assert _call(_dep(page, "stop").fn, request=_request(session)) == gr.skip()
        go.set()
        status += _status_lines([_by_id(out) for out in frames])
    finally:
        go.set()
        frames.close()
    assert status[-1].startswith("Done")


# -- 6b. the sweep and the quality meter while a run streams -------------------------------------
def test_the_sweep_is_refused_while_a_run_streams(page):
    sweep = _dep(page, "sweep")
    previous = _generate(page, OTHER)
    session = "sweep-mid-run"
    data = {block: block.value for block in sweep.inputs}
    data[next(b for b in sweep.inputs if isinstance(b, gr.State))] = previous
    frames = _stream(page, session)
    try:
        next(frames)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            assert sweep.fn(data, request=_request(session), progress=lambda *a, **k: None) == gr.skip()
        assert any(f"{GENERATION_RUNNING}: the sweep works" in str(w.message) for w in said)
        for _ in frames:
            pass
    finally:
        frames.close()
    out = _by_id(sweep.fn(data, request=_request(session), progress=lambda *a, **k: None))
    assert out["sweep-note"] == sweep_note(previous)  # the run over: it sweeps the page's text


def test_a_quality_meter_ticked_mid_run_measures_the_run_at_its_end_never_the_previous(page):
    tick = next(d for d in callbacks(page, "measure_quality") if d.trigger_after is None).fn
    after_run = _dep(page, "measure_after_run").fn
    previous = _generate(page, OTHER)
    assert previous.kl_to_dense is None
    session = "quality-mid-run"
    request = _request(session)
    frames = _stream(page, session)  # started with the box clear
    try:
        next(frames)
        assert _call(tick, previous, True, request=request) == (gr.skip(), gr.skip())
        outs = [_by_id(out) for out in frames]
    finally:
        frames.close()
    assert previous.kl_to_dense is None  # the previous run was not measured
    final = next(v for out in outs for v in out.values() if hasattr(v, "token_ids"))
    assert final.kl_to_dense is None  # the run did not measure itself
    meters, measured = _call(after_run, final, True, request=request)
    assert measured is final and final.kl_to_dense is not None and meters == plots.meters(final)
    # once: the next run's end measures nothing it was not asked to
    assert _call(after_run, final, True, request=request) == (gr.skip(), gr.skip())
    # ticked, then cleared again before the run's end: nothing measured
    again = _stream(page, session, prompt=OTHER)
    try:
        next(again)
        _call(tick, final, True, request=request)
        outs = [_by_id(out) for out in again]
    finally:
        again.close()
    other = next(v for out in outs for v in out.values() if hasattr(v, "token_ids"))
    assert _call(after_run, other, False, request=request) == (gr.skip(), gr.skip())
    assert other.kl_to_dense is None
    # a session that never ticked mid-run: its run's end measures nothing
    assert _call(after_run, other, True, request=_request("never-ticked")) == (gr.skip(), gr.skip())


# -- 7. an older run still ending when a newer one closes ----------------------------------------
def test_an_older_run_still_ending_is_going_on_and_never_draws_over_the_newer(page, monkeypatch):
    """Run A waits for its model; Generate B stops it and runs to its end first: A's stream
    still counted (a replay is refused), and A, superseded, writes nothing more (its last
    frame landed over B and over an accepted replay)."""
    engine = page.engine
    done = _generate(page, OTHER)
    engine.history.flush()
    real, gate, calls = engine.host.routed_model, threading.Event(), []

    def routed(*args, **kwargs):  # run A waits for its model (another one loading, say)
        calls.append(1)
        if len(calls) == 1:
            gate.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.host, "routed_model", routed)
    session = "older-still-ending"
    request = _request(session)
    a = _stream(page, session, prompt="Older run A text here. ", max_new=4)
    try:
        next(a)  # A started: waits for its model
        _call(_dep(page, "stop_previous").fn, request=request)  # Generate B: stops A
        b_out = [_by_id(out) for out in _stream(page, session, max_new=2)]
        assert _status_lines(b_out)[-1].startswith("Done")
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            assert _call(_dep(page, "replay").fn, done.run_id, "total", request=request) == gr.skip()
        assert [str(w.message) for w in said][0].startswith(f"{GENERATION_RUNNING}: ")
        gate.set()
        a_out = [_by_id(out) for out in a]
    finally:
        gate.set()
        a.close()
    assert a_out == []  # neither its trace, its maps nor its status line
    assert page.components["prompt"] in _call(_dep(page, "replay").fn, done.run_id, "total", request=request)
