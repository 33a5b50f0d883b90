"""Where the SQL console's queries run: worker processes (sandbox_worker.py), each query on
a fresh hardened in-memory DuckDB that holds only the rows the reader may see, and a
worker that outlives a query's time limit is killed (docs/architecture.md, the routing
log).

Why a process: DuckDB's interrupt is honoured between chunks of rows, not inside one
scalar function, and its memory limit does not cover the strings a function builds, so
`SELECT repeat('a', 2000000000)` ran for 13 s against a 3 s limit (measured) and a chain
of concatenations built a 1 GB value in 7 s; no parser check can foresee every such
expression. A process can always be stopped: the worker interrupts DuckDB at the time
limit, and this side kills it KILL_GRACE_S later if no answer came. A spare worker is
started at once, so the next query does not wait for one.

Why a copy: the worker's DuckDB has no file, URL, extension or other database it can
reach (enable_external_access off, configuration locked), so the rows it holds are all
that any query can see, whatever its catalog, schema or system-function tricks.

Why no disk: the worker's DuckDB does not spill to a temp directory (a sort past its
memory cap spilled into .tmp under the server's working directory, and a worker killed at
the time limit left about 250 MB of it behind), so a query that needs more than
MEMORY_LIMIT fails with SandboxMemory, in words.

Never opens the routing log (the console hands it the rows), never runs a query in this
process, never imports gradio or the model code.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from metaattn_viz.store import sandbox_worker as wire

log = logging.getLogger(__name__)

WORKER_SCRIPT = Path(wire.__file__)
MEMORY_LIMIT = "256MB"  # DuckDB's own cap in a worker (sorts, joins, aggregates)
THREADS = 2  # DuckDB threads per query
MAX_WORKERS = 2  # queries answered at once; more wait (a public Space shares its CPUs)
KILL_GRACE_S = 0.5  # after the time limit, how long DuckDB gets to stop before the kill
START_TIMEOUT_S = 60.0  # a worker's start (imports) on a busy machine
TRANSFER_BYTES_PER_S = 50e6  # time allowed for sending the rows, on top of the limit
MAX_RESULT_BYTES = 16 << 20  # an answer larger than this is refused (a browser tab crashes on 100 MB)


class SandboxError(Exception):
    """The query did not produce a result; the message is DuckDB's (first line)."""


class SandboxTimeout(SandboxError):
    """The query ran past its time limit and was stopped."""


class SandboxBusy(SandboxError):
    """Every worker was busy for the whole time limit."""


class SandboxMemory(SandboxError):
    """The query needed more memory than a worker allows (MEMORY_LIMIT, or the address
    space left to it)."""


_NARROW = "narrow it (WHERE, LIMIT), aggregate, or select fewer or shorter columns"


def _memory_message() -> str:
    return f"the query needed more memory than the console allows ({MEMORY_LIMIT}); {_NARROW}"


# The signals a worker over its memory ends with: SIGSEGV or SIGBUS where an allocation
# failed under its address-space cap, SIGABRT where one failed in C++ with nothing to catch
# it, SIGKILL from the system's out-of-memory killer.
MEMORY_SIGNALS = frozenset({signal.SIGSEGV, signal.SIGBUS, signal.SIGABRT, signal.SIGKILL})


def _ended_error(returncode: int | None) -> SandboxError:
    """Why a worker ended without answering, in words. Killed by one of MEMORY_SIGNALS: the
    query used too much memory. Stopped by another signal (SIGTERM, SIGINT, SIGHUP: sent from
    outside, a server shutting down, a person): said as such. Any other end is the worker's
    own failure, not the query's."""
    if returncode is not None and returncode < 0:
        sig = next((s for s in signal.Signals if s == -returncode), None)
        name = sig.name if sig is not None else f"signal {-returncode}"
        if sig in MEMORY_SIGNALS:
            return SandboxMemory(
                f"the query was stopped: it used more memory than the console allows (its "
                f"worker process ended with {name}); {_NARROW}"
            )
        return SandboxError(
            f"the SQL console's worker process was stopped from outside ({name}) and was "
            "replaced; run the query again"
        )
    return SandboxError(
        f"the SQL console's worker process ended unexpectedly (exit status {returncode}) and "
        "was replaced; run the query again"
    )


@dataclass
class Result:
    table: pa.Table  # at most max_rows + 1 rows
    elapsed: float  # seconds the query ran in the worker


def _worker_env() -> dict[str, str]:
    """A worker needs no secrets (tokens, keys): it gets a bare environment."""
    env = {"PATH": os.environ.get("PATH", ""), "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1"}
    for name in ("SYSTEMROOT", "TMPDIR"):  # Windows needs SYSTEMROOT to start Python
        if name in os.environ:
            env[name] = os.environ[name]
    return env


