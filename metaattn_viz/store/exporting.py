"""Export of the routing log to partitioned files any engine reads (DuckDB, Spark, Trino,
pandas): runs, tokens and routes as Parquet or CSV, hive-partitioned by day=YYYY-MM-DD
(docs/architecture.md).

Writes only under the folder it is given, and refuses one that already holds an export;
an export that fails part way removes what it wrote (and the folder, if it made it). Never
writes to the log itself (it reads one snapshot, then rolls back). Ctrl-C while DuckDB
reads or copies is KeyboardInterrupt (store/interrupts.py), after the same clean-up. Never
imports the model code, torch or gradio.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from pathlib import Path

from metaattn_viz.store.errors import ExportNotWritten
from metaattn_viz.store.interrupts import keyboard_interrupts
from metaattn_viz.store.opening import damaged, is_damaged
from metaattn_viz.store.owners import check_owner
from metaattn_viz.store.queries import Q
from metaattn_viz.store.runlog import PathArg, RunLog

EXPORT_FORMATS = ("parquet", "csv")
TABLES = ("runs", "tokens", "routes")  # each a hive-partitioned folder; then experts.<fmt>


def sql_string(path: Path) -> str:
    """`path` as an SQL string literal."""
    return "'" + str(path).replace("'", "''") + "'"


def export(
    source: RunLog | PathArg,
    out_dir: PathArg,
    fmt: str = "parquet",
    owner: str | None = None,
    run_id: str | None = None,
) -> dict[str, int]:
    """Write runs, tokens and routes under out_dir/<table>/day=YYYY-MM-DD/ (hive style,
    by the run's UTC creation day) and the experts lookup as out_dir/experts.<fmt>, from
    one consistent snapshot: every run, or (`owner`, owners.py) that owner's runs only;
    with `run_id`, only that run (no rows if `owner` may not see it).
    Refuses to write into existing non-empty table folders.
    CSV has a header row; NULL is an empty field and an empty string is "" (DuckDB reads
    that back with allow_quoted_nulls = false). Returns the rows written per table.
    Ctrl-C (DuckDB's interrupt included) removes what was written and raises
    KeyboardInterrupt."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"format must be one of {EXPORT_FORMATS}, got {fmt!r}")
    params = {"owner": check_owner(owner), "run_id": None if run_id is None else str(run_id)}
    out = Path(out_dir).expanduser()
    targets = {**{table: out / table for table in TABLES}, "experts": out / f"experts.{fmt}"}
    busy = [str(p) for p in targets.values() if p.exists() and (p.is_file() or any(p.iterdir()))]
    if busy:
        raise ValueError(
            f"export target already exists: {', '.join(busy)}; choose an empty "
            "--out folder (nothing was written)"
        )
    own = not isinstance(source, RunLog)
    with keyboard_interrupts():
        log = source if isinstance(source, RunLog) else RunLog(source, read_only=True)
    made = not out.exists()
    try:
        out.mkdir(parents=True, exist_ok=True)  # once the log opened: a refused one leaves no folder
        with keyboard_interrupts():  # Ctrl-C inside DuckDB: cleaned up below, then re-raised
            counts = _copy(log, targets, fmt, params)
    except BaseException as exc:
        if made:
            shutil.rmtree(out, ignore_errors=True)
        else:  # the targets were absent or empty (checked above)
            for target in targets.values():
                if target.is_dir():
                    shutil.rmtree(target, ignore_errors=True)
                else:
                    target.unlink(missing_ok=True)
        if is_damaged(exc) and _about(exc, out, log.path):  # writing the export, not reading the log
            raise ExportNotWritten(
                f"the export could not be written ({_reason(exc)}); nothing of it was kept, and "
                "the routing log is unchanged"
            ) from exc
        if is_damaged(exc):
            raise damaged(log.path, exc) from exc
        raise
    finally:
        if own:
            log.close()
    return counts


def _about(exc: BaseException, out: Path, log_path: Path) -> bool:
    """Whether DuckDB's error is about writing the export: it names one of the export's
    files under `out` and not the log (a COPY that could not write, a full disk, which is no
    sign of a damaged log; an error reading the log names the log, or no file). Looked for
    as the paths themselves, as DuckDB spells them (as given, relative or not), never by
    what it quotes: a folder's name may hold a quote. Where one path holds the other (a log
    in the export folder, an export folder named after the log), the longer one decides."""
    text = _reason(exc)  # the reason unwrapped from its JSON
    names = [(str(log), False) for log in _spellings(Path(log_path))]
    for root in _spellings(out):  # its folders' contents, and experts.<fmt>
        names += [(str(root / table) + os.sep, True) for table in TABLES] + [(str(root / "experts."), True)]
    named: set[bool] = set()
    for name, export in sorted(names, key=lambda n: -len(n[0])):
        if name in text:
            named.add(export)
            text = text.replace(name, "\0" * len(name))  # not found again inside a shorter name
    return named == {True}


def _spellings(path: Path) -> set[Path]:
    """`path` as given, absolute, and with its links resolved: how DuckDB may name it."""
    return {path, path.absolute(), path.resolve()}


def _reason(exc: BaseException) -> str:
    """DuckDB's reason for a failed write: the message inside the JSON some IO errors carry
    (`Could not write file "...": No space left on device`), else the whole message."""
    found = re.search(r'"exception_message":\s*"((?:[^"\\]|\\.)*)"', str(exc))
    if found:
        with contextlib.suppress(ValueError):
            return json.loads(f'"{found.group(1)}"')
    return str(exc)


def _copy(log: RunLog, targets: dict[str, Path], fmt: str, params: dict) -> dict[str, int]:
    """Every table COPY'd to its target from one snapshot; rows written per table."""
    extra = ", HEADER true" if fmt == "csv" else ""
    cur = log.fresh_cursor()
    counts: dict[str, int] = {}
    cur.begin()
    try:
        for table, query in (
            ("runs", Q.EXPORT_RUNS),
            ("tokens", Q.EXPORT_TOKENS),
            ("routes", Q.EXPORT_ROUTES),
        ):
            counts[table] = _copied(
                cur.execute(
                    Q.EXPORT_PARTITIONED.format(
                        query=query, path=sql_string(targets[table]), fmt=fmt, extra=extra
                    ),
                    params,
                ).fetchone()
            )
        counts["experts"] = _copied(
            cur.execute(
                Q.EXPORT_EXPERTS.format(path=sql_string(targets["experts"]), fmt=fmt, extra=extra)
            ).fetchone()
        )
    finally:
        cur.rollback()
        cur.close()
    return counts


def _copied(row: tuple | None) -> int:
    """The row count a COPY statement answers with."""
    if row is None:
        raise RuntimeError("COPY returned no row count")
    return row[0]
