"""The notebook API (metaattn_viz/api.py and the package's lazy names): importing is cheap,
``load`` routes a model the caller holds, ``route`` takes settings as keywords, ``detach``
gives the model back bit for bit with no hook left, traces round-trip through JSON and draw
themselves, ``calibrate`` trains, installs and saves controllers that load back, and the
README's Python examples run as written."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
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
EXCERPT = ROOT / "tests" / "data" / "wikitext2_excerpt.txt"
TEXTS = [line for line in EXCERPT.read_text(encoding="utf-8").splitlines() if line.strip()]


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
        "mav.load, mav.calibrate, mav.Trace, mav.RoutingTrace, mav.RoutingSettings\n"
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
    assert mav.calibrate is api.calibrate
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
    for model in (None, "some/folder"):  # refused before anything loads, not ignored
        with pytest.raises(ValueError, match=r"name names a \(model, tokenizer\) pair"):
            mav.load(model, name="mine")


# -- route's keyword settings --------------------------------------------------------------------
def test_route_takes_settings_as_keywords():
    r = routed_tiny()
    by_keyword = r.route(PROMPT, budget=0.3, hedge_policy="soft")
    by_object = r.route(PROMPT, RoutingSettings(budget=0.3, hedge_policy="soft"))
    assert by_keyword.settings == by_object.settings
    assert np.array_equal(by_keyword.routes, by_object.routes)
    # keywords change the settings given, the rest of which stay
    merged = r.route(PROMPT, RoutingSettings(hedge_policy="soft", window=8), budget=0.3)
    # a trace records the map "auto" stood for (a tiny model has none learned: elu + 1)
    assert merged.settings == RoutingSettings(hedge_policy="soft", window=8, budget=0.3, linear_map="elu")
    assert r.route(PROMPT).settings == RoutingSettings(linear_map="elu")  # what "auto" stood for
    with pytest.raises(ValueError, match="budget"):
        r.route(PROMPT, budget=3.0)
    with pytest.raises(TypeError, match="budgte"):
        r.route(PROMPT, budgte=0.3)


def test_a_backend_alone_keeps_the_given_models_device_and_dtype():
    """`load((model, tok), backend="cpu")` routes the model where it is, in its own dtype (it
    used to convert a bfloat16 model to float32 in place); device or dtype still move it."""
    model = tiny_model().to(torch.bfloat16)
    routed = mav.load((model, CharTokenizer()), backend="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16 and routed.model is model
    assert routed.runtime() == {"device": "cpu", "dtype": "bfloat16", "backend": "cpu", "linear_map": "elu"}
    assert routed.route(PROMPT, budget=0.3).n_tokens == len(PROMPT)
    assert routed.detach() is model and next(model.parameters()).dtype == torch.bfloat16
    moved = mav.load((model, CharTokenizer()), dtype="float32", backend="cpu")
    assert next(model.parameters()).dtype == torch.float32 and moved.runtime()["dtype"] == "float32"


# -- detach --------------------------------------------------------------------------------------
def test_a_placement_that_cannot_be_made_leaves_the_model_as_it_was():
    """`load((model, tok), device="cuda")` without a GPU (or another placement refused) is
    refused before the model is routed: no hooks, its attention implementation kept."""
    from metaattn_viz.routing.device import DeviceUnavailable

    model = tiny_model()
    implementation, hooks_before = model.config._attn_implementation, hooks(model)
    for kwargs, error in (
        (dict(device="cuda"), DeviceUnavailable),
        (dict(dtype="float8"), ValueError),
        (dict(backend="tpu"), ValueError),
        (dict(backend="triton"), DeviceUnavailable),  # where the model is: on the CPU
    ):
        if error is DeviceUnavailable and (
            torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"
        ):
            continue
        with pytest.raises(error):
            mav.load((model, CharTokenizer()), **kwargs)
        assert model.config._attn_implementation == implementation and hooks(model) == hooks_before


def test_a_model_without_weights_or_a_tokenizer_is_refused_by_name():
    with pytest.raises(TypeError, match="tokenizer must be the model's tokenizer, got NoneType"):
        mav.load((tiny_model(), None))
    with torch.device("meta"):
        shapes_only = tiny_model()
    with pytest.raises(ValueError, match="meta device"):
        mav.load((shapes_only, CharTokenizer()))


def test_a_model_routed_twice_is_refused_and_the_first_routing_keeps_working():
    """A notebook cell run twice: the second `load` of the same model is refused by name
    (it would record "metaattn" as the implementation to give back), the first routes on,
    and once it is detached the model routes again."""
    model = tiny_model()
    implementation, hooks_before = model.config._attn_implementation, hooks(model)
    first = mav.load((model, CharTokenizer()))
    with pytest.raises(ValueError, match="routed already"):
        mav.load((model, CharTokenizer()))
    assert first.route(PROMPT, budget=0.3).n_tokens > 0
    first.detach()
    assert model.config._attn_implementation == implementation and hooks(model) == hooks_before
    again = mav.load((model, CharTokenizer()))
    assert again.route(PROMPT, budget=0.3).n_tokens > 0
    again.detach()
    assert model.config._attn_implementation == implementation and hooks(model) == hooks_before


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


# -- calibrate -----------------------------------------------------------------------------------
def test_calibrate_trains_installs_and_saves_controllers_that_load_back(tmp_path, caplog):
    routed = mav.load((tiny_model(), CharTokenizer()), name="tiny")
    untrained = routed.controllers["bayes"]
    before = routed.route(PROMPT, budget=0.5)
    priorfree = routed.controllers["priorfree"]
    rng = torch.random.get_rng_state()
    rows: list[dict] = []
    stack = mav.calibrate(
        routed,
        TEXTS,
        steps=30,
        seq_len=64,
        batch_size=2,
        soft_fraction=1.0,
        val_windows=2,
        save=tmp_path / "ctrl",
        progress=False,
        on_step=rows.append,
    )
    assert torch.equal(torch.random.get_rng_state(), rng)  # the run seeded its own
    # it trained: every step reported, the loss fell, the weights moved
    assert [r["step"] for r in rows] == list(range(1, 31))
    first, last = (sum(r["loss"] for r in part) / 5 for part in (rows[:5], rows[-5:]))
    assert last < first, [r["loss"] for r in rows]
    assert stack.trained and stack.kind == "bayes"
    assert not torch.equal(stack.layers[0].fc2.weight, untrained.layers[0].fc2.weight)
    # installed on routed (the other kind untouched), and its routing uses it
    assert routed.controllers["bayes"] is stack and routed.controllers["priorfree"] is priorfree
    assert routed.controller_sources == {"bayes": str(tmp_path / "ctrl" / "bayes"), "priorfree": "untrained"}
    after = routed.route(PROMPT, budget=0.5)
    assert after.controller_trained and after.controller_id == stack.controller_id
    assert not np.array_equal(after.concentration, before.concentration)
    # the model handed back as it came: trainable again
    assert all(p.requires_grad for p in routed.model.parameters())
    # saved as assets/controllers/<model> is laid out; the record names the texts' own hash
    folder = tmp_path / "ctrl" / "bayes"
    assert sorted(p.name for p in (tmp_path / "ctrl").iterdir()) == ["bayes"]
    assert sorted(p.name for p in folder.iterdir()) == ["controller.safetensors", "meta.json"]
    meta = json.loads((folder / "meta.json").read_text())
    joined = "\n\n".join(t.strip() for t in TEXTS).encode()
    assert meta["data"]["sha256"] == hashlib.sha256(joined).hexdigest()
    assert meta["data"]["file"] == f"{len(TEXTS)} texts given to metaattn_viz.calibrate"
    assert meta["content_hash"] == stack.content_hash() and meta == stack.meta
    # and load back with the model: the same controllers, the same routing
    again = mav.load((tiny_model(), CharTokenizer()), name="tiny", controllers=tmp_path / "ctrl")
    assert again.controller_sources == {"bayes": str(folder), "priorfree": "untrained"}
    assert again.controllers["bayes"].content_hash() == stack.content_hash()
    replay = again.route(PROMPT, budget=0.5)
    assert np.array_equal(replay.concentration, after.concentration)
    assert np.array_equal(replay.routes, after.routes)
    assert again.weights_notice("bayes") is None  # the weights they were calibrated on
    # the same shape with other weights: used, but said (it routed as trained, silently)
    with caplog.at_level(logging.WARNING, logger="metaattn_viz.api"):
        other = mav.load((tiny_model(seed=1), CharTokenizer()), name="tiny", controllers=tmp_path / "ctrl")
    assert other.controllers["bayes"].trained
    assert "calibrated on another copy of these weights" in other.weights_notice("bayes")
    assert "bayes controllers of tiny: calibrated on another copy" in caplog.text
    assert other.weights_notice("priorfree") is None  # untrained: labelled so elsewhere


def test_calibrate_reads_a_file_and_trains_the_prior_free_baseline():
    routed = mav.load((tiny_model(), CharTokenizer()), name="tiny")
    stack = mav.calibrate(
        routed, EXCERPT, controller="priorfree", steps=2, seq_len=64, val_windows=1, progress=False
    )
    assert stack.kind == "priorfree" and routed.controllers["priorfree"] is stack
    assert stack.meta["data"]["file"] == str(EXCERPT)
    assert stack.meta["data"]["sha256"] == hashlib.sha256(EXCERPT.read_bytes()).hexdigest()
    assert routed.controller_sources["priorfree"] == "mav.calibrate (not saved)"
    assert routed.route(PROMPT, controller="priorfree").controller_trained


class Stop(Exception):
    """Raised by a step callback to stop a calibration part-way."""


def test_calibrate_refuses_bad_input_and_an_interrupted_run_installs_nothing(tmp_path):
    routed = mav.load((tiny_model(), CharTokenizer()), name="tiny")
    untrained = routed.controllers["bayes"]
    fast = dict(steps=2, seq_len=64, val_windows=1, progress=False)
    with pytest.raises(TypeError, match="not one string"):
        mav.calibrate(routed, "one long string", **fast)
    with pytest.raises(TypeError, match="texts must be strings; got int"):
        mav.calibrate(routed, ["a text", 3], **fast)
    with pytest.raises(ValueError, match="no text to calibrate on"):
        mav.calibrate(routed, ["", "  \n "], **fast)
    with pytest.raises(FileNotFoundError, match="no such file"):
        mav.calibrate(routed, tmp_path / "nope.txt", **fast)
    with pytest.raises(ValueError, match="controller must be one of bayes, priorfree"):
        mav.calibrate(routed, TEXTS, controller="nope", **fast)
    with pytest.raises(ValueError, match=r"steps \(--steps\) must be a whole number"):
        mav.calibrate(routed, TEXTS, **{**fast, "steps": 0})
    with pytest.raises(TypeError, match="learning_rate"):
        mav.calibrate(routed, TEXTS, learning_rate=0.1, **fast)
    (tmp_path / "file").write_text("in the way")
    with pytest.raises(ValueError, match="a file is in the way"):
        mav.calibrate(routed, TEXTS, save=tmp_path / "file", **fast)
    with pytest.raises(
        ValueError, match="shorter than one window.*give more or longer texts, or a smaller seq_len$"
    ):
        mav.calibrate(routed, ["too short", "for a window"], **fast)
    with pytest.raises(ValueError, match=r"seq_len 4096 is longer than the model's context \(1024 tokens\)"):
        mav.calibrate(routed, TEXTS, **{**fast, "seq_len": 4096})
    with pytest.raises(ValueError, match="save must name a folder, got an empty path"):
        mav.calibrate(routed, TEXTS, save="", **fast)
    with pytest.raises(FileNotFoundError, match="controllers: no such folder"):
        mav.load((tiny_model(), CharTokenizer()), controllers=tmp_path / "none")

    def stop(row):
        if row["step"] == 1:
            raise Stop

    with pytest.raises(Stop):
        mav.calibrate(routed, TEXTS, on_step=stop, save=tmp_path / "ctrl", **fast)
    assert routed.controllers["bayes"] is untrained and routed.controller_sources["bayes"] == "untrained"
    assert not (tmp_path / "ctrl").exists()
    assert all(p.requires_grad for p in routed.model.parameters())
    routed.detach()
    with pytest.raises(RuntimeError, match="detached"):
        mav.calibrate(routed, TEXTS, **fast)


def test_a_save_that_cannot_be_written_is_refused_before_training(tmp_path):
    """As the CLI's --out (writable.py): a folder where nothing can be made is named before
    the first step, not found after the last one with a bare OSError."""
    routed = mav.load((tiny_model(), CharTokenizer()), name="tiny")
    untrained = routed.controllers["bayes"]
    rows: list[dict] = []
    fast = dict(steps=2, seq_len=64, val_windows=1, progress=False, on_step=rows.append)
    with pytest.raises(
        ValueError, match=r"^save /proc/metaattn-ctrl/bayes cannot be written: no file can be made"
    ):
        mav.calibrate(routed, TEXTS, save="/proc/metaattn-ctrl", **fast)
    assert rows == [] and routed.controllers["bayes"] is untrained
    with pytest.raises(ValueError, match=r"seq_len must be a whole number >= 2 .*got 1$"):
        mav.calibrate(routed, TEXTS, **{**fast, "seq_len": 1})
    with pytest.raises(TypeError, match="save must be a folder path .*got int"):
        mav.calibrate(routed, TEXTS, save=7, **fast)  # type: ignore[arg-type]
    assert rows == []


def test_a_save_that_fails_after_training_keeps_the_trained_controllers(tmp_path, monkeypatch):
    """The stack is installed before it is written: a write that fails all the same (a full
    disk) says so, and the trained controllers route on."""
    import errno

    from metaattn_viz.routing.controller import ControllerStack

    save = ControllerStack.save  # the run's own checkpoints (a temporary folder) still write

    def full(self, folder, meta=None):
        if Path(folder).is_relative_to(tmp_path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return save(self, folder, meta)

    routed = mav.load((tiny_model(), CharTokenizer()), name="tiny")
    monkeypatch.setattr(ControllerStack, "save", full)
    with pytest.raises(
        OSError, match="could not be written to .*No space left.*installed on the routed model"
    ) as exc:
        mav.calibrate(routed, TEXTS, steps=2, seq_len=64, val_windows=1, progress=False, save=tmp_path / "c")
    assert exc.value.errno == errno.ENOSPC
    stack = routed.controllers["bayes"]
    assert stack.trained and routed.controller_sources["bayes"] == "mav.calibrate (not saved)"
    assert routed.route(PROMPT, budget=0.5).controller_trained


def test_save_and_controllers_expand_the_home_folder(tmp_path, monkeypatch):
    """`~` means the home folder, as on the command line, not a folder named "~" here."""
    home, here = tmp_path / "home", tmp_path / "here"
    home.mkdir()
    here.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(here)
    routed = mav.load((tiny_model(), CharTokenizer()), name="tiny")
    stack = mav.calibrate(
        routed, TEXTS, steps=2, seq_len=64, val_windows=1, progress=False, save="~/ctrl/tiny"
    )
    assert (home / "ctrl" / "tiny" / "bayes" / "meta.json").is_file() and not (here / "~").exists()
    assert routed.controller_sources["bayes"] == str(home / "ctrl" / "tiny" / "bayes")
    again = mav.load((tiny_model(), CharTokenizer()), name="tiny", controllers="~/ctrl/tiny")
    assert again.controllers["bayes"].content_hash() == stack.content_hash()


# -- the README ----------------------------------------------------------------------------------
def readme_python(block: int = 0) -> str:
    """The ``block``-th Python block of the README's "From Python" section."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## From Python", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) > block, f"README.md: no python block {block} under 'From Python'"
    return blocks[block]


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


