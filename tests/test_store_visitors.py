"""Visitors apart in the routing log (metaattn_viz/store/, owners.py): a reader scoped to
an owner sees that owner's runs and nothing of anyone else's, through every reading
method, the export and the SQL console, including queries written to reach the base
tables; an unscoped reader sees every run."""

from __future__ import annotations

import duckdb
import pandas as pd
import pytest
from helpers import synthetic_trace

from metaattn_viz import store
from metaattn_viz.core.settings import FULL
from metaattn_viz.store import RunLog, UnknownRun, session_owner, user_owner
from metaattn_viz.store.console import ConsoleError, _visible_tables, run_readonly_query
from metaattn_viz.store.owners import check_owner
from metaattn_viz.store.schema import LOG_TABLES

A, B = session_owner("browser-session-a"), session_owner("browser-session-b")
SECRET = "B's secret prompt"


@pytest.fixture
def visitors(tmp_path):
    """A log with 2 runs of A, 1 of B (a secret prompt) and 1 of the CLI (no owner)."""
    path = tmp_path / "routing.duckdb"
    runs: dict[str | None, list[str]] = {A: [], B: [], None: []}
    traces = {}
    with RunLog(path) as log:
        for i, owner in enumerate((A, A, B, None)):
            tr = synthetic_trace(n_layers=3, n_tokens=6 + i, seed=70 + i)
            tr.prompt = SECRET if owner == B else f"prompt {i}"
            rid = log.start_run(tr, owner=owner)
            log.finish(rid, tr, "stopped" if i == 1 else "done")
            runs[owner].append(rid)
            traces[rid] = tr
    with RunLog(path) as log:
        yield log, runs, traces


def leaks(df: pd.DataFrame, runs) -> bool:
    """Does any cell of `df` hold B's or the CLI's run id, or B's prompt?"""
    others = set(runs[B]) | set(runs[None])
    text = [str(v) for v in df.to_numpy().ravel()] + [str(c) for c in df.columns]
    return any(SECRET in t or any(o in t for o in others) for t in text)


def test_a_visitors_rows_name_neither_the_servers_process_nor_its_machine(visitors):
    import os
    import socket

    log, runs, _ = visitors
    for owner in (A, B):
        row = log.get_run(runs[owner][0], owner=owner)
        assert row["pid"] is None and row["host"] is None, row
    cli = log.get_run(runs[None][0])  # the CLI's run (no owner) keeps them
    assert cli["pid"] == os.getpid() and cli["host"] == socket.gethostname()


def test_owner_keys():
    assert session_owner("abc") == session_owner("abc") != session_owner("abd")
    assert "abc" not in session_owner("abc")  # a live session id is never stored
    assert user_owner(" alice ") == "user:alice"
    for bad in ("", "  ", 7, "x" * 201):
        with pytest.raises(ValueError, match="owner must be"):
            check_owner(bad)
    with pytest.raises(ValueError):
        session_owner("")


def test_list_runs_shows_each_owner_its_own_and_unscoped_everything(visitors):
    log, runs, _ = visitors
    assert sorted(log.list_runs(owner=A)["run_id"]) == sorted(runs[A])
    assert log.list_runs(owner=B)["run_id"].tolist() == runs[B]
    assert log.list_runs(owner=session_owner("nobody")).empty
    assert len(log.list_runs()) == 4  # unscoped: the shared log, as before
    assert log.list_runs(text="secret", owner=A).empty
    assert log.list_runs(status="stopped", owner=A)["run_id"].tolist() == [runs[A][1]]
    with pytest.raises(ValueError, match="owner must be"):
        log.list_runs(owner="")
    with pytest.raises(ValueError, match="owner must be"):
        log.start_run(synthetic_trace(n_layers=2, n_tokens=3), owner="")


def test_another_owners_run_is_unknown_in_the_words_of_a_missing_one(visitors):
    log, runs, traces = visitors
    b_run, missing = runs[B][0], "0" * 36
    with pytest.raises(UnknownRun) as theirs:
        log.load_trace(b_run, owner=A)
    with pytest.raises(UnknownRun) as nobodys:
        log.load_trace(missing, owner=A)
    assert str(theirs.value).replace(b_run, "?") == str(nobodys.value).replace(missing, "?")
    for call in (
        lambda: log.get_run(b_run, owner=A),
        lambda: log.load_trace(runs[None][0], owner=A),
        lambda: log.compare(runs[A][0], b_run, owner=A),
        lambda: log.compare(b_run, runs[A][0], owner=A),
    ):
        with pytest.raises(UnknownRun):
            call()
    own = log.load_trace(runs[A][0], owner=A)  # A replays and compares its own
    assert own.run_id == runs[A][0] and own.prompt == traces[runs[A][0]].prompt
    assert len(log.compare(runs[A][0], runs[A][1], owner=A)) == max(traces[r].n_tokens for r in runs[A])
    assert log.load_trace(b_run).prompt == SECRET  # unscoped reads every run


def test_analytics_count_only_the_owners_runs(visitors):
    log, runs, traces = visitors
    mine = [traces[r] for r in runs[A]]
    by_layer = log.full_attention_share_by_layer(owner=A)
    assert by_layer["decisions"].tolist() == [sum(t.n_tokens for t in mine)] * 3
    assert by_layer["full_share"].tolist() == pytest.approx(
        [
            sum((t.routes[layer] == FULL).sum() for t in mine) / sum(t.n_tokens for t in mine)
            for layer in range(3)
        ]
    )
    assert log.full_attention_share_by_layer(runs[B][0], owner=A).empty
    assert log.full_attention_share_by_budget(owner=A)["runs"].sum() == 2
    assert (
        log.uncertainty_vs_budget(owner=B)["decisions"].sum()
        == traces[runs[B][0]].n_layers * traces[runs[B][0]].n_tokens
    )
    over_time = log.runs_over_time(owner=A)
    assert (over_time["runs"].sum(), over_time["stopped"].sum()) == (2, 1)
    assert log.runs_over_time()["runs"].sum() == 4
    top = log.tokens_most_often_full(limit=100, min_occurrences=1, owner=B)
    assert set(top["token"]) <= set(traces[runs[B][0]].tokens)


