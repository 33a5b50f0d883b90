"""Opening a routing log file: connect, migrate the schema, recover abandoned runs, and
turn DuckDB's errors into messages a user can act on (docs/architecture.md).

A database locked by another process (`StoreLocked`: it may be free later), a file that
is not a DuckDB database, a routing log written by a newer version, a DuckDB file that is
not a routing log, a write-ahead log DuckDB cannot replay, a path that is not a regular
file (a named pipe would block the open for ever) -> raise `StoreUnavailable` naming the
path and what to do (`--db` elsewhere or `--no-log`).

The write-ahead log (`<path>.wal`) holds every commit since the last checkpoint: after a
crash, all the runs of a young log. DuckDB drops one it cannot replay without a word (a
damaged header; or, when the main file is missing, any): a read-only open then reads the
log without those runs (an export leaves them out), and a read-write one's next write
would replace it. So an open with a non-empty one refuses, writing nothing, when the main
file is missing or DuckDB replayed nothing of it. This module never overwrites, truncates
or deletes a file it did not create (a file it created for a log that then failed to open,
a full disk, is removed), and never imports the model code, torch or gradio.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import duckdb

from metaattn_viz.store import schema
from metaattn_viz.store.errors import StoreLocked, StoreUnavailable
from metaattn_viz.store.queries import Q
from metaattn_viz.writable import special_file

log = logging.getLogger(__name__)

# WAL size that triggers a checkpoint. DuckDB's 16 MB default checkpoints every few
# thousand tokens of logging and rewrites the trailing row group each time (measured: 40 ms
# per 30k route rows); 64 MB halves the cost of a commit, and a crash replays at most this.
CHECKPOINT_THRESHOLD = "64MB"
RECOVERED_ERROR = "the process writing this run ended while it was streaming (found on open)"


def _elsewhere(read_only: bool) -> str:
    """What to do instead: another --db, or (for a command that writes the log) no log."""
    return "pass --db with another path" + ("" if read_only else ", or --no-log to run without logging")


def _holder(text: str) -> str:
    """Who holds the lock, in DuckDB's words ("/usr/bin/python3 (PID 123)"), or ""."""
    marker = "Conflicting lock is held in"
    if marker not in text:
        return ""
    # the sentence ends at the first ". ": DuckDB 1.x adds "by user ...", 2.0 "However, ..."
    return text.split(marker, 1)[1].strip().split(". ", 1)[0].strip().rstrip(".")


