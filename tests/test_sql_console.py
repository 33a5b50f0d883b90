"""The read-only SQL console (metaattn_viz/store/console.py): hostile statements are
refused with a reason, ordinary SELECTs are answered, the row cap and the time limit
work, and nothing reaches a file, a setting or the log's contents."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from helpers import synthetic_trace

from metaattn_viz.store import LOG_TABLES, RunLog
from metaattn_viz.store.console import (
    ConsoleError,
    ConsoleRefused,
    ConsoleTimeout,
    describe_log,
    run_readonly_query,
)


@pytest.fixture
def log(tmp_path):
    with RunLog(tmp_path / "routing.duckdb") as log:
        for seed in range(3):
            tr = synthetic_trace(n_layers=4, n_tokens=10, seed=seed)
            log.finish(log.start_run(tr), tr)
        yield log


def snapshot(log):
    cur = log.fresh_cursor()
    try:
        return (
            {t: cur.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in LOG_TABLES},
            cur.execute("SELECT * FROM duckdb_settings() ORDER BY name").fetchall(),
            sorted(r[0] for r in cur.execute("SELECT database_name FROM duckdb_databases()").fetchall()),
        )
    finally:
        cur.close()


# (statement, words the refusal must contain)
HOSTILE = [
    # writes and DDL
    ("INSERT INTO runs SELECT * FROM runs", "INSERT"),
    ("UPDATE runs SET status = 'done'", "UPDATE"),
    ("DELETE FROM routes", "DELETE"),
    ("TRUNCATE routes", "DELETE/TRUNCATE"),
    ("DROP TABLE runs", "DROP"),
    ("CREATE TABLE x AS SELECT 1", "CREATE"),
    ("CREATE MACRO m() AS 1", "CREATE"),
    ("CREATE SECRET s (TYPE s3)", "CREATE"),
    ("ALTER TABLE runs ADD COLUMN x INT", "ALTER"),
    ("MERGE INTO runs USING runs r ON true WHEN MATCHED THEN DELETE", "MERGE"),
    ("WITH x AS (SELECT 1) INSERT INTO experts SELECT 9, 'x', 1, 'X'", "INSERT"),
    # other databases, extensions, files
    ("ATTACH '{tmp}/other.duckdb' AS other", "ATTACH"),
    ("DETACH other", "DETACH"),
    ("INSTALL httpfs", "INSTALL/LOAD"),
    ("LOAD httpfs", "INSTALL/LOAD"),
    ("COPY runs TO '{tmp}/runs.csv'", "COPY"),
    ("COPY (SELECT * FROM routes) TO '{tmp}/routes.parquet' (FORMAT parquet)", "COPY"),
    ("COPY runs FROM '{tmp}/runs.csv'", "COPY"),
    ("EXPORT DATABASE '{tmp}/dump'", "EXPORT"),
    ("IMPORT DATABASE '{tmp}/dump'", "IMPORT"),
    # settings and state
    ("SET threads = 1", "SET"),
    ("RESET threads", "SET"),
    ("SET enable_external_access = true", "SET"),
    ("USE memory", "USE"),
    ("SET VARIABLE x = 1", "SET"),
    ("PRAGMA version", "PRAGMA"),
    ("CALL pragma_version()", "CALL"),
    ("CHECKPOINT", "CHECKPOINT"),
    ("VACUUM", "VACUUM"),
    ("BEGIN TRANSACTION", "transactions"),
    ("PREPARE p AS SELECT 1", "PREPARE"),
    ("EXPLAIN ANALYZE SELECT * FROM runs", "EXPLAIN"),
    # file and URL readers inside a SELECT
    ("SELECT * FROM read_csv('/etc/passwd')", "read_csv()"),
    ("SELECT * FROM read_csv_auto('/etc/passwd')", "read_csv_auto()"),
    ("SELECT * FROM read_parquet('https://example.com/x.parquet')", "read_parquet()"),
    ("SELECT * FROM parquet_scan('{tmp}/x.parquet')", "parquet_scan()"),
    ("SELECT * FROM read_json_auto('{tmp}/x.json')", "read_json_auto()"),
    ("FROM read_ndjson('{tmp}/x.json')", "read_ndjson()"),
    ("SELECT * FROM read_text('/etc/passwd')", "read_text()"),
    ("SELECT * FROM read_blob('/etc/hostname')", "read_blob()"),
    ("SELECT * FROM glob('/*')", "glob()"),
    ("SELECT * FROM sniff_csv('/etc/passwd')", "sniff_csv()"),
    ("SELECT * FROM read_duckdb('{tmp}/other.duckdb')", "read_duckdb()"),
    ("SELECT * FROM '/etc/passwd'", "file or URL"),
    ("FROM 'runs.csv'", "file or URL"),
    ('SELECT * FROM "s3://bucket/x.parquet"', "file or URL"),
    ("DESCRIBE '/etc/passwd'", "file or URL"),
    ("SUMMARIZE SELECT * FROM read_csv('/etc/passwd')", "read_csv()"),
    ("SELECT * FROM query('SELECT * FROM read_text(''/etc/passwd'')')", "query()"),
    ("SELECT * FROM duckdb_settings()", "duckdb_settings()"),
    ("SELECT * FROM duckdb_secrets()", "duckdb_secrets()"),
    ("SELECT * FROM system.main.duckdb_tables()", "duckdb_tables()"),
    ("SELECT * FROM information_schema.tables", "not in the log's schema"),
    ("SELECT * FROM temp.main.anything", "another database"),
    ("SHOW TABLES", "not a table of the log"),
    # hidden in subqueries and CTEs
    ("WITH t AS (SELECT * FROM read_csv('/etc/passwd')) SELECT * FROM t", "read_csv()"),
    ("SELECT (SELECT count(*) FROM read_text('/etc/passwd'))", "read_text()"),
    ("SELECT * FROM runs WHERE run_id IN (SELECT content FROM read_text('/etc/passwd'))", "read_text()"),
    ('WITH "x.csv" AS (SELECT * FROM \'x.csv\') SELECT * FROM "x.csv"', "file or URL"),
    ("WITH a AS (SELECT * FROM b), b AS (SELECT 1) SELECT * FROM a", "b is not a table"),
    ("SELECT * FROM runs, secret_df", "secret_df is not a table"),
    # functions with effects
    ("SELECT nextval('seq')", "nextval()"),
    ("SELECT setseed(0.5)", "setseed()"),
    ("SELECT current_setting('threads')", "current_setting()"),
    ("SELECT sleep_ms(100000)", "sleep_ms()"),
    # several statements smuggling a write
    ("SELECT 1; DROP TABLE runs", "2 statements"),
    ("SELECT * FROM runs; COPY runs TO '{tmp}/x.csv'", "2 statements"),
    ("SELECT 1; SELECT 2; UPDATE runs SET status = 'failed'", "3 statements"),
    ("PIVOT runs ON status", "PIVOT"),
    ("", "empty"),
    ("-- just a comment", "empty"),
]


def test_at_least_25_hostile_statements_are_refused_with_a_reason(log, tmp_path):
    assert len(HOSTILE) >= 25
    before = snapshot(log)
    secret_df = pd.DataFrame({"x": [1]})  # noqa: F841 - a Python variable must not be a table
    for sql, reason in HOSTILE:
        sql = sql.replace("{tmp}", str(tmp_path))
        with pytest.raises(ConsoleRefused) as err:
            run_readonly_query(log, sql)
        msg = str(err.value)
        assert msg.startswith("refused: ") and reason in msg, (sql, msg)
        assert "read-only SELECT" in msg and "runs, tokens, routes" in msg
    assert snapshot(log) == before  # nothing written, set or attached
    made = {p.name for p in tmp_path.iterdir()} - {"routing.duckdb", "routing.duckdb.wal"}
    assert not made  # no file written


@pytest.mark.parametrize(
    "sql, rows",
    [
        ("SELECT count(*) AS n FROM routes", [(120,)]),
        ("select status, count(*) from runs group by status", [("done", 3)]),
        ("WITH r AS (SELECT * FROM runs) SELECT count(*) FROM r", [(3,)]),
        ("FROM runs SELECT count(DISTINCT run_id)", [(3,)]),
        (
            "SELECT e.name, count(*) > 0 FROM routes JOIN experts e USING (expert) "
            "GROUP BY ALL ORDER BY 1 LIMIT 1",
            [("full", True)],
        ),
        (
            "WITH RECURSIVE t(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM t WHERE n < 4) "
            "SELECT sum(n) FROM t",
            [(10,)],
        ),
        (
            "SELECT * FROM (PIVOT runs ON status IN ('done', 'failed') USING count(*) GROUP BY model)",
            [("synthetic", 3, 0)],
        ),
        ("SELECT count(*) FROM Main.ROUTES WHERE layer IN (SELECT unnest([0, 1]))", [(60,)]),
        ("SELECT max(range) FROM range(7);", [(6,)]),
        ("VALUES (1, 'a')", [(1, "a")]),
    ],
)
def test_ordinary_selects_are_answered(log, sql, rows):
    df, notice = run_readonly_query(log, sql)
    assert [tuple(r) for r in df.itertuples(index=False)] == rows
    assert notice.startswith(f"{len(rows)} row")


def test_describe_and_summarize_of_a_log_table_work(log):
    df, _ = run_readonly_query(log, "DESCRIBE routes")
    assert "conc_full" in set(df["column_name"])
    df, _ = run_readonly_query(log, "SUMMARIZE runs")
    assert len(df) > 10
    schema = describe_log(log)
    assert list(dict.fromkeys(schema["table"])) == list(LOG_TABLES)


def test_the_row_cap_stops_fetching(log):
    df, notice = run_readonly_query(log, "SELECT * FROM range(1000000000)", max_rows=50)
    assert len(df) == 50 and "first 50 rows (row cap)" in notice
    df, notice = run_readonly_query(log, "SELECT * FROM routes", max_rows=120)
    assert len(df) == 120 and "row cap" not in notice


def test_the_time_limit_interrupts_a_long_query(log):
    """Stopped with ConsoleTimeout (a query of 10^13 rows would take hours); the bound only
    keeps a stop that never comes from hanging the suite (benchmarks time the stop)."""
    import time

    from metaattn_viz.store.sandbox import KILL_GRACE_S

    t0 = time.perf_counter()
    with pytest.raises(ConsoleTimeout, match=r"stopped: the query ran past the 0\.5 s time limit"):
        run_readonly_query(
            log,
            "SELECT count(*) FROM range(100000000) a, range(100000) b WHERE a.range + b.range = 7",
            timeout_s=0.5,
        )
    assert time.perf_counter() - t0 < 10 * (0.5 + KILL_GRACE_S)  # a hang, not a slow stop
    df, _ = run_readonly_query(log, "SELECT count(*) FROM runs")  # the log still answers
    assert df.iloc[0, 0] == 3


def test_sql_errors_are_reported_not_refused(log):
    with pytest.raises(ConsoleError, match="syntax error") as err:
        run_readonly_query(log, "SELEC * FROM runs")
    assert not isinstance(err.value, ConsoleRefused)
    with pytest.raises(ConsoleError, match="no_such_column"):
        run_readonly_query(log, "SELECT no_such_column FROM runs")


def test_works_on_a_plain_connection_too():
    con = duckdb.connect()
    con.execute("CREATE TABLE runs AS SELECT 1 AS run_id")
    df, _ = run_readonly_query(con, "SELECT * FROM runs")
    assert df.iloc[0, 0] == 1
    with pytest.raises(ConsoleRefused):
        run_readonly_query(con, "DROP TABLE runs")
    with pytest.raises(ConsoleRefused):
        run_readonly_query(con, "SELECT * FROM read_csv('/etc/passwd')")


# -- the hardened connection and the time limit ------------------------------------------------
@pytest.mark.parametrize(
    "sql, answer",
    [
        ("SELECT repeat('a', 2000000000)", None),  # one 2 GB value: DuckDB cannot interrupt it
        ("SELECT count(*) FROM range(100000) a, range(100000) b", 10**10),  # 10^10 rows
        ("SELECT count(*) FROM range(100000) a, range(100000) b WHERE a.range + b.range = 7", None),
        ("SELECT sum(len(range(x))) FROM range(100000) t(x)", None),  # 5 * 10^9 list elements
    ],
)
def test_a_huge_query_is_answered_refused_or_stopped_within_the_limit(log, sql, answer):
    import time

    from metaattn_viz.store.sandbox import KILL_GRACE_S

    t0 = time.perf_counter()
    try:
        df, _ = run_readonly_query(log, sql, timeout_s=3)
    except ConsoleError as exc:  # stopped (ConsoleTimeout) or refused for memory
        assert isinstance(exc, ConsoleTimeout) or "more memory than the console allows" in str(exc), str(exc)
    else:
        assert answer is not None and df.iloc[0, 0] == answer
    assert time.perf_counter() - t0 < 10 * (3 + KILL_GRACE_S)  # a hang, not a slow stop
    df, _ = run_readonly_query(log, "SELECT count(*) FROM runs")  # the console still answers
    assert df.iloc[0, 0] == 3


def test_the_sandbox_connection_is_locked_down():
    """DuckDB's own guards, on top of the parser checks: no files or URLs, no
    extensions, no other databases, and settings no statement can change."""
    from metaattn_viz.store.sandbox import MEMORY_LIMIT, THREADS
    from metaattn_viz.store.sandbox_worker import hardened_connection

    with hardened_connection(MEMORY_LIMIT, THREADS) as con:
        for sql in (
            "SELECT * FROM read_csv('/etc/passwd')",
            "ATTACH '/tmp/x.duckdb' AS x",
            "COPY (SELECT 1) TO '/tmp/metaattn-sandbox-test.csv'",
            "INSTALL httpfs",
            "LOAD httpfs",
            "SET enable_external_access = true",
            "SET memory_limit = '100GB'",
            "SET threads = 64",
            "SET temp_directory = '/tmp/metaattn-sandbox-spill'",
            "RESET lock_configuration",
        ):
            with pytest.raises(duckdb.Error):
                con.execute(sql)
        assert con.execute("SELECT current_setting('threads')").fetchone()[0] == THREADS
        assert con.execute("SELECT current_setting('temp_directory')").fetchone()[0] == ""  # no spilling
        assert (
            con.execute("SELECT count(*) FROM duckdb_databases() WHERE NOT internal").fetchone()[0] == 1
        )  # its own in-memory database, nothing else


def test_a_worker_that_does_not_answer_is_killed_at_the_limit(tmp_path, monkeypatch):
    """The last resort when DuckDB cannot stop: the process is killed once the limit and
    KILL_GRACE_S have passed, and a spare started."""
    import time

    from metaattn_viz.store import sandbox, sandbox_worker

    stuck = tmp_path / "stuck_worker.py"  # says it is ready, then never answers
    stuck.write_text(
        "import sys, time\nsys.stdout.buffer.write(len(b'ready').to_bytes(4, "
        "'big') + b'ready')\nsys.stdout.flush()\ntime.sleep(600)\n"
    )
    assert sandbox_worker.READY == b"ready"
    monkeypatch.setattr(sandbox, "WORKER_SCRIPT", stuck)
    workers, guards = [], []

    class Worker(sandbox._Worker):  # the pool's workers, and how long each wait may take
        def __init__(self):
            super().__init__()
            workers.append(self)

        def _guarded(self, seconds, fn):
            guards.append(seconds)
            return super()._guarded(seconds, fn)

    monkeypatch.setattr(sandbox, "_Worker", Worker)
    pool = sandbox._Pool(1)
    try:
        t0 = time.perf_counter()
        with pytest.raises(sandbox.SandboxTimeout, match="ran past its time limit and was stopped"):
            pool.run({"sql": "SELECT 1"}, {}, timeout_s=0.5)
        assert time.perf_counter() - t0 < 10 * (0.5 + sandbox.KILL_GRACE_S)  # a hang, not a slow kill
        assert guards == [sandbox.START_TIMEOUT_S, 0.5 + sandbox.KILL_GRACE_S]  # the start, the query
        stuck_worker, spare = workers
        assert stuck_worker.proc.returncode == -signal.SIGKILL  # killed (and reaped)
        assert pool._idle == [spare] and spare.alive  # started at once for the next query
    finally:
        pool.close()


def test_a_query_over_the_memory_cap_fails_in_words_and_writes_no_file(tmp_path, monkeypatch):
    """A sort past the worker's memory cap spilled ~950 MB into .tmp under the server's
    working directory (and a worker killed at the time limit left its files there); now
    it fails, saying the query needed more memory than the console allows."""
    from metaattn_viz.store import sandbox

    monkeypatch.chdir(tmp_path)  # a worker's working directory is the server's
    pool = sandbox._Pool(1)
    monkeypatch.setattr(sandbox, "_POOL", pool)
    try:
        sort = (
            "SELECT sum(len(s)) FROM (SELECT range::VARCHAR || repeat('x', 60) AS s "
            "FROM range(6000000) ORDER BY s DESC)"
        )  # ~420 MB of rows to sort under a 256 MB cap
        # DuckDB's out-of-memory error, or now and then a SIGSEGV where an allocation fails
        # under the worker's address-space cap first: both said in words
        with pytest.raises(ConsoleError, match="more memory than the console allows") as err:
            run_readonly_query(duckdb.connect(), sort, timeout_s=10)
        assert not isinstance(err.value, ConsoleTimeout) and "narrow it" in str(err.value)
    finally:
        pool.close()
    assert list(tmp_path.iterdir()) == []  # no .tmp, no duckdb_temp_* files


def test_a_worker_out_of_memory_answer_names_the_consoles_cap(monkeypatch):
    """The worker answers "memory" for DuckDB's out-of-memory error (its first line read
    "could not allocate block of size 256.0 KiB (243.9 MiB/244.1 MiB used)"): the visitor
    reads the console's cap and what to do."""
    from metaattn_viz.store import sandbox

    class OutOfMemory:
        def run(self, request, tables, timeout_s):
            return {"ok": False, "kind": "memory"}, None

    monkeypatch.setattr(sandbox, "_POOL", OutOfMemory())
    with pytest.raises(sandbox.SandboxMemory) as err:
        sandbox.run_query("SELECT 1", {}, max_rows=10, timeout_s=1)
    assert str(err.value).startswith("the query needed more memory than the console allows")
    assert sandbox.MEMORY_LIMIT in str(err.value) and "narrow it" in str(err.value)


