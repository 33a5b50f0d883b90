"""Ctrl-C inside a DuckDB call, as Python's own KeyboardInterrupt.

DuckDB turns a SIGINT that arrives while it runs a statement in the main thread into
`RuntimeError("Query interrupted")` (the KeyboardInterrupt Python would have raised is
consumed), and `connection.interrupt()` into `duckdb.InterruptException`. Either is the
user's Ctrl-C, not a problem with the log: `is_interrupt` is the one test of that, and
`keyboard_interrupts()` re-raises it as KeyboardInterrupt, so that a caller's
`except Exception` (a log write that must not lose a result) lets it through and the
command line ends as an interrupt everywhere else does (exit 130).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import duckdb

# DuckDB's Python client raises this RuntimeError when a signal arrives during a statement
SIGNAL_MESSAGE = "Query interrupted"


def is_interrupt(exc: BaseException) -> bool:
    """Whether `exc` is DuckDB's report of an interrupted statement (Ctrl-C)."""
    if isinstance(exc, duckdb.InterruptException):
        return True
    return type(exc) is RuntimeError and str(exc) == SIGNAL_MESSAGE


@contextlib.contextmanager
def keyboard_interrupts() -> Iterator[None]:
    """Within the block, DuckDB's interrupt is raised as KeyboardInterrupt (from it)."""
    try:
        yield
    except Exception as exc:
        if is_interrupt(exc):
            raise KeyboardInterrupt from exc
        raise


__all__ = ["SIGNAL_MESSAGE", "is_interrupt", "keyboard_interrupts"]
