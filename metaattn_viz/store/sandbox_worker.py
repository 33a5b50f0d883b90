"""The SQL console's worker process: answers one query at a time on a fresh, hardened,
in-memory DuckDB that holds only the rows it was sent (sandbox.py starts and kills it).

Run as a script (`python -I sandbox_worker.py`): it imports nothing but the standard
library, duckdb and pyarrow, so it starts fast and does not need this package on the
path; sandbox.py imports it for the framing (`write_frame`, `read_frame`), the one
definition of the protocol.

Protocol, over stdin/stdout, each message a frame (4-byte big-endian length + bytes):
the worker first sends READY; a request is a JSON header {sql, max_rows, max_bytes,
timeout_s, memory_limit, threads, tables} followed by one Arrow IPC stream per name in
`tables`; the answer is a JSON header {ok, ...} followed, when ok, by the result as an
Arrow IPC stream of at most max_rows + 1 rows and about max_bytes (a larger answer is an
error: one 100 MB value is enough to crash a browser tab). A failed answer's kind is
"timeout" (interrupted at the time limit), "memory" (it needed more than its memory cap)
or "error" (with DuckDB's message). Values of a type Arrow or Python would not carry as
they are (TIME '24:00:00', TIMETZ's offset, any UHUGEINT (one past 2^127 wrapped), a VARINT, BIT,
dates and timestamps past Python's years) travel as DuckDB's own text of them.

It must never open a file, a URL or another database, nor keep anything from one
request to the next (each gets its own DuckDB instance, closed after it); DuckDB does not
spill to disk either (no temp_directory): a query over its memory cap fails. Its time limit
is cooperative (DuckDB's interrupt); sandbox.py kills it when DuckDB cannot stop (one
huge scalar value), which is why it is a process of its own.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
import time
from typing import IO, TYPE_CHECKING, Any, cast

import pyarrow as pa

if TYPE_CHECKING:
    import duckdb
    from duckdb.sqltypes import DuckDBPyType

READY = b"ready"
_LENGTH = struct.Struct(">I")
# Address space a query may add to the worker (Linux): DuckDB's memory_limit does not
# cover the values a scalar function builds, this does, so `repeat('a', 2000000000)`
# fails at once instead of running until the kill.
ADDRESS_SPACE_HEADROOM = 1 << 30


def _limit_address_space(query: bool) -> None:
    """For a query (`query`): cap this process's address space at what it maps now (its
    request's rows among it) plus the headroom. Between queries: lift the cap again (the
    soft limit back to the hard one), or the next request's rows, read under the last
    query's cap, would fail with a MemoryError and end the worker."""
    try:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        if not query:
            resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
            return
        with open("/proc/self/status") as f:
            size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
        soft = size + ADDRESS_SPACE_HEADROOM
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    except (ImportError, OSError, StopIteration, ValueError):
        pass  # not Linux: the time limit (the kill) still bounds a query


def write_frame(out: IO[bytes], payload: bytes) -> None:
    out.write(_LENGTH.pack(len(payload)))
    out.write(payload)


def read_frame(inp: IO[bytes]) -> bytes | None:
    """The next frame, or None at the end of the stream (the other side went away)."""
    head = inp.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    n = _LENGTH.unpack(head)[0]
    payload = inp.read(n)
    if len(payload) < n:
        return None
    return payload