@pytest.mark.parametrize("how", ["signal.SIGSEGV", "signal.SIGKILL", "signal.SIGABRT"])
def test_a_worker_ended_by_a_signal_is_reported_as_too_much_memory(tmp_path, monkeypatch, how):
    """A worker whose allocation fails under its address-space cap ends with SIGSEGV (the
    system's out-of-memory killer sends SIGKILL): the visitor reads that the query used too
    much memory, not that a process "ended unexpectedly"."""
    from metaattn_viz.store import sandbox

    crashing = tmp_path / "crashing_worker.py"  # says it is ready, reads a request, dies
    crashing.write_text(
        "import os, signal, sys\nsys.stdout.buffer.write(len(b'ready').to_bytes(4, "
        f"'big') + b'ready')\nsys.stdout.flush()\nsys.stdin.buffer.read(4)\nos.kill(os.getpid(), {how})\n"
    )
    monkeypatch.setattr(sandbox, "WORKER_SCRIPT", crashing)
    pool = sandbox._Pool(1)
    try:
        with pytest.raises(sandbox.SandboxMemory) as err:
            pool.run({"sql": "SELECT 1"}, {}, timeout_s=5)
    finally:
        pool.close()
    msg = str(err.value)
    assert "used more memory than the console allows" in msg and how.split(".")[1] in msg, msg
    assert "unexpectedly" not in msg


