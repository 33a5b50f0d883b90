"""app/examples.py and the shipped example traces (assets/example_traces/): each loads with
no model (not even torch), was made by the controllers that ship today (else: rerun
metaattn-viz examples), and regenerating one reproduces its routes; the generator and the
loader on a tiny model, and their errors."""

from __future__ import annotations

import gzip
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from helpers import routed_tiny

from metaattn_viz import paths
from metaattn_viz.app import examples as ex
from metaattn_viz.cli import main as cli_main
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.core.trace import RoutingTrace


# -- the shipped examples -------------------------------------------------------------------
def test_every_shipped_example_loads_as_the_trace_its_index_describes():
    index = ex.read_index()
    listed = ex.list_examples()
    prompts = ex.read_prompts()
    assert [e.label for e in listed] == [p["label"] for p in prompts]  # one per example prompt
    assert [(e.prompt, e.chat) for e in listed] == [(p["prompt"], p["chat"]) for p in prompts]
    total = 0
    for e in listed:
        tr = ex.load_example(e.key)
        assert isinstance(tr, RoutingTrace)
        assert tr.model == index["model"] == e.model and tr.controller_id == e.controller_id
        assert tr.controller_trained and tr.controller == index["controller"]
        assert tr.settings == RoutingSettings.from_dict(index["settings"])
        assert tr.n_tokens == e.n_tokens and tr.routes.shape == (tr.n_layers, tr.n_tokens)
        assert 0 < tr.n_prompt_tokens < tr.n_tokens <= tr.n_prompt_tokens + index["max_new_tokens"]
        assert tr.kl_to_dense is not None and np.isfinite(tr.kl_to_dense).all()
        assert tr.prompt == e.prompt and tr.run_id is None
        assert ex.load_example(e.label).token_ids == tr.token_ids  # by label as well
        total += (paths.ASSETS_DIR / "example_traces" / e.file).stat().st_size
    assert total < 1_000_000  # they ship inside the package
    assert ex.initial_trace().token_ids == ex.load_example(listed[0].key).token_ids


def test_the_shipped_examples_were_made_by_the_shipped_controllers():
    reasons = ex.stale_reasons()
    assert not reasons, "the example traces are stale:\n" + "\n".join(reasons)
    # and each recorded hash is the weights' own, not only what meta.json says
    from metaattn_viz.routing.controller import ControllerStack, default_folder
    from metaattn_viz.routing.loading import slugify

    index = ex.read_index()
    for kind, recorded in index["controllers"].items():
        stack = ControllerStack.load(default_folder(slugify(index["model"]), kind))
        assert stack.content_hash() == recorded, f"{kind}: rerun metaattn-viz examples"


