"""Opening a routing log file: connect, migrate the schema, recover abandoned runs, and
turn DuckDB's errors into messages a user can act on (docs/architecture.md).

A database locked by another process, a file that is not a DuckDB database, a routing
log written by a newer version, a DuckDB file that is not a routing log -> raise
`StoreUnavailable` naming the path and what to do (`--db` elsewhere or `--no-log`).
This module never overwrites, truncates or deletes a file it did not create, and never
imports the model code, torch or gradio.
"""

from __future__ import annotations

import logging
from pathlib import Path

import duckdb

from metaattn_viz.store import schema
from metaattn_viz.store.errors import StoreUnavailable
from metaattn_viz.store.queries import Q

log = logging.getLogger(__name__)

# WAL size that triggers a checkpoint. DuckDB's 16 MB default checkpoints every few
# thousand tokens of logging and rewrites the trailing row group each time (measured: 40 ms
# per 30k route rows); 64 MB halves the cost of a commit, and a crash replays at most this.
CHECKPOINT_THRESHOLD = "64MB"
RECOVERED_ERROR = "the process writing this run ended while it was streaming (found on open)"


def _elsewhere(read_only: bool) -> str:
    """What to do instead: another --db, or (for a command that writes the log) no log."""
    return "pass --db with another path" + ("" if read_only else ", or --no-log to run without logging")


def _unavailable(path: Path, exc: BaseException, read_only: bool) -> StoreUnavailable:
    text = str(exc)
    if "lock" in text.lower():
        holder = text.split("Conflicting lock is held in", 1)[-1].split(". See also")[0].strip()
        who = f" ({holder})" if holder and holder != text else ""
        return StoreUnavailable(
            f"routing log {path} is in use by another process{who}. DuckDB allows one "
            f"process per database file: stop that process, or {_elsewhere(read_only)}."
        )
    if "not a valid DuckDB database" in text:
        return StoreUnavailable(
            f"{path} is not a DuckDB database (the file was left untouched). Move it away, "
            f"or {_elsewhere(read_only)}."
        )
    return StoreUnavailable(
        f"cannot open routing log {path}: {text}. To go on, {_elsewhere(read_only)} (the file "
        "was left untouched)."
    )


# What DuckDB raises where a file's blocks are missing or garbled (a truncated copy, a disk
# error): found when a query first reads them, on open or any time later.
DAMAGED = (duckdb.IOException, duckdb.InternalException, duckdb.SerializationException, duckdb.FatalException)


def damaged(path: Path, exc: BaseException) -> StoreUnavailable:
    """A read of the log that DuckDB could not do (DAMAGED), in words."""
    return StoreUnavailable(
        f"routing log {path} could not be read ({type(exc).__name__}: {exc}); the file may be "
        "damaged (truncated, or written by something else). Restore it from a copy, or pass "
        "--db with another path."
    )


def connect(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """A connection to `path` (created read-write if missing), not yet migrated."""
    if path.is_dir():
        raise StoreUnavailable(f"routing log {path} is a directory; pass --db with a file path")
    if read_only and not path.exists():
        raise StoreUnavailable(
            f"no routing log at {path} (nothing has been logged there yet); "
            "pass --db with the path of an existing log"
        )
    if not read_only:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(
                f"cannot create the folder for routing log {path}: {exc}. "
                "Pass --db with a writable path, or --no-log."
            ) from exc
    try:
        return duckdb.connect(
            str(path), read_only=read_only, config={"checkpoint_threshold": CHECKPOINT_THRESHOLD}
        )
    except duckdb.Error as exc:
        raise _unavailable(path, exc, read_only) from exc


def _version(con: duckdb.DuckDBPyConnection, path: Path) -> int:
    """The file's schema version: 0 for an empty database."""
    tables = {r[0] for r in con.execute(Q.TABLES_IN_MAIN).fetchall()}
    if "schema_version" in tables:
        row = con.execute(Q.SCHEMA_VERSION).fetchone()
        value = row[0] if row is not None else None
        try:
            return int(value or 0)
        except (TypeError, ValueError):  # a table of that name that is not ours
            raise StoreUnavailable(
                f"{path} has a schema_version table whose version is {value!r}, not a number: "
                "it is not a metaattn-viz routing log (it was left untouched). Pass --db with "
                "another path, or --no-log."
            ) from None
    if tables:
        raise StoreUnavailable(
            f"{path} is a DuckDB database but not a metaattn-viz routing log (it has tables "
            f"{sorted(tables)} and no schema_version); it was left untouched. Pass --db with "
            "another path, or --no-log."
        )
    return 0


def migrate(con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> None:
    """Bring the file to schema.latest_schema_version(), each migration in the transaction
    that records its version; refuse newer files, and read-only opens that would need it."""
    version = _version(con, path)
    latest = schema.latest_schema_version()
    if version > latest:
        raise StoreUnavailable(
            f"routing log {path} has schema version {version}, newer than this metaattn-viz "
            f"understands ({latest}); upgrade metaattn-viz, or pass --db with another path."
        )
    if version == latest:
        return
    if read_only:
        what = "is empty" if version == 0 else f"has the older schema version {version}"
        raise StoreUnavailable(
            f"routing log {path} {what} and is opened read-only; open it once read-write "
            "(for example `metaattn-viz serve --db PATH`) to create or migrate it."
        )
    con.begin()
    try:
        for target, statements in schema.MIGRATIONS:
            if target <= version:
                continue
            for sql in statements:
                con.execute(sql)
            con.execute(Q.RECORD_VERSION, {"version": target})
        con.commit()
    except duckdb.Error as exc:
        con.rollback()
        raise StoreUnavailable(
            f"could not migrate routing log {path} from schema version "
            f"{version} to {latest}: {exc}; the file is unchanged."
        ) from exc
    if version:
        log.info("migrated routing log %s from schema version %d to %d", path, version, latest)


def open_database(path: Path, read_only: bool) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """(connection, recovered run ids): a connection to an up-to-date routing log.

    DuckDB lets one process open a file read-write, so a run still `running` when we open
    it read-write was left by a dead process: it is marked `interrupted` here (its
    committed batches stay) and its id is returned."""
    con = connect(path, read_only)
    try:
        migrate(con, path, read_only)
        recovered: list[str] = (
            []
            if read_only
            else [
                r[0] for r in con.execute(Q.MARK_ABANDONED_INTERRUPTED, {"error": RECOVERED_ERROR}).fetchall()
            ]
        )
    except duckdb.Error as exc:  # a damaged file, found by the first reads
        con.close()
        raise _unavailable(path, exc, read_only) from exc
    except BaseException:
        con.close()
        raise
    if recovered:
        log.warning(
            "routing log %s: %d run(s) left running by an ended process marked interrupted",
            path,
            len(recovered),
        )
    return con, recovered
