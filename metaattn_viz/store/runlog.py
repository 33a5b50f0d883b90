"""RunLog: the public handle on the routing log, where every run's RoutingTrace is kept in
an embedded DuckDB database, replayable without the model, comparable, queryable
(docs/architecture.md). The tables are described in schema.py.

Interface (what the app, the CLI and the console use):

    log = RunLog(path)                      # or RunLog(path, read_only=True)
    run_id = log.start_run(trace, kind="generate", owner=None)  # status "running"
    log.append(run_id, trace)               # every few tokens while the trace grows
    log.finish(run_id, trace, "done")       # or "stopped" / "failed"; one transaction
    trace = log.load_trace(run_id)          # replay: an equal RoutingTrace
    trace, status = log.load_trace_with_status(run_id)  # and its status, same snapshot
    log.list_runs(...), log.count_runs(...), log.runs_page(...), log.compare(a, b)
    log.full_attention_share_by_layer(), ...
    export(path_or_log, out_dir, "parquet")  # export.py

Every reading method takes `owner` (owners.py): None reads every run; an owner's key
reads that owner's runs only, and another owner's run is UnknownRun with the message of
a run that does not exist (so a visitor cannot even learn that it exists).

Handles on the same file in one process share one connection and one writer
(writer.py: how writes are queued, grouped and committed). Readers use a cursor per
thread and see committed data only (DuckDB's MVCC: call flush() first to read what was
just queued), inside one transaction per call so a replay is consistent.

Never imports gradio, transformers, torch or the model code; its SQL is in queries.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd

from metaattn_viz.core.trace import RoutingTrace
from metaattn_viz.paths import default_db_path
from metaattn_viz.store import codec
from metaattn_viz.store.errors import LOGGING_OFF, StoreUnavailable, UnknownRun
from metaattn_viz.store.opening import damaged, is_damaged, wal_path
from metaattn_viz.store.owners import check_owner
from metaattn_viz.store.queries import LIST_ORDERS, TIME_BUCKETS, Q
from metaattn_viz.store.schema import FINAL_STATUSES, STATUSES
from metaattn_viz.store.writer import WAL_DELETED, acquire, release

log = logging.getLogger(__name__)

PathArg = str | os.PathLike[str]


def resolve_db_path(db: PathArg | None = None) -> Path:
    """--db if given, else METAATTN_DB, else <data dir>/routing.duckdb; absolute, so that
    a later change of the working directory does not move it."""
    return (Path(db).expanduser() if db else default_db_path()).absolute()


def _reads(method):
    """A read of the log: where DuckDB finds the file's blocks missing or garbled (a
    truncated copy, a block that fails its checksum), StoreUnavailable naming the file, not
    DuckDB's exception."""

    @functools.wraps(method)
    def read(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except duckdb.Error as exc:
            if not is_damaged(exc):
                raise
            raise damaged(self.path, exc) from exc

    return read


class RunLog:
    """A handle on the routing log at `path` (default: resolve_db_path()).

    Handles on the same file in one process share one connection and one writer; close
    each handle (or use `with`); the file is released when the last one closes.
    """

    def __init__(self, path: PathArg | None = None, read_only: bool = False):
        self.path = resolve_db_path(path)
        self.read_only = read_only
        self._db = acquire(self.path, read_only)
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            release(self._db)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        return f"RunLog({str(self.path)!r}, {mode}{', closed' if self._closed else ''})"

    @property
    def recovered_runs(self) -> list[str]:
        """Runs found `running` on open (left by an ended process) and marked interrupted."""
        return self._db.recovered

    def fresh_cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor on the shared connection for one-off work (the SQL console); it is
        closed with the log, or by the caller."""
        self._check_open()
        return self._db.fresh_cursor()

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A cursor of its own in a read-only transaction: every read through it sees the log
        as of one moment (a run logged meanwhile in all of them or in none); closed after.
        Never the thread's shared cursor, which a failed read would leave in a transaction."""
        self._check_open()
        cur = self._db.fresh_cursor()
        try:
            cur.execute("BEGIN TRANSACTION")
            yield cur
            cur.execute("ROLLBACK")  # it only read
        finally:
            cur.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"routing log {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise StoreUnavailable(f"routing log {self.path} is opened read-only")

    # -- writing ---------------------------------------------------------------------------
    def start_run(self, trace: RoutingTrace, kind: str = "generate", owner: str | None = None) -> str:
        """Record a new run (status `running`, every setting, and who made it: `owner`,
        a key from owners.py, or None) and return its id, which is also set on
        `trace.run_id`. Like append, it queues and returns: the row is committed with the
        writer's next round (flush() waits for it; a failure is raised by the next append
        or finish). Positions already in the trace go with the next append/finish."""
        self._check_writable()
        if not isinstance(kind, str) or not kind.strip() or len(kind) > 32:
            raise ValueError(f"kind must be a short name such as 'generate', got {kind!r}")
        check_owner(owner)
        run_id = str(uuid.uuid4())
        self._db.start_run(run_id, codec.run_row(run_id, trace, kind, owner))
        trace.run_id = run_id
        return run_id

    def append(self, run_id: str, trace: RoutingTrace, start_pos: int | None = None) -> int:
        """Queue the positions of `trace` not yet handed over (from `start_pos`, which must
        not leave a gap; positions already queued are never written twice) and return at
        once; the writer commits them in its next round. Returns the number of positions
        queued so far. Raises StoreUnavailable if an earlier write of this run failed."""
        self._check_writable()
        return self._db.append(run_id, trace, start_pos)

    def finish(
        self, run_id: str, trace: RoutingTrace, status: str = "done", error: str | None = None
    ) -> None:
        """Write the remaining positions and the final fields (status, output_text,
        realized_cost, flops_ratio, timings, wall_ms, error, and kl_to_dense per token if
        the trace has it) in one transaction and wait for it. `done` is only ever written
        together with the run's last rows. `status` is how the run ended: `done`,
        `stopped` (the user stopped it), `failed` (with `error`), or `interrupted` (the
        process is going away mid-run; a crash is marked so on the next open)."""
        self._check_writable()
        if status not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {', '.join(FINAL_STATUSES)}, got {status!r}")
        self._db.finish(run_id, trace, status, error)

    def file_problem(self) -> str | None:
        """A sentence if the file this handle opened was deleted or replaced since (its
        writes then go nowhere that outlives this process), or the write-ahead log DuckDB
        writes was deleted (what is logged since is lost in a crash); None while all is
        well."""
        gone = self._db.file_gone()
        if gone is None:
            return None
        if gone == WAL_DELETED:
            return (
                f"the routing log's write-ahead log {wal_path(self.path)} was deleted while it "
                "was open, so runs logged since would be lost if this process crashed "
                "(restart to log again; a clean stop keeps them)"
            )
        return (
            f"the routing log's file was {gone} while it was open, so runs are not kept "
            "(restart to log again)"
        )

    def abandon(self, run_id: str, reason: str) -> None:
        """Give up on a streaming run after a failed write (append raised): nothing more
        is written for it, it is marked `interrupted` with `reason` (best effort), and
        flush() no longer raises its old error. A no-op for a run not streaming here, or
        once the log is closing; never raises."""
        self._db.abandon(run_id, reason)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued so far is committed; raise StoreUnavailable if a
        write of a run still streaming in this process failed, and TimeoutError if the
        writer is still writing after `timeout` s (slow, not failed: the write goes on)."""
        self._check_open()
        self._db.flush(timeout)

    # -- reading ---------------------------------------------------------------------------
    def _read_df(self, sql: str, owner: str | None, params: dict[str, Any] | None = None) -> pd.DataFrame:
        self._check_open()
        return self._db.cursor().execute(sql, {**(params or {}), "owner": check_owner(owner)}).df()

    def _run_row(self, cur: duckdb.DuckDBPyConnection, run_id: str, owner: str | None) -> dict[str, Any]:
        res = cur.execute(Q.RUN_BY_ID, {"run_id": str(run_id), "owner": check_owner(owner)})
        row = res.fetchone()
        if row is None:  # the same words whether it is missing or someone else's
            raise UnknownRun(f"no run {run_id!r} in routing log {self.path}")
        return dict(zip([d[0] for d in res.description or []], row, strict=True))

    @_reads
    def get_run(self, run_id: str, owner: str | None = None) -> dict[str, Any]:
        """The runs row of `run_id` as a dict; UnknownRun if there is none (visible to
        `owner`)."""
        self._check_open()
        return self._run_row(self._db.cursor(), run_id, owner)

    def load_trace(self, run_id: str, owner: str | None = None) -> RoutingTrace:
        """Replay: the RoutingTrace of `run_id` rebuilt from the log alone (its committed
        positions, for a run that is still streaming or was interrupted); UnknownRun if
        there is no such run visible to `owner`; StoreUnavailable naming the run and the
        value for a row this version cannot decode (a setting it no longer accepts)."""
        return self.load_trace_with_status(run_id, owner)[0]

    @_reads
    def load_trace_with_status(self, run_id: str, owner: str | None = None) -> tuple[RoutingTrace, str]:
        """`load_trace`, and the run's status (running, done, stopped, ...) from the same
        snapshot as its rows: a run still streaming reads as running with the positions
        committed so far, never as done with only part of them."""
        with self._snapshot() as cur:  # the runs row, tokens and routes as of one moment
            run = self._run_row(cur, run_id, owner)
            params = {"run_id": run_id, "n_tokens": run["n_tokens"]}
            tok = cur.execute(Q.TOKENS_OF_RUN, params).fetchnumpy()
            rt = cur.execute(Q.ROUTES_OF_RUN, params).fetchnumpy()
        L, T = int(run["n_layers"]), int(run["n_tokens"])
        if len(tok["pos"]) != T or len(rt["layer"]) != L * T:
            raise StoreUnavailable(
                f"routing log {self.path}: run {run_id} records {T} positions but holds "
                f"{len(tok['pos'])} token rows and {len(rt['layer'])} route rows "
                f"(expected {L * T}); the log is inconsistent"
            )
        try:
            return codec.decode_trace(run, tok, rt), str(run["status"])
        except (ValueError, TypeError, IndexError, OverflowError) as exc:  # rows this code rejects
            raise StoreUnavailable(
                f"run {run_id} in routing log {self.path} cannot be replayed: {exc}. Its rows "
                "(from another version, or edited by hand) are unchanged, and the other runs "
                "replay as before."
            ) from exc

    @_reads
    def list_runs(
        self,
        limit: int = 50,
        status: str | None = None,
        model: str | None = None,
        controller: str | None = None,
        text: str | None = None,
        order_by: str = "-created_at",
        offset: int = 0,
        owner: str | None = None,
    ) -> pd.DataFrame:
        """Runs (visible to `owner`) as a DataFrame, newest first by default: `limit` of
        them from the `offset`-th on. `text` matches the prompt or the output
        (case-insensitive); `order_by` is a column of LIST_ORDERS, '-' for descending.
        count_runs says how many match in all."""
        sql = _list_sql(order_by)
        filters = _run_filters(status, model, controller, text)
        return self._read_df(sql, owner, {**filters, "limit": int(limit), "offset": int(offset)})

    @_reads
    def runs_page(
        self,
        size: int,
        offset: int = 0,
        status: str | None = None,
        model: str | None = None,
        controller: str | None = None,
        text: str | None = None,
        order_by: str = "-created_at",
        owner: str | None = None,
    ) -> tuple[pd.DataFrame, int, int]:
        """A page of list_runs and how many runs match in all, read in one transaction (one
        snapshot: a run logged meanwhile is in both or in neither): (runs, start, total),
        `size` runs from the `offset`-th on, or from the last page's start (page_start)
        where fewer match."""
        sql = _list_sql(order_by)
        params = {**_run_filters(status, model, controller, text), "owner": check_owner(owner)}
        with self._snapshot() as cur:
            row = cur.execute(Q.COUNT_RUNS, params).fetchone()
            total = int(row[0]) if row else 0
            start = page_start(offset, total, size)
            df = cur.execute(sql, {**params, "limit": int(size), "offset": start}).df()
        return df, start, total

    @_reads
    def count_runs(
        self,
        status: str | None = None,
        model: str | None = None,
        controller: str | None = None,
        text: str | None = None,
        owner: str | None = None,
    ) -> int:
        """How many runs list_runs would list with these filters and no limit."""
        self._check_open()
        params = {**_run_filters(status, model, controller, text), "owner": check_owner(owner)}
        row = self._db.cursor().execute(Q.COUNT_RUNS, params).fetchone()
        return int(row[0]) if row else 0

    @_reads
    def compare(self, run_a: str, run_b: str, owner: str | None = None) -> pd.DataFrame:
        """Two runs token by token, one row per position of either run: pos, token_a,
        token_b, same_token, routes_a, routes_b (one letter per layer from
        `experts.symbol`: F full, L linear, W local window; lower case when hedged),
        agreement (share of the layers both runs have choosing the same expert; empty
        where one run lacks the position), cost_a, cost_b (mean over layers).

        df.attrs holds the counts behind the summary, over the positions both runs have
        (`positions`) and the layers both have (`layers`): `decisions` compared and
        `same_decisions` among them, `agreement` (their share), `same_token_positions` and
        `same_tokens` (its share of `positions`); NaN shares when there is no shared
        position. UnknownRun unless both runs are visible to `owner`."""
        for rid in (run_a, run_b):
            self.get_run(rid, owner)
        df = self._read_df(Q.COMPARE_RUNS, owner, {"run_a": str(run_a), "run_b": str(run_b)})
        decisions = df.pop("_decisions").astype(int)
        same_decisions = int(df.pop("_same_decisions").sum())
        shared = decisions > 0
        positions = int(shared.sum())
        same_tokens = int(df.loc[shared, "same_token"].sum())
        df.attrs.update(
            positions=positions,
            layers=int(decisions.max()) if positions else 0,
            decisions=int(decisions.sum()),
            same_decisions=same_decisions,
            agreement=same_decisions / int(decisions.sum()) if positions else float("nan"),
            same_token_positions=same_tokens,
            same_tokens=same_tokens / positions if positions else float("nan"),
        )
        return df

    # -- analytics -------------------------------------------------------------------------
    # Each answers over the runs visible to `owner` (every run when None).
    @_reads
    def full_attention_share_by_layer(
        self, run_id: str | None = None, owner: str | None = None
    ) -> pd.DataFrame:
        """Per layer: decisions, share routed to full attention, mean full weight, hedged
        share, mean cost (one run, or every run)."""
        return self._read_df(Q.FULL_ATTENTION_SHARE_BY_LAYER, owner, {"run_id": run_id})

    @_reads
    def full_attention_share_by_budget(self, owner: str | None = None) -> pd.DataFrame:
        """Per (controller, budget): runs, decisions, full-attention share, realized cost."""
        return self._read_df(Q.FULL_ATTENTION_SHARE_BY_BUDGET, owner)

    @_reads
    def tokens_most_often_full(
        self, limit: int = 20, min_occurrences: int = 2, owner: str | None = None
    ) -> pd.DataFrame:
        """Token texts whose positions most often get full attention (share over layers,
        averaged over their occurrences)."""
        return self._read_df(
            Q.TOKENS_MOST_OFTEN_FULL, owner, {"limit": int(limit), "min_occurrences": int(min_occurrences)}
        )

    @_reads
    def uncertainty_vs_budget(self, owner: str | None = None) -> pd.DataFrame:
        """Per (controller, budget): mean and p90 total uncertainty, mean epistemic
        uncertainty and vacuity, hedged share."""
        return self._read_df(Q.UNCERTAINTY_VS_BUDGET, owner)

    @_reads
    def runs_over_time(self, every: str = "day", owner: str | None = None) -> pd.DataFrame:
        """Runs, tokens and statuses per hour/day/week/month."""
        if every not in TIME_BUCKETS:
            raise ValueError(f"every must be one of {TIME_BUCKETS}, got {every!r}")
        return self._read_df(Q.RUNS_OVER_TIME.format(bucket=every), owner)

    def export(self, out_dir: PathArg, fmt: str = "parquet", owner: str | None = None) -> dict[str, int]:
        """store.export(self, out_dir, fmt, owner)."""
        from metaattn_viz.store.exporting import export  # export.py builds on RunLog

        return export(self, out_dir, fmt, owner)


def _list_sql(order_by: str) -> str:
    """LIST_RUNS ordered by `order_by`: a column of LIST_ORDERS, '-' for descending."""
    desc = order_by.startswith("-")
    column = order_by.lstrip("-")
    if column not in LIST_ORDERS:
        raise ValueError(
            f"order_by must be one of {', '.join(LIST_ORDERS)} (prefix '-' for descending), got {order_by!r}"
        )
    return Q.LIST_RUNS.format(order=f"{column} {'DESC' if desc else 'ASC'}")


def page_start(offset: int, total: int, size: int) -> int:
    """Where a page of `size` asked for at `offset` starts: at 0 or later, and at the last
    page's start at most (runs deleted, or a filter that now matches fewer)."""
    last = (max(total, 1) - 1) // size * size
    return min(max(int(offset), 0), last)


def _run_filters(
    status: str | None, model: str | None, controller: str | None, text: str | None
) -> dict[str, str | None]:
    """The filter parameters of LIST_RUNS and COUNT_RUNS (None: no filter)."""
    if status is not None and status not in STATUSES:
        raise ValueError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
    return {"status": status, "model": model, "controller": controller, "text": text or None}


def without_logging(exc: StoreUnavailable, until: str = "") -> str:
    """Why a server runs on without logging, in one paragraph: the store's sentence, then
    "Running without logging" (`until`: when that may end)."""
    reason = str(exc).rstrip()
    return f"{reason}{'' if reason.endswith('.') else '.'} Running without logging{until}."


def open_or_explain(db: PathArg | None = None, enabled: bool = True) -> tuple[RunLog | None, str | None]:
    """For the app and the CLI: (log, None), or (None, why) when logging is off or the log
    is unavailable, so the caller can run on without logging and show the reason."""
    if not enabled:
        return None, LOGGING_OFF
    try:
        return RunLog(db), None
    except StoreUnavailable as exc:
        log.warning("%s", exc)
        return None, without_logging(exc)