def test_a_worker_that_exits_on_its_own_says_so_in_words():
    from metaattn_viz.store import sandbox

    err = sandbox._ended_error(1)
    assert not isinstance(err, sandbox.SandboxMemory)
    assert "exit status 1" in str(err) and "run the query again" in str(err)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGHUP"])
def test_a_worker_stopped_from_outside_is_not_blamed_on_the_querys_memory(sig):
    from metaattn_viz.store import sandbox

    err = sandbox._ended_error(-int(getattr(signal, sig)))
    assert not isinstance(err, sandbox.SandboxMemory)
    assert f"stopped from outside ({sig})" in str(err) and "memory" not in str(err)
    assert "signal 77" in str(sandbox._ended_error(-77))  # no name: its number


# (an expression, and the same value as DuckDB itself prints it: the reference)
AS_DUCKDB_PRINTS = [
    "x'DEADBEEF41'::BLOB",
    "'ab\\x5Cc\\x00'::BLOB",
    "'nan'::DOUBLE",
    "'inf'::DOUBLE",
    "'-inf'::FLOAT",
    "INTERVAL 1 DAY",
    "INTERVAL '2 months 3 days 01:02:03.5'",
    "INTERVAL '-1 year 2 hours'",
    "INTERVAL '14 months'",
    "INTERVAL '0 seconds'",
    "INTERVAL '-90 minutes'",
    # dates and timestamps as text: Python's datetime stops at the years 1 and 9999
    "DATE '2020-02-29'",
    "'infinity'::DATE",
    "'-infinity'::DATE",
    "DATE '0001-01-01' - 1",
    "TIMESTAMP '2020-01-01 10:00:00.5'",
    "TIMESTAMP '2020-01-01 10:00:00'",
    "'infinity'::TIMESTAMP",
    "'-infinity'::TIMESTAMP",
    "'294247-01-10'::TIMESTAMP",
    "TIMESTAMP '0001-01-01 10:00:00' - INTERVAL 1 DAY",
    "TIMESTAMP_NS '2020-01-01 10:00:00.123456789'",
    "TIMESTAMP_S '2020-01-01 10:00:00'",
    "TIMESTAMPTZ '2020-01-01 10:00+02'",
]


