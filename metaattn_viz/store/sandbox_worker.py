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
error: one 100 MB value is enough to crash a browser tab).

It must never open a file, a URL or another database, nor keep anything from one
request to the next (each gets its own DuckDB instance, closed after it). Its time limit
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
from typing import IO, TYPE_CHECKING, Any

import pyarrow as pa

if TYPE_CHECKING:
    import duckdb

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
    tables, a memory and thread cap, and a configuration no query can change."""
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
            "lock_configuration": True,  # last: it locks the settings above
        },
    )


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
            reader = con.sql(request["sql"]).to_arrow_reader(min(limit, 100_000))
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
    except (duckdb.Error, pa.ArrowException) as exc:
        return {"ok": False, "kind": "error", "message": _first_line(exc)}, None
    except MemoryError:  # the address-space cap, met outside DuckDB
        return {"ok": False, "kind": "error", "message": "Out of Memory Error"}, None
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
                header = {
                    "ok": False,
                    "kind": "error",
                    "message": "Out of Memory Error: the result is too large",
                }
        write_frame(out, json.dumps(header).encode())
        if body is not None:
            write_frame(out, body)
        out.flush()


if __name__ == "__main__":
    main()
