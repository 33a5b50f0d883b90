"""The SQL console's values by column type (metaattn_viz/store/console.py and the worker's
casts in sandbox_worker.py): every type reaches the page and the API as DuckDB shows it
(DuckDB's own ::VARCHAR is the reference), nested values as their top-level twins, and a
type that cannot be shown is a sentence, never a raw exception."""

from __future__ import annotations

import json

import duckdb
import pyarrow as pa
import pytest

from metaattn_viz.app.api import table_json
from metaattn_viz.app.display import sql_table
from metaattn_viz.store.console import ConsoleError, _column_values, run_readonly_query


@pytest.fixture(scope="module")
def con():
    return duckdb.connect()


def duckdb_text(expr: str):
    """DuckDB's own text of `expr` (the reference); skip where this DuckDB lacks its type."""
    try:
        return duckdb.sql(f"SELECT ({expr})::VARCHAR").fetchall()[0][0]
    except duckdb.Error as exc:
        pytest.skip(f"this DuckDB cannot evaluate {expr}: {exc}")


# Values Arrow would not carry as they are: top level, shown as DuckDB's text.
AS_TEXT = [
    "340282366920938463463374607431768211455::UHUGEINT",  # 2^128 - 1: wrapped to -1
    "170141183460469231731687303715884105728::UHUGEINT",  # 2^127: wrapped negative
    "1::UHUGEINT",
    "TIMETZ '10:00:00+02'",  # the offset was lost
    "TIMETZ '23:59:59.25-05:30'",
    "TIME '24:00:00'",  # shown as 00:00:00
    "TIME '10:00:00.5'",
    "1::VARINT",  # a UnicodeDecodeError
    "-12345678901234567890123456789012345678901234567890::VARINT",
    "'101'::BIT",  # its bytes
    "DATE '2020-02-29'",
    "'infinity'::DATE",
    "TIMESTAMPTZ '2020-01-01 10:00:00+02'",
    "'POINT(1 2)'::GEOMETRY",
    "1::VARIANT",
]


@pytest.mark.parametrize("expr", AS_TEXT)
def test_a_value_arrow_cannot_carry_is_shown_as_duckdb_prints_it(con, expr):
    want = duckdb_text(expr)
    df, _ = run_readonly_query(con, f"SELECT {expr} AS v")
    assert df.iloc[0]["v"] == want
    assert json.loads(json.dumps(table_json(df)))["rows"] == [[want]]


# Nested values: (the expression, its leaves, how the console holds them) - each leaf as
# DuckDB prints it alone.
NESTED = [
    ("[{0}]", ["DATE '2020-01-01'"], lambda a: [a]),
    ("[{0}, {1}]", ["TIMESTAMP '2020-01-01 10:00:00.5'", "'infinity'::TIMESTAMP"], lambda a, b: [a, b]),
    ("[{0}]", ["TIME '24:00:00'"], lambda a: [a]),
    (
        "{{'t': {0}, 'u': {1}}}",
        ["TIMETZ '10:00:00+02'", "340282366920938463463374607431768211455::UHUGEINT"],
        lambda a, b: {"t": a, "u": b},
    ),
    ("{{'a b\"': {0}}}", ["TIME '10:00:00.25'"], lambda a: {'a b"': a}),  # a name to quote in the cast
    ("MAP {{'k': {0}}}", ["TIME '24:00:00'"], lambda a: [("k", a)]),
    ("[{0}]::TIMETZ[1]", ["TIMETZ '10:00:00+02'"], lambda a: [a]),
    ("[[{0}], []]", ["1::VARINT"], lambda a: [[a], []]),
    ("union_value(k := {0})", ["TIME '24:00:00'"], lambda a: a),
]


@pytest.mark.parametrize("template, leaves, shape", NESTED)
def test_a_nested_value_is_shown_as_duckdb_prints_its_members(con, template, leaves, shape):
    want = shape(*(duckdb_text(leaf) for leaf in leaves))
    df, _ = run_readonly_query(con, f"SELECT {template.format(*leaves)} AS v")
    assert df.iloc[0]["v"] == want


def test_the_pages_table_shows_a_list_of_dates_as_duckdb_prints_it(con):
    df, _ = run_readonly_query(con, "SELECT [DATE '2020-01-01', 'infinity'::DATE] AS v")
    assert sql_table(df).iloc[0]["v"] == duckdb_text("[DATE '2020-01-01', 'infinity'::DATE]")


