"""What the API takes as a trace from a client (/figure, /reroute): its size, its fields
(forged traces are refused, in one sentence), the text it would store and the file names
it would make (requests.trace_from_json, requests.text_from_json, RoutingTrace.from_json,
exports.run_label)."""

import copy
import json

import numpy as np
import pytest
from helpers import synthetic_trace

from metaattn_viz.app import requests as app_requests
from metaattn_viz.app.errors import AppError
from metaattn_viz.app.exports import Downloads, run_label
from metaattn_viz.core.trace import RoutingTrace


def _record(**kw) -> dict:
    return json.loads(
        json.dumps(synthetic_trace(**{"n_layers": 3, "n_tokens": 12, "seed": 2, **kw}).to_json())
    )


# -- size ---------------------------------------------------------------------------------
def test_a_trace_too_long_or_too_deep_is_refused_before_any_array_is_built(monkeypatch):
    def no_arrays(*a, **k):
        raise AssertionError("built a trace that the size check refuses")

    monkeypatch.setattr(RoutingTrace, "from_json", no_arrays)
    n = app_requests.APP_MAX_CONTEXT + 1
    long = {**_record(), "token_ids": [5] * n, "tokens": ["a"] * n}
    with pytest.raises(AppError, match=f"{n:,} tokens; the app takes traces of at most"):
        app_requests.trace_from_json(long)
    deep = {**_record(), "n_layers": app_requests.MAX_TRACE_LAYERS + 1}
    with pytest.raises(AppError, match="layers; the app takes traces of at most 1024"):
        app_requests.trace_from_json(deep)


def test_a_well_formed_trace_reads_back_equal_through_the_api_check():
    for kw in ({}, {"controller": "priorfree"}, {"n_tokens": 0, "n_prompt_tokens": 0}, {"budget": None}):
        trace = synthetic_trace(**{"n_layers": 3, "n_tokens": 12, "seed": 2, **kw})
        assert app_requests.trace_from_json(json.loads(json.dumps(trace.to_json()))) == trace, kw


def test_a_prior_free_probability_of_zero_is_a_real_trace():
    """A softmax in float32 underflows to 0: a prior-free trace may hold a zero probability
    (a Bayesian concentration may not)."""
    d = _record(controller="priorfree")
    d["concentration"][0][0] = [1.0, 0.0, 0.0]
    assert RoutingTrace.from_json(d).concentration[0, 0, 1] == 0
    d = _record()
    d["concentration"][0][0] = [1.0, 0.0, 0.5]
    with pytest.raises(ValueError, match="concentration must be > 0"):
        RoutingTrace.from_json(d)


# -- forged fields ------------------------------------------------------------------------
def _set(path, value):
    def edit(d):
        *outer, last = path
        node = d
        for k in outer:
            node = node[k]
        node[last] = value

    return edit


FORGED = {
    "settings text": (_set(["settings"], "x"), "settings must be a JSON object"),
    "settings bad value": (_set(["settings", "scope"], "nowhere"), "scope must be one of"),
    "token dicts": (lambda d: d.update(tokens=[{"a": 1}] * 12), "tokens must be a list of 12 strings"),
    "tokens short": (lambda d: d.update(tokens=["a"]), "tokens must be a list of 12 strings"),
    "n_layers float": (_set(["n_layers"], 3.0), "n_layers must be a whole number"),
    "n_layers text": (_set(["n_layers"], "3"), "n_layers must be a whole number"),
    "head_dim bool": (_set(["head_dim"], True), "head_dim must be a whole number"),
    "head_dim 0": (_set(["head_dim"], 0), "head_dim must be at least 1"),
    "n_prompt past T": (_set(["n_prompt_tokens"], 13), "n_prompt_tokens must be between 0 and"),
    "n_prompt negative": (_set(["n_prompt_tokens"], -1), "n_prompt_tokens must be between 0 and"),
    "token id float": (_set(["token_ids", 0], 1.0), "token_ids must be a list of whole numbers"),
    "model list": (_set(["model"], ["x"]), "model must be text"),
    "controller number": (_set(["controller"], 5), "controller must be"),
    "prompt dict": (_set(["prompt"], {"a": 1}), "prompt must be text"),
    # shapes: the same number of values, the wrong layout (from_json only counted them)
    "concentration transposed": (
        lambda d: d.update(concentration=np.asarray(d["concentration"]).reshape(12, 3, 3).tolist()),
        "concentration must",
    ),
    "cost flat": (lambda d: d.update(cost=np.ravel(d["cost"]).tolist()), "cost must"),
    "routes ragged": (
        _set(["routes", 0], [0]),
        r"routes must be an array of 3 x 12 \(layers x tokens\), not ragged",
    ),
    "lam one layer short": (lambda d: d.update(lam=d["lam"][:2]), "lam must hold 3 layers"),
    "kl one short": (_set(["kl_to_dense"], [0.0] * 11), "kl_to_dense must be null or"),
    # values
    "concentration nan": (_set(["concentration", 0, 0, 0], float("nan")), "concentration must be finite"),
    "concentration negative": (_set(["concentration", 1, 2, 0], -1.0), "concentration must be > 0"),
    "concentration text": (_set(["concentration", 1, 2, 0], "1"), "concentration must hold numbers"),
    "weights sum 2": (_set(["weights", 0, 0], [1.0, 1.0, 0.0]), "must sum to 1"),
    "weights negative": (_set(["weights", 0, 0], [1.5, -0.5, 0.0]), "weights must be finite and >= 0"),
    "weights inf": (_set(["weights", 0, 0], [float("inf"), 0.0, 0.0]), "weights must be finite"),
    "cost negative": (_set(["cost", 0, 0], -0.1), "cost must be finite and >= 0"),
    "lam inf": (_set(["lam", 0, 0], float("inf")), "lam must be finite"),
    "route 300": (_set(["routes", 0, 0], 300), "routes must be expert indices"),
    "hedged null": (_set(["hedged", 0, 0], None), "hedged must hold true or false"),
    "generation inf": (
        _set(
            ["generation"],
            {"max_new_tokens": float("inf"), "temperature": 0, "top_p": 1, "seed": 0, "chat": 1},
        ),
        "generation must hold",
    ),
}


