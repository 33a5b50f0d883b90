"""The routing log's two errors, shared by every store module (docs/architecture.md).

`StoreUnavailable` always names the file and what the user can do about it; callers may
carry on without logging. This module defines errors only: it never imports DuckDB,
the model code or gradio.
"""

from __future__ import annotations


class StoreUnavailable(RuntimeError):
    """The routing log cannot be opened or written; the message names the file and what
    to do. The caller can carry on without logging (`--no-log`)."""


class UnknownRun(LookupError):
    """No run with that id in this log."""

    def __str__(self) -> str:  # LookupError would print the repr of its argument
        return str(self.args[0]) if self.args else ""