class _Worker:
    """One worker process; `ask` is used by one thread at a time (the pool's)."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", str(WORKER_SCRIPT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_worker_env(),
            close_fds=True,
        )
        self.ready = False

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _guarded(self, seconds: float, fn: Any) -> tuple[Any, bool]:
        """(fn(), killed): run fn, killing the worker if it takes longer than `seconds`."""
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            self.proc.kill()

        timer = threading.Timer(seconds, kill)
        timer.daemon = True
        timer.start()
        try:
            return fn(), killed.is_set()
        except (OSError, ValueError):  # a broken pipe: the worker was killed or died
            return None, killed.is_set()
        finally:
            timer.cancel()

    def wait_ready(self) -> None:
        if self.ready:
            return
        assert self.proc.stdout is not None
        frame, _ = self._guarded(START_TIMEOUT_S, lambda: wire.read_frame(self.proc.stdout))
        if frame != wire.READY:
            self.close()
            raise SandboxError("the SQL console's worker process did not start")
        self.ready = True

    def ask(
        self, request: dict[str, Any], tables: dict[str, bytes], seconds: float
    ) -> tuple[dict[str, Any], pa.Table | None]:
        """Send one request; its answer, or SandboxTimeout (the worker is then killed), or
        the error _ended_error gives where the worker ended without answering."""
        stdin, stdout = self.proc.stdin, self.proc.stdout
        assert stdin is not None and stdout is not None

        def exchange() -> tuple[dict[str, Any], pa.Table | None] | None:
            wire.write_frame(stdin, json.dumps({**request, "tables": list(tables)}).encode())
            for payload in tables.values():
                wire.write_frame(stdin, payload)
            stdin.flush()
            head = wire.read_frame(stdout)
            if head is None:
                return None
            header = json.loads(head)
            if not header.get("ok"):
                return header, None
            body = wire.read_frame(stdout)
            return None if body is None else (header, wire.from_ipc(body))

        answer, killed = self._guarded(seconds, exchange)
        if answer is None or killed:
            self.close()
        if answer is None:
            if killed:
                raise SandboxTimeout("the query ran past its time limit and was stopped")
            raise _ended_error(self.proc.returncode)
        return answer

    def close(self) -> None:
        if self.alive:
            self.proc.kill()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            log.error("SQL console worker %d did not exit", self.proc.pid)
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                if pipe is not None:
                    pipe.close()
            except OSError:
                pass


class _Pool:
    """Up to MAX_WORKERS workers, reused; a killed one is replaced by a spare at once."""

    def __init__(self, size: int) -> None:
        self._slots = threading.BoundedSemaphore(size)
        self._lock = threading.Lock()
        self._idle: list[_Worker] = []
        self._closed = False

    def _take(self) -> _Worker:
        with self._lock:
            while self._idle:
                worker = self._idle.pop()
                if worker.alive:
                    break
                worker.close()
            else:
                worker = _Worker()
        worker.wait_ready()
        return worker

    def _give_back(self, worker: _Worker | None) -> None:
        """Keep `worker` for the next query, or (None: it was killed) start a spare."""
        with self._lock:
            if self._closed:
                if worker is not None:
                    worker.close()
                return
            self._idle.append(worker if worker is not None and worker.alive else _Worker())

    def run(
        self, request: dict[str, Any], tables: dict[str, bytes], timeout_s: float
    ) -> tuple[dict[str, Any], pa.Table | None]:
        if not self._slots.acquire(timeout=timeout_s):
            raise SandboxBusy(
                f"the SQL console is busy (every one of its {MAX_WORKERS} "
                "workers is answering a query); try again in a few seconds"
            )
        try:
            worker = self._take()
            size = sum(len(p) for p in tables.values())
            try:
                answer = worker.ask(request, tables, timeout_s + KILL_GRACE_S + size / TRANSFER_BYTES_PER_S)
            except SandboxError:
                self._give_back(None)
                raise
            self._give_back(worker)
            return answer
        finally:
            self._slots.release()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for worker in idle:
            worker.close()


_POOL = _Pool(MAX_WORKERS)
atexit.register(_POOL.close)


def run_query(sql: str, tables: dict[str, pa.Table], max_rows: int, timeout_s: float) -> Result:
    """Answer `sql` over `tables` (name -> rows; nothing else exists for the query) in a
    worker: at most max_rows + 1 rows and about MAX_RESULT_BYTES, stopped after timeout_s.
    Raises SandboxTimeout, SandboxBusy, SandboxMemory or SandboxError (DuckDB's message)."""
    request = {
        "sql": sql,
        "max_rows": int(max_rows),
        "max_bytes": MAX_RESULT_BYTES,
        "timeout_s": float(timeout_s),
        "memory_limit": MEMORY_LIMIT,
        "threads": THREADS,
    }
    payloads = {name: wire.to_ipc(table) for name, table in tables.items()}
    header, table = _POOL.run(request, payloads, timeout_s)
    if table is None:
        if header.get("kind") == "timeout":
            raise SandboxTimeout("the query ran past its time limit and was stopped")
        if header.get("kind") == "memory":
            raise SandboxMemory(_memory_message())
        raise SandboxError(str(header.get("message") or "the query failed"))
    return Result(table, float(header["elapsed"]))