@pytest.mark.parametrize("case", sorted(FORGED))
def test_a_forged_trace_is_refused_in_one_sentence(case):
    edit, msg = FORGED[case]
    d = _record()
    d["generation"] = {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "seed": 0, "chat": True}
    RoutingTrace.from_json(copy.deepcopy(d))  # the untouched record is fine
    edit(d)
    with pytest.raises(ValueError, match=msg):
        RoutingTrace.from_json(copy.deepcopy(d))
    with pytest.raises(
        AppError, match=r"^Expected a trace as returned by the generate endpoint.*" + msg
    ) as err:
        app_requests.trace_from_json(d)
    assert "\n" not in str(err.value)


def test_the_api_takes_only_the_controllers_the_app_has():
    d = _record()
    d["controller"] = "evil"
    RoutingTrace.from_json(copy.deepcopy(d))  # core does not know the controllers
    with pytest.raises(AppError, match="controller must be one of bayes"):
        app_requests.trace_from_json(d)
    with pytest.raises(AppError, match="a JSON object"):
        app_requests.trace_from_json([1, 2])


# -- text a re-route would store ------------------------------------------------------------
def test_a_reroute_stores_the_prompt_and_output_by_the_prompt_rules():
    base = {"token_ids": [1, 2, 3]}
    t = app_requests.text_from_json({**base, "prompt": "a\x00b\ud800c\r\nd", "output_text": "o\x07k\tz"}, 256)
    assert (t.prompt, t.output_text) == ("abc\nd", "ok\tz")
    assert app_requests.text_from_json(base, 256).prompt == ""  # a bare text has none
    too_long = "P" * (app_requests.MAX_PROMPT_CHARS + 1)
    for field in ("prompt", "output_text"):
        with pytest.raises(AppError, match=f"trace's {field} is 16,001 characters long"):
            app_requests.text_from_json({**base, field: too_long}, 256)
        for junk in ({"evil": 1}, ["a"], 5):
            with pytest.raises(AppError, match=f"trace's {field} must be text"):
                app_requests.text_from_json({**base, field: junk}, 256)


# -- file names -----------------------------------------------------------------------------
@pytest.mark.parametrize(
    "run_id, label",
    [
        ("3f2a1b4c-aaaa-bbbb", "3f2a1b4c"),
        ("../../../../tmp/x", "tmpx"),
        ("a/b\\c d.e", "abcde"),
        ([1], "unlogged"),
        ("../..", "unlogged"),
        ("ü✓", "unlogged"),
        (None, "unlogged"),
        ("x" * 1000, "xxxxxxxx"),
    ],
)
def test_run_label_keeps_only_letters_digits_and_hyphens(run_id, label):
    trace = synthetic_trace(n_layers=1, n_tokens=2)
    trace.run_id = run_id
    assert run_label(trace) == label


def test_a_client_run_id_cannot_steer_the_figure_file(tmp_path):
    trace = synthetic_trace(n_layers=1, n_tokens=2)
    trace.run_id = "../../../../tmp/x"
    import plotly.graph_objects as go

    path = Downloads(tmp_path / "dl").figure(go.Figure(), "session", "api-maps", run_label(trace))
    assert path.name == "metaattn-api-maps-tmpx.html" and (tmp_path / "dl") in path.parents


def test_an_unknown_run_is_named_short():
    """A client may send a megabyte of run id: the refusal names its first 80 characters."""
    from metaattn_viz.app.errors import no_such_run

    assert str(no_such_run("abc")) == "There is no run 'abc' in the routing log."
    assert len(str(no_such_run("x" * 1_000_000))) < 130
