"""The read-only SQL console over the routing log (the app's History tab).

`run_readonly_query(log, sql, owner=None)` answers one SELECT (or WITH ... SELECT,
FROM-first, VALUES, DESCRIBE/SUMMARIZE of a log table) over the log's tables and nothing
else: every run, or with `owner` (owners.py) that owner's runs only. It must never let a
statement write, change settings, attach or load anything, touch a file or URL, or see
another owner's rows. The checks, in order, each enough to refuse on its own:

1. DuckDB's own parser splits the text: exactly one statement, of type SELECT
   (INSERT/UPDATE/DELETE/CREATE/DROP/ALTER, COPY, EXPORT/IMPORT, ATTACH/DETACH,
   INSTALL/LOAD, SET/RESET/USE, PRAGMA, CALL, CHECKPOINT, VACUUM, transactions... are
   refused by type, and "SELECT 1; DROP ..." by count).
2. The parsed tree (json_serialize_sql) is walked: every table reference must be a
   table of the log (runs, tokens, routes, experts, schema_version) or a CTE in scope;
   string-literal and path-like table names ('x.csv', "s3://..."), other catalogs and
   schemas, and table functions other than range/generate_series/unnest (read_csv*,
   read_parquet, read_json*, read_text, read_blob, glob, parquet_scan, query,
   duckdb_settings, ...) are refused, as are scalar functions with side effects or a
   view outside the log (nextval, setseed, sleep_ms, current_setting, ...).
3. It never runs on the log's connection. The rows the reader may see of the tables it
   names (queries.visible_rows, read in one snapshot) are copied to a worker process
   (sandbox.py) whose in-memory DuckDB holds nothing else and reaches nothing else
   (external access off, configuration locked, a memory and thread cap): no catalog,
   schema or system-function trick can find another owner's rows there. A huge value
   fails at once on the worker's address-space cap; the query is interrupted after
   `timeout_s`, and the worker killed if DuckDB cannot stop; at most `max_rows` rows
   are computed and fetched.

Never imports gradio or the model; refusals raise ConsoleRefused with a message that
says what was refused and why.
"""

from __future__ import annotations

import json
import math
from decimal import Decimal
from typing import Any

import duckdb
import pandas as pd
import pyarrow as pa

from metaattn_viz.store import sandbox
from metaattn_viz.store.owners import check_owner
from metaattn_viz.store.queries import visible_rows
from metaattn_viz.store.runlog import RunLog
from metaattn_viz.store.schema import LOG_TABLES

ALLOWED_TABLE_FUNCTIONS = frozenset({"range", "generate_series", "unnest"})
# Scalar functions with an effect, a wait, or a view of things outside the log.
DENIED_FUNCTIONS = frozenset(
    {
        "nextval",
        "currval",
        "setval",
        "setseed",
        "write_log",
        "sleep_ms",
        "pg_sleep",
        "current_setting",
        "getvariable",
        "json_execute_serialized_sql",
        "enable_logging",
        "disable_logging",
        "enable_profiling",
        "disable_profiling",
        "checkpoint",
        "force_checkpoint",
    }
)
MAX_SQL_CHARS = 20_000
# Rows a query may read (its tables' visible rows together, copied to the worker): about
# 500 MB of Arrow at the routes table's ~100 bytes a row, some 370 runs of 512 tokens of a
# 30-layer model. A larger log is queried from its export.
MAX_INPUT_ROWS = 5_000_000
_TABLE_LIST = ", ".join(LOG_TABLES)
_STATEMENT_WORDS = {
    "INSERT": "INSERT writes to the log",
    "UPDATE": "UPDATE writes to the log",
    "DELETE": "DELETE/TRUNCATE writes to the log",
    "CREATE": "CREATE defines new objects",
    "DROP": "DROP/DEALLOCATE removes objects",
    "ALTER": "ALTER changes the schema",
    "COPY": "COPY reads or writes files",
    "COPY_DATABASE": "COPY FROM DATABASE copies a database",
    "EXPORT": "EXPORT DATABASE writes files",
    "ATTACH": "ATTACH opens another database",
    "DETACH": "DETACH closes a database",
    "LOAD": "INSTALL/LOAD adds extensions",
    "EXTENSION": "INSTALL/LOAD adds extensions",
    "SET": "SET/RESET/USE changes settings",
    "VARIABLE_SET": "SET VARIABLE changes state",
    "PRAGMA": "PRAGMA/IMPORT changes state",
    "CALL": "CALL/CHECKPOINT runs procedures",
    "TRANSACTION": "transactions are managed by the console",
    "VACUUM": "VACUUM/ANALYZE changes the database",
    "ANALYZE": "ANALYZE changes the database",
    "PREPARE": "PREPARE creates state",
    "EXECUTE": "EXECUTE runs a prepared statement",
    "EXPLAIN": "EXPLAIN (ANALYZE) runs plans",
    "MERGE_INTO": "MERGE INTO writes to the log",
    "MULTI": "this statement expands into "
    "several (a PIVOT without an IN list); name the values: PIVOT t ON c IN ('a', 'b')",
    "CREATE_FUNC": "CREATE FUNCTION defines new objects",
}


