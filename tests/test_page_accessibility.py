"""The Live tab's fixes found by a review of the page, called directly (no browser): a tiny
random routed model, a temporary routing log and the page built over them (as
tests/test_page_fixes.py). What only a browser shows (the focus ring, the live region, the
plots' names, the radio groups, no "Error" badges) is in tests/test_app_browser.py.

A typed window or budget between the slider's steps is routed where the handle shows it
and the box is set to it (the API and the CLI still take any value in range); a zero-width
character is named the same way in the maps' axes and hover as in the token strip; every
bad seed gets one sentence, the app's; a refused Generate is refused by a step with no
outputs (so the views get no "Error" badge), before the generation, which then never runs,
and the API keeps its own errors."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import gradio as gr
import pytest
from helpers import callbacks, controls_at, tiny_page

from metaattn_viz.app import attention_maps, plots
from metaattn_viz.app.errors import AppError
from metaattn_viz.app.requests import parse_request, parse_settings
from metaattn_viz.core.settings import RoutingSettings

PROMPT = "The quick brown fox jumps over the lazy dog. "
SEED_SENTENCE = "Seed must be a whole number between 0 and 2,147,483,647, got "


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page over a tiny model: its components by elem_id, its callbacks by name."""
    with tiny_page(tmp_path_factory.mktemp("page"), spread=3.0) as demo:
        yield demo


def _generate(demo, prompt=PROMPT, max_new=3):
    req = parse_request(prompt, parse_settings(0.5), max_new_tokens=max_new, quality=False, chat=False)
    return demo.engine.generations.generate(req)


def _by_id(out: dict) -> dict:
    return {getattr(c, "elem_id", None) or c: v for c, v in out.items()}


def _values(demo, dep, trace=None, **values) -> dict:
    """A callback's inputs (helpers.controls_at)."""
    return controls_at(demo, dep, trace, **values)


def _generate_steps(demo) -> list:
    """The events a press on Generate runs, in order: the one it triggers, then each that
    follows."""
    button = demo.components["generate"]
    chain = [d for d in demo.fns.values() if (button._id, "click") in [tuple(t) for t in d.targets]]
    assert len(chain) == 1
    while True:
        after = [d for d in demo.fns.values() if d.trigger_after == chain[-1]._id]
        if not after:
            return chain
        chain.append(after[0])


# -- a typed value between a slider's steps ------------------------------------------------------
def test_a_typed_value_between_steps_is_routed_and_shown_at_the_nearest_step(page):
    """A window of 13 was routed as 13 while the handle showed 16 (the box kept 13), a budget
    of 0.151 said "budget 0.15" with 0.151 in the log."""
    (reroute,) = callbacks(page, "live_reroute")
    trace = _generate(page)
    out = _by_id(reroute.fn(_values(page, reroute, trace, window=13.0), None))
    new = out[next(k for k, v in out.items() if hasattr(v, "token_ids"))]
    assert new.settings.window == 16 and out["window"] == 16  # routed and shown at 16
    out = _by_id(reroute.fn(_values(page, reroute, trace, budget=0.151), None))
    new = out[next(k for k, v in out.items() if hasattr(v, "token_ids"))]
    assert new.settings.budget == 0.15 and out["budget"] == 0.15
    assert "budget 0.15" in out["run-status"]
    # a number on a step is left as typed (no update of its box)
    out = _by_id(reroute.fn(_values(page, reroute, trace, budget=0.3), None))
    assert "budget" not in out and "window" not in out
    # a value that snaps to the shown run's: nothing re-routed, and the box back on the step
    out = _by_id(reroute.fn(_values(page, reroute, trace, window=float(trace.settings.window) + 1), None))
    assert out == {"window": trace.settings.window}


def test_only_the_pages_sliders_snap_the_api_and_the_cli_take_any_value_in_range(page):
    assert parse_settings(0.151, window=13).budget == 0.151  # what /generate and /reroute call
    assert parse_settings(0.151, window=13).window == 13
    assert RoutingSettings(budget=0.151, window=13).window == 13  # what the CLI builds
    fns = {d.api_name: d.fn for d in page.fns.values() if d.api_name == "reroute"}
    trace = _generate(page)
    again = fns["reroute"](trace.to_json(), budget=0.151, window=13, quality=False)
    assert again["settings"]["budget"] == 0.151 and again["settings"]["window"] == 13


# -- a zero-width character: named alike in the strip, the maps' axes and hover ---------------------
ZERO_WIDTH = ["\u200b", "\u200c", "\u200d", "\u2060", "\ufeff"]


