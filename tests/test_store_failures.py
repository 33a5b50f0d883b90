"""The routing log's files when something goes wrong around them: a write-ahead log DuckDB
cannot replay (refused, read-only too, both files kept), one deleted while the log is open
(reported), a new log that cannot be written (removed, not left to block every later open),
a migration that cannot be committed (its cause said), a log held by another process (a
clear sentence naming the holder, and a server that logs again once the holder lets go), a
path that is not a regular file (refused at once, not waited on), a run whose settings this
version rejects (a sentence naming the run and the value). Real DuckDB files throughout:
the write-ahead logs come from a process killed before its checkpoint."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import duckdb
import pytest
from helpers import synthetic_trace, writing_schema_version

from metaattn_viz import store
from metaattn_viz.store import RunLog, StoreUnavailable, opening
from metaattn_viz.store.errors import StoreLocked

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}

# Logs `n` runs, waits for their commit, and dies before any checkpoint: the runs are in
# the write-ahead log only (or, for a log checkpointed before, on top of what it holds).
KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from helpers import synthetic_trace
    from metaattn_viz.store import RunLog
    log = RunLog(sys.argv[1])
    for seed in range(int(sys.argv[2])):
        trace = synthetic_trace(n_layers=3, n_tokens=12, seed=100 + seed)
        log.finish(log.start_run(trace), trace)
    log.flush()
    os.kill(os.getpid(), signal.SIGKILL)
""")


def killed_writer(path: Path, n: int) -> None:
    done = subprocess.run(
        [sys.executable, "-c", KILLED_WRITER, str(path), str(n)], cwd=REPO, env=ENV, timeout=120
    )
    assert done.returncode == -signal.SIGKILL


def wal(path: Path) -> Path:
    return path.with_name(path.name + ".wal")


def digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def runs_in(path: Path) -> int:
    with RunLog(path, read_only=True) as log:
        return len(log.list_runs())


@pytest.fixture
def crashed(tmp_path):
    """A fresh log whose 3 runs are all in its write-ahead log, and a copy of both files."""
    db = tmp_path / "log" / "routing.duckdb"
    killed_writer(db, 3)
    assert wal(db).stat().st_size > 0 and db.stat().st_size <= 16384  # nothing checkpointed
    copy = tmp_path / "copy"
    shutil.copytree(db.parent, copy)
    return db, copy


def damage_header(path: Path) -> None:
    with open(path, "r+b") as f:
        f.write(b"\xff" * 64)


def checkpointed_under_a_damaged_wal(db: Path, n: int) -> Path:
    """`db` with `n` runs checkpointed into its file (closing checkpoints) and 3 more in a
    write-ahead log left by a killed writer, whose header is then overwritten."""
    with RunLog(db) as log:
        for seed in range(n):
            trace = synthetic_trace(n_layers=3, n_tokens=8, seed=seed)
            log.finish(log.start_run(trace), trace)
    killed_writer(db, 3)
    damage_header(wal(db))
    return db


# -- write-ahead logs ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["wal header overwritten", "database file missing"])
def test_a_wal_duckdb_would_drop_is_refused_and_kept(crashed, damage):
    """DuckDB drops such a write-ahead log without a word (and the first write, or the
    close that follows it, replaces it): every run in it would be lost. The log is refused
    and nothing is written, so the runs can still be recovered."""
    db, copy = crashed
    if damage == "database file missing":
        db.unlink()
    else:
        damage_header(wal(db))
    before = digests(db.parent)
    for _ in range(2):  # refused again: the first attempt changed nothing
        with pytest.raises(StoreUnavailable) as err:
            RunLog(db)
        msg = str(err.value)
        assert str(wal(db)) in msg and "left untouched" in msg and "recover" in msg
        assert "--db" in msg and "--no-log" in msg
        assert digests(db.parent) == before
    log, why = store.open_or_explain(db)  # the server runs on without logging, and says why
    assert log is None and str(wal(db)) in why and "Running without logging" in why
    assert digests(db.parent) == before
    # what the message promises: the files were kept, so the runs are still there
    for name in ("routing.duckdb", "routing.duckdb.wal"):
        shutil.copy(copy / name, db.parent / name)
    assert runs_in(db) == 3


