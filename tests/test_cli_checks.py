"""What the commands refuse, and in whose name: conflicting or out-of-range flags refused
before the model loads (or, where only the model knows, before any work), the environment's
path and runtime variables read by the flags' rules and named when wrong, and deploy's
errors in one `error:` line naming the flag."""

from __future__ import annotations

import argparse

import duckdb
import pytest
from helpers import Reached, cli_code, cli_refused, routed_tiny, tiny_config, tiny_corpus

from metaattn_viz import paths
from metaattn_viz.routing.model import RoutedModel

DATA = str(paths.REPO_ROOT / "tests" / "data" / "wikitext2_excerpt.txt")


@pytest.fixture
def no_model_load(monkeypatch):
    """Any model load fails the test: what is checked here is refused before it."""
    from metaattn_viz.routing import loading

    def load(*args, **kwargs):
        raise Reached("the model was loaded")

    monkeypatch.setattr(loading, "load", load)
    monkeypatch.setattr(RoutedModel, "load", staticmethod(load))


# -- feature-maps: --eval-only and --skip-eval together would do nothing ---------------------------
def test_feature_maps_refuses_eval_only_with_skip_eval_before_loading(no_model_load, tmp_path, capsys):
    line = cli_refused(
        ["feature-maps", "--data", DATA, "--out", str(tmp_path / "m"), "--eval-only", "--skip-eval"], capsys
    )
    assert "--skip-eval" in line and "--eval-only" in line and "not allowed" in line
    assert not (tmp_path / "m").exists()


# -- bench: the prefill and long decode rows against the model's context ---------------------------
def test_bench_refuses_a_row_longer_than_the_model_s_context_before_timing_it(monkeypatch, capsys):
    from metaattn_viz.bench import attention, model

    routed = routed_tiny(seed=1)  # a context of 1024 tokens
    monkeypatch.setattr(RoutedModel, "load", staticmethod(lambda *a, **k: routed))

    def timed(*args, **kwargs):
        raise Reached("a row was timed")

    # neither the attention rows (timed first) nor a model row
    monkeypatch.setattr(attention, "attention_rows", timed)
    monkeypatch.setattr(model, "plain_copy", timed)
    base = ["bench", "--seq-lens", "16", "--repeats", "1", "--json"]
    line = cli_refused([*base, "--prefill-len", "100000", "--long-context", "512"], capsys)
    assert "--prefill-len: 100000 tokens is more than the model's context (1024)" in line
    line = cli_refused([*base, "--prefill-len", "512", "--long-context", "100000"], capsys)
    assert "--long-context: 100000 tokens is more than the model's context (1024)" in line
    with pytest.raises(Reached):  # lengths within the context reach the rows
        model.model_rows(prefill_len=1024, long_context=1024)


def test_bench_s_random_weights_get_a_context_long_enough_for_both_rows(tmp_path):
    from metaattn_viz.bench.model import rows_model

    tiny_config().save_pretrained(tmp_path)  # a context of 1024 tokens
    routed = rows_model(long_context=2000, prefill_len=3000, device="cpu", model_config=str(tmp_path))
    assert routed.max_context >= 3000


def test_lambda_table_and_bench_say_the_same_about_the_context():
    from metaattn_viz.bench.model import check_context
    from metaattn_viz.cli.lambda_table import beyond_context

    assert beyond_context("--lengths", 8192, 8192) is None
    with pytest.raises(ValueError) as bench:
        check_context(8192, 8193, 8192)
    assert str(bench.value) == beyond_context("--prefill-len", 8193, 8192)


# -- METAATTN_DB and METAATTN_DATA: read as --db is ------------------------------------------------
@pytest.mark.parametrize("name", [paths.DB_ENV, paths.DATA_ENV])
def test_the_path_variables_expand_a_tilde_and_refuse_a_blank(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv(paths.DB_ENV, raising=False)
    monkeypatch.setenv(name, "~/r")
    want = tmp_path / "r" if name == paths.DB_ENV else tmp_path / "r" / "routing.duckdb"
    assert paths.default_db_path() == want
    monkeypatch.setenv(name, "   ")
    with pytest.raises(ValueError, match=f"{name} is blank"):
        paths.default_db_path()
    monkeypatch.setenv(name, "")  # empty: unset, as every variable of the server
    assert paths.default_db_path().name == "routing.duckdb" and "~" not in str(paths.default_db_path())


def test_export_reads_metaattn_db_with_its_tilde_expanded(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(paths.DB_ENV, "~/foo.duckdb")
    line = cli_refused(["export", "--out", str(tmp_path / "out")], capsys)
    assert f"no routing log at {tmp_path / 'foo.duckdb'}" in line
    monkeypatch.setenv(paths.DB_ENV, "   ")
    assert "METAATTN_DB is blank" in cli_refused(["export", "--out", str(tmp_path / "out")], capsys)


# -- examples: one check of --max-new-tokens before the model loads --------------------------------
def test_examples_refuses_too_many_new_tokens_before_the_model_loads(no_model_load, monkeypatch, capsys):
    from metaattn_viz.app import examples as ex
    from metaattn_viz.routing.generation import MAX_NEW_TOKENS

    def generate(*args, **kwargs):
        raise Reached("the examples were made")

    monkeypatch.setattr(ex, "generate", generate)
    line = cli_refused(["examples", "--max-new-tokens", "99999999"], capsys)
    assert f"--max-new-tokens must be at least 1 and at most {MAX_NEW_TOKENS}, got 99999999" in line
    line = cli_refused(["examples", "--max-new-tokens", "0"], capsys)
    assert f"at most {MAX_NEW_TOKENS}, got 0" in line


# -- the runtime variables and the port: named where the value came from ---------------------------
@pytest.mark.parametrize(
    "name, value, parse",
    [
        ("METAATTN_DEVICE", "bogus", "parse_device"),
        ("METAATTN_DTYPE", "float8", "parse_dtype"),
        ("METAATTN_BACKEND", "nope", "parse_backend"),
    ],
)
def test_a_bad_runtime_variable_is_named(name, value, parse, monkeypatch, no_model_load, capsys):
    from metaattn_viz.routing import device as device_mod

    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"^{name}: .* got '{value}'"):
        getattr(device_mod, parse)(None)
    with pytest.raises(ValueError) as flag:  # a value handed in: its caller names it
        getattr(device_mod, parse)(value)
    assert name not in str(flag.value)
    assert f"{name}: " in cli_refused(["route", "--prompt", "hi", "--no-log"], capsys)


@pytest.mark.parametrize("name, value", [("PORT", "99999"), ("GRADIO_SERVER_PORT", "-5")])
def test_a_bad_port_variable_is_named_not_the_flag(name, value, monkeypatch):
    from metaattn_viz.app.server import resolve_host_port

    monkeypatch.delenv("PORT", raising=False)
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError) as exc:
        resolve_host_port(None, None)
    assert f"${name} must be a port number (1..65535), got {value!r}" == str(exc.value)
    with pytest.raises(ValueError, match="--port must be in 1..65535, got 0"):
        resolve_host_port(None, 0)
    assert resolve_host_port("127.0.0.1", 8000) == ("127.0.0.1", 8000)  # --port wins


