"""Model choice (issue 15): which models a server offers (app/models.py) and the host's
registry of them (app/host.py): the default loads at once, the others on first use, one
load at a time, at most N stay loaded (least recently used dropped), untrained controllers
labelled, and every analysis runs on the model that made the trace. Tiny random models
stand in for real ones (an injected loader); nothing is downloaded."""

from __future__ import annotations

import json
import threading
import time

import pytest
from helpers import CharTokenizer, tiny_model

from metaattn_viz.app import plots
from metaattn_viz.app.analysis import Analysis
from metaattn_viz.app.errors import AppError
from metaattn_viz.app.history import RunHistory
from metaattn_viz.app.host import ModelHost, max_loaded_from_env
from metaattn_viz.app.models import (
    ModelChoice,
    catalogue,
    choice_for_spec,
    model_label,
    operator_specs,
    shipped_models,
)
from metaattn_viz.app.requests import Text
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing.loading import BUNDLED_NAME


# -- which models ---------------------------------------------------------------------------
def test_operator_models_come_from_the_flag_else_the_environment(monkeypatch):
    env = {"METAATTN_MODELS": " a/x , b/y,,a/x ", "METAATTN_MODEL": "c/z"}
    assert operator_specs(None, env) == ["a/x", "b/y", "c/z"]
    assert operator_specs(["d/w", "d/w", " "], env) == ["d/w", "c/z"]  # flags win over METAATTN_MODELS
    assert operator_specs("e/v", {}) == ["e/v"]
    assert operator_specs(None, {}) == []
    with pytest.raises(ValueError, match="must be given as text"):
        operator_specs([3], {})


def test_labels_say_which_controllers_are_untrained():
    assert model_label("M", {"bayes": True, "priorfree": True}) == "M"
    assert model_label("M", {}) == "M (untrained controllers)"
    assert model_label("M", {"bayes": True, "priorfree": False}) == "M (untrained priorfree controllers)"


def _ship(root, name, kinds=("bayes", "priorfree"), folder=None):
    """A shipped-controllers folder: meta.json naming the model, a weights file per kind."""
    from metaattn_viz.routing.loading import slugify

    for kind in kinds:
        d = root / (folder or slugify(name)) / kind
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps({"model": name, "content_hash": "0"}))
        (d / "controller.safetensors").write_bytes(b"x")


def test_catalogue_offers_the_operators_models_then_every_shipped_one(tmp_path, monkeypatch):
    monkeypatch.delenv("METAATTN_MODEL", raising=False)
    ctrl = tmp_path / "controllers"
    _ship(ctrl, "Foo-1B", kinds=("bayes",))
    _ship(ctrl, "SmolLM2-135M-Instruct")
    _ship(ctrl, "Other", folder="not-its-slug")  # a folder that does not match its meta: skipped
    assert [(c.id, c.spec) for c in shipped_models(ctrl)] == [
        ("foo-1b", "Foo-1B"),
        ("smollm2-135m-instruct", None),  # the bundled model's name: the bundled default
    ]
    mine = tmp_path / "my-model"
    mine.mkdir()
    (mine / "config.json").write_text("{}")
    got = catalogue([str(mine), "org/Foo-1B"], {}, ctrl)
    assert [(c.id, c.label) for c in got] == [
        ("my-model", "my-model (untrained controllers)"),  # the operator's first: the default
        ("foo-1b", "Foo-1B (untrained priorfree controllers)"),  # the hub id names the shipped one
        ("smollm2-135m-instruct", "SmolLM2-135M-Instruct"),
    ]
    assert got[1].spec == "org/Foo-1B"  # the operator's spec says how to load it
    # no operator model: the bundled default first
    assert catalogue(None, {}, ctrl)[0].name == BUNDLED_NAME
    # a spec that resolves to nothing is still offered: loading it explains the problem
    assert choice_for_spec(str(tmp_path / "missing.gguf"), ctrl).name == "missing.gguf"


def test_the_real_catalogue_offers_the_bundled_model_with_trained_controllers(monkeypatch):
    monkeypatch.delenv("METAATTN_MODEL", raising=False)
    monkeypatch.delenv("METAATTN_MODELS", raising=False)
    first = catalogue()[0]
    assert (first.id, first.name, first.label) == ("smollm2-135m-instruct", BUNDLED_NAME, BUNDLED_NAME)