def test_a_damaged_wal_on_top_of_a_checkpointed_log_is_refused_and_its_older_runs_kept(tmp_path):
    db = checkpointed_under_a_damaged_wal(tmp_path / "routing.duckdb", 2)
    before = digests(tmp_path)
    with pytest.raises(StoreUnavailable, match="its older runs stay") as err:
        RunLog(db)
    assert str(wal(db)) in str(err.value) and digests(tmp_path) == before
    wal(db).rename(tmp_path / "kept.wal")  # the way on that the message gives
    with RunLog(db) as log:
        assert len(log.list_runs()) == 2


def test_an_intact_or_torn_wal_is_replayed(crashed):
    """A crash leaves the write-ahead log whole, or cut in its last commit: DuckDB replays
    what it can, and the log opens with those runs."""
    db, copy = crashed
    with RunLog(db) as log:
        assert len(log.list_runs()) == 3 and log.recovered_runs == []
    for name in ("routing.duckdb", "routing.duckdb.wal"):
        shutil.copy(copy / name, db.parent / name)
    os.truncate(wal(db), wal(db).stat().st_size - 100)  # the last commit cut short
    with RunLog(db) as log:
        assert len(log.list_runs()) == 2


def test_a_wal_duckdb_cannot_replay_part_way_names_it_and_keeps_both_files(crashed):
    db, _ = crashed
    with open(wal(db), "r+b") as f:  # a checksum that fails in the middle
        f.seek(wal(db).stat().st_size // 2)
        f.write(b"\xff" * 64)
    before = digests(db.parent)
    with pytest.raises(StoreUnavailable, match="could not replay its write-ahead log") as err:
        RunLog(db)
    assert str(wal(db)) in str(err.value) and "left untouched" in str(err.value)
    assert digests(db.parent) == before


@pytest.mark.parametrize("damage", ["wal header overwritten", "database file missing"])
def test_a_wal_duckdb_would_drop_is_refused_read_only_too(crashed, damage):
    """A read-only open (an export, a notebook) replays the write-ahead log in memory; one
    DuckDB drops read as an empty log ("open it once read-write", which then refused) or a
    missing one ("nothing has been logged there yet"), and an export of a checkpointed log
    left its runs out and said it had exported them all."""
    db, _ = crashed
    with RunLog(db, read_only=True) as log:  # an intact one is read, and left as it was
        assert len(log.list_runs()) == 3
    if damage == "database file missing":
        db.unlink()
    else:
        damage_header(wal(db))
    before = digests(db.parent)
    with pytest.raises(StoreUnavailable) as err:
        RunLog(db, read_only=True)
    msg = str(err.value)
    assert str(wal(db)) in msg and "left untouched" in msg and "recover" in msg and "--no-log" not in msg
    assert "nothing has been logged" not in msg and "is empty" not in msg
    out = db.parent / "export"
    with pytest.raises(StoreUnavailable, match="write-ahead log"):
        store.export(db, out)
    assert not out.exists() and digests(db.parent) == before


def test_an_export_of_a_checkpointed_log_whose_wal_duckdb_would_drop_is_refused(tmp_path):
    db = checkpointed_under_a_damaged_wal(tmp_path / "routing.duckdb", 3)
    before = digests(tmp_path)
    out = tmp_path / "export"
    with pytest.raises(StoreUnavailable, match="reading it would leave out the runs in") as err:
        store.export(db, out)  # was: "exported 3 runs", of 6
    assert str(wal(db)) in str(err.value) and "its older runs stay" in str(err.value)
    assert not out.exists() and digests(tmp_path) == before
    wal(db).rename(tmp_path / "kept.wal")  # the way on that the message gives
    assert store.export(db, out)["runs"] == 3


@pytest.mark.skipif(sys.platform == "win32", reason="Windows refuses to delete an open file")
def test_a_wal_deleted_while_the_log_is_open_is_reported_and_a_clean_stop_keeps_its_runs(tmp_path):
    """DuckDB goes on committing into a write-ahead log deleted under it, which no open after
    a crash finds: the runs logged since were lost to a SIGKILL without a word. It is
    reported as a deleted file is; closing the log (which checkpoints) still keeps them."""
    db = tmp_path / "routing.duckdb"

    def log_run(log: RunLog, seed: int) -> None:
        trace = synthetic_trace(n_layers=3, n_tokens=12, seed=seed)
        log.finish(log.start_run(trace), trace)
        log.flush()

    with RunLog(db) as log:
        log_run(log, 7)
        assert wal(db).exists() and log.file_problem() is None
        wal(db).unlink()
        log_run(log, 8)
        problem = log.file_problem()
        assert problem is not None and str(wal(db)) in problem and "deleted while it was open" in problem
        assert "crash" in problem and not wal(db).exists()
    assert not wal(db).exists()  # checkpointed on close
    with RunLog(db) as log:  # no write-ahead log, and DuckDB holds none: nothing to report
        assert not wal(db).exists() and log.file_problem() is None and len(log.list_runs()) == 2
        log_run(log, 9)  # a new one, made by DuckDB: nothing to report either
        assert wal(db).exists() and log.file_problem() is None


# -- a new log on a full disk -------------------------------------------------------------------
OPEN_ON_A_FULL_DISK = textwrap.dedent("""
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # no file may grow past 4 KB
    from metaattn_viz.store import open_or_explain
    print(open_or_explain(sys.argv[1])[1])
""")


def test_a_new_log_that_cannot_be_written_is_removed_and_does_not_block_the_next_open(tmp_path):
    """DuckDB leaves the file it started (0 bytes on a full disk) when it cannot write it,
    and every later open then found "not a DuckDB database": the file is the open's own,
    so it is removed, and the message does not call it left untouched."""
    db = tmp_path / "routing.duckdb"
    done = subprocess.run(
        [sys.executable, "-c", OPEN_ON_A_FULL_DISK, str(db)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    why = done.stdout.strip()
    assert why.startswith(f"could not create routing log {db}: ") and "File too large" in why
    assert "removed" in why and "untouched" not in why and why.endswith("Running without logging.")
    assert "Free some space" in why
    assert list(tmp_path.iterdir()) == []
    with RunLog(db) as log:  # space again: the log is created
        trace = synthetic_trace(n_layers=2, n_tokens=4)
        log.finish(log.start_run(trace), trace)
        assert len(log.list_runs()) == 1


def test_a_new_log_where_no_file_can_be_made_is_not_blamed_on_the_disk():
    """A log that cannot be created for another reason than space (here: /proc, where not
    even root makes a file) read "free some space" (review 65)."""
    from metaattn_viz.store import open_or_explain

    path = Path("/proc/metaattn-viz-test-routing.duckdb")
    if not Path("/proc").is_dir():
        pytest.skip("no /proc on this system")
    log, why = open_or_explain(str(path))
    assert log is None and "could not create routing log" in why and not path.exists()
    assert "Free some space" not in why and "To go on, pass --db with another path" in why


# -- a migration on a full disk -----------------------------------------------------------------
class CommitFails:
    """A connection whose commit fails as DuckDB's does on a full disk: DuckDB has rolled
    the transaction back by the time it raises."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self._con = con

    def __getattr__(self, name: str):
        return getattr(self._con, name)

    def commit(self) -> None:
        self._con.rollback()
        raise duckdb.TransactionException(
            'TransactionContext Error: Failed to commit: Could not write file "routing.duckdb.wal": '
            "No space left on device"
        )


def test_a_migration_that_cannot_be_committed_says_why(tmp_path, monkeypatch):
    """Migrating on a full disk said "cannot rollback - no transaction is active": the
    rollback after DuckDB's own hid the reason."""
    db = tmp_path / "routing.duckdb"
    with writing_schema_version(monkeypatch, 1), RunLog(db) as log:
        trace = synthetic_trace(n_layers=2, n_tokens=5)
        log.finish(log.start_run(trace), trace)
    connect = opening.connect
    with monkeypatch.context() as m:
        m.setattr(opening, "connect", lambda *args, **kwargs: CommitFails(connect(*args, **kwargs)))
        with pytest.raises(StoreUnavailable) as err:
            RunLog(db)
    msg = str(err.value)
    assert msg.startswith(f"could not migrate routing log {db} from schema version 1 to ")
    assert "No space left on device" in msg and "no transaction is active" not in msg
    assert "the file is unchanged. Free some space, or pass --db with another path, or --no-log" in msg
    with RunLog(db) as log:  # space again: migrated, and its run kept
        assert len(log.list_runs()) == 1


# -- a log held by another process --------------------------------------------------------------
HOLD = (
    "import sys, duckdb; con = duckdb.connect(sys.argv[1], read_only=sys.argv[2] == 'ro'); "
    "print('ready', flush=True); sys.stdin.read()"
)


class Holder:
    """Another process holding the log (read-only: as `metaattn-viz export` or a notebook)."""

    def __init__(self, db: Path, read_only: bool):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", HOLD, str(db), "ro" if read_only else "rw"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def release(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture
def logged(tmp_path):
    db = tmp_path / "routing.duckdb"
    with RunLog(db) as log:
        trace = synthetic_trace(n_layers=2, n_tokens=5)
        log.finish(log.start_run(trace), trace)
    return db


@pytest.mark.parametrize("reader", [False, True])
def test_a_held_log_names_its_holder_and_what_it_is_doing(logged, reader):
    holder = Holder(logged, read_only=reader)
    try:
        with pytest.raises(StoreLocked) as err:
            RunLog(logged)
        msg = str(err.value)
        assert f"(PID {holder.proc.pid})" in msg and "another process" in msg
        assert "See also" not in msg and "However" not in msg and "))." not in msg  # DuckDB's tail cut
        if reader:  # readers may share a file: only writing it waits for them
            assert "read-only" in msg and "one process per database file" not in msg
            assert "export" in msg and "Wait for that process to end" in msg
            with RunLog(logged, read_only=True) as log:
                assert len(log.list_runs()) == 1
        else:
            assert "Stop that process" in msg
    finally:
        holder.release()


def test_a_server_whose_log_was_held_at_startup_logs_once_it_is_free(logged, monkeypatch):
    """The log is tried again (at most every RETRY_OPEN_S) by the next status, read or write;
    meanwhile each generation's notes say that its run is not logged."""
    from metaattn_viz.app import history as app_history
    from metaattn_viz.app.errors import AppError

    monkeypatch.setattr(app_history, "RETRY_OPEN_S", 0.0)  # every call tries again
    holder = Holder(logged, read_only=False)
    history = app_history.RunHistory(str(logged))
    try:
        status = history.status()
        assert not status["logging"] and f"(PID {holder.proc.pid})" in status["log_problem"]
        assert "until it is free" in status["log_problem"]
        with pytest.raises(AppError, match="in use by another process"):
            history.runs()
        trace = synthetic_trace(n_layers=2, n_tokens=6, seed=3)
        recorder = history.recorder("generate")  # as generation.py drives it: update, finish
        assert recorder.run_log is None
        note = recorder.update(trace)
        assert note.startswith("This run is not logged: ") and "in use by another process" in note
        assert recorder.update(trace) is None and recorder.finish(trace, "done", None) is None  # once
        unused = history.recorder("generate")
        assert "not logged" in unused.finish(trace, "done", None)  # a run with no token: at its end
        holder.release()
        status = history.status()
        assert status["logging"] and status["log_problem"] is None
        assert len(history.runs()) == 1  # History reads the log again
        recorder = history.recorder("generate")
        assert recorder.start(trace) is None and recorder.finish(trace, "done", None) is None
        history.flush()
        assert len(history.runs()) == 2 and history.replay(trace.run_id).run_id == trace.run_id
    finally:
        holder.release()
        history.close()


def test_logging_turned_off_adds_no_note_and_is_never_retried(logged, monkeypatch):
    from metaattn_viz.app import history as app_history

    monkeypatch.setattr(app_history, "RETRY_OPEN_S", 0.0)
    history = app_history.RunHistory(str(logged), enabled=False)
    try:
        trace = synthetic_trace(n_layers=2, n_tokens=6)
        recorder = history.recorder("generate")
        assert recorder.update(trace) is None and recorder.finish(trace, "done", None) is None
        assert history.run_log is None and history.log_problem == "logging is off (--no-log)"
    finally:
        history.close()


# -- runs this version cannot read ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("column", "value", "named"),
    [
        ("scope", "'zzz'", "'zzz'"),
        ("budget", "7.5", "7.5"),
        ("timings", "'{not json'", "'{not json'"),
        ("timings", "'[1, 2]'", "'[1, 2]'"),
    ],
)
def test_a_run_whose_values_this_version_rejects_names_the_run_and_the_value(logged, column, value, named):
    with RunLog(logged) as log:
        good = log.list_runs()["run_id"][0]
        trace = synthetic_trace(n_layers=2, n_tokens=5, seed=9)
        bad = log.start_run(trace)
        log.finish(bad, trace)
    with duckdb.connect(str(logged)) as con:  # an old or hand-edited log
        con.execute(f"UPDATE runs SET {column} = {value} WHERE run_id = $r", {"r": bad})
    with RunLog(logged) as log:
        with pytest.raises(StoreUnavailable) as err:
            log.load_trace(bad)
        msg = str(err.value)
        assert bad in msg and str(logged) in msg and named in msg and "cannot be replayed" in msg
        assert log.load_trace(good).run_id == good  # the others replay as before


# -- a path that is not a regular file ----------------------------------------------------------
def promptly(fn, seconds: float = 30.0):
    """fn()'s result (or its exception): a failed test, not a hung one, where it blocks."""
    box: dict = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), "blocked: a named pipe opened to write waits for a reader"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes")
def test_a_named_pipe_or_a_device_is_refused_as_a_log_or_an_output_without_waiting(tmp_path):
    """`route --db FIFO` hung before the model loaded (writable.py opened the pipe to try it,
    and waited for a reader), and `export --db FIFO` in DuckDB's connect; /dev/null is no log
    either (and a report written through a temporary file would replace it)."""
    from metaattn_viz.cli import UserError
    from metaattn_viz.cli.route import log_path
    from metaattn_viz.writable import output_problem

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    problem = promptly(lambda: output_problem(fifo, "--db", folder=False))
    assert problem == f"--db {fifo} is a named pipe (FIFO), not a regular file"
    with pytest.raises(UserError, match="named pipe"):
        promptly(lambda: log_path(str(fifo)))
    assert output_problem(fifo, "--out", folder=True) == f"--out {fifo} is a named pipe (FIFO), not a folder"
    if Path("/dev/null").exists():
        assert output_problem("/dev/null", "--report", folder=False) == (
            "--report /dev/null is a character device, not a regular file"
        )
    assert output_problem(tmp_path / "new.duckdb", "--db", folder=False) is None  # files and folders
    assert output_problem(tmp_path, "--out", folder=True) is None  # as before
    # the log itself, read-only (export) and read-write, in a process of its own: DuckDB's
    # connect would hold the registry's lock while it waited
    log = tmp_path / "routing.duckdb"
    with RunLog(log) as run_log:
        trace = synthetic_trace(n_layers=2, n_tokens=4)
        run_log.finish(run_log.start_run(trace), trace)
    os.mkfifo(wal(log))  # a write-ahead log that is a pipe
    opens = textwrap.dedent("""
        import sys
        from metaattn_viz.store import RunLog, StoreUnavailable
        for path in sys.argv[1:]:
            for read_only in (True, False):
                try:
                    RunLog(path, read_only=read_only).close()
                    print("opened")
                except StoreUnavailable as exc:
                    print(exc)
    """)
    done = subprocess.run(
        [sys.executable, "-c", opens, str(fifo), str(log)],
        cwd=REPO,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 4
    for line in lines[:2]:
        assert line.startswith(f"routing log {fifo} is a named pipe (FIFO), not a regular file")
    for line in lines[2:]:
        assert f"its write-ahead log {wal(log)} is a named pipe (FIFO)" in line
    assert "--no-log" not in lines[0] and "--no-log" in lines[1]
    assert fifo.exists() and not wal(fifo).exists()
