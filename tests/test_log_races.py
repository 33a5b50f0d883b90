"""The routing log under timing: an export while the log's writer is slow answers that the
log is busy, exports nothing half-written and never says runs are not being logged (a
failed write still does); a replay's status comes from the same snapshot as its rows; the
downloads folder of a killed server is removed by the next one, never a running server's.
Synthetic traces and a temporary log: no model."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import zipfile
from pathlib import Path

import duckdb
import pytest
from helpers import grow, synthetic_trace

from metaattn_viz.app import exports
from metaattn_viz.app.errors import AppError
from metaattn_viz.app.history import RunHistory
from metaattn_viz.store import codec
from metaattn_viz.store import writer as store_writer

ROOT = Path(__file__).resolve().parent.parent


class StalledWriter:
    """The log's writer stuck in a write (a slow disk) until `release()`."""

    def __init__(self, monkeypatch):
        self.entered, self._go = threading.Event(), threading.Event()
        write = store_writer._write

        def slow(cur, work):
            self.entered.set()
            self._go.wait(10)  # never longer, whatever a test does
            return write(cur, work)

        monkeypatch.setattr(store_writer, "_write", slow)

    def release(self) -> None:
        self._go.set()


def streamed_run(h: RunHistory, n_tokens: int = 30):
    """A run whose start is committed, all its tokens made, its finish not yet asked for."""
    full = synthetic_trace(n_layers=4, n_tokens=n_tokens, seed=1)
    rec = h.recorder("generate")
    chunks = grow(full, 5)
    trace = next(chunks)
    assert rec.start(trace) is None
    h.flush()
    for _ in chunks:  # the same trace, grown to its end
        pass
    return rec, trace


def finishing(rec, trace) -> threading.Thread:
    """rec.finish in a thread of its own (it waits for its commit)."""
    notes: list = []
    t = threading.Thread(target=lambda: notes.append(rec.finish(trace, "done", None)))
    t.notes = notes  # type: ignore[attr-defined]
    t.start()
    return t


def test_a_run_export_behind_a_slow_write_is_busy_not_half_written_or_unlogged(tmp_path, monkeypatch):
    """The flush timed out inside RunHistory.write, which took it for a failed write: the
    export went on with the run half-written (running, no tokens) and the header said runs
    were not being logged (review: slowflush.py)."""
    h = RunHistory(str(tmp_path / "log.duckdb"))
    try:
        rec, trace = streamed_run(h)
        stall = StalledWriter(monkeypatch)
        monkeypatch.setattr(exports, "EXPORT_TIMEOUT_S", 0.2)
        t = finishing(rec, trace)
        assert stall.entered.wait(5)
        with pytest.raises(AppError) as err:
            exports.run_rows(h, rec.run_id, "csv", None, tmp_path / "slot")
        assert str(err.value) == exports.LOG_BUSY
        assert list((tmp_path / "slot").glob("**/*")) == []  # nothing half-written kept
        assert h.log_problem is None and h.status()["log_problem"] is None
        stall.release()
        t.join(10)
        assert t.notes == [None]  # type: ignore[attr-defined]
        path = exports.run_rows(h, rec.run_id, "csv", None, tmp_path / "slot")
        with zipfile.ZipFile(path) as z:
            (runs,) = [n for n in z.namelist() if n.startswith("runs/")]
            text = z.read(runs).decode()
        assert ",done," in text and h.log_problem is None
    finally:
        h.close()


def test_the_whole_log_export_behind_a_slow_write_is_busy_and_logging_goes_on(tmp_path, monkeypatch):
    """The whole log's export waited 10 s whatever EXPORT_TIMEOUT_S said, then answered the
    store's "a write did not complete" instead of that the log is busy."""
    h = RunHistory(str(tmp_path / "log.duckdb"))
    try:
        rec, trace = streamed_run(h)
        stall = StalledWriter(monkeypatch)
        monkeypatch.setattr(exports, "EXPORT_TIMEOUT_S", 0.2)
        t = finishing(rec, trace)
        assert stall.entered.wait(5)
        slot = tmp_path / "slot"
        slot.mkdir()
        with pytest.raises(AppError) as err:
            h.export("csv", None, slot)
        assert str(err.value) == exports.LOG_BUSY
        assert list(slot.iterdir()) == []  # nothing half-written kept
        assert h.log_problem is None
        stall.release()
        t.join(10)
        assert h.export("csv", None, slot).is_file()
    finally:
        h.close()


def test_a_flush_that_runs_out_raises_timeout_and_reports_nothing(tmp_path, monkeypatch):
    """RunHistory.flush: a wait that runs out is the caller's TimeoutError (the store's
    own raised StoreUnavailable, which write() kept as a reason for not logging)."""
    h = RunHistory(str(tmp_path / "log.duckdb"))
    try:
        rec, trace = streamed_run(h)
        stall = StalledWriter(monkeypatch)
        t = finishing(rec, trace)
        assert stall.entered.wait(5)
        with pytest.raises(TimeoutError):
            h.flush(0.1)
        assert h.log_problem is None
        stall.release()
        t.join(10)
        h.flush(5)
        assert h.run_log.get_run(rec.run_id)["status"] == "done"
    finally:
        h.close()