def to_ipc(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return sink.getvalue().to_pybytes()


def from_ipc(payload: bytes) -> pa.Table:
    return pa.ipc.open_stream(payload).read_all()


def hardened_connection(memory_limit: str, threads: int) -> duckdb.DuckDBPyConnection:
    """A fresh in-memory DuckDB with no way out: no files, URLs or other databases
    (enable_external_access), no extensions to load or install, no Python variables as
    tables, a memory and thread cap, no spilling to disk, and a configuration no query
    can change. Without temp_directory = '' DuckDB spills a sort or join past its memory
    cap into .tmp under the server's working directory (up to 90% of the disk, and a
    worker killed at the time limit leaves its files behind); with it, the query fails
    with an out-of-memory error."""
    import duckdb  # here, not at import: the parent imports this module for the wire format

    return duckdb.connect(
        ":memory:",
        config={
            "enable_external_access": False,
            "autoload_known_extensions": False,
            "autoinstall_known_extensions": False,
            "allow_community_extensions": False,
            "allow_unsigned_extensions": False,
            "python_enable_replacements": False,
            "memory_limit": memory_limit,
            "threads": threads,
            "temp_directory": "",  # no spilling: a file the worker would write
            "lock_configuration": True,  # last: it locks the settings above
        },
    )


# DuckDB types whose values Arrow and Python carry as they are; a value of any other type
# (at any depth of a LIST, ARRAY, STRUCT, MAP or UNION) is sent as DuckDB's text of it.
CARRIED_TYPES = frozenset(
    {
        "boolean",
        "tinyint",
        "smallint",
        "integer",
        "bigint",
        "hugeint",
        "utinyint",
        "usmallint",
        "uinteger",
        "ubigint",
        "float",
        "double",
        "decimal",
        "varchar",
        "blob",
        "interval",
    }
)


def _quoted(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _shown_type(t: DuckDBPyType) -> str | None:
    """The type to cast a value of type `t` to before the Arrow export, so that it arrives
    as DuckDB shows it: None where it arrives as it is (CARRIED_TYPES, and containers of
    them), VARCHAR for any other value, containers rebuilt around their cast members."""
    kind = t.id
    if kind in CARRIED_TYPES:
        return None
    if kind not in ("list", "array", "struct", "map", "union"):
        return "VARCHAR"
    children = list(t.children)
    size = children[1][1] if kind == "array" else None  # an ARRAY's: its members' type, its size
    members = [
        (name, cast("DuckDBPyType", member))
        for name, member in (children[:1] if kind == "array" else children)
        if not (kind == "union" and name == "")  # a UNION's tag, not a member
    ]
    shown = [_shown_type(member) for _, member in members]
    if all(s is None for s in shown):
        return None
    types = [s if s is not None else str(member) for s, (_, member) in zip(shown, members, strict=True)]
    if kind == "list":
        return f"{types[0]}[]"
    if kind == "array":
        return f"{types[0]}[{size}]"
    if kind == "map":
        return f"MAP({types[0]}, {types[1]})"
    fields = ", ".join(f"{_quoted(name)} {typ}" for (name, _), typ in zip(members, types, strict=True))
    return f"{kind.upper()}({fields})"


def _as_shown(rel: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """`rel` with each column whose values Arrow would not carry as DuckDB shows them cast
    to the type _shown_type gives. Columns are taken by position and every one named
    again: two may share a name, which a projection would otherwise rename (a, a_1)."""
    shown = [_shown_type(t) for t in rel.types]
    if all(s is None for s in shown):
        return rel
    columns = [
        f"{f'#{i}' if s is None else f'CAST(#{i} AS {s})'} AS {_quoted(name)}"
        for i, (s, name) in enumerate(zip(shown, rel.columns, strict=True), start=1)
    ]
    return rel.project(", ".join(columns))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _too_large(size: int, max_bytes: int) -> str:
    return (
        f"the answer holds at least {size / 2**20:,.1f} MB, more than the console's "
        f"{max_bytes / 2**20:,.0f} MB; select fewer rows or columns, or shorten long values "
        "(left(col, 200))"
    )


def answer(request: dict[str, Any], tables: dict[str, pa.Table]) -> tuple[dict[str, Any], pa.Table | None]:
    """(header, result table) for one request."""
    import duckdb

    con = hardened_connection(request["memory_limit"], int(request["threads"]))
    timer = threading.Timer(float(request["timeout_s"]), con.interrupt)
    timer.daemon = True
    try:
        for name, table in tables.items():
            con.register(name, table)
        limit = int(request["max_rows"]) + 1
        max_bytes = int(request["max_bytes"])
        t0 = time.perf_counter()
        timer.start()
        try:
            reader = _as_shown(con.sql(request["sql"])).to_arrow_reader(min(limit, 100_000))
            batches, n, size = [], 0, 0
            while n < limit:  # the result streams: rows past the cap are never computed
                try:
                    batch = reader.read_next_batch()
                except StopIteration:
                    break
                batches.append(batch)
                n += batch.num_rows
                size += batch.nbytes
                if size > max_bytes:
                    return {"ok": False, "kind": "error", "message": _too_large(size, max_bytes)}, None
            result = pa.Table.from_batches(batches, reader.schema).slice(0, limit)
        finally:
            timer.cancel()
        elapsed = time.perf_counter() - t0
        return {"ok": True, "elapsed": elapsed}, result
    except duckdb.InterruptException:
        return {"ok": False, "kind": "timeout"}, None
    except (duckdb.OutOfMemoryException, MemoryError):  # DuckDB's cap, or the address space's
        return {"ok": False, "kind": "memory"}, None
    except (duckdb.Error, pa.ArrowException) as exc:
        return {"ok": False, "kind": "error", "message": _first_line(exc)}, None
    finally:
        con.close()


def main() -> None:
    # The protocol owns the real stdout; anything else printing there goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    inp = sys.stdin.buffer
    write_frame(out, READY)
    out.flush()
    while True:
        _limit_address_space(query=False)  # the next request's rows may need more
        head = read_frame(inp)
        if head is None:
            return
        request = json.loads(head)
        tables = {}
        for name in request["tables"]:
            payload = read_frame(inp)
            if payload is None:
                return
            tables[name] = from_ipc(payload)
        _limit_address_space(query=True)
        header, result = answer(request, tables)
        del tables
        body = None
        if result is not None:
            try:
                body = to_ipc(result)
            except MemoryError:
                header = {"ok": False, "kind": "memory"}
        write_frame(out, json.dumps(header).encode())
        if body is not None:
            write_frame(out, body)
        out.flush()


if __name__ == "__main__":
    main()