def test_the_readme_calibration_example_runs_as_written(tmp_path, monkeypatch):
    """The second block, with the reader's model, tokenizer and texts: a tiny model."""
    code = readme_python(1)
    assert "mav.calibrate(routed, texts" in code and "controllers=" in code
    monkeypatch.chdir(tmp_path)  # its save folder is relative
    scope: dict = {"model": tiny_model(), "tokenizer": CharTokenizer(), "texts": TEXTS}
    exec(compile(code, "README.md", "exec"), scope)
    trace, stack, routed = scope["trace"], scope["stack"], scope["routed"]
    assert trace.controller_trained and trace.controller_id == stack.controller_id
    assert stack.meta["hyperparameters"]["steps"] == 64
    # the last line loaded the saved controllers back with the model
    assert routed.controllers["bayes"].content_hash() == stack.content_hash()
    assert routed.controller_sources["bayes"] == str(Path("controllers/my-model/bayes"))


# -- == and what is refused by name ----------------------------------------------------------------
def test_traces_compare_with_eq_on_every_stored_field():
    """`==` is the round trip's equality (not numpy's "truth value of an array is
    ambiguous"), whatever the class: a notebook Trace equals the RoutingTrace of its record."""
    import copy

    trace = mav.load((tiny_model(), CharTokenizer()), name="tiny").route(PROMPT, budget=0.4, max_new_tokens=2)
    assert isinstance(trace, mav.Trace)
    back = RoutingTrace.from_json(trace.to_json())
    assert type(back) is RoutingTrace and back == trace and trace == back
    assert trace == copy.deepcopy(trace) and trace in [copy.deepcopy(trace)]
    assert mav.Trace.from_json(json.dumps(trace.to_json())) == trace
    back.lam[0, 1] = np.nextafter(back.lam[0, 1], np.float32(np.inf))
    assert back != trace
    assert trace != trace.to_json() and trace != None  # noqa: E711 - == of another type is False
    assert RoutingTrace.from_json(trace.to_json()).routes.dtype == np.int8
    widened = RoutingTrace.from_json(trace.to_json())
    widened.routes = widened.routes.astype(np.int64)
    assert widened != trace  # the same values in another dtype are another field


