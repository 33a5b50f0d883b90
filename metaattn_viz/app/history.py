"""The app's side of the routing log: writing runs as they happen, and reading them back
for the History tab (replay, the runs table a page at a time, compare, the SQL console,
export).

Three policies, each defined once:
- writes (`write`, `RunRecorder`, `log_finished`) never fail a request: on a store problem
  the server keeps serving without logging and says why (`log_problem`), and a generation
  whose run is not logged says so in its notes; a wait for writes (`flush`) that runs out
  is the caller's TimeoutError, never a reason given for not logging (a slow write is not
  a failed one);
- reads the user asked for (`_reading`) turn a store problem into AppError, a sentence;
- a log that another process held at startup (`StoreLocked`) is opened again, at most every
  RETRY_OPEN_S, by the next status, read or write (`run_log`), so logging resumes once that
  process lets go.

Every write takes the run's `owner` and every read the `owner` whose runs it may see (keys
of store.owners; None: every run); deployment.Deployment decides which, per visitor.
Another owner's run reads as a run that does not exist.

The DataFrames returned are the log's own; how they look on the page is the UI's business.
Never imports gradio or the model.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaattn_viz.app import exports
from metaattn_viz.app.errors import AppError, no_such_run
from metaattn_viz.app.exports import LOG_BUSY, not_written, zip_folder
from metaattn_viz.app.requests import choice
from metaattn_viz.core.trace import RoutingTrace

log = logging.getLogger(__name__)

LOG_EVERY_S = 0.25  # routing-log batches while streaming
SQL_TIMEOUT_S = 5.0  # the SQL console's time limit per query
LOST_ERROR = "a write to the routing log failed: the tokens after it were not logged"
RETRY_OPEN_S = 5.0  # a log held by another process at startup is tried again this often


RUNS_PAGE = 200  # the History tab's runs table shows this many runs at a time


@dataclass(frozen=True)
class RunsPage:
    """One page of the runs table: its runs (a DataFrame), the position of the first of
    them among the runs that match (0-based), how many match, and the page size."""

    runs: Any
    offset: int
    total: int
    size: int = RUNS_PAGE

    @property
    def has_previous(self) -> bool:
        return self.offset > 0

    @property
    def has_next(self) -> bool:
        return self.offset + len(self.runs) < self.total


def _filters(text: str | None, status: str | None, controller: str | None) -> dict:
    """The History tab's filters as RunLog.runs_page takes them (empty: none)."""
    return {
        "status": status or None,
        "controller": controller or None,
        "text": (text or "").strip() or None,
    }


