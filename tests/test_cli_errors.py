"""What the commands do with arguments they cannot honour: refuse them before any work, in
one line with exit code 2 (argparse's for a malformed number), and never lose a result that
was computed (metaattn_viz/cli/outputs.py), and the notebook API refuses what it cannot
use by name (tests/test_api.py)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import duckdb
import pytest
from helpers import ROOT, THREAD_ENV, free_port

from metaattn_viz.cli import UserError, main
from metaattn_viz.cli.outputs import check_output

DATA = str(ROOT / "tests" / "data" / "wikitext2_excerpt.txt")  # the tests read no corpus/


def _cli(*args, timeout=180, stdin=b""):
    return subprocess.run(
        [sys.executable, "-m", "metaattn_viz", *args],
        input=stdin,
        capture_output=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **THREAD_ENV},
    )


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model (routed, or the bare checkpoint) fails the test: the checks under
    test come before it."""
    from metaattn_viz.routing import loading
    from metaattn_viz.routing.model import RoutedModel

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(RoutedModel, "load", load)
    monkeypatch.setattr(loading, "load", load)


# -- output paths, checked before the work -------------------------------------------------------
def test_check_output_says_why_a_path_cannot_be_written(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    assert check_output(None, "--out", folder=True) is None
    assert check_output(tmp_path / "new" / "deeper", "--out", folder=True) == tmp_path / "new" / "deeper"
    assert (
        check_output(tmp_path / "new" / "report.md", "--report", folder=False)
        == tmp_path / "new" / "report.md"
    )
    assert not (tmp_path / "new").exists()  # checked, not made
    for path, folder, message in [
        ("", True, "--out is empty"),
        ("  ", False, "--out is empty"),
        (a_file, True, "is a file, not a folder"),
        (tmp_path, False, "is a folder; give a file path"),
        (a_file / "under" / "report.md", False, f"cannot be made: {a_file} is a file"),
    ]:
        with pytest.raises(UserError, match=message):
            check_output(path, "--out", folder=folder)


def test_check_output_refuses_a_folder_nothing_can_be_written_in(tmp_path):
    """Tried, not read from permission bits (which say yes to root): /proc takes no files."""
    with pytest.raises(UserError, match=r"cannot be written: no file can be made in /proc \("):
        check_output("/proc/metaattn-out", "--out", folder=True)
    with pytest.raises(UserError, match=r"cannot be written: no file can be made in /proc \("):
        check_output("/proc/report.md", "--report", folder=False)
    with pytest.raises(UserError, match=r"/proc/version cannot be opened for writing \("):
        check_output("/proc/version", "--report", folder=False)
    before = sorted(tmp_path.iterdir())
    assert check_output(tmp_path / "x", "--out", folder=True)
    assert sorted(tmp_path.iterdir()) == before  # the trial file is gone


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["eval", "--data", DATA, "--report", "{file}/report.md"],
            "--report {file}/report.md cannot be made",
        ),
        (["eval", "--data", DATA, "--report", "{dir}"], "is a folder; give a file path"),
        (["eval", "--data", DATA, "--report", "{dir}/pareto.png"], "is the name of the plot written beside"),
        (["eval", "--data", DATA, "--report", "{latin}"], "exists and is not UTF-8 text"),
        (["lambda-table", "--out", "{file}"], "--out {file} is a file, not a folder"),
        (["calibrate", "--data", DATA, "--out", "{file}"], "--out {file} is a file, not a folder"),
        (["export", "--out", "{file}"], "--out {file} is a file, not a folder"),
        (["export", "--out", ""], "--out is empty"),
    ],
)
def test_a_command_refuses_an_output_it_cannot_write_before_it_works(
    no_model, args, message, tmp_path, capsys
):
    """Refused at once (not after an evaluation or a 43-minute table: no model is loaded)."""
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    latin = tmp_path / "old-report.md"
    latin.write_bytes("r\u00e9sultats".encode("latin-1"))
    fill = {"file": str(a_file), "dir": str(tmp_path), "latin": str(latin)}
    assert main([a.format(**fill) for a in args]) == 2
    assert message.format(**fill) in capsys.readouterr().err
    assert a_file.read_text() == "x"


def test_export_of_a_log_that_is_not_there_leaves_no_folder(tmp_path, capsys):
    out = tmp_path / "export"
    assert main(["export", "--db", str(tmp_path / "none.duckdb"), "--out", str(out)]) == 2
    assert "no routing log at" in capsys.readouterr().err
    assert not out.exists()