# -- a DuckDB file that is not a routing log: advice that fits the command ------------------------
FOREIGN = ["CREATE TABLE t AS SELECT 1 AS x", "CREATE TABLE schema_version AS SELECT 'a' AS version"]


@pytest.mark.parametrize("table", FOREIGN)
def test_a_foreign_duckdb_file_gets_advice_the_command_can_follow(table, tmp_path, capsys):
    from metaattn_viz.store import RunLog, StoreUnavailable

    path = tmp_path / "other.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(table)
    line = cli_refused(["export", "--db", str(path), "--out", str(tmp_path / "out")], capsys)
    assert "not a metaattn-viz routing log" in line and "pass --db with another path" in line
    assert "--no-log" not in line  # export has no --no-log
    with pytest.raises(StoreUnavailable, match="--no-log"):  # a command that writes the log has
        RunLog(path)


# -- deploy: one `error:` line naming the flag ------------------------------------------------------
def _deploy(*argv: str) -> int:
    from metaattn_viz.deploy.cli import add_deploy_parser

    parser = argparse.ArgumentParser(prog="metaattn-viz")
    add_deploy_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["deploy", *argv])

    def make_api(token):
        raise AssertionError("a refused deploy reached the Hub")

    return args.handler(args, make_api=make_api, environ={}, out=lambda text: None)


def _deploy_error(capsys, *argv: str) -> str:
    assert _deploy(*argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("metaattn-viz deploy: error: "), err
    assert "Errno" not in err and "Traceback" not in err
    return err


def test_deploy_words_a_folder_manifest_a_file_root_and_a_blank_space(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    line = _deploy_error(capsys, "--dry-run", "--manifest", str(tmp_path))
    assert f"--manifest {tmp_path}: a folder" in line
    assert f"--root {afile}: not a folder" in _deploy_error(capsys, "--dry-run", "--root", str(afile))
    assert f"--root {tmp_path / 'none'}: no such folder" in _deploy_error(
        capsys, "--dry-run", "--root", str(tmp_path / "none")
    )
    for blank in ("", "  "):
        assert "--space is empty" in _deploy_error(capsys, "--dry-run", "--space", blank)
    assert "--hardware 'nope'" in _deploy_error(capsys, "--dry-run", "--hardware", "nope")


def test_a_manifest_that_is_a_folder_is_a_manifest_error(tmp_path):
    from metaattn_viz.deploy.manifest import ManifestError, load_manifest

    with pytest.raises(ManifestError, match="is a folder, not a manifest file"):
        load_manifest(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ManifestError, match="cannot be read"):
        load_manifest(tmp_path / "f" / "Spacefile")


# -- lambda-table: --texts named with the windows it needs -----------------------------------------
def test_lambda_table_names_texts_and_the_windows_it_needed(tmp_path, monkeypatch, capsys):
    from metaattn_viz.routing import lambda_table

    routed = routed_tiny(seed=1)
    routed.controller("bayes").trained = True
    monkeypatch.setattr(RoutedModel, "load", staticmethod(lambda *a, **k: routed))

    def build(*args, **kwargs):
        raise Reached("a table was built")

    monkeypatch.setattr(lambda_table, "build", build)
    data = tiny_corpus(tmp_path)
    args = ["lambda-table", "--data", str(data), "--lengths", "32", "--out", str(tmp_path / "t")]
    line = cli_refused([*args, "--texts", "100000"], capsys)
    assert "--texts 100000 needs 100001 calibration windows of 32 tokens" in line
    held = int(line.split(f"{data} holds ")[1].split(":")[0])
    assert f"give --texts {held - 1} or fewer" in line
    with pytest.raises(Reached):  # as many as it holds: the table is made
        cli_code([*args, "--texts", str(held - 1)])
