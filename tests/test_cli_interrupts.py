"""How the commands end when the user or the terminal ends them: Ctrl-C inside DuckDB is an
interrupt like any other (exit 130, `interrupted`; a run it cuts short is logged as
`interrupted`), a reader of stdout that goes away ends the command quietly (exit 141), and
a log `route` could not write, or an `eval` window longer than the model's context, is
refused before the work. And `eval` prints its rows on stdout (store/interrupts.py,
cli/__init__.py main, cli/route.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import duckdb
import pytest
from helpers import ROOT, THREAD_ENV, Reached, cli_refused, routed_tiny, synthetic_trace

from metaattn_viz import store
from metaattn_viz.cli import main
from metaattn_viz.store import exporting
from metaattn_viz.store.interrupts import SIGNAL_MESSAGE, is_interrupt, keyboard_interrupts

DATA = str(ROOT / "tests" / "data" / "wikitext2_excerpt.txt")


def _signal_interrupt() -> RuntimeError:
    """What DuckDB's Python client raises when SIGINT arrives during a statement."""
    return RuntimeError(SIGNAL_MESSAGE)


@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the checks under test come before it."""
    from metaattn_viz.routing.model import RoutedModel

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(RoutedModel, "load", load)


@pytest.fixture
def tiny_load(monkeypatch):
    """`RoutedModel.load` gives a tiny model (context 1024) at once."""
    from metaattn_viz.routing.model import RoutedModel

    monkeypatch.setattr(RoutedModel, "load", staticmethod(lambda *a, **k: routed_tiny()))


def _log_with_a_run(path):
    with store.RunLog(path) as log:
        trace = synthetic_trace(n_layers=2, n_tokens=5)
        run_id = log.start_run(trace, kind="route")
        log.finish(run_id, trace, status="done")
    return path


# -- Ctrl-C inside DuckDB -------------------------------------------------------------------------
def test_duckdbs_reports_of_an_interrupt_are_told_from_other_errors():
    assert is_interrupt(_signal_interrupt())
    assert is_interrupt(duckdb.InterruptException("INTERRUPT Error: Interrupted!"))
    assert not is_interrupt(RuntimeError("the disk said no"))
    assert not is_interrupt(store.StoreUnavailable(SIGNAL_MESSAGE))  # ours, not DuckDB's
    with pytest.raises(KeyboardInterrupt), keyboard_interrupts():
        raise _signal_interrupt()
    with pytest.raises(RuntimeError, match="the disk"), keyboard_interrupts():
        raise RuntimeError("the disk said no")


@pytest.mark.parametrize("error", [_signal_interrupt, lambda: duckdb.InterruptException("x")])
def test_ctrl_c_while_route_logs_is_an_interrupt_not_a_warning(
    error, monkeypatch, tiny_load, tmp_path, capsys
):
    def interrupted(*args, **kwargs):
        raise error()

    monkeypatch.setattr(store, "RunLog", interrupted)
    code = main(["route", "--prompt", "The cat sat", "--json", "--db", str(tmp_path / "log.duckdb")])
    out, err = capsys.readouterr()
    assert code == 130
    assert err.strip().endswith("interrupted") and "warning" not in err and "Traceback" not in err
    assert out == ""  # the run ends where it was interrupted: no trace printed


def test_a_run_whose_log_write_is_interrupted_is_logged_as_interrupted(monkeypatch, tmp_path):
    from metaattn_viz.cli.route import log_trace

    db = tmp_path / "log.duckdb"

    def finish(self, *args, **kwargs):
        raise _signal_interrupt()

    monkeypatch.setattr(store.RunLog, "finish", finish)
    with pytest.raises(KeyboardInterrupt):
        log_trace(synthetic_trace(n_layers=2, n_tokens=3), db)
    with duckdb.connect(str(db), read_only=True) as con:
        assert con.execute("SELECT status FROM runs").fetchall() == [("interrupted",)]


def test_ctrl_c_during_export_is_an_interrupt_and_leaves_no_export(monkeypatch, tmp_path, capsys):
    db = _log_with_a_run(tmp_path / "log.duckdb")
    out = tmp_path / "export"

    def copy(*args, **kwargs):
        (out / "runs").mkdir()
        (out / "runs" / "part.csv").write_text("half")
        raise _signal_interrupt()

    monkeypatch.setattr(exporting, "_copy", copy)
    assert main(["export", "--db", str(db), "--out", str(out), "--format", "csv"]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "interrupted"
    assert not out.exists()  # rolled back: the folder it made is gone


def test_any_command_that_meets_duckdbs_interrupt_ends_as_interrupted(monkeypatch, tmp_path, capsys):
    db = _log_with_a_run(tmp_path / "log.duckdb")

    def export(*args, **kwargs):  # DuckDB's exception reaching main untranslated
        raise duckdb.InterruptException("INTERRUPT Error: Interrupted!")

    monkeypatch.setattr(store, "export", export)
    assert main(["export", "--db", str(db), "--out", str(tmp_path / "x")]) == 130
    assert capsys.readouterr().err.strip() == "interrupted"


def test_a_real_sigint_inside_duckdb_ends_export_as_interrupted(tmp_path):
    """A real signal, while DuckDB runs a statement that would never end by itself: the
    message this DuckDB gives it is the one store/interrupts.py knows."""
    db = _log_with_a_run(tmp_path / "log.duckdb")
    out = tmp_path / "export"
    script = textwrap.dedent(
        f"""
        import os, signal, sys, threading, time
        from metaattn_viz.cli import main
        from metaattn_viz.store import exporting

        busy = threading.Event()

        def ctrl_c():  # Ctrl-C (again, should one arrive between statements) until it ends
            while True:
                time.sleep(0.5)
                if not busy.is_set():
                    return
                os.kill(os.getpid(), signal.SIGINT)

        def copy(log, *args):
            cur = log.fresh_cursor()
            cur.execute("SET threads = 1")  # the main thread runs every task, and checks between
            busy.set()
            threading.Thread(target=ctrl_c, daemon=True).start()
            try:
                cur.execute("SELECT count(*) FROM range(1000000000000) a").fetchall()
            except BaseException as exc:
                sys.stderr.write(f"DuckDB raised {{type(exc).__name__}}\\n")
                raise
            finally:
                busy.clear()

        exporting._copy = copy
        sys.exit(main(["export", "--db", {str(db)!r}, "--out", {str(out)!r}, "--format", "csv"]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, **THREAD_ENV},
    )
    assert "DuckDB raised RuntimeError" in done.stderr, done.stderr[-2000:]  # not Python's own
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip().endswith("interrupted") and "Traceback" not in done.stderr
    assert not out.exists()