class ConsoleError(Exception):
    """A console query that did not produce a result (the message is for the user)."""


class ConsoleRefused(ConsoleError):
    """The statement is not a read-only query over the log's tables."""


class ConsoleTimeout(ConsoleError):
    """The query ran past the time limit and was stopped."""


def _refuse(what: str) -> ConsoleRefused:
    return ConsoleRefused(
        f"refused: {what}. The console answers one read-only SELECT over the log's tables ({_TABLE_LIST})."
    )


def _statement_of(sql: str) -> str:
    if not isinstance(sql, str) or not sql.strip():
        raise _refuse("the query is empty")
    if len(sql) > MAX_SQL_CHARS:
        raise _refuse(f"the query is longer than {MAX_SQL_CHARS} characters")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise ConsoleError(f"syntax error: {_first_line(exc)}") from None
    if not statements:
        raise _refuse("the query is empty (only comments?)")
    if len(statements) > 1:
        raise _refuse(f"{len(statements)} statements; only one is allowed")
    kind = statements[0].type.name
    if kind != "SELECT":
        raise _refuse(_STATEMENT_WORDS.get(kind, f"{kind} statements are not queries"))
    return statements[0].query


def _path_like(name: str) -> bool:
    return any(c in name for c in "./\\:~*?") or name.startswith("$")


def _check_tree(node, ctes: frozenset, catalogs: frozenset, found: set[str]) -> None:
    """Walk json_serialize_sql's tree, CTE names in scope in `ctes`; add the log tables
    it names to `found`."""
    if isinstance(node, list):
        for x in node:
            _check_tree(x, ctes, catalogs, found)
        return
    if not isinstance(node, dict):
        return
    cte_entries = (node.get("cte_map") or {}).get("map") or []
    if cte_entries:
        visible = set(ctes)
        for entry in cte_entries:  # a CTE sees the ones before it (and itself if recursive)
            name = str(entry["key"]).lower()
            body = entry["value"]
            recursive = (body.get("query_node") or {}).get("type") == "RECURSIVE_CTE_NODE"
            _check_tree(
                body, frozenset(visible | {name}) if recursive else frozenset(visible), catalogs, found
            )
            visible.add(name)
        ctes = frozenset(visible)
        node = {k: v for k, v in node.items() if k != "cte_map"}
    kind = node.get("type")
    if kind in ("BASE_TABLE", "SHOW_REF"):
        table = _check_table(node, ctes, catalogs)
        if table:
            found.add(table)
    elif kind == "TABLE_FUNCTION":
        fn = (node.get("function") or {}).get("function_name", "?")
        if str(fn).lower() not in ALLOWED_TABLE_FUNCTIONS:
            allowed = ", ".join(sorted(ALLOWED_TABLE_FUNCTIONS))
            raise _refuse(
                f"the table function {fn}() is not allowed (file, URL and system "
                f"readers are off; allowed: {allowed})"
            )
    fn = node.get("function_name")
    if isinstance(fn, str) and fn.lower() in DENIED_FUNCTIONS:
        raise _refuse(f"the function {fn}() has effects or reads state outside the log")
    for value in node.values():
        if isinstance(value, (dict, list)):
            _check_tree(value, ctes, catalogs, found)


