"""What the page tells the user when something is wrong: `AppError`, a plain sentence.

User mistakes and unavailable resources (a model that is still loading, a routing log that
cannot be read) raise AppError with a sentence fit for the page; the UI shows it as it is.
Anything else is a bug: the UI logs its traceback and shows a short message instead
(ui_errors.user_errors). Never imports gradio, torch or the store.
"""

from __future__ import annotations

# At most this many characters of a value a visitor sent are quoted back in a message: a
# link or a client may send a megabyte of it.
QUOTED_CHARS = 80


class AppError(Exception):
    """A problem to show the user in plain words (the server log has any detail)."""


def quoted(value) -> str:
    """`value` as a message quotes it back: its repr, cut to QUOTED_CHARS with an ellipsis."""
    text = repr(value)
    return text if len(text) <= QUOTED_CHARS else text[: QUOTED_CHARS - 1] + "\u2026"


def no_such_run(run_id) -> AppError:
    """A run id the routing log does not hold (for this reader), named short (quoted)."""
    return AppError(f"There is no run {quoted(run_id)} in the routing log.")


__all__ = ["AppError", "QUOTED_CHARS", "no_such_run", "quoted"]