# -- a reader of stdout that goes away ------------------------------------------------------------
def test_a_closed_stdout_ends_a_command_quietly(tmp_path):
    db = _log_with_a_run(tmp_path / "log.duckdb")
    read, write = os.pipe()
    os.close(read)  # nobody reads: the first flush of stdout meets a broken pipe
    try:
        done = subprocess.run(
            [sys.executable, "-m", "metaattn_viz", "export", "--db", str(db), "--out", str(tmp_path / "x")],
            stdout=write,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
            cwd=ROOT,
            env={**os.environ, **THREAD_ENV},
        )
    finally:
        os.close(write)
    assert done.returncode == 141, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "BrokenPipe" not in done.stderr, done.stderr


def test_a_broken_pipe_while_printing_is_not_a_traceback(monkeypatch, tmp_path, capsys):
    class Gone:
        """A stdout whose reader went away."""

        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(store, "export", lambda *a, **k: {"runs": 1, "tokens": 2, "routes": 3})
    monkeypatch.setattr(sys, "stdout", Gone())
    assert main(["export", "--db", str(tmp_path / "log.duckdb"), "--out", str(tmp_path / "x")]) == 141
    assert capsys.readouterr().err == ""


# -- route's log, checked before the model loads --------------------------------------------------
def test_route_refuses_a_log_it_could_not_write_before_loading_the_model(no_model, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [
        (tmp_path, f"--db {tmp_path} is a folder"),
        (a_file / "log.duckdb", f"--db {a_file / 'log.duckdb'} cannot be made: {a_file} is a file"),
    ]
    if os.path.isdir("/proc"):  # a folder nothing can be made in, even by root
        why = "--db /proc/x.duckdb cannot be written: no file can be made in /proc"
        cases.append(("/proc/x.duckdb", why))
    for db, expected in cases:
        line = cli_refused(["route", "--prompt", "hi", "--db", str(db)], capsys)
        assert expected in line, line


def test_route_names_the_environment_when_its_log_cannot_be_written(no_model, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("METAATTN_DB", str(tmp_path))
    line = cli_refused(["route", "--prompt", "hi"], capsys)
    assert f"METAATTN_DB {tmp_path} is a folder" in line and "--no-log" in line
    from metaattn_viz.routing.model import RoutedModel

    def load(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(RoutedModel, "load", load)
    with pytest.raises(Reached):  # --no-log: no log to check
        main(["route", "--prompt", "hi", "--no-log"])


# -- eval -----------------------------------------------------------------------------------------
def test_eval_refuses_a_window_longer_than_the_models_context_before_any_work(tiny_load, monkeypatch, capsys):
    from metaattn_viz.training import evaluate

    def reached(*args, **kwargs):
        raise Reached

    monkeypatch.setattr(evaluate, "evaluate", reached)
    args = ["eval", "--data", DATA, "--seq-len", "10000", "--max-tokens", "10000"]
    line = cli_refused(args, capsys)
    assert "--seq-len: 10000 tokens is more than the model's context (1024)" in line


def test_eval_prints_its_rows_on_stdout_and_its_progress_on_stderr(tiny_load, monkeypatch, capsys):
    from metaattn_viz.training import evaluate

    rows = [
        {"controller": "bayes", "budget": 0.5, "realized_cost": 0.5, "ppl": 12.0, "kl_to_dense": 0.01},
        {"controller": "full", "budget": 1.0, "realized_cost": 1.0, "ppl": 10.0, "kl_to_dense": 0.0},
    ]

    def fake(*args, progress=None, **kwargs):
        for row in rows:
            progress(row)
        return rows

    monkeypatch.setattr(evaluate, "evaluate", fake)
    assert main(["eval", "--data", DATA, "--seq-len", "16", "--max-tokens", "32"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and "bayes budget=0.5" in lines[0] and "ppl=10.00" in lines[1]
    assert sum("budget=" in line for line in err.splitlines()) == 2  # once each, as scored
