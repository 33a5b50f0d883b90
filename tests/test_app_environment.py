"""The server's settings from the environment (app/environment.py): one rule for whole
numbers and flags, and `serve` refusing a bad one by name before it loads anything."""

from __future__ import annotations

import subprocess
import sys

import pytest
from helpers import ROOT, base_env

from metaattn_viz.app.environment import flag_from_env, whole_from_env


@pytest.mark.parametrize(
    "held, expected", [(None, 7), ("", 7), ("  ", 7), ("3", 3), (" 12 ", 12), ("1", 1), ("20", 20)]
)
def test_a_whole_number_from_the_environment(held, expected):
    env = {} if held is None else {"N": held}
    assert whole_from_env("N", 7, 1, 20, environ=env) == expected


@pytest.mark.parametrize("held", ["0", "21", "-3", "abc", "2.5", "1e3", "1_0", "٣", "3 4"])
def test_a_bad_whole_number_is_refused_by_name_with_its_range(held):
    with pytest.raises(ValueError, match=rf"^N must be a whole number from 1 to 20, got '{held}'$"):
        whole_from_env("N", 7, 1, 20, environ={"N": held})


def test_an_open_range_says_its_lower_end():
    with pytest.raises(ValueError, match="N must be a whole number >= 2, got '1'"):
        whole_from_env("N", 7, 2, environ={"N": "1"})
    assert whole_from_env("N", 7, 2, environ={"N": "123456"}) == 123456


@pytest.mark.parametrize(
    "held, on",
    [("1", True), ("TRUE", True), (" yes ", True), ("on", True), ("0", False), ("", False), ("no", False)],
)
def test_a_flag_from_the_environment(held, on):
    assert flag_from_env("F", environ={"F": held}) is on
    assert flag_from_env("F", environ={}) is False


def test_the_servers_numbers_are_checked(monkeypatch):
    from metaattn_viz.app.deployment import PUBLIC_LIMITS, Deployment
    from metaattn_viz.app.host import configure_threads, max_loaded_from_env

    monkeypatch.setenv("METAATTN_THREADS", "0")
    with pytest.raises(ValueError, match="METAATTN_THREADS must be a whole number from 1 to 1024, got '0'"):
        configure_threads()
    monkeypatch.setenv("METAATTN_MAX_MODELS", "none")
    with pytest.raises(ValueError, match="METAATTN_MAX_MODELS must be a whole number >= 1"):
        max_loaded_from_env()
    public = Deployment.detect(public=True)
    monkeypatch.setenv("METAATTN_QUEUE_SIZE", "lots")  # was ignored without a word
    with pytest.raises(ValueError, match="METAATTN_QUEUE_SIZE must be a whole number >= 1, got 'lots'"):
        public.limits  # noqa: B018 - the property reads the variable
    monkeypatch.setenv("METAATTN_QUEUE_SIZE", "")
    assert public.limits == PUBLIC_LIMITS


@pytest.mark.parametrize("held", ["abc", "256"])  # 256 leaves no room for a 256-token generation
def test_serve_refuses_a_bad_app_max_context_in_one_line(tmp_path, held):
    env = {**base_env(tmp_path), "METAATTN_APP_MAX_CONTEXT": held}
    done = subprocess.run(
        [sys.executable, "-m", "metaattn_viz", "serve", "--no-log", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"metaattn-viz serve: error: METAATTN_APP_MAX_CONTEXT must be a whole number >= 257, got '{held}'"
    )
    assert "Traceback" not in done.stderr


def test_serve_checks_the_queue_size_before_it_builds_the_page(monkeypatch):
    """Building the page starts loading the model (all of them on ZeroGPU): a bad queue size
    must be refused first, not after minutes of loading."""
    from metaattn_viz.app import server, ui

    built = []
    monkeypatch.setattr(ui, "build_app", lambda **kwargs: built.append(kwargs))
    monkeypatch.setenv("METAATTN_QUEUE_SIZE", "lots")
    with pytest.raises(ValueError, match="METAATTN_QUEUE_SIZE must be a whole number >= 1, got 'lots'"):
        server.serve(port=1, log_runs=False, public=True)
    assert built == []
