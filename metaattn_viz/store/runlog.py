"""The routing log: every run's RoutingTrace in an embedded DuckDB database, replayable
without the model, comparable, queryable, exportable (docs/architecture.md, "Storage").

Tables (schema version in `schema_version`; older databases are migrated on open):

- `runs`    one row per run: status, kind, model, controller, every RoutingSettings field
            (`window` is stored as `local_window`, `lam` as `fixed_lam`), prompt, output text,
            n_tokens, realized_cost, flops_ratio, wall_ms, timings (JSON), error.
- `tokens`  one row per (run, position): token_id, text, is_prompt, kl_to_dense (the
            quality meter, when the run measured it; written by finish).
- `routes`  one row per (run, layer, position): the chosen expert, hedged, the Dirichlet
            concentrations (conc_full/linear/local), the mixing weights applied
            (weight_full/linear/local), cost, lambda, and the uncertainty measures of
            dirichlet.uncertainties (uncertainty = total, aleatoric, epistemic, vacuity),
            stored so that SQL can ask about them; a replay recomputes them from the trace.
- `experts` the lookup (expert, name, cost, symbol) for joins and route strings.

Interface (what the app, the CLI and the console use):

    log = RunLog(path)                      # or RunLog(path, read_only=True)
    run_id = log.start_run(trace, kind="generate")   # a `runs` row, status "running"
    log.append(run_id, trace)               # every few tokens while the trace grows
    log.finish(run_id, trace, "done")       # remaining rows + final fields, one transaction
    trace = log.load_trace(run_id)          # replay: an equal RoutingTrace
    log.list_runs(...), log.compare(a, b), log.full_attention_share_by_layer(), ...
    export(path_or_log, out_dir, "parquet")  # hive-partitioned by day=YYYY-MM-DD

Writes: one writer per process. RunLog objects on the same file share one connection
(a module-level registry); a single writer thread owns the write cursor and commits what
the streams have queued, in one transaction per round, from Arrow tables (never
row-by-row INSERTs). `start_run` and `append` only queue (append copies the new positions
out of the trace) and return, so logging costs a generation almost nothing; the writer
lets them gather for up to COMMIT_WINDOW_S (1 s) to share a commit. `finish` and
`flush` wait for their commit and raise `StoreUnavailable` if it failed (so does the
next append after a failed write). A run is `done` only in the transaction that writes
its last rows. Readers use a cursor per thread and see committed data only (DuckDB's
MVCC: call flush() first to read what was just queued), inside one transaction per call
so a replay is consistent.

Crashes: DuckDB lets one process open a file read-write, so a run still `running` when we
open it read-write was left by a dead process: it is marked `interrupted` on open (its
committed batches stay; a crash loses at most the last COMMIT_WINDOW_S of a stream).
Closing the log (or exiting the interpreter) while a run streams writes what was queued
and marks the run `interrupted`.

Errors: a database locked by another process, a file that is not a DuckDB database, a
routing log written by a newer version, a DuckDB file that is not a routing log -> raise
`StoreUnavailable` naming the path and what to do (`--db` elsewhere or `--no-log`). The
store never overwrites, truncates or deletes a file it did not create.

This module never imports gradio, transformers, torch or the model code (the uncertainty
columns are computed in numpy, checked against dirichlet.py by the tests). All SQL lives
here, in `Q`, under names that say what each query answers.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import json
import logging
import math
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa

from metaattn_viz.paths import default_db_path
from metaattn_viz.core.settings import EXPERTS, RoutingSettings
from metaattn_viz.core.trace import RoutingTrace

log = logging.getLogger(__name__)

STATUSES = ("running", "done", "interrupted", "failed")
FINAL_STATUSES = ("done", "interrupted", "failed")
# The log's tables: what the read-only console may read, and what export writes.
LOG_TABLES = ("runs", "tokens", "routes", "experts", "schema_version")
EXPORT_FORMATS = ("parquet", "csv")
# RoutingSettings field -> runs column (`window` is an SQL keyword; `lam` would be
# confused with the per-decision lambda in `routes`).
SETTINGS_COLUMNS = {"budget": "budget", "scope": "scope", "hedge_policy": "hedge_policy",
                    "hedge_threshold": "hedge_threshold", "hedge_min_weight": "hedge_min_weight",
                    "window": "local_window", "n_sink": "n_sink", "lam": "fixed_lam",
                    "dual_step": "dual_step", "backend": "backend"}
UNCERTAINTY_COLUMNS = {"total": "uncertainty", "aleatoric": "aleatoric",
                       "epistemic": "epistemic", "vacuity": "vacuity"}
# How long the writer lets queued appends gather before committing them (finish and
# flush are written at once). A round costs 5-10 ms of CPU whatever its size (DuckDB's
# fixed cost per statement, measured on 2 busy cores), so this keeps logging a stream
# to about 1% of a core, and bounds what a crash can lose of a stream: its last second.
COMMIT_WINDOW_S = 1.0
# WAL size that triggers a checkpoint. DuckDB's 16 MB default checkpoints every few
# thousand tokens of logging and rewrites the trailing row group each time (measured: 40 ms
# per 30k route rows); 64 MB halves the cost of a commit, and a crash replays at most this.
CHECKPOINT_THRESHOLD = "64MB"
RECOVERED_ERROR = "the process writing this run ended while it was streaming (found on open)"
CLOSED_ERROR = "the routing log was closed while this run was streaming"


class StoreUnavailable(RuntimeError):
    """The routing log cannot be opened or written; the message names the file and what
    to do. The caller can carry on without logging (`--no-log`)."""


class UnknownRun(LookupError):
    """No run with that id in this log."""

    def __str__(self) -> str:  # LookupError would print the repr of its argument
        return str(self.args[0]) if self.args else ""


# ---------------------------------------------------------------------------------------
# Schema and migrations. A migration is frozen text: never edit one that has shipped, add
# the next version instead. Each runs inside the transaction that records its version.
# ---------------------------------------------------------------------------------------
MIGRATIONS: list[tuple[int, tuple[str, ...]]] = [
    (1, (
        """CREATE TABLE schema_version (
             version    INTEGER NOT NULL,
             applied_at TIMESTAMP NOT NULL)""",
        """CREATE TABLE experts (
             expert TINYINT PRIMARY KEY,
             name   VARCHAR NOT NULL,
             cost   DOUBLE NOT NULL,
             symbol VARCHAR NOT NULL)""",
        """INSERT INTO experts VALUES (0, 'full', 1.00, 'F'), (1, 'linear', 0.15, 'L'),
                                      (2, 'local', 0.30, 'W')""",
        """CREATE TABLE runs (
             run_id             VARCHAR PRIMARY KEY,
             created_at         TIMESTAMP NOT NULL,  -- UTC
             finished_at        TIMESTAMP,           -- UTC
             status             VARCHAR NOT NULL
                                CHECK (status IN ('running', 'done', 'interrupted', 'failed')),
             kind               VARCHAR NOT NULL,
             model              VARCHAR,
             controller         VARCHAR,
             controller_id      VARCHAR,
             controller_trained BOOLEAN,
             budget             DOUBLE,
             scope              VARCHAR,
             hedge_policy       VARCHAR,
             hedge_threshold    DOUBLE,
             hedge_min_weight   DOUBLE,
             local_window       INTEGER,
             n_sink             INTEGER,
             fixed_lam          DOUBLE,
             dual_step          DOUBLE,
             backend            VARCHAR,
             n_layers           SMALLINT NOT NULL,
             head_dim           SMALLINT,
             n_tokens           INTEGER NOT NULL,  -- positions committed so far
             n_prompt_tokens    INTEGER NOT NULL,
             truncated          INTEGER NOT NULL,
             prompt             VARCHAR,
             output_text        VARCHAR,
             realized_cost      DOUBLE,
             flops_ratio        DOUBLE,
             wall_ms            DOUBLE,
             timings            VARCHAR,  -- JSON object
             error              VARCHAR,
             pid                INTEGER,
             host               VARCHAR)""",
        """CREATE TABLE tokens (
             run_id    VARCHAR NOT NULL,
             pos       INTEGER NOT NULL,
             token_id  INTEGER NOT NULL,
             text      VARCHAR NOT NULL,
             is_prompt BOOLEAN NOT NULL,
             kl_to_dense FLOAT)  -- KL(dense || routed) of the next token, when measured""",
        """CREATE TABLE routes (
             run_id        VARCHAR NOT NULL,
             layer         SMALLINT NOT NULL,
             pos           INTEGER NOT NULL,
             expert        TINYINT NOT NULL,
             hedged        BOOLEAN NOT NULL,
             conc_full     FLOAT NOT NULL,
             conc_linear   FLOAT NOT NULL,
             conc_local    FLOAT NOT NULL,
             weight_full   FLOAT NOT NULL,
             weight_linear FLOAT NOT NULL,
             weight_local  FLOAT NOT NULL,
             cost          FLOAT NOT NULL,
             lam           FLOAT NOT NULL,
             uncertainty   FLOAT NOT NULL,
             aleatoric     FLOAT NOT NULL,
             epistemic     FLOAT NOT NULL,
             vacuity       FLOAT NOT NULL)""",
    )),
]


def latest_schema_version() -> int:
    return MIGRATIONS[-1][0]


# ---------------------------------------------------------------------------------------
# Named queries. $name parameters; nothing is formatted into SQL except vetted identifiers
# (ORDER BY choices, time buckets) and the export paths (quoted by _sql_string).
# ---------------------------------------------------------------------------------------
class Q:
    TABLES_IN_MAIN = ("SELECT table_name FROM duckdb_tables() "
                      "WHERE database_name = current_database() AND schema_name = 'main'")
    SCHEMA_VERSION = "SELECT max(version) FROM schema_version"
    RECORD_VERSION = "INSERT INTO schema_version VALUES ($version, now()::TIMESTAMP)"
    MARK_ABANDONED_INTERRUPTED = """
        UPDATE runs SET status = 'interrupted', error = coalesce(error, $error)
        WHERE status = 'running' RETURNING run_id"""
    MARK_OWN_INTERRUPTED = """
        UPDATE runs SET status = 'interrupted', error = coalesce(error, $error),
                        finished_at = now()::TIMESTAMP
        WHERE run_id = $run_id AND status = 'running'"""
    INSERT_RUNS = "INSERT INTO runs BY NAME SELECT * FROM _new_runs"
    INSERT_TOKENS = "INSERT INTO tokens BY NAME SELECT * FROM _new_tokens"
    INSERT_ROUTES = "INSERT INTO routes BY NAME SELECT * FROM _new_routes"
    UPDATE_PROGRESS = """
        UPDATE runs SET n_tokens = p.n_tokens, n_prompt_tokens = p.n_prompt_tokens,
                        truncated = p.truncated
        FROM _progress p WHERE runs.run_id = p.run_id"""
    UPDATE_KL_TO_DENSE = """
        UPDATE tokens SET kl_to_dense = k.kl_to_dense
        FROM _kl k WHERE tokens.run_id = k.run_id AND tokens.pos = k.pos"""
    UPDATE_FINAL = """
        UPDATE runs SET status = f.status, finished_at = f.finished_at, prompt = f.prompt,
                        output_text = f.output_text, realized_cost = f.realized_cost,
                        flops_ratio = f.flops_ratio, wall_ms = f.wall_ms,
                        timings = f.timings, error = f.error
        FROM _final f WHERE runs.run_id = f.run_id"""
    RUN_BY_ID = "SELECT * FROM runs WHERE run_id = $run_id"
    TOKENS_OF_RUN = """
        SELECT pos, token_id, text, kl_to_dense FROM tokens
        WHERE run_id = $run_id AND pos < $n_tokens ORDER BY pos"""
    ROUTES_OF_RUN = """
        SELECT layer, pos, expert, hedged, conc_full, conc_linear, conc_local,
               weight_full, weight_linear, weight_local, cost, lam
        FROM routes WHERE run_id = $run_id AND pos < $n_tokens"""
    LIST_RUNS = """
        SELECT * FROM runs
        WHERE ($status::VARCHAR IS NULL OR status = $status::VARCHAR)
          AND ($model::VARCHAR IS NULL OR model = $model::VARCHAR)
          AND ($controller::VARCHAR IS NULL OR controller = $controller::VARCHAR)
          AND ($text::VARCHAR IS NULL
               OR contains(lower(coalesce(prompt, '')), lower($text::VARCHAR))
               OR contains(lower(coalesce(output_text, '')), lower($text::VARCHAR)))
        ORDER BY {order} NULLS LAST, run_id
        LIMIT $limit OFFSET $offset"""
    COMPARE_RUNS = """
        WITH per_pos AS (
            SELECT d.run_id, d.pos,
                   string_agg(CASE WHEN d.hedged THEN lower(e.symbol) ELSE e.symbol END, ''
                              ORDER BY d.layer) AS routes,
                   avg(d.cost) AS cost
            FROM routes d JOIN experts e USING (expert)
            WHERE d.run_id IN ($run_a, $run_b)
            GROUP BY d.run_id, d.pos),
        agree AS (
            SELECT a.pos, avg((a.expert = b.expert)::DOUBLE) AS agreement
            FROM routes a JOIN routes b ON a.layer = b.layer AND a.pos = b.pos
            WHERE a.run_id = $run_a AND b.run_id = $run_b
            GROUP BY a.pos),
        positions AS (SELECT DISTINCT pos FROM per_pos)
        SELECT p.pos, ta.text AS token_a, tb.text AS token_b,
               (ta.text IS NOT DISTINCT FROM tb.text) AS same_token,
               ra.routes AS routes_a, rb.routes AS routes_b, g.agreement,
               ra.cost AS cost_a, rb.cost AS cost_b
        FROM positions p
        LEFT JOIN per_pos ra ON ra.pos = p.pos AND ra.run_id = $run_a
        LEFT JOIN per_pos rb ON rb.pos = p.pos AND rb.run_id = $run_b
        LEFT JOIN tokens ta ON ta.pos = p.pos AND ta.run_id = $run_a
        LEFT JOIN tokens tb ON tb.pos = p.pos AND tb.run_id = $run_b
        LEFT JOIN agree g ON g.pos = p.pos
        ORDER BY p.pos"""
    FULL_ATTENTION_SHARE_BY_LAYER = """
        SELECT layer, count(*) AS decisions,
               avg((expert = 0)::DOUBLE) AS full_share,
               avg(weight_full) AS full_weight,
               avg(hedged::DOUBLE) AS hedged_share,
               avg(cost) AS mean_cost
        FROM routes
        WHERE $run_id::VARCHAR IS NULL OR run_id = $run_id::VARCHAR
        GROUP BY layer ORDER BY layer"""
    FULL_ATTENTION_SHARE_BY_BUDGET = """
        SELECT r.controller, r.budget, count(DISTINCT r.run_id) AS runs,
               count(*) AS decisions,
               avg((d.expert = 0)::DOUBLE) AS full_share,
               avg(d.weight_full) AS full_weight,
               avg(d.cost) AS realized_cost
        FROM routes d JOIN runs r USING (run_id)
        GROUP BY r.controller, r.budget
        ORDER BY r.controller, r.budget NULLS LAST"""
    TOKENS_MOST_OFTEN_FULL = """
        WITH per_token AS (
            SELECT run_id, pos, avg((expert = 0)::DOUBLE) AS full_share
            FROM routes GROUP BY run_id, pos)
        SELECT t.text AS token, count(*) AS occurrences, avg(p.full_share) AS full_share
        FROM per_token p JOIN tokens t USING (run_id, pos)
        GROUP BY t.text
        HAVING count(*) >= $min_occurrences
        ORDER BY full_share DESC, occurrences DESC, token
        LIMIT $limit"""
    UNCERTAINTY_VS_BUDGET = """
        SELECT r.controller, r.budget, count(*) AS decisions,
               avg(d.uncertainty) AS mean_uncertainty,
               quantile_cont(d.uncertainty, 0.9) AS p90_uncertainty,
               avg(d.epistemic) AS mean_epistemic,
               avg(d.vacuity) AS mean_vacuity,
               avg(d.hedged::DOUBLE) AS hedged_share
        FROM routes d JOIN runs r USING (run_id)
        GROUP BY r.controller, r.budget
        ORDER BY r.controller, r.budget NULLS LAST"""
    RUNS_OVER_TIME = """
        SELECT date_trunc('{bucket}', created_at) AS period, count(*) AS runs,
               sum(n_tokens) AS tokens,
               count(*) FILTER (WHERE status = 'done') AS done,
               count(*) FILTER (WHERE status = 'interrupted') AS interrupted,
               count(*) FILTER (WHERE status = 'failed') AS failed,
               count(*) FILTER (WHERE status = 'running') AS running,
               avg(realized_cost) AS mean_realized_cost
        FROM runs GROUP BY period ORDER BY period"""
    EXPORT_RUNS = "SELECT *, strftime(created_at, '%Y-%m-%d') AS day FROM runs"
    EXPORT_TOKENS = """SELECT t.*, strftime(r.created_at, '%Y-%m-%d') AS day
                       FROM tokens t JOIN runs r USING (run_id)"""
    EXPORT_ROUTES = """SELECT d.*, strftime(r.created_at, '%Y-%m-%d') AS day
                       FROM routes d JOIN runs r USING (run_id)"""
    EXPORT_PARTITIONED = "COPY ({query}) TO {path} (FORMAT {fmt}, PARTITION_BY (day){extra})"
    EXPORT_EXPERTS = "COPY experts TO {path} (FORMAT {fmt}{extra})"


LIST_ORDERS = ("created_at", "finished_at", "n_tokens", "budget", "realized_cost",
               "flops_ratio", "wall_ms", "status", "model", "controller")
TIME_BUCKETS = ("hour", "day", "week", "month")


def resolve_db_path(db: str | os.PathLike | None = None) -> Path:
    """--db if given, else METAATTN_DB, else <data dir>/routing.duckdb."""
    return Path(db).expanduser() if db else default_db_path()


# ---------------------------------------------------------------------------------------
# Opening: classify DuckDB's errors into messages a user can act on.
# ---------------------------------------------------------------------------------------
def _unavailable(path: Path, exc: BaseException) -> StoreUnavailable:
    text = str(exc)
    if "lock" in text.lower():
        holder = text.split("Conflicting lock is held in", 1)[-1].split(". See also")[0].strip()
        who = f" ({holder})" if holder and holder != text else ""
        return StoreUnavailable(
            f"routing log {path} is in use by another process{who}. DuckDB allows one "
            "process per database file: stop that process, or pass --db with another path, "
            "or --no-log to run without logging.")
    if "not a valid DuckDB database" in text:
        return StoreUnavailable(
            f"{path} is not a DuckDB database (the file was left untouched). Move it away, "
            "or pass --db with another path, or --no-log to run without logging.")
    return StoreUnavailable(
        f"cannot open routing log {path}: {text}. Pass --db with another path, or --no-log "
        "to run without logging (the file was left untouched).")


def _connect(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    if path.is_dir():
        raise StoreUnavailable(f"routing log {path} is a directory; pass --db with a file path")
    if read_only and not path.exists():
        raise StoreUnavailable(f"no routing log at {path} (nothing has been logged there yet); "
                               "pass --db with the path of an existing log")
    if not read_only:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the folder for routing log {path}: {exc}. "
                                   "Pass --db with a writable path, or --no-log.") from exc
    try:
        return duckdb.connect(str(path), read_only=read_only,
                              config={"checkpoint_threshold": CHECKPOINT_THRESHOLD})
    except duckdb.Error as exc:
        raise _unavailable(path, exc) from exc


def _prepare_schema(con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> None:
    tables = {r[0] for r in con.execute(Q.TABLES_IN_MAIN).fetchall()}
    latest = latest_schema_version()
    if "schema_version" in tables:
        version = con.execute(Q.SCHEMA_VERSION).fetchone()[0] or 0
    elif tables:
        raise StoreUnavailable(
            f"{path} is a DuckDB database but not a metaattn-viz routing log (it has tables "
            f"{sorted(tables)} and no schema_version); it was left untouched. Pass --db with "
            "another path, or --no-log.")
    else:
        version = 0
    if version > latest:
        raise StoreUnavailable(
            f"routing log {path} has schema version {version}, newer than this metaattn-viz "
            f"understands ({latest}); upgrade metaattn-viz, or pass --db with another path.")
    if version == latest:
        return
    if read_only:
        what = "is empty" if version == 0 else f"has the older schema version {version}"
        raise StoreUnavailable(
            f"routing log {path} {what} and is opened read-only; open it once read-write "
            "(for example `metaattn-viz serve --db PATH`) to create or migrate it.")
    con.begin()
    try:
        for target, statements in MIGRATIONS:
            if target <= version:
                continue
            for sql in statements:
                con.execute(sql)
            con.execute(Q.RECORD_VERSION, {"version": target})
        con.commit()
    except duckdb.Error as exc:
        con.rollback()
        raise StoreUnavailable(f"could not migrate routing log {path} from schema version "
                               f"{version} to {latest}: {exc}; the file is unchanged.") from exc
    if version:
        log.info("migrated routing log %s from schema version %d to %d", path, version, latest)


# ---------------------------------------------------------------------------------------
# The writer's work: what a stream hands over (copies, so the trace may keep growing).
# ---------------------------------------------------------------------------------------
@dataclass
class _Slice:
    """Positions [start, end) of one run, copied out of its trace."""

    start: int
    end: int
    token_ids: np.ndarray  # [n] int32
    texts: list[str]
    concentration: np.ndarray  # [L, n, K]
    routes: np.ndarray  # [L, n]
    hedged: np.ndarray
    weights: np.ndarray
    cost: np.ndarray
    lam: np.ndarray
    n_prompt_tokens: int
    truncated: int
    point_estimate: bool


@dataclass
class _Work:
    seq: int
    run_id: str
    new_run: dict | None = None  # a runs row (start_run)
    rows: _Slice | None = None
    final: dict | None = None  # final fields (finish)
    kl_to_dense: pa.Table | None = None  # (run_id, pos, kl_to_dense) for finish


@dataclass
class _RunState:
    n_layers: int
    started: float  # time.monotonic() at start_run
    queued: int = 0  # positions handed to the writer
    finishing: bool = False
    error: BaseException | None = None


def _snapshot(trace: RoutingTrace, start: int) -> _Slice | None:
    """Copy the positions of `trace` from `start` to its current end (None if none)."""
    arrays = (trace.concentration, trace.routes, trace.hedged, trace.weights, trace.cost,
              trace.lam)
    token_ids, texts = trace.token_ids, trace.tokens
    # Another thread may be extending the trace: take the length every field already has.
    end = min(len(token_ids), len(texts), *(a.shape[1] for a in arrays))
    if end <= start:
        return None
    conc, routes, hedged, weights, cost, lam = (np.array(a[:, start:end]) for a in arrays)
    return _Slice(start, end, np.asarray(token_ids[start:end], np.int32), list(texts[start:end]),
                  conc, routes, hedged, weights, cost, lam, int(trace.n_prompt_tokens),
                  int(trace.truncated), trace.point_estimate)


def _utc(epoch_s: float) -> _dt.datetime:
    return _dt.datetime.fromtimestamp(epoch_s, _dt.timezone.utc).replace(tzinfo=None)


def _finite_or_none(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def _run_row(run_id: str, trace: RoutingTrace, kind: str) -> dict:
    row = {"run_id": run_id, "created_at": _utc(trace.created_at), "status": "running",
           "kind": kind, "model": trace.model, "controller": trace.controller,
           "controller_id": trace.controller_id,
           "controller_trained": bool(trace.controller_trained),
           "n_layers": int(trace.n_layers), "head_dim": int(trace.head_dim), "n_tokens": 0,
           "n_prompt_tokens": int(trace.n_prompt_tokens), "truncated": int(trace.truncated),
           "prompt": trace.prompt, "pid": os.getpid(), "host": socket.gethostname()}
    settings = trace.settings.to_dict()
    for name, column in SETTINGS_COLUMNS.items():
        row[column] = settings[name]
    return row


RUNS_ARROW_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("created_at", pa.timestamp("us")), ("status", pa.string()),
    ("kind", pa.string()), ("model", pa.string()), ("controller", pa.string()),
    ("controller_id", pa.string()), ("controller_trained", pa.bool_()),
    ("budget", pa.float64()), ("scope", pa.string()), ("hedge_policy", pa.string()),
    ("hedge_threshold", pa.float64()), ("hedge_min_weight", pa.float64()),
    ("local_window", pa.int32()), ("n_sink", pa.int32()), ("fixed_lam", pa.float64()),
    ("dual_step", pa.float64()), ("backend", pa.string()), ("n_layers", pa.int16()),
    ("head_dim", pa.int16()), ("n_tokens", pa.int32()), ("n_prompt_tokens", pa.int32()),
    ("truncated", pa.int32()), ("prompt", pa.string()), ("pid", pa.int32()),
    ("host", pa.string()), ("finished_at", pa.timestamp("us")), ("output_text", pa.string()),
    ("realized_cost", pa.float64()), ("flops_ratio", pa.float64()), ("wall_ms", pa.float64()),
    ("timings", pa.string()), ("error", pa.string()),
])
FINAL_ARROW_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("status", pa.string()), ("finished_at", pa.timestamp("us")),
    ("prompt", pa.string()), ("output_text", pa.string()), ("realized_cost", pa.float64()),
    ("flops_ratio", pa.float64()), ("wall_ms", pa.float64()), ("timings", pa.string()),
    ("error", pa.string()),
])
PROGRESS_ARROW_SCHEMA = pa.schema([
    ("run_id", pa.string()), ("n_tokens", pa.int32()), ("n_prompt_tokens", pa.int32()),
    ("truncated", pa.int32()),
])


def _safe_text(s: str) -> str:
    """Token text as valid UTF-8 (a lone surrogate from a broken decode becomes U+FFFD)."""
    try:
        s.encode("utf-8")
        return s
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")


def uncertainty_columns(concentration: np.ndarray, point_estimate: bool) -> dict:
    """The uncertainty columns of `routes` for concentrations [..., K]: the measures of
    dirichlet.uncertainties (total and aleatoric as fractions of log K, epistemic in nats,
    vacuity K/S; a point estimate has no epistemic part), computed in numpy on the writer
    thread; tests/test_store.py checks them against dirichlet.py. Not torch: on 2 busy
    cores its per-op cost made these columns 3-5x slower than numpy (and slower than the
    whole DuckDB insert), competing with the generation for the intra-op pool."""
    from scipy.special import digamma

    beta = np.asarray(concentration, np.float64)
    k = beta.shape[-1]
    s = beta.sum(-1, keepdims=True)
    m = beta / s
    total = -(m * np.log(np.maximum(m, 1e-30))).sum(-1)
    if point_estimate:
        zero = np.zeros_like(total)
        measures = {"total": total / math.log(k), "aleatoric": total / math.log(k),
                    "epistemic": zero, "vacuity": zero}
    else:
        aleatoric = -(m * (digamma(beta + 1) - digamma(s + 1))).sum(-1)
        measures = {"total": total / math.log(k), "aleatoric": aleatoric / math.log(k),
                    "epistemic": np.maximum(total - aleatoric, 0.0), "vacuity": k / s[..., 0]}
    return {UNCERTAINTY_COLUMNS[name]: v.astype(np.float32) for name, v in measures.items()}


def _merge_slices(slices: list[tuple[str, _Slice]]) -> list[tuple[str, _Slice]]:
    """Join each run's consecutive slices of a writer round into one (a stream appends a
    few positions at a time; building tables per slice would cost more than inserting)."""
    merged: dict[str, list[_Slice]] = {}
    out: list[tuple[str, list[_Slice]]] = []
    for rid, sl in slices:
        group = merged.get(rid)
        if group is not None and group[-1].end == sl.start:
            group.append(sl)
        else:
            merged[rid] = group = [sl]
            out.append((rid, group))
    result = []
    for rid, group in out:
        if len(group) == 1:
            result.append((rid, group[0]))
            continue
        last = group[-1]
        cat = lambda field: np.concatenate([getattr(g, field) for g in group], axis=1)  # noqa: E731
        result.append((rid, _Slice(
            group[0].start, last.end, np.concatenate([g.token_ids for g in group]),
            [t for g in group for t in g.texts], cat("concentration"), cat("routes"),
            cat("hedged"), cat("weights"), cat("cost"), cat("lam"), last.n_prompt_tokens,
            last.truncated, last.point_estimate)))
    return result


def _tables_for(slices: list[tuple[str, _Slice]]) -> tuple[pa.Table, pa.Table]:
    """(tokens, routes) Arrow tables for the slices of one writer round."""
    run_ids = [rid for rid, _ in slices]
    dictionary = pa.array(run_ids, pa.string())
    tok_idx, route_idx, cols = [], [], {c: [] for c in (
        "pos_t", "token_id", "text", "is_prompt", "layer", "pos", "expert", "hedged", "cost",
        "lam", *(f"conc_{e}" for e in EXPERTS), *(f"weight_{e}" for e in EXPERTS),
        *UNCERTAINTY_COLUMNS.values())}
    for i, (_, s) in enumerate(slices):
        L, n = s.routes.shape  # [L, n]
        positions = np.arange(s.start, s.end, dtype=np.int32)
        tok_idx.append(np.full(n, i, np.int32))
        cols["pos_t"].append(positions)
        cols["token_id"].append(s.token_ids)
        cols["text"].extend(_safe_text(t) for t in s.texts)
        cols["is_prompt"].append(positions < s.n_prompt_tokens)
        route_idx.append(np.full(L * n, i, np.int32))
        cols["layer"].append(np.repeat(np.arange(L, dtype=np.int16), n))  # layer-major
        cols["pos"].append(np.tile(positions, L))
        cols["expert"].append(s.routes.astype(np.int8).ravel())
        cols["hedged"].append(s.hedged.astype(bool).ravel())
        cols["cost"].append(s.cost.astype(np.float32).ravel())
        cols["lam"].append(s.lam.astype(np.float32).ravel())
        for k, e in enumerate(EXPERTS):
            cols[f"conc_{e}"].append(s.concentration[..., k].astype(np.float32).ravel())
            cols[f"weight_{e}"].append(s.weights[..., k].astype(np.float32).ravel())
        for column, values in uncertainty_columns(s.concentration, s.point_estimate).items():
            cols[column].append(values.ravel())  # [L, n] -> layer-major

    def run_id_column(idx):
        return pa.DictionaryArray.from_arrays(pa.array(np.concatenate(idx)), dictionary)

    tokens = pa.table({"run_id": run_id_column(tok_idx),
                       "pos": np.concatenate(cols["pos_t"]),
                       "token_id": np.concatenate(cols["token_id"]),
                       "text": pa.array(cols["text"], pa.string()),
                       "is_prompt": np.concatenate(cols["is_prompt"])})
    route_cols = {"run_id": run_id_column(route_idx)}
    for c in ("layer", "pos", "expert", "hedged", *(f"conc_{e}" for e in EXPERTS),
              *(f"weight_{e}" for e in EXPERTS), "cost", "lam", *UNCERTAINTY_COLUMNS.values()):
        route_cols[c] = np.concatenate(cols[c])
    return tokens, pa.table(route_cols)


# ---------------------------------------------------------------------------------------
# One open database per process: the shared connection, the writer thread, the cursors.
# ---------------------------------------------------------------------------------------
class _Database:
    def __init__(self, path: Path, read_only: bool):
        self.path = path
        self.read_only = read_only
        self.con = _connect(path, read_only)
        try:
            _prepare_schema(self.con, path, read_only)
            self.recovered: list[str] = [] if read_only else [
                r[0] for r in self.con.execute(Q.MARK_ABANDONED_INTERRUPTED,
                                               {"error": RECOVERED_ERROR}).fetchall()]
        except BaseException:
            self.con.close()
            raise
        if self.recovered:
            log.warning("routing log %s: %d run(s) left running by an ended process marked "
                        "interrupted", path, len(self.recovered))
        self.refs = 0
        self._cursor_lock = threading.Lock()
        self._local = threading.local()
        self._cursors: list[duckdb.DuckDBPyConnection] = []
        self._cond = threading.Condition()
        self._pending: list[_Work] = []
        self._seq = 0  # last ticket handed out
        self._done_seq = 0  # last ticket the writer has dealt with
        self._waiting = 0  # threads blocked in wait(): the writer must not dawdle
        self._runs: dict[str, _RunState] = {}
        self._writer: threading.Thread | None = None
        self._stopping = False
        self._closed = False

    # -- cursors ---------------------------------------------------------------------------
    def cursor(self) -> duckdb.DuckDBPyConnection:
        """This thread's cursor (created on first use)."""
        cur = getattr(self._local, "cursor", None)
        if cur is None:
            cur = self.fresh_cursor()
            self._local.cursor = cur
        return cur

    def fresh_cursor(self) -> duckdb.DuckDBPyConnection:
        with self._cursor_lock:
            if self._closed:
                raise StoreUnavailable(f"routing log {self.path} is closed")
            cur = self.con.cursor()
            self._cursors.append(cur)
            return cur

    # -- the writer ------------------------------------------------------------------------
    def submit(self, run_id: str, **parts) -> int:
        """Queue work (caller holds self._cond). Returns its ticket."""
        if self._stopping:
            raise StoreUnavailable(f"routing log {self.path} is closing")
        self._seq += 1
        self._pending.append(_Work(self._seq, run_id, **parts))
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, daemon=True,
                                            name=f"metaattn-store-writer:{self.path.name}")
            self._writer.start()
        self._cond.notify_all()
        return self._seq

    def wait(self, ticket: int, timeout: float | None = None) -> None:
        """Block until the writer has dealt with `ticket` (caller holds self._cond)."""
        self._waiting += 1
        self._cond.notify_all()
        try:
            done = self._cond.wait_for(lambda: self._done_seq >= ticket, timeout)
        finally:
            self._waiting -= 1
        if not done:
            raise StoreUnavailable(f"routing log {self.path}: a write did not complete within "
                                   f"{timeout:g} s")

    def _write_loop(self) -> None:
        cur = self.fresh_cursor()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending or self._stopping)
                # Group commit: queued appends wait up to COMMIT_WINDOW_S for company (one
                # fsync for many tokens and streams); someone blocked in wait() cannot.
                self._cond.wait_for(lambda: self._waiting or self._stopping, COMMIT_WINDOW_S)
                if not self._pending:
                    return
                work, self._pending = self._pending, []
                upto = work[-1].seq
                # Runs whose earlier write failed get no later rows (that would leave a gap).
                work = [w for w in work if not (w.run_id in self._runs
                                                and self._runs[w.run_id].error)]
            error = None
            try:
                self._write(cur, work)
            except Exception as exc:  # noqa: BLE001 - reported to every waiter of this round
                log.error("routing log %s: write failed: %s", self.path, exc)
                error = StoreUnavailable(f"could not write to routing log {self.path}: {exc}")
                error.__cause__ = exc
            with self._cond:
                for w in work:
                    st = self._runs.get(w.run_id)
                    if st is None:
                        continue
                    if error is not None:
                        st.error = error
                self._done_seq = upto
                self._cond.notify_all()

    def _write(self, cur: duckdb.DuckDBPyConnection, work: list[_Work]) -> None:
        """One transaction for everything the streams queued since the last round. A run
        started in the same round is inserted with its progress and final fields folded in
        (a whole trace logged at once costs one INSERT per table and no UPDATE)."""
        if not work:
            return
        new_runs = {w.run_id: dict(w.new_run) for w in work if w.new_run is not None}
        slices = _merge_slices([(w.run_id, w.rows) for w in work if w.rows is not None])
        progress: dict[str, dict] = {}
        finals: dict[str, dict] = {}
        for rid, s in slices:  # in queue order: the last slice of a run wins
            fields = {"n_tokens": s.end, "n_prompt_tokens": s.n_prompt_tokens,
                      "truncated": s.truncated}
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
        registered = {}
        if new_runs:
            registered["_new_runs"] = pa.Table.from_pylist(list(new_runs.values()),
                                                           RUNS_ARROW_SCHEMA)
        if slices:
            registered["_new_tokens"], registered["_new_routes"] = _tables_for(slices)
        if progress:
            registered["_progress"] = pa.Table.from_pylist(list(progress.values()),
                                                           PROGRESS_ARROW_SCHEMA)
        if finals:
            registered["_final"] = pa.Table.from_pylist(list(finals.values()),
                                                        FINAL_ARROW_SCHEMA)
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
                try:
                    cur.execute(Q.MARK_OWN_INTERRUPTED, {"run_id": rid, "error": CLOSED_ERROR})
                except duckdb.Error as exc:
                    log.error("routing log %s: could not mark run %s interrupted: %s",
                              self.path, rid, exc)
        with self._cursor_lock:
            self._closed = True
            for cur in self._cursors:
                try:
                    cur.close()
                except duckdb.Error:
                    pass
            self._cursors.clear()
            self.con.close()