# -- the host's registry ----------------------------------------------------------------------
def tiny_routed(name: str, seed: int = 0, trained: bool = False):
    from metaattn_viz.routing.controller import ControllerStack, config_for_model
    from metaattn_viz.routing.model import RoutedModel

    model = tiny_model(seed=seed)
    ctrl = {k: ControllerStack(config_for_model(model.config, k), seed=seed) for k in ("bayes", "priorfree")}
    for s in ctrl.values():
        s.trained = trained
    return RoutedModel(model, CharTokenizer(), ctrl, name)


class Loader:
    """Makes tiny models by choice, counting loads and how many run at once."""

    def __init__(self, fail: set[str] = frozenset(), delay: float = 0.0, trained: set[str] = frozenset()):
        self.calls: list[str] = []
        self.running = self.most = 0
        self.fail, self.delay, self.trained = fail, delay, trained
        self._lock = threading.Lock()

    def __call__(self, choice: ModelChoice):
        with self._lock:
            self.calls.append(choice.id)
            self.running += 1
            self.most = max(self.most, self.running)
        try:
            time.sleep(self.delay)
            if choice.id in self.fail:
                raise RuntimeError(f"{choice.name} is broken")
            return tiny_routed(choice.name, len(self.calls), choice.id in self.trained)
        finally:
            with self._lock:
                self.running -= 1


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("METAATTN_MODEL", raising=False)
    monkeypatch.delenv("METAATTN_MODELS", raising=False)
    monkeypatch.delenv("METAATTN_MAX_MODELS", raising=False)


def host_of(specs, loader, **kw) -> ModelHost:
    return ModelHost(specs, threads=False, loader=loader, **kw)


def test_the_default_loads_at_once_and_the_others_on_first_use(no_env):
    loader = Loader()
    host = host_of(["org/tiny-a", "org/tiny-b"], loader)
    a = host.routed_model(30)
    assert a.name == "tiny-a" and host.ready and loader.calls == ["tiny-a"]
    assert not host.is_ready("tiny-b")
    b = host.routed_model(30, model="org/tiny-b")  # by the operator's spec
    assert b.name == "tiny-b" and loader.calls == ["tiny-a", "tiny-b"]
    assert host.routed_model(30, model="tiny-b") is b  # by id or name: no second load
    assert host.routed_model(30, model=None) is a
    labels = dict((mid, label) for label, mid in host.choices())
    assert labels["tiny-a"] == "tiny-a (untrained controllers)"
    assert labels["smollm2-135m-instruct"] == BUNDLED_NAME  # shipped models are offered too
    assert host.choices()[0][1] == "tiny-a"  # the default first
    with pytest.raises(AppError, match="does not offer the model 'nope'.*tiny-a, tiny-b"):
        host.routed_model(1, model="nope")


def test_at_most_n_models_stay_loaded_least_recently_used_first(no_env):
    loader = Loader()
    host = host_of(["org/tiny-a", "org/tiny-b", "org/tiny-c"], loader, max_loaded=2)
    host.routed_model(30)
    host.routed_model(30, model="tiny-b")
    host.routed_model(30, model="tiny-a")  # a is now the most recently used
    host.routed_model(30, model="tiny-c")
    assert host.loaded_ids() == ["tiny-a", "tiny-c"]  # b, least recently used, was dropped
    host.routed_model(30, model="tiny-b")  # loads again
    assert loader.calls == ["tiny-a", "tiny-b", "tiny-c", "tiny-b"]
    assert host.loaded_ids() == ["tiny-c", "tiny-b"]
    assert {m["id"]: m["loaded"] for m in host.status()["models"]} == {
        "tiny-a": False,
        "tiny-b": True,
        "tiny-c": True,
        "smollm2-135m-instruct": False,
    }