def _unavailable(path: Path, exc: BaseException, read_only: bool, created: bool = False) -> StoreUnavailable:
    text = str(exc)
    low = text.lower()
    if "conflicting lock" in low or "could not set lock" in low:
        holder = _holder(text)
        who = f" ({holder})" if holder else ""
        if "read-only mode" in low:  # the holder only reads: readers may share, a writer may not
            return StoreLocked(
                f"routing log {path} is open read-only in another process{who}, such as a "
                "running `metaattn-viz export` or a notebook; DuckDB lets no process write "
                "a database file while another reads it. Wait for that process to end (or "
                f"close its connection), or {_elsewhere(read_only)}."
            )
        return StoreLocked(
            f"routing log {path} is in use by another process{who}, which has it open for writing; DuckDB "
            f"lets no other process open it meanwhile. Stop that process, or {_elsewhere(read_only)}."
        )
    if created:  # a new file this open had started: removed by the caller
        return StoreUnavailable(
            f"could not create routing log {path}: {_reason(text)}; anything of it this open "
            f"had written was removed. {_go_on(text)} {_elsewhere(read_only)}."
        )
    if "replaying wal" in low:
        return StoreUnavailable(
            f"cannot open routing log {path}: DuckDB could not replay its write-ahead log "
            f"{wal_path(path)} ({_reason(text)}). Both files were left untouched: to start a "
            f"new log move both away (keep them to try to recover the runs in it), or "
            f"{_elsewhere(read_only)}."
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


def _reason(text: str) -> str:
    """DuckDB's message without a trailing full stop (it goes inside a sentence)."""
    return text.strip().rstrip(".")


def _go_on(text: str) -> str:
    """How the sentence after a failed write starts: "Free some space, or" where DuckDB's
    message says the disk (or the file size limit, or the quota) is full, else "To go on,"."""
    low = text.lower()
    full = any(s in low for s in ("no space left", "file too large", "disk quota"))
    return "Free some space, or" if full else "To go on,"


def wal_path(path: Path) -> Path:
    """The write-ahead log DuckDB keeps beside `path`."""
    return path.with_name(path.name + ".wal")


def _size(path: Path) -> int:
    """The size of the file at `path`; 0 when there is none."""
    try:
        return path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0


def _wal_not_replayed(
    path: Path, wal_bytes: int, why: str, move: str, read_only: bool, lost: str | None = None
) -> StoreUnavailable:
    """A write-ahead log holding commits that opening the log would throw away (or, read
    only, leave out of every read: an export would miss its runs); `move`: what to move
    away to go on without them; `lost`: what becomes of its runs, where not that."""
    wal = wal_path(path)
    if read_only:
        lost, done = lost or "reading it would leave out", "read"
    else:
        lost, done = lost or "opening it would throw away", "opened"
    return StoreUnavailable(
        f"routing log {path}: {why}; {lost} the runs in {wal} ({wal_bytes} bytes: what was "
        f"logged since the last checkpoint). Nothing was {done} or written: the files were "
        f"left untouched. Keep them to try to recover those runs; {move}; or "
        f"{_elsewhere(read_only)}."
    )


def _remove_created(path: Path, wal_existed: bool) -> None:
    """Remove what a failed open of a new log created: the file (a 0-byte or half-written
    one would block every later open) and its write-ahead log, if it made one."""
    for created in (path, *(() if wal_existed else (wal_path(path),))):
        try:
            created.unlink(missing_ok=True)
        except OSError as exc:
            log.error("routing log %s: could not remove %s after a failed open: %s", path, created, exc)


# What DuckDB raises where a file's blocks are missing or garbled (a truncated copy, a disk
# error): found when a query first reads them, on open or any time later. A block whose
# checksum fails is a bare duckdb.Error (is_damaged).
DAMAGED = (duckdb.IOException, duckdb.InternalException, duckdb.SerializationException, duckdb.FatalException)


def is_damaged(exc: BaseException) -> bool:
    """Whether DuckDB's error says the file is damaged: one of DAMAGED, or the bare
    duckdb.Error of its data-corruption error, which has no Python class of its own ("Corrupt
    database file: computed checksum ... does not match stored checksum ...": a block
    overwritten in place)."""
    return isinstance(exc, DAMAGED) or (type(exc) is duckdb.Error and "corrupt" in str(exc).lower())


def damaged(path: Path, exc: BaseException) -> StoreUnavailable:
    """A read of the log that DuckDB could not do (is_damaged), in words."""
    return StoreUnavailable(
        f"routing log {path} could not be read ({type(exc).__name__}: {exc}); the file may be "
        "damaged (truncated, or written by something else). Restore it from a copy, or pass "
        "--db with another path."
    )


def connect(path: Path, read_only: bool, created: bool = False) -> duckdb.DuckDBPyConnection:
    """A connection to `path` (created read-write if missing), not yet migrated. `created`:
    the caller found no file at `path`, so one DuckDB leaves behind on failure is removed."""
    if path.is_dir():
        raise StoreUnavailable(f"routing log {path} is a directory; pass --db with a file path")
    # DuckDB would wait for ever on a named pipe (for a reader), and cannot keep a log in a device
    what = special_file(path)
    if what is not None:
        raise StoreUnavailable(
            f"routing log {path} is {what}, not a regular file (it was left untouched). To go "
            f"on, {_elsewhere(read_only)}."
        )
    what = special_file(wal_path(path))
    if what is not None:
        raise StoreUnavailable(
            f"routing log {path}: its write-ahead log {wal_path(path)} is {what}, not a regular "
            f"file (both were left untouched). To go on, move it away, or {_elsewhere(read_only)}."
        )
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
    wal_existed = wal_path(path).exists()
    try:
        return duckdb.connect(
            str(path), read_only=read_only, config={"checkpoint_threshold": CHECKPOINT_THRESHOLD}
        )
    except duckdb.Error as exc:
        error = _unavailable(path, exc, read_only, created)
        if created and not isinstance(error, StoreLocked):  # locked: another process's file
            _remove_created(path, wal_existed)
        raise error from exc


def _version(con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> int:
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
                f"it is not a metaattn-viz routing log (it was left untouched). To go on, "
                f"{_elsewhere(read_only)}."
            ) from None
    if tables:
        raise StoreUnavailable(
            f"{path} is a DuckDB database but not a metaattn-viz routing log (it has tables "
            f"{sorted(tables)} and no schema_version); it was left untouched. To go on, "
            f"{_elsewhere(read_only)}."
        )
    return 0


def migrate(con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> None:
    """Bring the file to schema.latest_schema_version(), each migration in the transaction
    that records its version; refuse newer files, and read-only opens that would need it."""
    version = _version(con, path, read_only)
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
        try:
            con.rollback()
        except duckdb.Error:  # a failed commit (a full disk) has rolled back already
            pass
        raise StoreUnavailable(
            f"could not migrate routing log {path} from schema version {version} to "
            f"{latest}: {_reason(str(exc))}; the file is unchanged. {_go_on(str(exc))} "
            f"{_elsewhere(read_only)}."
        ) from exc
    if version:
        log.info("migrated routing log %s from schema version %d to %d", path, version, latest)


def _check_replayed(con: duckdb.DuckDBPyConnection, path: Path, wal_bytes: int, read_only: bool) -> None:
    """Refuse a log whose non-empty write-ahead log DuckDB replayed nothing of (a damaged
    header, or a crash in the middle of its first commit): it reads as what was
    checkpointed alone, and the first write would replace the write-ahead log."""
    tables = con.execute(Q.TABLES_IN_MAIN).fetchall()
    if not tables or wal_size(con) == 0:
        raise _wal_not_replayed(
            path,
            wal_bytes,
            "DuckDB replayed nothing of its write-ahead log (it is damaged, or holds only a "
            "write cut short by a crash)",
            f"to open the log without them (its older runs stay), move {wal_path(path)} away"
            if tables
            else f"to start a new log, move {path} and {wal_path(path)} away",
            read_only,
        )


# DuckDB's own account of the write-ahead log it holds: what it replayed on open, and what
# was committed since ("0 bytes" when it used none of it, or holds none).
WAL_SIZE = "SELECT wal_size FROM pragma_database_size() WHERE database_name = current_database()"


def wal_size(con: duckdb.DuckDBPyConnection) -> float | None:
    """The number in DuckDB's account of its write-ahead log ("17.4 KiB" -> 17.4; 0 for
    "0 bytes"): zero or not is all it tells. None where DuckDB words it otherwise."""
    row = con.execute(WAL_SIZE).fetchone()
    found = re.match(r"\s*(\d+(?:\.\d+)?)", str(row[0]) if row is not None else "")
    return float(found.group(1)) if found is not None else None


def open_database(path: Path, read_only: bool) -> tuple[duckdb.DuckDBPyConnection, list[str]]:
    """(connection, recovered run ids): a connection to an up-to-date routing log.

    DuckDB lets one process open a file read-write, so a run still `running` when we open
    it read-write was left by a dead process: it is marked `interrupted` here (its
    committed batches stay) and its id is returned. A write-ahead log DuckDB would drop is
    refused before anything is written (see the module), read-only too (its runs would be
    left out of every read); a new file that fails to open is removed."""
    created, wal_bytes, wal_existed = False, 0, False
    if not path.is_dir():
        wal_existed, wal_bytes = wal_path(path).exists(), _size(wal_path(path))
        created = not read_only and not path.exists()
        if wal_bytes and not path.exists():  # DuckDB would delete it (read-write), or find no log
            raise _wal_not_replayed(
                path,
                wal_bytes,
                "the database file is missing but its write-ahead log is not",
                f"to start a new log, move {wal_path(path)} away",
                read_only,
                "without it DuckDB cannot read" if read_only else None,
            )
    con = connect(path, read_only, created)
    try:
        if wal_bytes:
            _check_replayed(con, path, wal_bytes, read_only)
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
        if created:
            _remove_created(path, wal_existed)
        raise _unavailable(path, exc, read_only, created) from exc
    except StoreUnavailable as exc:
        con.close()
        if not created:
            raise
        _remove_created(path, wal_existed)  # a new log whose schema could not be written
        raise _unavailable(path, exc.__cause__ or exc, read_only, created) from exc
    except BaseException:
        con.close()
        if created:
            _remove_created(path, wal_existed)
        raise
    if recovered:
        log.warning(
            "routing log %s: %d run(s) left running by an ended process marked interrupted",
            path,
            len(recovered),
        )
    return con, recovered