def test_from_json_refuses_routes_outside_the_experts_and_what_is_not_a_record():
    d = routed_tiny().route(PROMPT, budget=0.5).to_json()
    with pytest.raises(ValueError, match=r"routes must be expert indices in \[0, 3\), got \[0, 7\]"):
        RoutingTrace.from_json(
            {**d, "routes": [[7 if j == 1 else 0 for j, _ in enumerate(row)] for row in d["routes"]]}
        )
    with pytest.raises(ValueError, match="a trace record is a dict or its JSON text, got NoneType"):
        RoutingTrace.from_json(None)  # type: ignore[arg-type]


def test_prompts_and_arguments_of_the_wrong_kind_are_refused_by_name():
    r = routed_tiny()
    vocab = r.model.config.vocab_size
    ok = r.route([5, 6, np.int64(7)], budget=0.5)  # token ids, numpy's whole numbers too
    assert ok.token_ids == [5, 6, 7]
    for ids in ([-1, 5], [vocab], [1.5, 2.0], [True, 3]):
        with pytest.raises(ValueError, match=rf"token ids must be whole numbers in \[0, {vocab}\)"):
            r.route(ids)
    for batch in (["a", "b"], [[5, 6], [7]], [np.array([5, 6])]):  # said as a batch, not as bad ids
        with pytest.raises(
            ValueError, match="prompt is a list of texts or of token-id lists: batches are not"
        ):
            r.route(batch)
    with pytest.raises(ValueError, match="prompt is empty"):
        r.route([])
    with pytest.raises(
        ValueError, match=r"not valid UTF-8 text: an unpaired surrogate \(U\+DCFF\) at character 5"
    ):
        r.route("hello\udcffworld")  # what an undecodable byte on a command line becomes
    with pytest.raises(TypeError, match="settings must be a RoutingSettings.*got dict"):
        r.route(PROMPT, {"budget": 0.3})
    with pytest.raises(TypeError, match="sampling must be a Sampling, got dict"):
        r.route(PROMPT, sampling={"temperature": 1.0}, max_new_tokens=1)
    with pytest.raises(ValueError, match="max_context must be a whole number >= 1"):
        r.route(PROMPT, max_context=0)
    trace = r.route(PROMPT, budget=0.5)
    with pytest.raises(TypeError, match="settings must be a RoutingSettings.*got NoneType"):
        r.reroute(trace, None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="trace must be a RoutingTrace.*got str"):
        r.reroute("hello", RoutingSettings())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="trace must be a RoutingTrace.*got NoneType"):
        mav.figure(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="routed must be a RoutedModel.*got str"):
        mav.calibrate("model", TEXTS)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="temperature must be a number in \\[0, 5\\], got 'hot'"):
        mav.Sampling(temperature="hot")
    with pytest.raises(ValueError, match="seed must be a whole number in"):
        mav.Sampling(seed=2**70)