def test_models_load_one_at_a_time(no_env):
    loader = Loader(delay=0.2)
    host = host_of(["org/tiny-a", "org/tiny-b", "org/tiny-c"], loader, max_loaded=3)
    host.start_loading("tiny-b")
    host.start_loading("tiny-c")
    threads = [
        threading.Thread(target=host.routed_model, args=(30, m)) for m in ("tiny-a", "tiny-b", "tiny-c")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(loader.calls) == ["tiny-a", "tiny-b", "tiny-c"] and loader.most == 1
    assert sorted(host.loaded_ids()) == ["tiny-a", "tiny-b", "tiny-c"]


def test_a_model_that_cannot_load_says_why_and_the_others_still_serve(no_env):
    loader = Loader(fail={"tiny-b"})
    host = host_of(["org/tiny-a", "org/tiny-b"], loader)
    with pytest.raises(AppError, match="could not be loaded: tiny-b is broken"):
        host.routed_model(30, model="tiny-b")
    with pytest.raises(AppError, match="tiny-b is broken"):
        host.routed_model(30, model="tiny-b")
    assert loader.calls.count("tiny-b") == 1  # not retried on every request
    assert host.routed_model(30).name == "tiny-a"
    (b,) = [m for m in host.models() if m["id"] == "tiny-b"]
    assert b["error"] == "tiny-b is broken" and not b["loaded"]
    assert host.status("tiny-b")["model_error"] == "tiny-b is broken"


def test_a_model_still_loading_is_a_plain_message(no_env):
    host = host_of(["org/tiny-a"], Loader(delay=1.0))
    with pytest.raises(AppError, match="tiny-a is still loading"):
        host.routed_model(0.01)
    assert host.routed_model(30).name == "tiny-a"


def test_labels_follow_the_controllers_a_loaded_model_really_has(no_env):
    host = host_of(["org/tiny-a"], Loader(trained={"tiny-a"}))
    assert host.choices()[0] == ("tiny-a (untrained controllers)", "tiny-a")  # nothing shipped
    host.routed_model(30)
    assert host.choices()[0] == ("tiny-a", "tiny-a")


def test_max_loaded_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("METAATTN_MAX_MODELS", "3")
    assert max_loaded_from_env() == 3
    monkeypatch.setenv("METAATTN_MAX_MODELS", "0")
    with pytest.raises(ValueError, match="METAATTN_MAX_MODELS must be a whole number >= 1"):
        max_loaded_from_env()
    monkeypatch.setenv("METAATTN_MAX_MODELS", "many")
    with pytest.raises(ValueError, match="METAATTN_MAX_MODELS"):
        max_loaded_from_env()


# -- analyses run on the model that made the trace ---------------------------------------------
def test_reroute_and_quality_use_the_traces_own_model(no_env):
    host = host_of(["org/tiny-a", "org/tiny-b"], Loader())
    history = RunHistory(enabled=False)
    analysis = Analysis(host, history)
    try:
        b = host.routed_model(30, model="tiny-b")
        settings = RoutingSettings(budget=0.5, window=4, n_sink=1)
        trace = b.route("The cat sat", settings, 2)
        assert trace.model == "tiny-b"
        again = analysis.reroute(trace, settings.with_(budget=0.8), log_run=False)
        assert again.model == "tiny-b" and again.token_ids == trace.token_ids
        kl = analysis.quality(trace)
        ref = b.reroute(trace, settings, quality=True).kl_to_dense
        assert kl.shape == ref.shape and abs(kl - ref).max() < 1e-4  # b's own KL, not a's
        text = Text(list(trace.token_ids), list(trace.tokens))
        assert analysis.reroute(text, settings, log_run=False).model == "tiny-a"  # no model: default
        trace.model = "gone"
        with pytest.raises(AppError, match="does not offer the model 'gone'"):
            analysis.reroute(trace, settings, log_run=False)
        with pytest.raises(AppError, match="attention view needs that model"):
            analysis.inspect(trace, 1)
    finally:
        history.close()


def test_every_figure_of_an_untrained_models_trace_says_untrained(no_env):
    host = host_of(["org/tiny-a"], Loader())
    trace = host.routed_model(30).route("abc", RoutingSettings(window=4, n_sink=1), 1)
    assert not trace.controller_trained
    assert "UNTRAINED" in plots.routing_maps(trace).layout.title.text
    assert "UNTRAINED" in plots.expert_map(trace, relative=True).layout.title.text
    assert "UNTRAINED" in plots.meters(trace)


def test_a_generation_runs_on_the_model_the_request_names(no_env):
    """The page's model dropdown reaches the generation: the request's model routes it, an
    empty one is the default, and a model the server does not offer is a plain message."""
    from metaattn_viz.app.generation import Generations
    from metaattn_viz.app.requests import parse_request, parse_settings

    host = host_of(["org/tiny-a", "org/tiny-b"], Loader())
    history = RunHistory(enabled=False)
    generations = Generations(host, history, Analysis(host, history))
    try:
        settings = parse_settings(0.5)
        for model, made_by in (("tiny-b", "tiny-b"), ("", "tiny-a")):
            req = parse_request("The cat", settings, max_new_tokens=2, chat=False, quality=False, model=model)
            assert generations.generate(req, timeout=60).model == made_by
        job = generations.start(parse_request("The cat", settings, max_new_tokens=2, model="nowhere"))
        with pytest.raises(AppError, match="does not offer the model 'nowhere'"):
            job.result(60)
        with pytest.raises(AppError, match="Model must be the name"):
            parse_request("The cat", settings, model=3)
    finally:
        history.close()
