"""The notebook API (metaattn_viz/api.py and the package's lazy names): importing is cheap,
``load`` routes a model the caller holds, ``route`` takes settings as keywords, ``detach``
gives the model back bit for bit with no hook left, traces round-trip through JSON and draw
themselves, and the README's Python example runs as written."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import CharTokenizer, routed_tiny, tiny_model

import metaattn_viz as mav
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.core.trace import RoutingTrace

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "some text to route, " * 3


def hooks(model) -> dict[str, tuple[int, ...]]:
    """Every module's hook counts (forward, forward-pre, backward, backward-pre)."""
    return {
        name: (
            len(m._forward_hooks),
            len(m._forward_pre_hooks),
            len(m._backward_hooks),
            len(m._backward_pre_hooks),
        )
        for name, m in model.named_modules()
    }


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def assert_traces_equal(a: RoutingTrace, b: RoutingTrace) -> None:
    """Every field equal; arrays in value, shape and dtype."""
    for f in dataclasses.fields(RoutingTrace):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, np.ndarray) or isinstance(y, np.ndarray):
            assert isinstance(x, np.ndarray) and isinstance(y, np.ndarray), f.name
            assert x.dtype == y.dtype and x.shape == y.shape, f.name
            assert np.array_equal(x, y), f.name
        else:
            assert x == y, f.name