def _check_table(node: dict, ctes: frozenset, catalogs: frozenset) -> str | None:
    """The log table `node` names (None: a CTE or a query); refuse anything else."""
    name = str(node.get("table_name") or "")
    if node.get("type") == "SHOW_REF" and not name:
        return None  # DESCRIBE/SUMMARIZE of a query: the query itself is walked
    catalog = str(node.get("catalog_name") or "").lower()
    schema = str(node.get("schema_name") or "").lower()
    if catalog and catalog not in catalogs:
        raise _refuse(f"{catalog}.{schema or 'main'}.{name} is in another database")
    if schema and schema != "main":
        raise _refuse(f"{schema}.{name} is not in the log's schema")
    if _path_like(name):
        raise _refuse(f"'{name}' looks like a file or URL, and the console reads no files")
    low = name.lower()
    if not catalog and not schema and low in ctes:
        return None
    if low in LOG_TABLES:
        return low
    raise _refuse(f"{name} is not a table of the log")


def _checked(sql: str, cursor: duckdb.DuckDBPyConnection) -> tuple[str, set[str]]:
    """(statement, the log tables it names), or ConsoleRefused."""
    statement = _statement_of(sql)
    try:
        tree = json.loads(_scalar(cursor, "SELECT json_serialize_sql($q)", {"q": statement}))
        if tree.get("error"):
            raise _refuse(f"the query could not be checked ({tree.get('error_message', 'unknown')})")
        catalog = _scalar(cursor, "SELECT current_database()")
        found: set[str] = set()
        _check_tree(tree.get("statements", []), frozenset(), frozenset({str(catalog).lower()}), found)
    except RecursionError:  # hundreds of nested expressions or subqueries
        raise _refuse("the query nests too deeply to be checked; flatten it (a CTE per level)") from None
    return statement, found


def check_readonly(sql: str, cursor: duckdb.DuckDBPyConnection) -> str:
    """Raise ConsoleRefused unless `sql` is one read-only query over the log's tables;
    return the statement text."""
    return _checked(sql, cursor)[0]


def _visible_tables(
    cur: duckdb.DuckDBPyConnection, names: set[str], owner: str | None
) -> dict[str, pa.Table]:
    """The rows of the log tables `names` that `owner` may see (all rows for None), read
    in one snapshot; ConsoleError where they are more than MAX_INPUT_ROWS. A table the
    database lacks is left out (the query then fails with DuckDB's "does not exist")."""
    present = {
        r[0]
        for r in cur.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "AND schema_name = 'main'"
        ).fetchall()
    }
    cur.execute("BEGIN TRANSACTION READ ONLY")
    try:
        queries = {n: visible_rows(n, owner) for n in sorted(names) if n in present}
        counts = {
            n: _scalar(cur, f"SELECT count(*) FROM ({sql})", params) for n, (sql, params) in queries.items()
        }
        if sum(counts.values()) > MAX_INPUT_ROWS:
            each = ", ".join(f"{n}: {c:,}" for n, c in counts.items())
            raise ConsoleError(
                f"this query reads {sum(counts.values()):,} rows ({each}), more than the console's "
                f'{MAX_INPUT_ROWS:,}; export the log (History, "Download the routing log", or '
                "/export) and query its files with DuckDB"
            )
        return {n: _rows(cur, sql, params) for n, (sql, params) in queries.items()}
    finally:
        cur.execute("ROLLBACK")