class RunHistory:
    """The routing log of one server (None when logging is off or unavailable), its
    background writer, and the queries of the History tab."""

    def __init__(self, db: str | None = None, enabled: bool = True):
        self._db = db
        self._run_log = None
        self._open_problem: str | None = None
        self._retry_at: float | None = None  # when to try a locked log again (None: never)
        self._open_lock = threading.Lock()
        self._closed = False
        self._write_problem: str | None = None  # the last write's failure; a success clears it
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="run-log")
        if enabled:
            self._open()
        else:
            from metaattn_viz.store.errors import LOGGING_OFF

            self._open_problem = LOGGING_OFF

    def _open(self) -> None:
        """Open the log; when another process holds it, say so and try again later."""
        from metaattn_viz import store
        from metaattn_viz.store.errors import StoreLocked
        from metaattn_viz.store.runlog import without_logging

        try:
            self._run_log = store.RunLog(self._db)
        except StoreLocked as exc:
            self._retry_at = time.monotonic() + RETRY_OPEN_S
            problem = without_logging(exc, f" until it is free (tried again every {RETRY_OPEN_S:g} s)")
            if problem != self._open_problem:
                log.warning("%s", exc)
            self._open_problem = problem
            return
        except store.StoreUnavailable as exc:
            log.warning("%s", exc)
            self._retry_at, self._open_problem = None, without_logging(exc)
            return
        if self._open_problem is not None:
            log.info("routing log %s is free again: runs are logged from now on", self._run_log.path)
        self._retry_at, self._open_problem = None, None

    @property
    def run_log(self):
        """The open RunLog, or None when logging is off or the log is unavailable; a log
        that another process held is tried again here (at most every RETRY_OPEN_S)."""
        if self._run_log is None and self._retry_at is not None and time.monotonic() >= self._retry_at:
            with self._open_lock:
                due = self._retry_at is not None and time.monotonic() >= self._retry_at
                if self._run_log is None and due and not self._closed:
                    self._open()
        return self._run_log

    @property
    def log_problem(self) -> str | None:
        """Why runs are not logged: the log could not be opened (or is still held by another
        process), its file was deleted or replaced while open, or the last write failed (a
        full disk; None once a write succeeds again)."""
        run_log = self.run_log  # a held log is tried again first
        return self._open_problem or self.file_problem(run_log) or self._write_problem

    @property
    def unlogged(self) -> str | None:
        """Why no run is logged while the log cannot be opened (None when it is open, or
        when logging was turned off on purpose)."""
        if self.run_log is not None:
            return None
        from metaattn_viz.store.errors import LOGGING_OFF

        return None if self._open_problem == LOGGING_OFF else self._open_problem

    def file_problem(self, run_log=None) -> str | None:
        """A sentence if the log's file was deleted or replaced while open, else None."""
        run_log = run_log if run_log is not None else self._run_log
        problem = run_log.file_problem() if run_log is not None else None
        return f"Runs are not being logged: {problem}." if problem else None

    def status(self) -> dict:
        """The log's part of the page header."""
        run_log = self.run_log
        return {
            "logging": run_log is not None,
            "log_path": str(run_log.path) if run_log is not None else None,
            "log_problem": self.log_problem,
        }

    # -- writing ----------------------------------------------------------------------------
    def write(self, fn, default=None):
        """Run a routing-log write; on a store problem keep serving without logging:
        remember why (`log_problem`) and return `default`."""
        from metaattn_viz import store

        if self.file_problem() is not None:  # it would write into a deleted file: not kept
            return default
        try:
            out = fn()
        except store.StoreUnavailable as exc:
            log.warning("routing log: %s", exc)
            self._write_problem = f"Runs are not being logged: {exc}"
            return default
        self._write_problem = None
        return out

    def log_finished(self, trace: RoutingTrace, kind: str, owner: str | None = None) -> None:
        """Log a complete trace (a re-route) as `owner`'s run. The run is started here (that
        only queues it), so `trace.run_id` is set before the request answers (an API client
        exports the run by it); the wait for its commit is off the request path."""
        run_log = self.run_log
        if run_log is None:
            return
        rid = self.write(lambda: run_log.start_run(trace, kind, owner=owner))
        if rid is not None:
            self._writer.submit(lambda: self.write(lambda: run_log.finish(rid, trace, "done")))

    def recorder(self, kind: str, owner: str | None = None) -> RunRecorder:
        """A recorder for one run of `owner` that grows while it streams."""
        return RunRecorder(self, kind, owner)

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until every run handed to the log so far is committed: TimeoutError if
        that takes more than `timeout` s in all (the writes go on, and nothing is reported),
        while a write that failed is reported as every write's failure is (`write`)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._writer.submit(lambda: None).result(timeout)
        run_log = self.run_log
        if run_log is not None:
            left = None if deadline is None else max(deadline - time.monotonic(), 0.0)
            self.write(lambda: run_log.flush(left))  # its TimeoutError passes through

    def close(self) -> None:
        with self._open_lock:
            self._closed, self._retry_at = True, None
        self._writer.shutdown(wait=True)
        if self._run_log is not None:
            self._run_log.close()

    # -- reading ----------------------------------------------------------------------------
    @contextmanager
    def _reading(self, *also: type[Exception]):
        """The log, for a read the user asked for: AppError if there is none, and a store
        problem (or any of `also`) becomes AppError with its own sentence."""
        from metaattn_viz import store

        if self.run_log is None:
            raise AppError(self.log_problem or "The routing log is not available.")
        caught: tuple[type[Exception], ...] = (store.StoreUnavailable, *also)
        try:
            yield self.run_log
        except caught as exc:
            raise AppError(str(exc)) from None

    def replay(self, run_id: str, owner: str | None = None) -> RoutingTrace:
        """The trace of a logged run visible to `owner`, rebuilt from the log (no model
        needed)."""
        return self.replay_with_status(run_id, owner)[0]

    def replay_with_status(self, run_id: str, owner: str | None = None) -> tuple[RoutingTrace, str]:
        """`replay`, and the run's status in the log (running, done, stopped, ...), read
        with its rows in one snapshot: a replay of a run still streaming, or cut short,
        holds only part of it, and its status says so."""
        from metaattn_viz import store

        with self._reading() as run_log:
            run_id = (run_id or "").strip()
            if not run_id:
                raise AppError("Pick a run first (click a row of the runs table).")
            try:
                return run_log.load_trace_with_status(run_id, owner=owner)
            except store.UnknownRun:
                raise no_such_run(run_id) from None

    def runs(
        self,
        text: str = "",
        status: str | None = None,
        controller: str | None = None,
        order_by: str = "-created_at",
        limit: int = 200,
        owner: str | None = None,
        offset: int = 0,
    ):
        """The logged runs visible to `owner` (a DataFrame, newest first by default),
        filtered: `limit` of them from the `offset`-th on."""
        with self._reading(ValueError) as run_log:  # ValueError: an unknown order_by
            return run_log.list_runs(
                limit=limit,
                offset=offset,
                order_by=order_by,
                owner=owner,
                **_filters(text, status, controller),
            )

    def runs_page(
        self,
        text: str = "",
        status: str | None = None,
        controller: str | None = None,
        order_by: str = "-created_at",
        offset: int = 0,
        size: int = RUNS_PAGE,
        owner: str | None = None,
    ) -> RunsPage:
        """One page of the History tab's runs table: `size` runs from `offset` on (from the
        last page's start where fewer runs match now), and how many match in all, from one
        snapshot of the log (RunLog.runs_page)."""
        with self._reading(ValueError) as run_log:
            filters = _filters(text, status, controller)
            df, start, total = run_log.runs_page(size, offset, order_by=order_by, owner=owner, **filters)
        return RunsPage(df, start, total, size)

    def compare(self, run_a: str, run_b: str, owner: str | None = None):
        """Two runs visible to `owner` side by side: (their traces, the per-token
        comparison DataFrame)."""
        a, b = self.replay(run_a, owner), self.replay(run_b, owner)
        with self._reading() as run_log:
            return a, b, run_log.compare(a.run_id, b.run_id, owner=owner)

    def sql(self, query: str, max_rows: int = 500, owner: str | None = None):
        """The read-only SQL console over the runs visible to `owner`: (DataFrame,
        notice). A query is stopped after SQL_TIMEOUT_S."""
        from metaattn_viz.store import console as sql_console

        if not (query or "").strip():
            raise AppError("Type a query first, e.g. SELECT * FROM runs LIMIT 10.")
        with self._reading(sql_console.ConsoleError) as run_log:
            return sql_console.run_readonly_query(
                run_log, query, max_rows=max_rows, timeout_s=SQL_TIMEOUT_S, owner=owner
            )

    def export(self, fmt: str, owner: str | None, folder: Path) -> Path:
        """The runs visible to `owner` (every run when None) as partitioned Parquet or CSV
        in one zip file, written into `folder` (a Downloads slot: app/exports.py removes it
        in time)."""
        from metaattn_viz import store

        fmt = choice("Format", fmt, store.EXPORT_FORMATS)
        out = Path(folder) / "routing-log"
        try:
            with self._reading() as run_log:
                try:
                    run_log.flush(timeout=exports.EXPORT_TIMEOUT_S)
                    store.export(run_log, out, fmt, owner=owner)
                except TimeoutError:  # the flush: the log's writer is behind
                    raise AppError(LOG_BUSY) from None
                except OSError as exc:  # ExportNotWritten, or its folder could not be made
                    raise not_written(exc) from None
            stamp = time.strftime("%Y%m%d-%H%M%S")
            return zip_folder(out, Path(folder) / f"metaattn-routing-log-{stamp}-{fmt}.zip")
        finally:
            shutil.rmtree(out, ignore_errors=True)  # the zip holds it (or it failed)


