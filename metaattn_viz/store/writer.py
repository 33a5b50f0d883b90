"""The single writer: one open routing log per process, shared by every RunLog on that
file (docs/architecture.md).

`acquire(path, read_only)` returns the process's `Database` for a file (opening it on
first use) and `release(db)` gives it back; the last release closes it. A Database owns
the shared connection, a cursor per reading thread, the bookkeeping of the runs
streaming in this process, and one writer thread that owns the write cursor and commits
what the streams have queued, in one transaction per round, from Arrow tables (never
row-by-row INSERTs). Its interface is start_run / append / finish / flush for writing,
cursor / fresh_cursor for reading, close.

`start_run` and `append` only queue (append copies the new positions out of the trace)
and return, so logging costs a generation almost nothing; the writer lets them gather for
up to COMMIT_WINDOW_S to share a commit. `finish` and `flush` wait for their commit and
raise `StoreUnavailable` if it failed (so does the next append after a failed write); a
`flush(timeout)` that runs out first raises TimeoutError: the write is slow, not failed,
and goes on. A run is `done` only in the transaction that writes its last rows. Closing
(or exiting the interpreter) while a run streams writes what was queued and marks the run
`interrupted`; a crash loses at most the last COMMIT_WINDOW_S of a stream.

Never imports the model code, torch or gradio; knows no SQL beyond the names in Q.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from metaattn_viz.core.trace import RoutingTrace
from metaattn_viz.store import codec
from metaattn_viz.store.codec import TraceSlice
from metaattn_viz.store.errors import StoreUnavailable
from metaattn_viz.store.opening import open_database, wal_path, wal_size
from metaattn_viz.store.queries import Q
from metaattn_viz.store.schema import FINAL_ARROW_SCHEMA, PROGRESS_ARROW_SCHEMA, RUNS_ARROW_SCHEMA

log = logging.getLogger(__name__)

# How long the writer lets queued appends gather before committing them (finish and
# flush are written at once). A round costs 5-10 ms of CPU whatever its size (DuckDB's
# fixed cost per statement, measured on 2 busy cores), so this keeps logging a stream
# to about 1% of a core, and bounds what a crash can lose of a stream: its last second.
COMMIT_WINDOW_S = 1.0
CLOSED_ERROR = "the routing log was closed while this run was streaming"
WAL_DELETED = "write-ahead log deleted"  # what Database.file_gone says of it
FINISH_LOST_ERROR = "a write to the routing log failed: the end of this run was not logged"


@dataclass
class _Work:
    """One queued piece of a run for the writer (copies: the trace may keep growing)."""

    seq: int
    run_id: str
    new_run: dict[str, Any] | None = None  # a runs row (start_run)
    rows: TraceSlice | None = None
    final: dict[str, Any] | None = None  # final fields (finish)
    kl_to_dense: pa.Table | None = None  # (run_id, pos, kl_to_dense) for finish
    abandon: str | None = None  # the stream gave up on this run: mark it interrupted, why


@dataclass
class _RunState:
    """A run streaming in this process."""

    n_layers: int
    started: float  # time.monotonic() at start_run
    queued: int = 0  # positions handed to the writer
    finishing: bool = False
    error: StoreUnavailable | None = None


class Database:
    """One open routing log in this process (get it from `acquire`)."""

    def __init__(self, path: Path, read_only: bool):
        self.path = path
        self.read_only = read_only
        self.con: duckdb.DuckDBPyConnection | None  # None once closed
        self.con, self._recovered = open_database(path, read_only)
        self._identity = _identity(path)  # the file opened, to notice it deleted or replaced
        self.key = str(path)  # its key in the registry (acquire sets it)
        self._refs = 0  # RunLog handles holding it (the registry's count)
        self._cursor_lock = threading.Lock()
        self._local = threading.local()
        # the cursors still held somewhere, closed with the database; weakly held, so one
        # closed and dropped by its caller (a console query, an export) is forgotten
        self._cursors: weakref.WeakSet[duckdb.DuckDBPyConnection] = weakref.WeakSet()
        self._cond = threading.Condition()
        self._pending: list[_Work] = []
        self._seq = 0  # last ticket handed out
        self._done_seq = 0  # last ticket the writer has dealt with
        self._waiting = 0  # threads blocked in _wait(): the writer must not dawdle
        self._runs: dict[str, _RunState] = {}
        self._writer: threading.Thread | None = None
        self._stopping = False
        self._closed = False

    def file_gone(self) -> str | None:
        """None while `path` is still the file this Database opened and the write-ahead log
        DuckDB is writing is still at its path; else what became of them: "deleted" or
        "replaced" (the file: a deleted one keeps taking writes through the open connection,
        and they vanish when it closes), or WAL_DELETED (commits go on into the deleted
        write-ahead log, which no open after a crash finds: they are kept only if this
        process closes the log, which checkpoints them into the file)."""
        now = _identity(self.path)
        if now != self._identity:
            return "deleted" if now is None else "replaced"
        return WAL_DELETED if self._wal_deleted() else None

    def _wal_deleted(self) -> bool:
        """Whether DuckDB is committing into a write-ahead log no longer at its path (deleted
        under it). No file there is also the rule from a checkpoint, which removes it, to the
        next commit, which makes it again: so DuckDB's own account says whether it holds one,
        read between two looks at the path, so that neither a checkpoint nor a first commit
        in between is taken for a deletion. A read-only log writes none."""
        wal = wal_path(self.path)
        if self.read_only or wal.exists():
            return False
        try:
            held = wal_size(self.cursor())
        except (duckdb.Error, StoreUnavailable):  # closed or closing: nothing more is written
            return False
        return bool(held) and not wal.exists()

    @property
    def recovered(self) -> list[str]:
        """Runs found `running` on open (left by an ended process) and marked interrupted."""
        return list(self._recovered)

    # -- cursors ---------------------------------------------------------------------------
    def cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's cursor (created on first use)."""
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self.fresh_cursor()
            self._local.cursor = cur
        return cur

    def fresh_cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor, closed with the database (or by the caller)."""
        with self._cursor_lock:
            if self._closed or self.con is None:
                raise StoreUnavailable(f"routing log {self.path} is closed")
            cur = self.con.cursor()
            self._cursors.add(cur)
            return cur

    # -- the streams' side -----------------------------------------------------------------
    def start_run(self, run_id: str, row: dict[str, Any]) -> None:
        """Queue a new run's row and start tracking it as streaming."""
        with self._cond:
            self._runs[run_id] = _RunState(n_layers=int(row["n_layers"]), started=time.monotonic())
            self._submit(run_id, new_run=row)

    def append(self, run_id: str, trace: RoutingTrace, start_pos: int | None = None) -> int:
        """Queue the positions of `trace` not yet queued; return how many are queued."""
        with self._cond:
            st = self._streaming(run_id)
            if start_pos is not None and start_pos > st.queued:
                raise ValueError(
                    f"append from position {start_pos} would leave a gap: run "
                    f"{run_id} has {st.queued} positions queued"
                )
            if trace.n_layers != st.n_layers:
                raise ValueError(
                    f"trace has {trace.n_layers} layers, run {run_id} was started with {st.n_layers}"
                )
            rows = codec.snapshot(trace, st.queued)
            if rows is not None:
                rows.so_far["wall_ms"] = (time.monotonic() - st.started) * 1e3  # so far
                self._submit(run_id, rows=rows)
                st.queued = rows.end
            return st.queued

    def finish(self, run_id: str, trace: RoutingTrace, status: str, error: str | None) -> None:
        """Queue the remaining positions with the final fields, and wait for the commit."""
        with self._cond:
            st = self._runs.get(run_id)
            if st is not None and st.error is not None:  # an earlier write failed
                self._runs.pop(run_id)
                self._give_up(run_id)
                raise st.error
            st = self._streaming(run_id)
            rows = codec.snapshot(trace, st.queued)
            final = codec.final_fields(
                run_id,
                trace,
                status,
                error,
                wall_ms=(time.monotonic() - st.started) * 1e3,
                finished_at=time.time(),
            )
            kl = codec.kl_table(run_id, trace)
            st.finishing = True
            ticket = self._submit(run_id, rows=rows, final=final, kl_to_dense=kl)
            if rows is not None:
                st.queued = rows.end
            try:
                self._wait(ticket)
            finally:
                failed = st.error
                self._runs.pop(run_id, None)
            if failed is not None:
                self._give_up(run_id)
                raise failed

    def _give_up(self, run_id: str) -> None:
        """A run whose end could not be written (caller holds self._cond): the writer marks
        it interrupted (best effort; else the next read-write open does), so that it does
        not stay `running` in this server's reads while it lives."""
        if not self._stopping:
            self._submit(run_id, abandon=FINISH_LOST_ERROR)

    def abandon(self, run_id: str, reason: str) -> None:
        """The stream of `run_id` gives up on it after a failed write: nothing more comes
        for it. The writer marks it interrupted with `reason` (best effort: else the next
        read-write open does) and forgets it, so later flushes no longer raise its error."""
        with self._cond:
            st = self._runs.get(run_id)
            if st is None or st.finishing or self._stopping:
                return  # finished, or close() marks it
            st.finishing = True
            self._submit(run_id, abandon=reason)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued so far is committed; raise the error of a failed
        write of a run still streaming in this process, or TimeoutError when the writer has
        not got there within `timeout` s (its round is still being written)."""
        with self._cond:
            self._wait(self._seq, timeout)
            for st in self._runs.values():
                if st.error is not None:
                    raise st.error

    def _streaming(self, run_id: str) -> _RunState:
        st = self._runs.get(run_id)
        if st is None:
            raise ValueError(
                f"run {run_id} is not streaming in this process (unknown, finished, or started elsewhere)"
            )
        if st.finishing:
            raise ValueError(f"run {run_id} is already finishing")
        if st.error is not None:
            raise st.error
        return st

    def _submit(self, run_id: str, **parts: Any) -> int:
        """Queue work (caller holds self._cond). Returns its ticket."""
        if self._stopping:
            raise StoreUnavailable(f"routing log {self.path} is closing")
        self._seq += 1
        self._pending.append(_Work(self._seq, run_id, **parts))
        if self._writer is None:
            self._writer = threading.Thread(
                target=self._write_loop, daemon=True, name=f"metaattn-store-writer:{self.path.name}"
            )
            self._writer.start()
        self._cond.notify_all()
        return self._seq

    def _wait(self, ticket: int, timeout: float | None = None) -> None:
        """Block until the writer has dealt with `ticket` (caller holds self._cond);
        TimeoutError if it has not within `timeout` s: a slow write is not a failed one (the
        writer goes on, and reports a failure to the waiters of its round when there is one)."""
        self._waiting += 1
        self._cond.notify_all()
        try:
            done = self._cond.wait_for(lambda: self._done_seq >= ticket, timeout)
        finally:
            self._waiting -= 1
        if not done:
            raise TimeoutError(f"routing log {self.path}: a write did not complete within {timeout:g} s")

    # -- the writer thread -----------------------------------------------------------------
    def _write_loop(self) -> None:
        cur = self.fresh_cursor()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stopping)
                # Group commit: queued appends wait up to COMMIT_WINDOW_S for company (one
                # fsync for many tokens and streams); someone blocked in _wait() cannot.
                self._cond.wait_for(lambda: self._waiting or self._stopping, COMMIT_WINDOW_S)
                if not self._pending:
                    return
                work, self._pending = self._pending, []
                upto = work[-1].seq
                abandoned = [w for w in work if w.abandon is not None]
                # Runs whose earlier write failed get no later rows (that would leave a gap).
                work = [
                    w
                    for w in work
                    if w.abandon is None and not (w.run_id in self._runs and self._runs[w.run_id].error)
                ]
            error = None
            try:
                _write(cur, work)
            except Exception as exc:  # noqa: BLE001 - reported to every waiter of this round
                log.error("routing log %s: write failed: %s", self.path, exc)
                error = StoreUnavailable(f"could not write to routing log {self.path}: {exc}")
                error.__cause__ = exc
            for w in abandoned:
                self._mark_interrupted(cur, w.run_id, w.abandon or "")
            with self._cond:
                for w in work:
                    st = self._runs.get(w.run_id)
                    if st is None:
                        continue
                    if error is not None:
                        st.error = error
                for w in abandoned:
                    self._runs.pop(w.run_id, None)
                self._done_seq = upto
                self._cond.notify_all()

    def _mark_interrupted(self, cur: duckdb.DuckDBPyConnection, run_id: str, error: str) -> None:
        """Mark a run of this process that is still `running` as interrupted (best effort:
        a run left running is marked so by the next read-write open)."""
        try:
            cur.execute(Q.MARK_OWN_INTERRUPTED, {"run_id": run_id, "error": error})
        except duckdb.Error as exc:
            log.error("routing log %s: could not mark run %s interrupted: %s", self.path, run_id, exc)

    # -- closing ---------------------------------------------------------------------------
    def close(self) -> None:
        with self._cond:
            if self._closed or self._stopping:
                return
            # Streams still open in this process: what they queued is written, then they
            # are marked interrupted (a closed log must not leave runs that look alive).
            streaming = [rid for rid, st in self._runs.items() if not st.finishing]
            writer = self._writer
            self._stopping = True
            self._cond.notify_all()
        if writer is not None:
            writer.join()
        if streaming and not self.read_only:
            cur = self.fresh_cursor()
            for rid in streaming:
                self._mark_interrupted(cur, rid, CLOSED_ERROR)
        with self._cursor_lock:
            self._closed = True
            for cur in list(self._cursors):
                try:
                    cur.close()
                except duckdb.Error:
                    pass
            self._cursors.clear()
            # closed, and dropped: the threads' own cursors (a Gradio worker thread lives on)
            # and the connection, which a closed RunLog still holding this Database kept
            # alive to the interpreter's end, where DuckDB's bindings printed "nanobind:
            # leaked ..." (a server stopped by Ctrl-C or SIGTERM)
            self._local = threading.local()
            con, self.con = self.con, None
            if con is not None:
                con.close()


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the file at `path`, None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _write(cur: duckdb.DuckDBPyConnection, work: list[_Work]) -> None:
    """One transaction for everything the streams queued since the last round. A run
    started in the same round is inserted with its progress and final fields folded in
    (a whole trace logged at once costs one INSERT per table and no UPDATE)."""
    if not work:
        return
    new_runs = {w.run_id: dict(w.new_run) for w in work if w.new_run is not None}
    slices = codec.merge_slices([(w.run_id, w.rows) for w in work if w.rows is not None])
    progress: dict[str, dict[str, Any]] = {}
    finals: dict[str, dict[str, Any]] = {}
    for rid, s in slices:  # in queue order: the last slice of a run wins
        fields = {"n_tokens": s.end, "n_prompt_tokens": s.n_prompt_tokens, "truncated": s.truncated}
        fields.update(s.so_far)  # the text and measures so far (a finish's final fields follow)
        if rid in new_runs:
            new_runs[rid].update(fields)
        else:
            progress.setdefault(rid, {"run_id": rid}).update(fields)
    for w in work:
        if w.final is None:
            continue
        if w.run_id in new_runs:
            new_runs[w.run_id].update(w.final)
        else:
            finals[w.run_id] = w.final
    kls = [w.kl_to_dense for w in work if w.kl_to_dense is not None]
    # Build every Arrow table before the transaction: a bad value fails early.
    registered: dict[str, pa.Table] = {}
    if new_runs:
        registered["_new_runs"] = pa.Table.from_pylist(list(new_runs.values()), RUNS_ARROW_SCHEMA)
    if slices:
        registered["_new_tokens"], registered["_new_routes"] = codec.slice_tables(slices)
    if progress:
        registered["_progress"] = pa.Table.from_pylist(list(progress.values()), PROGRESS_ARROW_SCHEMA)
    if finals:
        registered["_final"] = pa.Table.from_pylist(list(finals.values()), FINAL_ARROW_SCHEMA)
    if kls:
        registered["_kl"] = pa.concat_tables(kls)
    for name, table in registered.items():
        cur.register(name, table)
    try:
        cur.begin()
        try:
            if new_runs:
                cur.execute(Q.INSERT_RUNS)
            if slices:
                cur.execute(Q.INSERT_TOKENS)
                cur.execute(Q.INSERT_ROUTES)
            if progress:
                cur.execute(Q.UPDATE_PROGRESS)
            if kls:
                cur.execute(Q.UPDATE_KL_TO_DENSE)
            if finals:
                cur.execute(Q.UPDATE_FINAL)
            cur.commit()
        except BaseException:
            try:
                cur.rollback()
            except duckdb.Error:
                pass
            raise
    finally:
        for name in registered:
            cur.unregister(name)


# -- the registry: one Database per file per process ----------------------------------------
_REGISTRY: dict[str, Database] = {}
_REGISTRY_LOCK = threading.Lock()


def acquire(path: Path, read_only: bool) -> Database:
    """The process's Database for `path`, opened on first use; give it back with release.
    Keyed by the file `path` resolves to now (the key kept on the Database, for release)."""
    path = path.absolute()  # the working directory may change while it is open
    key = str(path.resolve())
    with _REGISTRY_LOCK:
        db = _REGISTRY.get(key)
        if db is not None and db.read_only and not read_only:
            raise StoreUnavailable(
                f"routing log {path} is already open read-only in this "
                "process; close that RunLog before opening it read-write"
            )
        if db is None:
            db = Database(path, read_only)
            db.key = key
            _REGISTRY[key] = db
        db._refs += 1
        return db


def release(db: Database) -> None:
    """Give back what acquire returned; the last release closes the database."""
    with _REGISTRY_LOCK:
        db._refs -= 1
        if db._refs > 0:
            return
        if _REGISTRY.get(db.key) is db:
            del _REGISTRY[db.key]
    db.close()


@atexit.register
def _close_all() -> None:
    with _REGISTRY_LOCK:
        dbs = list(_REGISTRY.values())
        _REGISTRY.clear()
    for db in dbs:
        try:
            db.close()
        except Exception as exc:  # noqa: BLE001 - never fail interpreter exit
            log.error("routing log %s: close at exit failed: %s", db.path, exc)