def _rows(cur: duckdb.DuckDBPyConnection, sql: str, params: dict[str, str]) -> pa.Table:
    return cur.sql(sql, params=params or None).to_arrow_table()


def _scalar(cursor: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None) -> Any:
    """The one value a one-row, one-column query answers."""
    rows = cursor.execute(sql, params or {}).fetchall()  # all: an unfinished result blocks the cursor
    row = rows[0] if rows else None
    if row is None:
        raise ConsoleError(f"no answer from {sql!r}")
    return row[0]


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def run_readonly_query(
    log_or_con: RunLog | duckdb.DuckDBPyConnection,
    sql: str,
    max_rows: int = 1000,
    timeout_s: float = 5.0,
    owner: str | None = None,
) -> tuple[pd.DataFrame, str]:
    """Answer one read-only query over the runs visible to `owner` (every run when None):
    (DataFrame of at most max_rows rows, notice). Raises ConsoleRefused (not allowed),
    ConsoleTimeout (stopped after timeout_s) or ConsoleError (a SQL error, with DuckDB's
    message, or a busy console)."""
    if max_rows < 1 or timeout_s <= 0:
        raise ValueError("max_rows must be >= 1 and timeout_s > 0")
    check_owner(owner)
    cur = log_or_con.fresh_cursor() if isinstance(log_or_con, RunLog) else log_or_con.cursor()
    try:
        statement, names = _checked(sql, cur)
        try:
            tables = _visible_tables(cur, names, owner)
        except duckdb.Error as exc:
            raise ConsoleError(_first_line(exc)) from None
    finally:
        cur.close()
    try:
        result = sandbox.run_query(statement, tables, max_rows, timeout_s)
    except sandbox.SandboxTimeout:
        raise ConsoleTimeout(
            f"stopped: the query ran past the {timeout_s:g} s time limit; "
            "narrow it (WHERE, LIMIT) or aggregate"
        ) from None
    except sandbox.SandboxError as exc:
        raise ConsoleError(str(exc)) from None
    elapsed = result.elapsed
    table = result.table
    named = zip(table.columns, table.column_names, strict=True)
    rows = list(zip(*(_column_values(c, n) for c, n in named), strict=True))
    capped = len(rows) > max_rows
    df = pd.DataFrame.from_records(rows[:max_rows], columns=table.column_names)
    if capped:
        notice = (
            f"showing the first {max_rows} rows (row cap); add LIMIT, WHERE or an "
            f"aggregate to see the rest ({elapsed:.2f} s)"
        )
    else:
        notice = f"{len(df)} row{'s' if len(df) != 1 else ''} in {elapsed:.2f} s"
    return df, notice


def _column_values(column: pa.ChunkedArray, name: str = "") -> list:
    """A result column's values as Python objects that a table on the page and JSON carry
    as they are, in DuckDB's own text where they would not, at any depth of a list, struct
    or map: a BLOB as DuckDB prints it (\\xDE\\xAD...), NaN and infinities as nan / inf /
    -inf (JSON has no such numbers and pandas would show them as empty), an INTERVAL as
    "2 months 3 days 01:02:03.5" (Arrow hands it over as a (months, days, nanoseconds)
    triple), a DECIMAL or HUGEINT as a number (an int where it has no fraction: sum() of
    integers is a HUGEINT); a UHUGEINT or VARINT as DuckDB's text of it (exact, whatever
    its size: Arrow carries neither). Dates, times, timestamps and the types Arrow cannot carry
    arrive as DuckDB's text already (the worker casts them, sandbox_worker.CARRIED_TYPES).
    A value that still cannot be shown is ConsoleError naming the column."""
    t = column.type
    try:
        if _has_extension_type(t):  # an Arrow type pyarrow only sees the storage of
            raise ValueError(f"its type {t} is not one the console knows")
        values = column.to_pylist()
        return [_as_text(v) for v in values] if _needs_text(t) else values
    except (OverflowError, TypeError, ValueError, pa.ArrowException) as exc:
        raise ConsoleError(
            f"column {name!r} holds a value that cannot be shown ({exc}); cast it to text in "
            f"the query ({name}::VARCHAR)"
        ) from None


