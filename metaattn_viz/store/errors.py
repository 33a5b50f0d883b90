"""The routing log's errors, shared by every store module (docs/architecture.md).

`StoreUnavailable` always names the file and what the user can do about it; callers may
carry on without logging. `StoreLocked` is the one that may pass: another process holds
the file, and an open may succeed once it lets go. `ExportNotWritten` is an export's own
failure to write its files (a full disk): the log is fine, and the message says so. This
module defines errors only: it never imports DuckDB, the model code or gradio.
"""

from __future__ import annotations

# why a log is not written when logging was switched off (--no-log); light to import, so
# that code with logging off (the GPU check's engine, on a machine without DuckDB) needs none
LOGGING_OFF = "logging is off (--no-log)"


class StoreUnavailable(RuntimeError):
    """The routing log cannot be opened or written; the message names the file and what
    to do. The caller can carry on without logging (`--no-log`)."""


class StoreLocked(StoreUnavailable):
    """The routing log is held by another process (a server writing it, or a reader such
    as a running export); opening it again may succeed once that process lets go."""


class ExportNotWritten(OSError):
    """An export could not write its files (its folder's disk is full, or the folder was
    taken away); the routing log it read is unchanged. The message says why, in DuckDB's
    words, and that the log is fine."""

    def __str__(self) -> str:  # OSError would print the repr of a tuple of arguments
        return str(self.args[0]) if self.args else ""


class UnknownRun(LookupError):
    """No run with that id in this log."""

    def __str__(self) -> str:  # LookupError would print the repr of its argument
        return str(self.args[0]) if self.args else ""