# -- numbers argparse refuses (exit code 2, the flag named) ---------------------------------------
@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["eval", "--data", DATA, "--seq-len", "0"],
            "argument --seq-len: must be a whole number >= 2, got 0",
        ),
        (["eval", "--data", DATA, "--seq-len", "-4"], "argument --seq-len: must be a whole number >= 2"),
        # a window of one token scores nothing (perplexity over 0 tokens)
        (
            ["eval", "--data", DATA, "--seq-len", "1"],
            "argument --seq-len: must be a whole number >= 2, got 1",
        ),
        (
            ["eval", "--data", DATA, "--max-tokens", "x"],
            "argument --max-tokens: must be a whole number >= 1, got 'x'",
        ),
        (["eval", "--data", DATA, "--calib-windows", "0"], "argument --calib-windows: must be"),
        (["route", "--prompt", "hi", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be"),
        (["route", "--prompt", "hi", "--seed", "-3"], "argument --seed: must be a whole number >= 0"),
        (["route", "--prompt", "hi", "--db", ""], "argument --db: is empty: give a path"),
        (["serve", "--db", " "], "argument --db: is empty"),
    ],
)
def test_malformed_numbers_are_refused_naming_the_flag(args, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_a_seed_too_large_for_torch_is_refused_before_the_model_loads(no_model, capsys):
    assert main(["route", "--prompt", "hi", "--seed", str(2**70), "--no-log"]) == 2
    assert "seed must be a whole number in [0, 9223372036854775807]" in capsys.readouterr().err


def test_deploy_refuses_a_space_id_the_hub_would(capsys):
    assert main(["deploy", "--dry-run", "--root", str(ROOT), "--space", "bad name!/x y", "--json"]) == 2
    assert "--space 'bad name!/x y': not a name the Hub accepts" in capsys.readouterr().err


# -- the prompt: checked before the model loads; "-" reads standard input ---------------------------
@pytest.mark.parametrize(
    "prompt, stdin, expected",
    [
        ("hi \udcff", b"", "--prompt: prompt is not valid UTF-8 text: an unpaired surrogate (U+DCFF)"),
        ("  \n", b"", "--prompt: prompt is empty"),
        ("-", b"hello \xff world", "standard input is not valid UTF-8 text: byte 6 (0xff)"),
        ("-", b" \n\t", "standard input: prompt is empty"),
    ],
)
def test_route_refuses_a_prompt_it_cannot_route_before_loading_the_model(
    no_model, monkeypatch, capsys, prompt, stdin, expected
):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    assert main(["route", "--prompt", prompt, "--no-log"]) == 2
    assert f"metaattn-viz route: error: {expected}" in capsys.readouterr().err


def test_prompt_text_reads_standard_input_whole_for_a_dash():
    import io

    from metaattn_viz.cli.route import prompt_text

    assert prompt_text("-x") == "-x"
    assert prompt_text("-", io.BytesIO("line one\nzwei – drei 😀\n".encode())) == "line one\nzwei – drei 😀\n"


# -- the real model: bytes on the command line; a prompt on stdin; a log that fails --------------
@pytest.mark.slow
def test_route_refuses_bytes_that_are_not_utf8_and_keeps_its_result_when_the_log_fails(tmp_path):
    out = _cli("route", "--prompt", b"hello \xff world", "--no-log")
    err = out.stderr.decode()
    assert out.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert "--prompt: prompt is not valid UTF-8 text" in err and "loaded" not in err  # no model load
    # a database DuckDB opens but whose schema version is not a number: the log fails in a
    # way no check foresaw, and the route's result (of a prompt read from stdin) is printed
    odd = tmp_path / "odd.duckdb"
    with duckdb.connect(str(odd)) as con:
        con.execute(
            "CREATE TABLE schema_version (version VARCHAR); INSERT INTO schema_version VALUES ('abc')"
        )
    out = _cli("route", "--prompt", "-", "--db", str(odd), "--json", stdin=b"The cat sat")
    err = out.stderr.decode()
    assert out.returncode == 0, err[-2000:]
    assert "warning: run not logged" in err and "not a metaattn-viz routing log" in err
    assert json.loads(out.stdout)["prompt"] == "The cat sat"


def test_whatever_the_log_raises_route_keeps_its_trace(monkeypatch, capsys, tmp_path):
    """The failures no check foresaw (not StoreUnavailable) are a warning naming the log."""
    from helpers import synthetic_trace

    from metaattn_viz import store
    from metaattn_viz.cli import route as route_cli

    def broken(*args, **kwargs):
        raise RuntimeError("the disk said no")

    monkeypatch.setattr(store, "RunLog", broken)
    assert route_cli.log_trace(synthetic_trace(n_layers=2, n_tokens=3), tmp_path / "log.duckdb") is None
    err = capsys.readouterr().err
    assert f"warning: run not logged to {tmp_path / 'log.duckdb'}: RuntimeError: the disk said no" in err


def test_a_read_only_command_is_not_told_to_run_without_a_log(tmp_path, capsys):
    junk = tmp_path / "junk.duckdb"
    junk.write_bytes(os.urandom(4096))
    assert main(["export", "--db", str(junk), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "is not a DuckDB database" in err and "pass --db with another path" in err
    assert "--no-log" not in err  # export has no such flag


def test_a_report_records_the_command_that_reruns_it_quoted():
    import shlex

    from metaattn_viz.cli import from_subcommand

    argv = ["-v", "eval", "--data", "d.raw", "--report", "/tmp/rep 2/r.md"]
    cmd = shlex.join(["metaattn-viz", *from_subcommand(argv, "eval")])
    assert cmd == "metaattn-viz eval --data d.raw --report '/tmp/rep 2/r.md'"
    assert shlex.split(cmd)[1:] == argv[1:]


def test_a_report_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A write that fails halfway (a full disk) leaves the old report as it was."""
    from pathlib import Path

    from metaattn_viz.training import report

    path = tmp_path / "results.md"
    path.write_text("# Old\n")
    monkeypatch.setattr(report, "tables", lambda rows, command: "| a new table |\n" * 50)
    write = Path.write_text

    def half_then_full_disk(self, data, *a, **k):
        write(self, data[: len(data) // 2], *a, **k)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_full_disk)
    with pytest.raises(OSError, match="No space"):
        report.write_report([], path, "metaattn-viz eval")
    monkeypatch.undo()
    assert path.read_text() == "# Old\n" and [p.name for p in tmp_path.iterdir()] == ["results.md"]


def test_serve_on_a_taken_port_says_so_in_one_line(tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = _cli("serve", "--port", str(port), "--db", str(tmp_path / "log.duckdb"), timeout=120)
    err = out.stderr.decode()
    assert out.returncode == 2 and f"cannot listen on 127.0.0.1:{port}: the port is taken" in err, err
    assert "Traceback" not in err
    assert "serving on" not in err  # found before the app is built: it never said it served


def test_serve_on_a_host_that_is_not_this_machines_says_so_before_building_the_app(monkeypatch):
    from metaattn_viz.app import server

    def never(**kwargs):
        raise AssertionError("the app was built")

    monkeypatch.setattr("metaattn_viz.app.ui.build_app", never)
    for host in ("no-such-host.invalid", "192.0.2.1"):  # no such name; TEST-NET-1, not ours
        refused = rf"cannot listen on {host}:\d+: .*another --port or --host"
        with pytest.raises(server.CannotListen, match=refused):
            server.serve(host=host, port=free_port())
    served = ["127.0.0.1", "localhost", "0.0.0.0"]  # as Gradio serves them: they pass
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        served += ["::1", "[::1]"]  # Gradio strips the brackets
    except OSError:  # a machine without IPv6
        pass
    for host in served:
        server.check_listen(host, free_port())


def test_serve_refuses_db_with_no_log_and_a_port_that_is_not_a_number(capsys, monkeypatch):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--db", "x.duckdb", "--no-log"])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    monkeypatch.setenv("PORT", "abc")
    assert main(["serve", "--no-log"]) == 2
    assert "$PORT must be a port number (1..65535), got 'abc'" in capsys.readouterr().err


def test_calibrate_names_the_budget_flag_it_read(tmp_path, capsys):
    assert main(["calibrate", "--data", DATA, "--out", str(tmp_path / "c"), "--train-budgets", ","]) == 2
    assert "--train-budgets is empty" in capsys.readouterr().err
    assert main(["calibrate", "--data", DATA, "--out", str(tmp_path / "c"), "--seed", str(10**20)]) == 2
    assert "seed (--seed) must be a whole number" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before anything was made


def test_eval_json_is_strict_whatever_a_row_holds():
    import json
    import math

    from metaattn_viz.training.report import finite_or_null

    rows = [{"kl": math.nan, "cost": 0.5, "u": {"a": math.inf, "b": [1.0, -math.inf, "x"]}, "n": 3}]
    clean = finite_or_null(rows)
    assert clean == [{"kl": None, "cost": 0.5, "u": {"a": None, "b": [1.0, None, "x"]}, "n": 3}]
    json.dumps(clean, allow_nan=False)


def test_a_value_error_is_one_line_and_verbose_shows_where_it_came_from(monkeypatch, capsys, tmp_path):
    """Settings errors are ValueErrors with a plain message (one line, exit 2); an internal
    ValueError reads the same, so -v adds its traceback."""
    import metaattn_viz.cli as cli

    def broken(args):
        raise ValueError("operands could not be broadcast together")

    monkeypatch.setattr(cli, "_cmd_export", broken)
    argv = ["export", "--db", str(tmp_path / "x.duckdb"), "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err == "metaattn-viz export: error: operands could not be broadcast together\n"
    assert main(["-v", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "in broken" in err
    assert err.endswith("metaattn-viz export: error: operands could not be broadcast together\n")