def _has_extension_type(t: pa.DataType) -> bool:
    """Whether `t` is, or holds, an Arrow extension type (its values would arrive as their
    storage: the bytes of a type the console does not know)."""
    if isinstance(t, pa.BaseExtensionType):
        return True
    return any(_has_extension_type(t.field(i).type) for i in range(t.num_fields))


def _needs_text(t: pa.DataType) -> bool:
    """Whether _as_text changes any value of type `t`."""
    if pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_floating(t):
        return True
    if pa.types.is_interval(t) or pa.types.is_decimal(t):
        return True
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t):
        return _needs_text(t.value_type)
    if pa.types.is_struct(t):
        return any(_needs_text(t.field(i).type) for i in range(t.num_fields))
    if pa.types.is_map(t):
        return _needs_text(t.key_type) or _needs_text(t.item_type)
    return False


# the whole numbers a JSON answer carries as numbers (orjson's range: a signed or unsigned
# 64-bit integer); a HUGEINT or a DECIMAL(38, 0) beyond it is sent as its exact text
JSON_INT_MIN, JSON_INT_MAX = -(2**63), 2**64 - 1


def _as_text(v: Any) -> Any:
    """One value as _column_values shows it (a list, struct or map value by its members)."""
    if isinstance(v, Decimal):  # an int where it has no fraction, as DuckDB's type says
        if v.as_tuple().exponent != 0:
            return float(v)
        whole = int(v)
        # past 64 bits JSON encoders refuse it (the page's answer failed): its exact text
        return whole if JSON_INT_MIN <= whole <= JSON_INT_MAX else str(whole)
    if isinstance(v, float):
        if math.isfinite(v):
            return v
        return "nan" if v != v else ("inf" if v > 0 else "-inf")
    if isinstance(v, bytes):
        return "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02X}" for b in v)
    if isinstance(v, pa.MonthDayNano):
        return _interval_text(v.months, v.days, v.nanoseconds)
    if isinstance(v, list):
        return [_as_text(x) for x in v]
    if isinstance(v, dict):
        return {k: _as_text(x) for k, x in v.items()}
    if isinstance(v, tuple):  # a MAP's (key, value) pairs
        return tuple(_as_text(x) for x in v)
    return v


def _interval_text(months: int, days: int, nanoseconds: int) -> str:
    """An interval as DuckDB prints it: "1 year 2 months 3 days 04:05:06.5", "1 day", "00:00:00"."""

    def unit(n: int, name: str) -> str:
        return f"{n} {name}{'' if abs(n) == 1 else 's'}"

    years, months = int(months / 12), months - 12 * int(months / 12)  # both with the sign of months
    parts = [unit(n, name) for n, name in ((years, "year"), (months, "month"), (days, "day")) if n]
    if nanoseconds or not parts:
        micros = abs(nanoseconds) // 1000
        secs, frac = divmod(micros, 1_000_000)
        clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}"
        if frac:
            clock += f".{frac:06d}".rstrip("0")
        parts.append(("-" if nanoseconds < 0 else "") + clock)
    return " ".join(parts)


def describe_log(log_or_con: RunLog | duckdb.DuckDBPyConnection) -> pd.DataFrame:
    """The tables and columns the console can read (table, column, type)."""
    cur = log_or_con.fresh_cursor() if isinstance(log_or_con, RunLog) else log_or_con.cursor()
    try:
        return cur.execute(
            'SELECT table_name AS "table", column_name AS "column", data_type AS type '
            "FROM duckdb_columns() WHERE database_name = current_database() "
            "AND schema_name = 'main' AND list_contains($tables, table_name) "
            "ORDER BY list_position($tables, table_name), column_index",
            {"tables": list(LOG_TABLES)},
        ).df()
    finally:
        cur.close()