# -- import ------------------------------------------------------------------------------------
def test_importing_the_package_loads_nothing_heavy():
    code = (
        "import sys, json\n"
        "import metaattn_viz as mav\n"
        "heavy = ('torch', 'transformers', 'gradio', 'plotly')\n"
        "before = [m for m in heavy if m in sys.modules]\n"
        "mav.load, mav.Trace, mav.RoutingTrace, mav.RoutingSettings\n"
        "print(json.dumps([before, [m for m in heavy if m in sys.modules]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    # neither importing the package nor naming the API imports torch or plotly
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [[], []]


def test_the_public_names_are_the_one_definitions():
    from metaattn_viz import api
    from metaattn_viz.routing.model import RoutedModel

    assert mav.load is api.load and mav.Trace is api.Trace and mav.figure is api.figure
    assert mav.RoutedModel is RoutedModel and mav.RoutingTrace is RoutingTrace
    assert set(mav.__all__) <= set(dir(mav))
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mav.nope  # noqa: B018


# -- load ----------------------------------------------------------------------------------------
def test_load_routes_a_model_the_caller_holds_with_untrained_controllers():
    model = tiny_model()
    routed = mav.load((model, CharTokenizer()), name="tiny-llama")
    assert isinstance(routed, mav.RoutedModel) and routed.model is model
    assert routed.name == "tiny-llama"
    assert set(routed.controller_sources.values()) == {"untrained"}
    trace = routed.route(PROMPT, budget=0.3, max_new_tokens=3)
    assert isinstance(trace, mav.Trace) and isinstance(trace, RoutingTrace)
    assert trace.controller_trained is False and trace.n_tokens == len(PROMPT) + 3
    assert trace.realized_cost == pytest.approx(0.3, abs=0.05)


def test_load_refuses_what_is_not_a_model():
    with pytest.raises(TypeError, match=r"\(model, tokenizer\) pair; got int"):
        mav.load(42)
    with pytest.raises(TypeError, match="transformers causal LM"):
        mav.load((object(), CharTokenizer()))


# -- route's keyword settings --------------------------------------------------------------------
def test_route_takes_settings_as_keywords():
    r = routed_tiny()
    by_keyword = r.route(PROMPT, budget=0.3, hedge_policy="soft")
    by_object = r.route(PROMPT, RoutingSettings(budget=0.3, hedge_policy="soft"))
    assert by_keyword.settings == by_object.settings
    assert np.array_equal(by_keyword.routes, by_object.routes)
    # keywords change the settings given, the rest of which stay
    merged = r.route(PROMPT, RoutingSettings(hedge_policy="soft", window=8), budget=0.3)
    assert merged.settings == RoutingSettings(hedge_policy="soft", window=8, budget=0.3)
    assert r.route(PROMPT).settings == RoutingSettings()
    with pytest.raises(ValueError, match="budget"):
        r.route(PROMPT, budget=3.0)
    with pytest.raises(TypeError, match="budgte"):
        r.route(PROMPT, budgte=0.3)


# -- detach --------------------------------------------------------------------------------------
def test_detach_gives_the_model_back_bit_for_bit_with_no_hook_left():
    model = tiny_model()
    model.train()
    model.model.layers[1].train(False)  # a mixed train/eval state, to be given back as it was
    modes = {name: m.training for name, m in model.named_modules()}
    implementation = model.config._attn_implementation
    ids = torch.tensor([list(PROMPT.encode())])
    hooks_before = hooks(model)
    model.eval()  # the tiny config has no dropout, but compare the logits in one mode
    before = logits(model, ids)
    model.train()
    model.model.layers[1].train(False)

    routed = mav.load((model, CharTokenizer()))
    assert hooks(model) != hooks_before  # the hooks the check below must see gone
    assert model.config._attn_implementation != implementation
    cheap = routed.route(ids[0].tolist(), budget=0.2)
    assert cheap.realized_cost < 0.5  # routing really ran through the hooks

    assert routed.detach() is model
    assert hooks(model) == hooks_before
    assert model.config._attn_implementation == implementation
    assert {name: m.training for name, m in model.named_modules()} == modes
    model.eval()
    assert torch.equal(logits(model, ids), before)
    assert routed.detached
    routed.detach()  # a second detach finds nothing left to undo
    assert hooks(model) == hooks_before
    with pytest.raises(RuntimeError, match="detached"):
        routed.route(PROMPT)


def test_a_with_block_detaches_on_the_way_out():
    model = tiny_model()
    hooks_before = hooks(model)
    with mav.load((model, CharTokenizer())) as routed:
        routed.route(PROMPT, budget=0.5)
        assert hooks(model) != hooks_before
    assert hooks(model) == hooks_before and routed.detached


def test_a_refused_model_is_handed_back_as_it_came():
    model = tiny_model().train()
    model.model.layers[1].self_attn.layer_idx = 5  # a layer routing cannot place
    hooks_before, implementation = hooks(model), model.config._attn_implementation
    with pytest.raises(ValueError, match="layer_idx"):
        mav.load((model, CharTokenizer()))
    assert hooks(model) == hooks_before and model.config._attn_implementation == implementation
    assert all(m.training for m in model.modules())


# -- JSON ----------------------------------------------------------------------------------------
def test_a_trace_round_trips_through_json():
    r = routed_tiny(spread=4.0)
    hedging = RoutingSettings(budget=0.4, hedge_policy="soft", hedge_threshold=0.5)
    first = r.route(PROMPT, hedging, max_new_tokens=4)  # generated tokens, mixed weights
    first.run_id = "run-1"
    assert first.hedged.any() and not np.isin(first.weights, (0.0, 1.0)).all()
    trace = r.reroute(first, RoutingSettings(budget=0.3))  # with kl_to_dense
    assert trace.kl_to_dense is not None
    text = json.dumps(trace.to_json())
    back = RoutingTrace.from_json(text)
    assert type(back) is RoutingTrace
    assert_traces_equal(back, trace)
    assert_traces_equal(RoutingTrace.from_json(first.to_json()), first)
    # the notebook's trace reads the same record, and draws
    assert isinstance(mav.Trace.from_json(text), mav.Trace)


def test_the_trace_comparison_sees_one_changed_value():
    trace = routed_tiny().route(PROMPT, budget=0.5)
    back = RoutingTrace.from_json(trace.to_json())
    back.concentration[1, 2, 0] = np.nextafter(back.concentration[1, 2, 0], np.float32(np.inf))
    with pytest.raises(AssertionError, match="concentration"):
        assert_traces_equal(back, trace)


def test_an_empty_trace_round_trips_too():
    trace = routed_tiny().new_trace("bayes", RoutingSettings())
    assert_traces_equal(RoutingTrace.from_json(trace.to_json()), trace)


def test_from_json_refuses_a_partial_record_by_name():
    d = routed_tiny().route(PROMPT, budget=0.5).to_json()
    with pytest.raises(ValueError, match="missing weights, lam"):
        RoutingTrace.from_json({k: v for k, v in d.items() if k not in ("weights", "lam")})
    with pytest.raises(ValueError, match="routes must hold 3 layers"):
        RoutingTrace.from_json({**d, "routes": d["routes"][:2]})


# -- figures -------------------------------------------------------------------------------------
def test_a_trace_draws_its_maps_and_says_its_controllers_are_untrained():
    import plotly.graph_objects as go

    trace = mav.load((tiny_model(), CharTokenizer()), name="tiny").route(PROMPT, budget=0.5)
    fig = trace.figure()
    assert isinstance(fig, go.Figure)
    assert [d.type for d in fig.data] == ["heatmap", "heatmap"]
    assert "tiny (bayes controllers, UNTRAINED)" in fig.layout.title.text
    assert '"type":"heatmap"' in fig.to_html(full_html=False)  # a complete figure: it saves
    html = trace._repr_html_()
    assert "plotly" in html.lower() and "UNTRAINED" in html
    # any trace (a replay, a JSON record) draws through the same function
    plain = RoutingTrace.from_json(trace.to_json())
    assert json.loads(mav.figure(plain).to_json()) == json.loads(fig.to_json())


# -- the README ----------------------------------------------------------------------------------
def readme_python() -> str:
    """The Python block of the README's "From Python" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## From Python", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README.md: no python block under 'From Python'"
    return match.group(1)


@pytest.mark.slow
def test_the_readme_python_example_runs_as_written():
    code = readme_python()
    assert "mav.load()" in code and "routed.detach()" in code
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    trace, routed = scope["trace"], scope["routed"]
    assert trace.n_tokens > trace.n_prompt_tokens  # it generated
    assert trace.controller_trained and trace.settings.budget == 0.3
    assert routed.detached