def test_replaying_an_example_needs_neither_the_model_nor_torch():
    code = (
        "import sys; from metaattn_viz.app import examples as ex; "
        "t = ex.initial_trace(); assert t is not None and t.n_tokens > 0; "
        "from metaattn_viz.app import plots; plots.live_views(t); "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.slow
def test_regenerating_a_shipped_example_reproduces_its_routes(real_model):
    from metaattn_viz.routing.model import RoutedModel

    index = ex.read_index()
    listed = ex.list_examples()
    example = min(listed, key=lambda e: e.n_tokens)  # the shortest: a few seconds
    shipped = ex.load_example(example.key)
    routed = RoutedModel.from_loaded(real_model)
    try:
        item = {"label": example.label, "prompt": example.prompt, "chat": example.chat}
        settings = RoutingSettings.from_dict(index["settings"])
        again = ex.make_example(routed, item, settings, index["max_new_tokens"], example.controller)
    finally:
        routed.detach()
    assert again.token_ids == shipped.token_ids, "the text differs: rerun metaattn-viz examples"
    np.testing.assert_array_equal(again.routes, shipped.routes, err_msg="rerun metaattn-viz examples")
    np.testing.assert_allclose(again.concentration, shipped.concentration, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(again.kl_to_dense, shipped.kl_to_dense, rtol=1e-2, atol=1e-4)


# -- the generator and the loader, on a tiny model --------------------------------------------
PROMPTS = [
    {"label": "One: first!", "prompt": "The cat sat on", "chat": False},
    {"label": "Two", "prompt": "A routed model", "chat": True},
]


def _tiny_trained():
    routed = routed_tiny(spread=4.0)
    for stack in routed.controllers.values():
        stack.trained = True  # as if calibrated: the generator refuses untrained ones
    return routed


def _prompts_file(tmp_path, items=PROMPTS):
    path = tmp_path / "examples.json"
    path.write_text(json.dumps(items))
    return path


def test_generate_writes_traces_and_an_index_that_load_back_equal(tmp_path):
    routed = _tiny_trained()
    out = tmp_path / "traces"
    said: list[str] = []
    settings = RoutingSettings(budget=0.4, window=4, n_sink=1)
    index = ex.generate(routed, out, _prompts_file(tmp_path), settings, 3, "bayes", said.append)
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "one-first.json.gz", "two.json.gz"]
    assert index == json.loads((out / "index.json").read_text())
    assert index["model"] == "tiny-llama" and index["max_new_tokens"] == 3
    assert index["controllers"] == {k: s.content_hash() for k, s in routed.controllers.items()}
    # as the traces record them: "auto" is elu + 1 for a model without learned maps
    assert RoutingSettings.from_dict(index["settings"]) == settings.with_(linear_map="elu")
    assert len(said) == 2 and said[0].startswith("One: first!")
    listed = ex.list_examples(out)
    assert [e.key for e in listed] == ["one-first", "two"]
    for e, item in zip(listed, PROMPTS, strict=True):
        tr = ex.load_example(e.key, out)
        assert tr.prompt == item["prompt"] and tr.n_tokens == e.n_tokens
        assert tr.n_tokens - tr.n_prompt_tokens == 3  # no end-of-sequence token in bytes
        again = ex.make_example(routed, item, settings, 3, "bayes")  # deterministic: greedy
        assert again.token_ids == tr.token_ids
        np.testing.assert_array_equal(again.routes, tr.routes)
        np.testing.assert_array_equal(tr.concentration, again.concentration)
        assert tr.kl_to_dense is not None and tr.kl_to_dense.shape == (tr.n_tokens,)
    assert ex.initial_trace(out).prompt == PROMPTS[0]["prompt"]


def test_the_index_records_the_commit_as_it_was_before_the_traces_were_written(tmp_path, monkeypatch):
    """Rewriting the shipped traces dirties the checkout: the commit the index records must
    be read before that (it recorded "+dirty" after a clean `make examples`)."""
    from metaattn_viz.training import provenance

    out = tmp_path / "traces"
    monkeypatch.setattr(
        provenance, "git_commit", lambda: "abc+dirty" if out.exists() and any(out.iterdir()) else "abc"
    )
    index = ex.generate(_tiny_trained(), out, _prompts_file(tmp_path), RoutingSettings(), 1, "bayes")
    assert index["project_commit"] == "abc"


def test_the_staleness_check_names_the_controllers_that_changed(tmp_path):
    routed = _tiny_trained()
    out, controllers = tmp_path / "traces", tmp_path / "controllers"
    ex.generate(routed, out, _prompts_file(tmp_path), RoutingSettings(window=4, n_sink=1), 2)
    for kind, stack in routed.controllers.items():
        stack.save(controllers / "tiny-llama" / kind)
    assert ex.stale_reasons(out, controllers) == []
    import torch

    stack = routed.controllers["bayes"]
    with torch.no_grad():
        stack.layers[0].fc2.bias.add_(1.0)  # "new controllers were calibrated"
    stack.save(controllers / "tiny-llama" / "bayes")
    reasons = ex.stale_reasons(out, controllers)
    assert len(reasons) == 1 + len(PROMPTS)  # the index's hash, and each bayes trace
    assert all("rerun metaattn-viz examples" in r for r in reasons)
    assert "bayes controllers" in reasons[0] and stack.content_hash() in reasons[0]
    shutil.rmtree(controllers / "tiny-llama" / "priorfree")  # no longer shipped
    assert any("priorfree" in r and "None" in r for r in ex.stale_reasons(out, controllers))


def test_untrained_controllers_make_no_examples(tmp_path):
    with pytest.raises(ex.ExampleError, match="untrained"):
        ex.generate(routed_tiny(), tmp_path / "t", _prompts_file(tmp_path), max_new_tokens=1)
    assert not (tmp_path / "t").exists() or not any((tmp_path / "t").iterdir())


def test_bad_examples_are_refused_in_plain_words(tmp_path):
    assert ex.example_key(" Copy a list! ") == "copy-a-list"
    with pytest.raises(ex.ExampleError, match="letters or digits"):
        ex.example_key("!!")
    dup = [{"label": "A b", "prompt": "x"}, {"label": "a-B", "prompt": "y"}]
    with pytest.raises(ex.ExampleError, match="share a label"):
        ex.read_prompts(_prompts_file(tmp_path, dup))
    with pytest.raises(ex.ExampleError, match="item 0 has no prompt"):
        ex.read_prompts(_prompts_file(tmp_path, [{"label": "x", "prompt": "  "}]))
    # no index: nothing listed (the page starts empty), and reading says how to fix it
    assert ex.list_examples(tmp_path) == [] and ex.initial_trace(tmp_path) is None
    with pytest.raises(ex.ExampleError, match="rerun metaattn-viz examples"):
        ex.read_index(tmp_path)
    with pytest.raises(ex.ExampleError, match="no example 'nope'.*Capital cities"):
        ex.load_example("nope")
    # a damaged trace file
    folder = tmp_path / "copy"
    shutil.copytree(paths.ASSETS_DIR / "example_traces", folder)
    first = ex.list_examples(folder)[0]
    (folder / first.file).write_bytes(b"not gzip")
    with pytest.raises(ex.ExampleError, match="cannot read the example trace.*rerun"):
        ex.load_example(first.key, folder)
    (folder / first.file).write_bytes(gzip.compress(b'{"model": "m"}'))
    with pytest.raises(ex.ExampleError, match="not a trace record.*missing"):
        ex.load_example(first.key, folder)


def test_the_examples_command_checks_its_arguments_before_loading_a_model(capsys):
    assert cli_main(["examples", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens must be at least 1" in capsys.readouterr().err


def _files(folder):
    return {p.name: p.read_bytes() if p.is_file() else "a folder" for p in folder.iterdir()}


def test_a_run_stopped_midway_leaves_the_previous_examples_as_they_were(tmp_path, monkeypatch):
    """Ctrl-C while the second trace is made: the folder still holds the first run's traces
    under the first run's index (it held a new trace under the old index), nothing else."""
    routed, prompts = _tiny_trained(), _prompts_file(tmp_path)
    out = tmp_path / "traces"
    out.mkdir()
    (out / "README").write_text("not ours")  # anything else in --out is left alone
    ex.generate(routed, out, prompts, RoutingSettings(), 1, "bayes")
    before = _files(out)
    made = ex.make_example

    def stopped_at_the_second(routed, item, *args, **kwargs):
        if item["label"] == PROMPTS[1]["label"]:
            raise KeyboardInterrupt
        return made(routed, item, *args, **kwargs)

    monkeypatch.setattr(ex, "make_example", stopped_at_the_second)
    with pytest.raises(KeyboardInterrupt):
        ex.generate(routed, out, prompts, RoutingSettings(), 3, "bayes")
    assert _files(out) == before  # no staging folder left, no trace replaced
    assert ex.read_index(out)["max_new_tokens"] == 1
    assert all(ex.load_example(e.key, out).n_tokens == e.n_tokens for e in ex.list_examples(out))
    # a run that fails into a folder that was not there leaves no folder
    with pytest.raises(KeyboardInterrupt):
        ex.generate(routed, tmp_path / "new", prompts, RoutingSettings(), 3, "bayes")
    assert not (tmp_path / "new").exists()
    # and a run that completes replaces every trace and the index, leaving the rest
    monkeypatch.setattr(ex, "make_example", made)
    ex.generate(routed, out, prompts, RoutingSettings(), 2, "bayes")
    assert sorted(_files(out)) == sorted(before) and (out / "README").read_text() == "not ours"
    assert ex.read_index(out)["max_new_tokens"] == 2
    for e in ex.list_examples(out):
        tr = ex.load_example(e.key, out)
        assert tr.n_tokens == e.n_tokens and tr.n_tokens - tr.n_prompt_tokens == 2


def test_a_prompt_taken_out_of_the_list_takes_its_trace_with_it(tmp_path):
    """A rerun without one of the prompts removes that prompt's trace (it would ship as a
    leftover) and nothing that the previous index did not list."""
    routed = _tiny_trained()
    out = tmp_path / "traces"
    out.mkdir()
    (out / "mine.json.gz").write_bytes(b"not from an index")
    first = ex.generate(routed, out, _prompts_file(tmp_path), RoutingSettings(), 1, "bayes")
    dropped = first["examples"][1]["file"]
    assert (out / dropped).is_file()
    ex.generate(routed, out, _prompts_file(tmp_path, PROMPTS[:1]), RoutingSettings(), 1, "bayes")
    assert not (out / dropped).exists() and (out / first["examples"][0]["file"]).is_file()
    assert (out / "mine.json.gz").read_bytes() == b"not from an index"
    assert [e.key for e in ex.list_examples(out)] == [first["examples"][0]["key"]]


def test_a_run_stopped_while_moving_its_traces_in_leaves_no_index(tmp_path, monkeypatch):
    """The few renames at the end can be interrupted too: then the folder has no index (it
    reads as "no example traces: rerun"), never an index out of step with its traces."""
    routed, prompts = _tiny_trained(), _prompts_file(tmp_path)
    out = tmp_path / "traces"
    ex.generate(routed, out, prompts, RoutingSettings(), 1, "bayes")
    replace, moved = ex.os.replace, []

    def stopped_after_one(src, dst):
        if moved:
            raise KeyboardInterrupt
        moved.append(dst)
        replace(src, dst)

    monkeypatch.setattr(ex.os, "replace", stopped_after_one)
    with pytest.raises(KeyboardInterrupt):
        ex.generate(routed, out, prompts, RoutingSettings(), 3, "bayes")
    assert sorted(p.name for p in out.iterdir()) == ["one-first.json.gz", "two.json.gz"]  # no staging
    assert ex.list_examples(out) == [] and ex.initial_trace(out) is None
    with pytest.raises(ex.ExampleError, match="no example traces.*rerun metaattn-viz examples"):
        ex.stale_reasons(out)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: tmp / "file.txt", "--out .*file.txt is a file, not a folder"),
        (lambda tmp: tmp / "file.txt" / "sub", "--out .*sub cannot be made: .*file.txt is a file"),
        (lambda tmp: "", "--out is empty: give a folder path"),
        (lambda tmp: "  ", "--out is empty: give a folder path"),
    ],
)
def test_the_examples_command_checks_its_out_folder_before_loading_a_model(
    tmp_path, monkeypatch, capsys, make, message
):
    (tmp_path / "file.txt").write_text("x")
    monkeypatch.chdir(tmp_path)  # an empty --out wrote the traces here

    def loads_a_model(*args, **kwargs):
        raise AssertionError("the model was loaded before --out was checked")

    monkeypatch.setattr(ex, "generate", loads_a_model)
    assert cli_main(["examples", "--out", str(make(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, no traceback
    assert err.startswith("metaattn-viz examples: error: ")
    assert re.search(message, err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]
    # the shipped folder, when no --out is given, is checked the same way
    monkeypatch.setattr(ex, "TRACES_DIR", tmp_path / "file.txt")
    assert cli_main(["examples"]) == 2
    assert "the default --out" in capsys.readouterr().err


def test_the_examples_command_writes_where_out_says(tmp_path, monkeypatch, capsys):
    routed = _tiny_trained()
    real = ex.generate

    def on_the_tiny_model(routed_=None, out=None, **kwargs):
        return real(routed, out, _prompts_file(tmp_path), RoutingSettings(), **kwargs)

    monkeypatch.setattr(ex, "generate", on_the_tiny_model)
    out = tmp_path / "a" / "b"
    assert cli_main(["examples", "--out", str(out), "--max-new-tokens", "1"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == len(PROMPTS)
    assert [e.key for e in ex.list_examples(out)] == ["one-first", "two"]
    assert sorted(p.name for p in out.iterdir()) == ["index.json", "one-first.json.gz", "two.json.gz"]
