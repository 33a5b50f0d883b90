"""How a page callback fails: an AppError shows its own sentence; anything unexpected is
logged with its traceback and shown as one short sentence that names what was being done.

`user_errors(what)` decorates every callback (plain or generator); `warn(notes)` shows a
job's notes as warnings. A gr.Error passes through (``spaces`` words its quota and queue
messages so on ZeroGPU), except ``spaces``' "ZeroGPU worker error" that is only an
exception's class name: that one gets the usual sentence (the GPU work sends its own errors
back as data, app/gpu_work.py, so this is what is left: e.g. a result that would not
pickle).

Gradio shows a message as HTML, and a message may quote what a visitor sent (a shared
link's value, a query): every message on the page goes out escaped (`shown`), so it reads
as the text it is; the named API endpoints (`page=False`) give a program the sentence as it
is. Never holds page layout or model logic.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging

import gradio as gr

from metaattn_viz.app.errors import AppError

log = logging.getLogger(__name__)

# The title `spaces` (0.51.3, zero/wrappers.py) gives an exception raised in a ZeroGPU worker,
# with the exception's class name as the whole message.
ZEROGPU_WORKER_ERROR = "ZeroGPU worker error"


def _something_went_wrong(what: str, name: str) -> gr.Error:
    return gr.Error(
        f"Something went wrong while {what} ({name}). The server log has the details; "
        "the app is still running.",
        print_exception=False,
    )


def shown(message: str) -> str:
    """`message` escaped for Gradio's toasts, which render HTML (quotes are left as they
    are, so the sentence reads as an API client gets it unescaped)."""
    return html.escape(message, quote=False)


def as_gr_error(exc: BaseException, what: str, page: bool = True) -> gr.Error:
    """The gr.Error the page shows for `exc`, raised while `what` (e.g. "generating");
    `page` False: for an API client (gradio_client), which reads the sentence unescaped."""
    if isinstance(exc, gr.Error):
        message = str(getattr(exc, "message", ""))
        if getattr(exc, "title", None) == ZEROGPU_WORKER_ERROR and message.isidentifier():
            log.error("%s failed in a ZeroGPU worker with %s (spaces printed its traceback)", what, message)
            return _something_went_wrong(what, message)
        return exc
    if isinstance(exc, AppError):
        return gr.Error(shown(str(exc)) if page else str(exc), print_exception=False)
    log.error("%s failed", what, exc_info=exc)
    return _something_went_wrong(what, type(exc).__name__)


def user_errors(what: str, page: bool = True):
    """Decorate a callback (plain, generator or coroutine) so that failures become plain
    messages: escaped for a page's toast, or (`page` False, the named API endpoints) as
    they are, for a program."""

    def wrap(fn):
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def coro(*args, **kwargs):
                try:
                    return await fn(*args, **kwargs)
                except Exception as exc:  # a cancellation (BaseException) passes through
                    raise as_gr_error(exc, what, page) from None

            return coro

        if inspect.isgeneratorfunction(fn):

            @functools.wraps(fn)
            def gen(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as exc:
                    raise as_gr_error(exc, what, page) from None

            return gen

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                raise as_gr_error(exc, what, page) from None

        return call

    return wrap


def warn(notes) -> None:
    """Show each note as a gr.Warning (a toast), escaped."""
    for note in notes:
        gr.Warning(shown(note))


__all__ = ["user_errors", "as_gr_error", "shown", "warn"]