_REGISTRY: dict[str, _Database] = {}
_REGISTRY_LOCK = threading.Lock()


def _acquire(path: Path, read_only: bool) -> _Database:
    key = str(path.resolve())
    with _REGISTRY_LOCK:
        db = _REGISTRY.get(key)
        if db is not None and db.read_only and not read_only:
            raise StoreUnavailable(f"routing log {path} is already open read-only in this "
                                   "process; close that RunLog before opening it read-write")
        if db is None:
            db = _Database(path, read_only)
            _REGISTRY[key] = db
        db.refs += 1
        return db


def _release(db: _Database) -> None:
    with _REGISTRY_LOCK:
        db.refs -= 1
        if db.refs > 0:
            return
        _REGISTRY.pop(str(db.path.resolve()), None)
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


# ---------------------------------------------------------------------------------------
# The public handle.
# ---------------------------------------------------------------------------------------
class RunLog:
    """A handle on the routing log at `path` (default: resolve_db_path()).

    Handles on the same file in one process share one connection and one writer; close
    each handle (or use `with`); the file is released when the last one closes.
    """

    def __init__(self, path: str | os.PathLike | None = None, read_only: bool = False):
        self.path = resolve_db_path(path)
        self.read_only = read_only
        self._db = _acquire(self.path, read_only)
        self._closed = False

    # -- lifecycle -------------------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            _release(self._db)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        mode = "read-only" if self.read_only else "read-write"
        return f"RunLog({str(self.path)!r}, {mode}{', closed' if self._closed else ''})"

    @property
    def recovered_runs(self) -> list[str]:
        """Runs found `running` on open (left by an ended process) and marked interrupted."""
        return list(self._db.recovered)

    def fresh_cursor(self) -> duckdb.DuckDBPyConnection:
        """A new cursor on the shared connection for one-off work (the SQL console); it is
        closed with the log, or by the caller."""
        self._check_open()
        return self._db.fresh_cursor()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreUnavailable(f"routing log {self.path} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise StoreUnavailable(f"routing log {self.path} is opened read-only")

    # -- writing ---------------------------------------------------------------------------
    def start_run(self, trace: RoutingTrace, kind: str = "generate") -> str:
        """Record a new run (status `running`, every setting) and return its id, which is
        also set on `trace.run_id`. Like append, it queues and returns: the row is committed
        with the writer's next round (flush() waits for it; a failure is raised by the next
        append or finish). Positions already in the trace go with the next append/finish."""
        self._check_writable()
        if not isinstance(kind, str) or not kind.strip() or len(kind) > 32:
            raise ValueError(f"kind must be a short name such as 'generate', got {kind!r}")
        run_id = str(uuid.uuid4())
        row = _run_row(run_id, trace, kind)
        db = self._db
        with db._cond:
            db._runs[run_id] = _RunState(n_layers=int(trace.n_layers), started=time.monotonic())
            db.submit(run_id, new_run=row)
        trace.run_id = run_id
        return run_id

    def append(self, run_id: str, trace: RoutingTrace, start_pos: int | None = None) -> int:
        """Queue the positions of `trace` not yet handed over (from `start_pos`, which must
        not leave a gap; positions already queued are never written twice) and return at
        once; the writer commits them in its next round. Returns the number of positions
        queued so far. Raises StoreUnavailable if an earlier write of this run failed."""
        self._check_writable()
        db = self._db
        with db._cond:
            st = self._state(run_id)
            if start_pos is not None and start_pos > st.queued:
                raise ValueError(f"append from position {start_pos} would leave a gap: run "
                                 f"{run_id} has {st.queued} positions queued")
            if trace.n_layers != st.n_layers:
                raise ValueError(f"trace has {trace.n_layers} layers, run {run_id} was "
                                 f"started with {st.n_layers}")
            rows = _snapshot(trace, st.queued)
            if rows is not None:
                db.submit(run_id, rows=rows)
                st.queued = rows.end
            return st.queued

    def finish(self, run_id: str, trace: RoutingTrace, status: str = "done",
               error: str | None = None) -> None:
        """Write the remaining positions and the final fields (status, output_text,
        realized_cost, flops_ratio, timings, wall_ms, error, and kl_to_dense per token if
        the trace has it) in one transaction and wait for it. `done` is only ever written
        together with the run's last rows."""
        self._check_writable()
        if status not in FINAL_STATUSES:
            raise ValueError(f"status must be one of {FINAL_STATUSES}, got {status!r}")
        db = self._db
        with db._cond:
            st = db._runs.get(run_id)
            if st is not None and st.error is not None:  # an earlier write failed
                db._runs.pop(run_id)
                raise st.error
            st = self._state(run_id)
            rows = _snapshot(trace, st.queued)
            final = {"run_id": run_id, "status": status, "finished_at": _utc(time.time()),
                     "prompt": trace.prompt, "output_text": trace.output_text,
                     "realized_cost": _finite_or_none(trace.realized_cost),
                     "flops_ratio": _finite_or_none(trace.attention_flops_ratio),
                     "wall_ms": (time.monotonic() - st.started) * 1e3,
                     "timings": json.dumps(trace.timings, default=_json_default),
                     "error": error}
            kl = None
            if trace.kl_to_dense is not None:
                values = np.asarray(trace.kl_to_dense, np.float32).ravel()
                kl = pa.table({"run_id": pa.array([run_id] * len(values), pa.string()),
                               "pos": np.arange(len(values), dtype=np.int32),
                               "kl_to_dense": values})
            st.finishing = True
            ticket = db.submit(run_id, rows=rows, final=final, kl_to_dense=kl)
            if rows is not None:
                st.queued = rows.end
            try:
                db.wait(ticket)
            finally:
                failed = st.error
                db._runs.pop(run_id, None)
            if failed is not None:
                raise failed

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything queued so far is committed; raise StoreUnavailable if a
        write of a run still streaming in this process failed."""
        self._check_open()
        db = self._db
        with db._cond:
            db.wait(db._seq, timeout)
            for st in db._runs.values():
                if st.error is not None:
                    raise st.error

    def _state(self, run_id: str) -> _RunState:
        st = self._db._runs.get(run_id)
        if st is None:
            raise ValueError(f"run {run_id} is not streaming in this process (unknown, "
                             "finished, or started elsewhere)")
        if st.finishing:
            raise ValueError(f"run {run_id} is already finishing")
        if st.error is not None:
            raise st.error
        return st

    # -- reading ---------------------------------------------------------------------------
    def _read_df(self, sql: str, params: dict | None = None):
        self._check_open()
        return self._db.cursor().execute(sql, params or {}).df()

    def get_run(self, run_id: str) -> dict:
        """The runs row of `run_id` as a dict; UnknownRun if there is none."""
        self._check_open()
        cur = self._db.cursor()
        res = cur.execute(Q.RUN_BY_ID, {"run_id": str(run_id)})
        row = res.fetchone()
        if row is None:
            raise UnknownRun(f"no run {run_id!r} in routing log {self.path}")
        return dict(zip([d[0] for d in res.description], row))

    def load_trace(self, run_id: str) -> RoutingTrace:
        """Replay: the RoutingTrace of `run_id` rebuilt from the log alone (its committed
        positions, for a run that is still streaming or was interrupted)."""
        self._check_open()
        cur = self._db.cursor()
        cur.begin()  # one snapshot for the run row, its tokens and its routes
        try:
            res = cur.execute(Q.RUN_BY_ID, {"run_id": str(run_id)})
            row = res.fetchone()
            if row is None:
                raise UnknownRun(f"no run {run_id!r} in routing log {self.path}")
            run = dict(zip([d[0] for d in res.description], row))
            params = {"run_id": run_id, "n_tokens": run["n_tokens"]}
            tok = cur.execute(Q.TOKENS_OF_RUN, params).fetchnumpy()
            rt = cur.execute(Q.ROUTES_OF_RUN, params).fetchnumpy()
        finally:
            cur.commit()
        L, T = int(run["n_layers"]), int(run["n_tokens"])
        if len(tok["pos"]) != T or len(rt["layer"]) != L * T:
            raise StoreUnavailable(
                f"routing log {self.path}: run {run_id} records {T} positions but holds "
                f"{len(tok['pos'])} token rows and {len(rt['layer'])} route rows "
                f"(expected {L * T}); the log is inconsistent")
        layer, pos = np.asarray(rt["layer"], np.intp), np.asarray(rt["pos"], np.intp)

        def grid(values, dtype):
            out = np.zeros((L, T), dtype)
            out[layer, pos] = np.asarray(values, dtype)
            return out

        def grid3(prefix):
            return np.stack([grid(rt[f"{prefix}_{e}"], np.float32) for e in EXPERTS], -1)

        kl = np.ma.filled(np.ma.asarray(tok["kl_to_dense"], np.float32), np.nan)  # NULL: NaN
        settings = RoutingSettings.from_dict(
            {name: run[column] for name, column in SETTINGS_COLUMNS.items()})
        trace = RoutingTrace(
            model=run["model"], controller=run["controller"],
            controller_id=run["controller_id"], controller_trained=bool(run["controller_trained"]),
            settings=settings, n_layers=L, head_dim=int(run["head_dim"]),
            token_ids=[int(t) for t in tok["token_id"]], tokens=[str(t) for t in tok["text"]],
            n_prompt_tokens=int(run["n_prompt_tokens"]),
            concentration=grid3("conc"), routes=grid(rt["expert"], np.int8),
            hedged=grid(rt["hedged"], bool), weights=grid3("weight"),
            cost=grid(rt["cost"], np.float32), lam=grid(rt["lam"], np.float32),
            kl_to_dense=None if T == 0 or np.isnan(kl).all() else kl,
            truncated=int(run["truncated"]),
            timings=json.loads(run["timings"]) if run["timings"] else {},
            created_at=run["created_at"].replace(tzinfo=_dt.timezone.utc).timestamp(),
            prompt=run["prompt"] or "", output_text=run["output_text"] or "", run_id=run_id)
        return trace

    def list_runs(self, limit: int = 50, status: str | None = None, model: str | None = None,
                  controller: str | None = None, text: str | None = None,
                  order_by: str = "-created_at", offset: int = 0):
        """Runs as a DataFrame, newest first by default. `text` matches the prompt or the
        output (case-insensitive); `order_by` is a column of LIST_ORDERS, '-' for
        descending."""
        desc = order_by.startswith("-")
        column = order_by.lstrip("-")
        if column not in LIST_ORDERS:
            raise ValueError(f"order_by must be one of {LIST_ORDERS} (prefix '-' for "
                             f"descending), got {order_by!r}")
        if status is not None and status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        sql = Q.LIST_RUNS.format(order=f"{column} {'DESC' if desc else 'ASC'}")
        return self._read_df(sql, {"status": status, "model": model, "controller": controller,
                                   "text": text or None, "limit": int(limit),
                                   "offset": int(offset)})

    def compare(self, run_a: str, run_b: str):
        """Two runs token by token: pos, token_a, token_b, same_token, routes_a, routes_b
        (one letter per layer from `experts.symbol`: F full, L linear, W local window;
        lower case when hedged), agreement (share of layers choosing the same expert),
        cost_a, cost_b (mean over layers). df.attrs holds the overall agreement and the
        share of identical tokens."""
        for rid in (run_a, run_b):
            self.get_run(rid)
        df = self._read_df(Q.COMPARE_RUNS, {"run_a": str(run_a), "run_b": str(run_b)})
        df.attrs["agreement"] = float(df["agreement"].mean()) if len(df) else float("nan")
        df.attrs["same_tokens"] = float(df["same_token"].mean()) if len(df) else float("nan")
        return df

    # -- analytics -------------------------------------------------------------------------
    def full_attention_share_by_layer(self, run_id: str | None = None):
        """Per layer: decisions, share routed to full attention, mean full weight, hedged
        share, mean cost (one run, or every run)."""
        return self._read_df(Q.FULL_ATTENTION_SHARE_BY_LAYER, {"run_id": run_id})

    def full_attention_share_by_budget(self):
        """Per (controller, budget): runs, decisions, full-attention share, realized cost."""
        return self._read_df(Q.FULL_ATTENTION_SHARE_BY_BUDGET)

    def tokens_most_often_full(self, limit: int = 20, min_occurrences: int = 2):
        """Token texts whose positions most often get full attention (share over layers,
        averaged over their occurrences)."""
        return self._read_df(Q.TOKENS_MOST_OFTEN_FULL,
                             {"limit": int(limit), "min_occurrences": int(min_occurrences)})

    def uncertainty_vs_budget(self):
        """Per (controller, budget): mean and p90 total uncertainty, mean epistemic
        uncertainty and vacuity, hedged share."""
        return self._read_df(Q.UNCERTAINTY_VS_BUDGET)

    def runs_over_time(self, every: str = "day"):
        """Runs, tokens and statuses per hour/day/week/month."""
        if every not in TIME_BUCKETS:
            raise ValueError(f"every must be one of {TIME_BUCKETS}, got {every!r}")
        return self._read_df(Q.RUNS_OVER_TIME.format(bucket=every))

    def export(self, out_dir: str | os.PathLike, fmt: str = "parquet") -> dict[str, int]:
        return export(self, out_dir, fmt)


# ---------------------------------------------------------------------------------------
# Export: partitioned files any engine reads (DuckDB, Spark, Trino, pandas).
# ---------------------------------------------------------------------------------------
def _sql_string(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def export(source: RunLog | str | os.PathLike, out_dir: str | os.PathLike,
           fmt: str = "parquet") -> dict[str, int]:
    """Write runs, tokens and routes under out_dir/<table>/day=YYYY-MM-DD/ (hive style,
    by the run's UTC creation day) and the experts lookup as out_dir/experts.<fmt>, from
    one consistent snapshot. Refuses to write into existing non-empty table folders.
    CSV has a header row; NULL is an empty field and an empty string is "" (DuckDB reads
    that back with allow_quoted_nulls = false). Returns the rows written per table."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    out = Path(out_dir).expanduser()
    targets = {"runs": out / "runs", "tokens": out / "tokens", "routes": out / "routes",
               "experts": out / f"experts.{fmt}"}
    busy = [str(p) for p in targets.values()
            if p.exists() and (p.is_file() or any(p.iterdir()))]
    if busy:
        raise ValueError(f"export target already exists: {', '.join(busy)}; choose an empty "
                         "--out folder (nothing was written)")
    out.mkdir(parents=True, exist_ok=True)
    extra = ", HEADER true" if fmt == "csv" else ""
    own = not isinstance(source, RunLog)
    log_ = RunLog(source, read_only=True) if own else source
    try:
        cur = log_.fresh_cursor()
        counts = {}
        cur.begin()
        try:
            for table, query in (("runs", Q.EXPORT_RUNS), ("tokens", Q.EXPORT_TOKENS),
                                 ("routes", Q.EXPORT_ROUTES)):
                counts[table] = cur.execute(Q.EXPORT_PARTITIONED.format(
                    query=query, path=_sql_string(targets[table]), fmt=fmt,
                    extra=extra)).fetchone()[0]
            counts["experts"] = cur.execute(Q.EXPORT_EXPERTS.format(
                path=_sql_string(targets["experts"]), fmt=fmt, extra=extra)).fetchone()[0]
        finally:
            cur.rollback()
            cur.close()
    finally:
        if own:
            log_.close()
    return counts


def open_or_explain(db: str | os.PathLike | None = None, enabled: bool = True
                    ) -> tuple[RunLog | None, str | None]:
    """For the app and the CLI: (log, None), or (None, why) when logging is off or the log
    is unavailable, so the caller can run on without logging and show the reason."""
    if not enabled:
        return None, "logging is off (--no-log)"
    try:
        return RunLog(db), None
    except StoreUnavailable as exc:
        log.warning("%s", exc)
        return None, f"{exc} Running without logging."
