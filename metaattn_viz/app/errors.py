"""What the page tells the user when something is wrong: `AppError`, a plain sentence.

User mistakes and unavailable resources (a model that is still loading, a routing log that
cannot be read) raise AppError with a sentence fit for the page; the UI shows it as it is.
Anything else is a bug: the UI logs its traceback and shows a short message instead
(ui_errors.user_errors). Never imports gradio, torch or the store.
"""

from __future__ import annotations


class AppError(Exception):
    """A problem to show the user in plain words (the server log has any detail)."""


def no_such_run(run_id) -> AppError:
    """A run id the routing log does not hold (for this reader), named short: a client may
    send a megabyte of it."""
    return AppError(f"There is no run {run_id!r:.80} in the routing log.")


__all__ = ["AppError", "no_such_run"]