def test_export_of_an_owner_holds_only_its_runs(visitors, tmp_path):
    log, runs, traces = visitors
    counts = log.export(tmp_path / "a", "parquet", owner=A)
    mine = [traces[r] for r in runs[A]]
    assert counts == {
        "runs": 2,
        "tokens": sum(t.n_tokens for t in mine),
        "routes": sum(t.n_layers * t.n_tokens for t in mine),
        "experts": 3,
    }
    with duckdb.connect() as con:
        for table in ("runs", "tokens", "routes"):
            ids = {
                r[0]
                for r in con.execute(
                    f"SELECT DISTINCT run_id FROM read_parquet('{tmp_path}/a/{table}/**/*.parquet')"
                ).fetchall()
            }
            assert ids == set(runs[A]), table
        assert (
            con.execute(
                f"SELECT count(*) FROM read_parquet('{tmp_path}/a/runs/**/*.parquet') WHERE prompt = $s",
                {"s": SECRET},
            ).fetchone()[0]
            == 0
        )
    assert store.export(log, tmp_path / "all", "csv")["runs"] == 4  # unscoped: everything


def test_the_console_answers_an_owner_over_its_own_rows(visitors):
    log, runs, traces = visitors
    df, _ = run_readonly_query(log, "SELECT run_id, owner FROM runs", owner=A)
    assert sorted(df["run_id"]) == sorted(runs[A]) and set(df["owner"]) == {A}
    for table in ("tokens", "routes"):
        df, _ = run_readonly_query(log, f"SELECT DISTINCT run_id FROM {table}", owner=A)
        assert sorted(df["run_id"]) == sorted(runs[A]), table
    df, _ = run_readonly_query(log, "SELECT count(*) FROM tokens", owner=B)
    assert df.iloc[0, 0] == traces[runs[B][0]].n_tokens
    df, _ = run_readonly_query(log, "SELECT count(*) FROM experts", owner=B)
    assert df.iloc[0, 0] == 3  # the lookup holds no runs: everyone sees it
    df, _ = run_readonly_query(log, "SELECT count(*) FROM runs")  # unscoped: every run
    assert df.iloc[0, 0] == 4


def tricks(log) -> list[str]:
    """Queries written to reach the base tables or other rows."""
    db = str(log.path).replace("'", "''")
    catalog = log.fresh_cursor().execute("SELECT current_database()").fetchone()[0]
    return [
        f"SELECT * FROM {catalog}.main.runs",
        f'SELECT * FROM "{catalog}".runs',
        f"SELECT prompt FROM runs UNION ALL SELECT prompt FROM {catalog}.main.runs",
        "SELECT * FROM main.runs",
        "SELECT * FROM memory.main.runs",
        "SELECT * FROM temp.main.runs",
        "SELECT * FROM system.main.runs",
        "SELECT * FROM runs_before_v2",
        "SELECT * FROM duckdb_tables()",
        "SELECT * FROM duckdb_views()",
        "SELECT * FROM duckdb_databases()",
        "SELECT * FROM information_schema.tables",
        "SELECT * FROM information_schema.columns",
        "SELECT * FROM query_table('runs')",
        "SELECT * FROM query('SELECT * FROM runs')",
        f"ATTACH '{db}' AS log (READ_ONLY)",
        f"SELECT * FROM read_parquet('{db}')",
        f"SELECT * FROM read_duckdb('{db}')",
        f"SELECT * FROM '{db}'",
        f"SELECT content FROM read_text('{db}')",
        f"SELECT content FROM read_blob('{db}')",
        "SELECT * FROM glob('*')",
        "DESCRIBE runs",
        "SUMMARIZE runs",
        "SUMMARIZE tokens",
        "SELECT * FROM runs, tokens, routes LIMIT 5",
    ]


def test_no_console_query_reaches_another_owners_rows(visitors):
    log, runs, _ = visitors
    answered = 0
    for sql in tricks(log):
        try:
            df, _ = run_readonly_query(log, sql, owner=A)
        except ConsoleError:
            continue  # refused by the parser, or an error in the sandbox
        answered += 1
        assert not leaks(df, runs), sql
    assert answered >= 4  # DESCRIBE, SUMMARIZE, the join, ... were answered


def test_even_past_the_parser_the_sandbox_holds_only_the_owners_rows(visitors):
    """The parser's checks switched off: each trick goes straight to the sandbox, with
    every log table the console would copy for A. What it can reach is A's rows only."""
    from metaattn_viz.store import sandbox

    log, runs, _ = visitors
    cur = log.fresh_cursor()
    try:
        tables = _visible_tables(cur, set(LOG_TABLES), owner=A)
    finally:
        cur.close()
    assert sorted(tables["runs"]["run_id"].to_pylist()) == sorted(runs[A])
    answered = 0
    for sql in tricks(log) + [
        "SELECT sql FROM duckdb_views()",
        "SELECT * FROM duckdb_tables() t, duckdb_columns() c",
        "SELECT * FROM duckdb_settings()",
    ]:
        try:
            result = sandbox.run_query(sql, tables, max_rows=1000, timeout_s=5)
        except sandbox.SandboxError:
            continue
        answered += 1
        assert not leaks(result.table.to_pandas(), runs), sql
    assert answered >= 8