def test_values_json_cannot_carry_come_back_as_duckdb_prints_them(log):
    """BLOBs, NaN and infinities, and INTERVALs reach the page and the API as DuckDB's own
    text of them (not an encoding error, an empty cell or a (months, days, ns) triple);
    nested in a list or a struct too; finite numbers stay numbers."""
    sql = "SELECT " + ", ".join(f"({e}) AS c{i}" for i, e in enumerate(AS_DUCKDB_PRINTS))
    df, _ = run_readonly_query(log, sql)
    want = duckdb.sql(sql.replace(") AS c", ")::VARCHAR AS c")).fetchall()[0]
    assert tuple(df.iloc[0]) == want
    df, _ = run_readonly_query(
        log, "SELECT [1.5, 'nan'::DOUBLE] AS l, {'b': x'00FF'::BLOB, 'n': 2.0::DOUBLE} AS s"
    )
    assert df.iloc[0]["l"] == [1.5, "nan"] and df.iloc[0]["s"] == {"b": "\\x00\\xFF", "n": 2.0}
    import json

    from metaattn_viz.app.api import table_json

    assert json.loads(json.dumps(table_json(df)))["rows"] == [[[1.5, "nan"], {"b": "\\x00\\xFF", "n": 2.0}]]


def test_decimals_and_hugeints_are_numbers(log):
    """sum() of integers is a HUGEINT, which Arrow hands over as a DECIMAL: a number on the
    page and in JSON, not the text '10'; one past 64 bits is its exact text, which JSON's
    encoders carry (orjson, Gradio's, refuses such a number: the answer failed)."""
    df, _ = run_readonly_query(
        log,
        "SELECT sum(x) AS s, 1.5::DECIMAL(10, 2) AS d, 170141183460469231731687303715884105727::HUGEINT AS h "
        "FROM range(5) r(x)",
    )
    assert df.iloc[0].tolist() == [10, 1.5, "170141183460469231731687303715884105727"]
    import orjson

    from metaattn_viz.app.api import table_json

    assert orjson.loads(orjson.dumps(table_json(df)))["rows"] == [
        [10, 1.5, "170141183460469231731687303715884105727"]
    ]