class RunRecorder:
    """Logs one streaming run: `start_run` after the prefill, `append` at most every
    LOG_EVERY_S, `finish` at the end. If the log fails, the recorder stops logging this run
    and each call that noticed returns a note for the user (otherwise None)."""

    def __init__(self, history: RunHistory, kind: str, owner: str | None = None):
        self.history = history
        self.kind = kind
        self.owner = owner
        self.run_log = history.run_log  # None once logging stops for this run
        self.run_id: str | None = None
        self._last = 0.0
        # the log cannot be opened (held by another process, damaged): said once, in the
        # notes of the first update or of the finish
        self._unlogged = history.unlogged if self.run_log is None else None

    def _not_logged(self) -> str | None:
        """The note that this run is not logged, the first time it is asked for."""
        note, self._unlogged = self._unlogged, None
        return None if note is None else f"This run is not logged: {note}"

    @property
    def started(self) -> bool:
        return self.run_id is not None

    def start(self, trace: RoutingTrace) -> str | None:
        """Log the run's first trace (its prompt, routed)."""
        run_log = self.run_log
        if run_log is None:
            return self._not_logged()
        self.run_id = self.history.write(lambda: run_log.start_run(trace, self.kind, owner=self.owner))
        self._last = time.monotonic()
        if self.run_id is None:
            self.run_log = None
            return self.history.log_problem or "This run is not logged."
        return None

    def update(self, trace: RoutingTrace) -> str | None:
        """Log the tokens since the last batch, if LOG_EVERY_S has passed."""
        run_log, run_id = self.run_log, self.run_id
        if run_log is None:
            return self._not_logged()
        if run_id is None or time.monotonic() - self._last < LOG_EVERY_S:
            return None
        ok = self.history.write(lambda: run_log.append(run_id, trace))
        self._last = time.monotonic()
        if ok is None:
            run_log.abandon(run_id, LOST_ERROR)  # marked interrupted; later exports unaffected
            self._lost(trace)
            return self.history.log_problem or "This run is no longer logged."
        return None

    def _lost(self, trace: RoutingTrace) -> None:
        """Logging stopped for this run: its id no longer names a whole run in the log, so
        the trace does not carry it (no link or export offered for it)."""
        self.run_log = None
        if trace.run_id == self.run_id:
            trace.run_id = None
        self.run_id = None

    def finish(
        self, trace: RoutingTrace | None, status: str | None, error: BaseException | None
    ) -> str | None:
        """Log how the run ended (done / stopped / interrupted / failed, with the error)."""
        run_log, run_id = self.run_log, self.run_id
        if run_log is None:
            return self._not_logged()
        if run_id is None or trace is None:
            return None
        err = None if error is None else f"{type(error).__name__}: {error}"
        if (
            self.history.write(lambda: run_log.finish(run_id, trace, status, error=err), default=False)
            is False
        ):
            self._lost(trace)
            return self.history.log_problem or "The run could not be logged."
        return None


__all__ = ["RunHistory", "RunRecorder", "RunsPage", "LOG_EVERY_S", "RUNS_PAGE", "SQL_TIMEOUT_S"]