def test_zero_width_characters_are_named_alike_in_the_strip_and_the_maps():
    """The strip said <U+200B> where the maps' ticks and hover said U+FFFD."""
    for pos, c in enumerate(ZERO_WIDTH):
        assert plots.token_label(pos, c) == f"{pos}\u2009{plots.strip_text(c)}"
        assert plots.strip_text(c) == f"<U+{ord(c):04X}>"
    assert plots.token_label(0, "a\u00a0b") == "0\u2009a\u2423b"  # another space, as the strip's
    assert plots.token_label(0, "\ufffd") == "0\u2009\ufffd"  # part of a character: as routed
    assert plots.token_label(0, "\n") == "0\u2009\\n"


def test_the_maps_axes_and_hover_name_a_zero_width_character(page):
    trace = _generate(page, max_new=0)
    tokens = [*trace.tokens[: -len(ZERO_WIDTH)], *ZERO_WIDTH]
    shown = dataclasses.replace(trace, tokens=tokens)
    fig = json.loads(plots.routing_maps_json(shown))
    heatmaps = [t for t in fig["data"] if t["type"] == "heatmap"]
    labels = [str(x) for x in heatmaps[0]["x"]]  # the ticks; the hover shows %{x}
    assert labels[-len(ZERO_WIDTH) :] == [
        f"{trace.n_tokens - len(ZERO_WIDTH) + i}\u2009<U+{ord(c):04X}>" for i, c in enumerate(ZERO_WIDTH)
    ]
    assert "%{x}" in heatmaps[0]["hovertemplate"] and not any("\ufffd" in x for x in labels)
    # bertviz's token labels too
    assert attention_maps._display_tokens(["\u200b", "a"], [3, 4])[0] == "<U+200B>"


# -- the seed: the app's one sentence -----------------------------------------------------------------
@pytest.mark.parametrize(
    "value,got",
    [
        (-1, "-1"),
        (None, "an empty box"),
        ("", "an empty box"),
        (10**20, "100000000000000000000"),
        (1.5, "1.5"),
    ],
)
def test_every_bad_seed_gets_the_apps_one_sentence(page, value, got):
    """-1 got Gradio's "Value -1 is less than minimum value 0.", 1.5 was rounded to 2."""
    from metaattn_viz.app.live_request import seed

    with pytest.raises(AppError, match="^" + SEED_SENTENCE + got + r"\.$"):
        seed(value)
    first = _generate_steps(page)[0]
    with pytest.raises(gr.Error) as refused:
        first.fn(_values(page, first, prompt=PROMPT, Seed=value))
    assert str(refused.value.message) == f"{SEED_SENTENCE}{got}."
    assert seed(0) == 0 and seed(2**31 - 1) == 2**31 - 1 and seed(7.0) == 7
    # Gradio's own check of the box no longer comes first (nor after a re-route's refresh)
    box = next(b for b in first.inputs if getattr(b, "label", None) == "Seed")
    assert box.minimum is None and first.preprocess is False


# -- a refused Generate: its toast, and no "Error" badge on the views ----------------------------------
def test_a_refused_generate_is_refused_before_the_generation_by_a_step_with_no_outputs(page):
    """A prompt of spaces was refused by the generation itself, whose outputs (the maps, the
    strip, the meters, the status line, the inspector's position) each took Gradio's red
    "Error" badge over the previous run's views."""
    steps = _generate_steps(page)
    names = [d.name for d in steps]
    assert names.index("check_generate") < names.index("live_generate")
    check = steps[0]
    # queued: Gradio 6 shows no toast for an error of an unqueued event
    assert check.name == "check_generate" and check.outputs == [] and check.queue is not False
    generate = next(d for d in steps if d.name == "live_generate")
    assert check.inputs and set(check.inputs) <= set(generate.inputs)
    # the step after the check (and so the rest) runs only if it passed
    assert steps[1].trigger_only_on_success
    with pytest.raises(gr.Error, match="The prompt is empty"):
        check.fn(_values(page, check, prompt="   "))
    assert check.fn(_values(page, check, prompt=PROMPT)) is None


def test_the_api_keeps_its_own_errors(page):
    fns = {d.api_name: d.fn for d in page.fns.values() if d.api_name in ("generate", "reroute")}
    with pytest.raises(gr.Error, match="The prompt is empty"):
        asyncio.run(fns["generate"]("   ", max_new_tokens=1, quality=False))
    with pytest.raises(gr.Error, match="Seed must be between 0 and 2,147,483,647, got -1"):
        asyncio.run(fns["generate"](PROMPT, max_new_tokens=1, quality=False, seed=-1))
    with pytest.raises(gr.Error, match="Seed must be a whole number between 0 and 2,147,483,647, got 1.5"):
        asyncio.run(fns["generate"](PROMPT, max_new_tokens=1, quality=False, seed=1.5))