def test_a_failed_write_is_still_reported(tmp_path, monkeypatch):
    """A write that fails (a full disk) is a reason for not logging, as before: the flush
    says so through log_problem, and the run's finish in its note."""
    h = RunHistory(str(tmp_path / "log.duckdb"))
    try:
        rec, trace = streamed_run(h)

        def full_disk(cur, work):
            raise duckdb.IOException("No space left on device")

        monkeypatch.setattr(store_writer, "_write", full_disk)
        rec.run_log.append(rec.run_id, trace)
        h.flush(5)
        assert "Runs are not being logged" in (h.log_problem or "")
        assert "No space left on device" in (rec.finish(trace, "done", None) or "")
    finally:
        h.close()


def test_a_replay_as_its_run_finishes_keeps_its_status_with_its_rows(tmp_path, monkeypatch):
    """The status was read after the rows, in a later snapshot: a run that finished
    meanwhile replayed as done with 12 of its 30 tokens and no note that it is partial
    (review: replay_race.py)."""
    h = RunHistory(str(tmp_path / "log.duckdb"))
    try:
        full = synthetic_trace(n_layers=4, n_tokens=30, seed=2)
        rec = h.recorder("generate")
        chunks = grow(full, 5)
        rec.start(next(chunks))
        trace = next(chunks)
        rec.run_log.append(rec.run_id, trace)
        h.flush()
        partial = trace.n_tokens
        decode = codec.decode_trace

        def decode_then_finish(*args, **kwargs):  # the rows are read: the stream ends now
            out = decode(*args, **kwargs)
            monkeypatch.setattr(codec, "decode_trace", decode)
            for _ in chunks:  # the same trace, grown to its end
                pass
            assert rec.finish(trace, "done", None) is None
            return out

        monkeypatch.setattr(codec, "decode_trace", decode_then_finish)
        replayed, status = h.replay_with_status(rec.run_id)
        assert (status, replayed.n_tokens) == ("running", partial) and partial < full.n_tokens
        replayed, status = h.replay_with_status(rec.run_id)  # and once it is finished
        assert (status, replayed.n_tokens) == ("done", full.n_tokens)
    finally:
        h.close()


# -- the downloads folder of a killed server ------------------------------------------------
SERVER = """
import os, signal, sys
from metaattn_viz.app.exports import Downloads
d = Downloads()
d.write("visitor", "trace", "t.json", "a visitor's prompt")
print(d.root, flush=True)
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.stdin.read()
"""


def start_server(tmp: Path, how: str) -> subprocess.Popen:
    """A process that makes its Downloads folder in `tmp`, prints it, then is killed
    (`how` "kill") or waits for its standard input to close."""
    env = {**os.environ, "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-c", SERVER, how],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def folder_of(p: subprocess.Popen) -> Path:
    assert p.stdout is not None
    return Path(p.stdout.readline().strip())


def test_a_killed_servers_downloads_are_removed_at_the_next_start_never_a_running_ones(tmp_path, monkeypatch):
    """A SIGKILLed server left its downloads folder (its visitors' prompts) behind for
    good: mkdtemp and atexit only."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    running = start_server(tmp_path, "wait")
    alive = folder_of(running)
    killed = start_server(tmp_path, "kill")  # after: a server that starts removes it
    dead = folder_of(killed)
    assert killed.wait(30) == -signal.SIGKILL
    assert dead.is_dir() and any(dead.rglob("t.json"))
    other = tmp_path / "metaattn-downloads-target"  # not a server's folder, and a link to it
    other.mkdir()
    (tmp_path / "metaattn-downloads-1-link").symlink_to(other)
    (tmp_path / "metaattn-downloads-2-file").write_text("")
    try:
        mine = exports.Downloads()
        try:
            assert not dead.exists()
            assert alive.is_dir() and any(alive.rglob("t.json"))
            assert mine.root.is_dir() and mine.root.parent == tmp_path
            assert other.is_dir() and (tmp_path / "metaattn-downloads-1-link").is_symlink()
            assert (tmp_path / "metaattn-downloads-2-file").is_file()
            assert exports.remove_abandoned(tmp_path) == []  # nor this server's own
            assert mine.root.is_dir()
        finally:
            mine.close()
        assert not mine.root.exists()
    finally:
        running.communicate("", timeout=30)  # ends as a server does: its folder removed
    assert not alive.exists()


def test_a_reused_pid_does_not_keep_an_abandoned_folder(tmp_path):
    """The PID in a folder's name is only a label: a folder named with a process that is
    running (here this one) but whose lock nobody holds is abandoned."""
    left = tmp_path / f"metaattn-downloads-{os.getpid()}-abc"
    (left / "visitor").mkdir(parents=True)
    assert exports.remove_abandoned(tmp_path) == [left] and not left.exists()