@pytest.mark.parametrize(
    "expr, top, nested",
    [
        ("DATE '2020-01-01'", "2020-01-01", ["2020-01-01"]),  # not 2020-01-01T00:00:00.000
        ("TIMESTAMP '2020-01-01 10:00:00.5'", "2020-01-01 10:00:00.5", ["2020-01-01 10:00:00.5"]),
        ("1::HUGEINT", 1, [1]),  # not the text "1"
        ("1.5::DECIMAL(4, 1)", 1.5, [1.5]),
        ("18446744073709551615::HUGEINT", 2**64 - 1, [2**64 - 1]),  # the largest a JSON number
        ("-9223372036854775808::HUGEINT", -(2**63), [-(2**63)]),
        # past 64 bits: the exact text (orjson, which Gradio answers with, refuses the number)
        ("170141183460469231731687303715884105727::HUGEINT", str(2**127 - 1), [str(2**127 - 1)]),
        ("99999999999999999999999999999999999999::DECIMAL(38, 0)", "9" * 38, ["9" * 38]),
    ],
)
def test_a_nested_value_reaches_json_as_its_top_level_twin(con, expr, top, nested):
    import orjson

    df, _ = run_readonly_query(con, f"SELECT {expr} AS t, [{expr}] AS l, {{'s': {expr}}} AS s")
    rows = orjson.loads(orjson.dumps(table_json(df)))["rows"]  # the encoder the page's answer goes through
    assert rows == [[top, nested, {"s": top}]]


def test_a_map_of_decimals_holds_numbers(con):
    df, _ = run_readonly_query(con, "SELECT MAP {'a': 1.5} AS m")
    assert json.loads(json.dumps(table_json(df)))["rows"] == [[[["a", 1.5]]]]


def test_cast_columns_keep_their_names_and_order(con):
    """The worker casts by position: two columns may share a name; ORDER BY still holds."""
    df, _ = run_readonly_query(
        con,
        "SELECT TIME '24:00:00' AS a, 1 AS a, DATE '2020-01-01' + range::INT AS d "
        "FROM range(3) ORDER BY d DESC",
    )
    assert list(df.columns) == ["a", "a", "d"]
    assert [tuple(r) for r in df.itertuples(index=False)] == [
        ("24:00:00", 1, "2020-01-03"),
        ("24:00:00", 1, "2020-01-02"),
        ("24:00:00", 1, "2020-01-01"),
    ]


@pytest.mark.parametrize(
    "column",
    [
        pa.chunked_array([pa.array([b"0123456789abcdef"], pa.uuid())]),  # an Arrow extension type
        pa.chunked_array([pa.array([2**62], pa.timestamp("s"))]),  # past Python's datetime
    ],
    ids=["extension", "overflow"],
)
def test_a_value_that_cannot_be_shown_is_a_sentence_naming_the_column(column):
    with pytest.raises(ConsoleError, match=r"column 'x' holds a value that cannot be shown .*x::VARCHAR"):
        _column_values(column, "x")


# Strings inside nested values: DuckDB quotes some (and escapes \ and ') and leaves others bare.
NESTED_STRINGS = [
    *("a", "x y", "é x", "1", "-", "a;b", "a|b", "a/b", "a>b", "a\tb", "a\nb", "\u00a0a"),
    *("", "  ", " lead", "trail ", "\tlead", "\nx", "x\r", "\vx", "\fx"),
    *("it's", "a\\b", "a,b", "[x]", "{k}", "(x)", "a:b", "a=b", 'q"d', "'"),
    *("NULL", "null", "nULl", "NULL "),
]


def test_the_pages_table_quotes_strings_inside_nested_values_as_duckdb_does(con):
    """Each string in a LIST, as a STRUCT's value and field name, and as a MAP's key and
    value: the page's text is DuckDB's own ::VARCHAR of the same value."""
    for text in NESTED_STRINGS:
        s = "'" + text.replace("'", "''") + "'"  # an SQL literal (a backslash is itself)
        exprs = [f"[{s}, 'b']", f"{{'k': {s}, 'it''s a \\': 1}}", f"MAP([{s}], [{s}])", f"[[{s}], NULL]"]
        sql = "SELECT " + ", ".join(f"{e} AS c{i}" for i, e in enumerate(exprs))
        want = con.execute(sql.replace(" AS c", "::VARCHAR AS c")).fetchall()[0]
        df, _ = run_readonly_query(con, sql)
        shown = tuple(sql_table(df).iloc[0])
        assert shown == want, (text, shown, want)


def test_the_api_carries_every_double_and_timestamp_exactly(con):
    """/sql and /runs rounded every float to 10 decimal places (1.234e-12 read 0.0, 0.1 + 0.2
    read 0.3, a budget of 0.24000000000000002 read 0.24) and cut timestamps to milliseconds:
    pandas' to_json. Each value now reaches JSON as Python has it."""
    import pandas as pd

    df, _ = run_readonly_query(con, "SELECT 1.234e-12::DOUBLE AS s, 0.1::DOUBLE + 0.2::DOUBLE AS x")
    assert json.loads(json.dumps(table_json(df)))["rows"] == [[1.234e-12, 0.1 + 0.2]]
    # /runs: the log's own DataFrame (timestamps with microseconds, a missing value, numpy ints)
    runs = pd.DataFrame(
        {
            "created_at": [pd.Timestamp("2026-12-08 02:25:59.843445", tz="UTC")],
            "kl": [float("nan")],
            "n": pd.array([42], dtype="int64"),
            "budget": [0.24000000000000002],
        }
    )
    rows = json.loads(json.dumps(table_json(runs)))["rows"]
    assert rows == [["2026-12-08T02:25:59.843445+00:00", None, 42, 0.24000000000000002]]
    assert pd.Timestamp(rows[0][0]) == runs["created_at"][0]
