"""What the page tells the user when something is wrong: `AppError`, a plain sentence.

User mistakes and unavailable resources (a model that is still loading, a routing log that
cannot be read) raise AppError with a sentence fit for the page; the UI shows it as it is.
Anything else is a bug: the UI logs its traceback and shows a short message instead
(ui_errors.user_errors). Never imports gradio, torch or the store.
"""

from __future__ import annotations


class AppError(Exception):
    """A problem to show the user in plain words (the server log has any detail)."""


__all__ = ["AppError"]
