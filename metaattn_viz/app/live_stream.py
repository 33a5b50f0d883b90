"""The Live tab's streaming generations as its other events see them (mechanics, no page
layout): while a run streams in a browser session, the page's trace (a gr.State) still
holds the previous run; the stream's last frame replaces it. So an event that reads the
trace asks `streaming(session)` first, and the uncertainty measure and per-token view
picked while a run streams are handed to the run (`pick`), whose frames draw them.

`open` a stream when a generation starts drawing (with the view its controls had then),
read `view` for each frame, and `close` it after the last frame: `close` says which view
to draw again when one was picked after the last frame was drawn (under one lock with
`pick`, so no pick falls between the two). After `close` the trace is the run's own and
an event draws it itself.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

View = tuple[str, bool]  # the uncertainty measure (bottom map) and the per-token view


@dataclass
class Stream:
    """One run's frames: the view they draw."""

    view: View


class Streams:
    """The runs streaming now, one per browser session."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[str, Stream] = {}

    def open(self, session: str | None, view: View) -> Stream:
        """A run of `session` starts drawing `view` (a session's newer run replaces an older
        one still ending). Without a session (a direct call) the stream is not registered."""
        stream = Stream(view)
        if session is not None:
            with self._lock:
                self._open[session] = stream
        return stream

    def pick(self, session: str | None, view: View) -> bool:
        """`view` picked in `session`: handed to the run streaming there, if one is (True:
        its frames draw it from the next one on)."""
        with self._lock:
            stream = self._open.get(session) if session is not None else None
            if stream is None:
                return False
            stream.view = view
            return True

    def streaming(self, session: str | None) -> bool:
        """Whether a run streams in `session` (its trace is not yet the page's)."""
        with self._lock:
            return session is not None and session in self._open

    def close(self, session: str | None, stream: Stream, drawn: View | None) -> View | None:
        """The run's last frame (of view `drawn`, None if it drew none) is out: the view to
        draw again if another was picked since, else None."""
        with self._lock:
            if session is not None and self._open.get(session) is stream:
                del self._open[session]
            return stream.view if drawn is not None and stream.view != drawn else None


__all__ = ["Stream", "Streams", "View"]