def test_a_trace_records_how_its_text_was_generated_and_keeps_it():
    """`generation` (max new tokens, temperature, top-p, seed, chat template) is what a share
    link carries and the log keeps; a re-route of the text keeps it; a record from before it
    existed reads as None; a malformed one is refused by name."""
    r = routed_tiny()
    trace = r.route(
        PROMPT, budget=0.5, max_new_tokens=3, sampling=mav.Sampling(temperature=0.7, top_p=0.9, seed=11)
    )
    assert trace.generation == {
        "max_new_tokens": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "seed": 11,
        "chat": False,
    }
    assert r.reroute(trace, RoutingSettings(budget=0.3)).generation == trace.generation
    # asked for a chat template the tokenizer does not have: recorded as what was applied
    assert r.route(PROMPT, budget=0.5, chat=True).generation["chat"] is False
    d = trace.to_json()
    assert RoutingTrace.from_json(json.dumps(d)).generation == trace.generation
    older = {k: v for k, v in d.items() if k != "generation"}
    assert RoutingTrace.from_json(older).generation is None
    with pytest.raises(ValueError, match="generation must be null or hold max_new_tokens"):
        RoutingTrace.from_json({**d, "generation": {"seed": 1}})
    # a record whose token ids are not this model's is refused by name, as route refuses it
    foreign = RoutingTrace.from_json(
        {**d, "token_ids": [t + r.model.config.vocab_size for t in d["token_ids"]]}
    )
    with pytest.raises(ValueError, match="token ids must be whole numbers in"):
        r.reroute(foreign, RoutingSettings(budget=0.3))