def test_a_query_nested_past_what_can_be_checked_is_refused_in_words(log):
    """DuckDB parses 400 nested calls; the checker's walk of its tree is refused in words
    rather than failing with Python's RecursionError."""
    for deep in ("abs(" * 400 + "1" + ")" * 400, "(SELECT " * 400 + "1" + ")" * 400):
        with pytest.raises(ConsoleRefused, match="nests too deeply"):
            run_readonly_query(log, f"SELECT {deep} AS x")


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT repeat('x', 20000000) AS s",  # one 20 MB value (100 MB crashed a Chromium tab)
        "SELECT repeat('x', 100000) AS s FROM range(400)",  # 40 MB over rows under the row cap
    ],
)
def test_an_answer_larger_than_the_byte_cap_is_refused_in_words(log, sql):
    from metaattn_viz.store.sandbox import MAX_RESULT_BYTES

    with pytest.raises(ConsoleError, match=f"more than the console's {MAX_RESULT_BYTES >> 20} MB"):
        run_readonly_query(log, sql)
    df, _ = run_readonly_query(log, "SELECT len(repeat('x', 1000000)) AS n")  # 1 MB is fine
    assert df.iloc[0, 0] == 1_000_000


def test_a_query_over_more_rows_than_the_console_takes_points_to_the_export(log, monkeypatch):
    from metaattn_viz.store import console

    monkeypatch.setattr(console, "MAX_INPUT_ROWS", 100)  # the fixture's routes: 3 runs x 4 x 10
    with pytest.raises(ConsoleError, match=r"reads 120 rows \(routes: 120\).*export the log"):
        run_readonly_query(log, "SELECT count(*) FROM routes")
    df, _ = run_readonly_query(log, "SELECT count(*) AS n FROM tokens")
    assert df.iloc[0, 0] == 30


def test_a_worker_lifts_its_address_space_cap_between_queries(tmp_path):
    """The cap a query runs under must not stay for the next request, whose rows are read
    before its own cap is set (a reused worker failed every other query on a large log)."""
    code = (
        "import resource\n"
        "from metaattn_viz.store.sandbox_worker import _limit_address_space\n"
        "hard = resource.getrlimit(resource.RLIMIT_AS)[1]\n"
        "_limit_address_space(query=True)\n"
        "during = resource.getrlimit(resource.RLIMIT_AS)[0]\n"
        "_limit_address_space(query=False)\n"
        "print(during != hard, resource.getrlimit(resource.RLIMIT_AS)[0] == hard)\n"
    )
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=root)
    assert out.stdout.split() == ["True", "True"]


def test_the_pages_table_shows_nested_values_as_duckdb_prints_them(log):
    """A browser table shows a dict as "[object Object]": the page gets DuckDB's text of
    STRUCT, MAP and LIST cells (the API keeps them as JSON)."""
    from metaattn_viz.app.display import sql_table

    exprs = [
        "{'layer': 1, 'n': 2, 's': 'x'}",
        "map([0, 1], [10, 20])",
        "[{'a': 1}]",
        "['x', 'y']",
        "{'a': NULL, 'b': [1.5], 't': true}",
    ]
    sql = "SELECT " + ", ".join(f"({e}) AS c{i}" for i, e in enumerate(exprs))
    df, _ = run_readonly_query(log, sql)
    want = duckdb.sql(sql.replace(") AS c", ")::VARCHAR AS c")).fetchall()[0]
    assert tuple(sql_table(df).iloc[0]) == want
    assert isinstance(df.iloc[0]["c0"], dict)  # the console's own answer is untouched


def test_the_pages_table_shows_columns_of_the_same_name_each(log):
    """Two columns named alike (a query's own, or a join's run_id) are each shown as they
    came, by position; a nested cell in either is written as DuckDB prints it."""
    from metaattn_viz.app.display import sql_table

    df, _ = run_readonly_query(log, "SELECT 1 AS a, 2 AS a, [1, 2] AS s, {'x': 3} AS s, 'v' AS S")
    shown = sql_table(df)
    assert list(shown.columns) == ["a", "a", "s", "s", "S"]
    assert shown.iloc[0].tolist() == [1, 2, "[1, 2]", "{'x': 3}", "v"]
    assert list(df.iloc[0, 2]) == [1, 2]  # the console's own answer is untouched

    joined, _ = run_readonly_query(
        log, "SELECT * FROM runs r JOIN tokens t ON r.run_id = t.run_id ORDER BY t.pos LIMIT 3"
    )
    shown = sql_table(joined)
    assert list(shown.columns).count("run_id") == 2 and shown.shape == joined.shape
    ids = shown.iloc[:, [i for i, c in enumerate(shown.columns) if c == "run_id"]]
    assert (ids.iloc[:, 0] == ids.iloc[:, 1]).all()
