"""The Live tab's streaming generations as its other events see them (mechanics, no page
layout): while a run streams in a browser session, the page's trace (a gr.State) still
holds the previous run; the stream's last frame replaces it. So an event that reads the
trace asks `going_on(session, jobs)` first (the run's job, or its stream until the last
frame is out), and the uncertainty measure and per-token view picked while a run streams
are handed to the run (`pick`), whose frames draw them.

`submit` when a Generate is pressed (Gradio takes its inputs, the measure and view among
them, then; the run may wait in the queue), `open` a stream when the generation starts
drawing (with the view its controls had at `submit`, or one picked since), read `view` for
each frame, and `close` it after the last frame: `close` says which view to draw again
when one was picked after the last frame was drawn, or while the run drew no frame at all
(then the trace the page showed at the pick, `Stream.shown`, is drawn: a run that fails
before its first frame leaves it on the page). `close` and `pick` share one lock, so no
pick falls between the two. After `close` the trace is the run's own and an event draws it
itself.

A session may have several streams open: a run still ending (waiting for its model, say)
when a newer Generate of the session opens its own. Every open stream counts in
`going_on`, but only the newest draws the page: an older one is `superseded` (its job
stopped) and writes nothing more. `stop` (the Stop button) stops the session's run, and a
Generate pressed before it that has not started drawing yet (`open` stops its job at once).

A Generate the queue refused (full) never opens: its mark would say a run waits. So
`submit` and `stop` take whether the session has anything in Gradio's queue
(gradio_queue.session_pending): with nothing there for REFUSED_AFTER_S after its press, a
Generate was refused and its mark goes.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

View = tuple[str, bool]  # the uncertainty measure (bottom map) and the per-token view

# the first sentence of every refusal while a run goes on in the session (re-route, replay,
# token inspector)
GENERATION_RUNNING = "A generation is running"
# the status line from Stop until the run's last frame (which says it stopped): Stop is not
# queued, so that it acts even when the queue is full, and only a queued event shows a toast
STOPPING = "Stopping the generation\u2026"
MAX_SESSIONS = 1024  # the sessions whose Generates and picks are kept (the oldest go first)
MAX_SUBMITTED = 8  # a session's Generates waiting to run (one that never ran leaves a mark)
# how long after its press a Generate with nothing of its session in Gradio's queue counts
# as refused: the press's own event answers first, then the page pushes the generation
REFUSED_AFTER_S = 5.0


@dataclass
class Stream:
    """One run's frames: the view they draw; `picked`: a view was picked while it ran, on
    the page's trace `shown` (the previous run's)."""

    view: View
    picked: bool = False
    shown: Any = None
    job: Any = None  # its generation.GenerationJob (None for a direct call)
    superseded: bool = False  # a newer stream of the session draws the page: write nothing


def _keep(table: dict, session: str, value) -> None:
    """`table[session] = value`, the session now the newest; the oldest beyond MAX_SESSIONS
    dropped (a session gone leaves its entries behind)."""
    table.pop(session, None)
    table[session] = value
    while len(table) > MAX_SESSIONS:
        del table[next(iter(table))]


def stoppable(job) -> bool:
    """Whether Stop stops `job` (generation.GenerationJob): it has not stopped decoding yet
    (its quality meter, after the text, runs to its end)."""
    return not job.done and job.phase in ("starting", "prefill", "decoding")


def stopping(job) -> bool:
    """Whether `job` was stopped and has not stopped decoding yet: its frames say STOPPING
    (a stopped run's quality meter has its own line)."""
    return job.stop_event.is_set() and stoppable(job)


class Streams:
    """The runs streaming now, by browser session (the newest last)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._open: dict[str, list[Stream]] = {}
        self._count = itertools.count(1)  # orders submits and picks
        # Generates not yet drawing, oldest first: (order, time.monotonic() of the press)
        self._submitted: dict[str, deque[tuple[int, float]]] = {}
        self._picked: dict[str, tuple[int, View]] = {}  # the latest pick (for a run not open)
        self._stopped: dict[str, int] = {}  # the latest Stop while a Generate was not open

    def submit(self, session: str | None, pending: bool | None = None) -> None:
        """A Generate of `session` is pressed: its inputs are taken now, and a view picked
        from now until it starts drawing is the run's (`open`). `pending`: whether the
        session has events in Gradio's queue (None: cannot tell), for `_drop_refused`."""
        if session is not None:
            with self._lock:
                self._drop_refused(session, pending)
                marks = self._submitted.get(session) or deque(maxlen=MAX_SUBMITTED)
                marks.append((next(self._count), time.monotonic()))
                _keep(self._submitted, session, marks)

    def _drop_refused(self, session: str, pending: bool | None) -> None:
        """Forget the session's Generates not yet drawing when the queue holds nothing of
        the session and the newest was pressed over REFUSED_AFTER_S ago: the queue refused
        them, and no run of theirs will open (holding self._lock)."""
        marks = self._submitted.get(session)
        if pending is False and marks and time.monotonic() - marks[-1][1] > REFUSED_AFTER_S:
            for table in (self._submitted, self._picked, self._stopped):
                table.pop(session, None)

    def open(self, session: str | None, view: View, job=None) -> Stream:
        """A run of `session` (its `job`) starts drawing `view`, its controls' view when it
        was submitted, or the view picked since. An older stream of the session still open
        is superseded (its job stopped); a Stop pressed after every Generate of the session
        so far, this one's included, stops `job` at once. Without a session (a direct call)
        the stream is not registered."""
        stream = Stream(view, job=job)
        if session is not None:
            with self._lock:
                marks = self._submitted.get(session)
                newest = marks[-1][0] if marks else 0  # the session's latest Generate
                submitted = marks.popleft()[0] if marks else 0  # this run's submit (the oldest)
                seq, picked = self._picked.get(session, (0, view))
                if seq > submitted:
                    stream.view = picked
                if newest and self._stopped.get(session, 0) > newest and job is not None:
                    job.stop()  # Stop pressed while this run waited in the queue
                if not marks:  # no other Generate of the session waits: nothing to keep
                    self._submitted.pop(session, None)
                    self._picked.pop(session, None)
                    self._stopped.pop(session, None)
                older = self._open.get(session) or []
                for old in older:
                    old.superseded = True
                    if old.job is not None:
                        old.job.stop()
                _keep(self._open, session, [*older, stream])
        return stream

    def stop(self, session: str | None, jobs, pending: bool | None = None) -> bool:
        """Stop pressed in `session`: its running generation stops (`jobs`:
        generation.Generations), and so does a Generate pressed before that has not started
        drawing (`open`). Whether the status line says STOPPING: such a Generate waits, or
        the newest run is one Stop stops (`stopping`; not its quality meter, say).
        `pending`: as for `submit`."""
        if session is None:
            return False
        with self._lock:
            self._drop_refused(session, pending)
            waiting = bool(self._submitted.get(session))
            if waiting:
                _keep(self._stopped, session, next(self._count))
            streams = self._open.get(session) or []
            job = streams[-1].job if streams else None
        if job is None:  # no stream yet (a direct call, or its job just started)
            return jobs.stop(session) or waiting
        if waiting or stoppable(job):
            jobs.stop(session)
        return waiting or stopping(job)

    def pick(self, session: str | None, view: View, shown=None) -> bool:
        """`view` picked in `session`, over the page's trace `shown`: handed to the run
        streaming there, if one is (True: its frames draw it from the next one on), and
        kept for a run submitted before the pick that has not started drawing."""
        if session is None:
            return False
        with self._lock:
            _keep(self._picked, session, (next(self._count), view))
            streams = self._open.get(session)
            if not streams:
                return False
            stream = streams[-1]
            stream.view, stream.picked, stream.shown = view, True, shown
            return True

    def streaming(self, session: str | None) -> bool:
        """Whether a run streams in `session` (its trace is not yet the page's), the newest
        or an older one still ending."""
        with self._lock:
            return session is not None and bool(self._open.get(session))

    def going_on(self, session: str | None, jobs) -> bool:
        """Whether a run is going on in `session`: its generation runs (`jobs`:
        generation.Generations), or its stream has not sent the last frame, which puts its
        trace on the page (the job ends first). An event that reads or replaces the page's
        trace (re-route, replay, the token inspector) is refused meanwhile."""
        return session is not None and (jobs.running(session) or self.streaming(session))

    def close(self, session: str | None, stream: Stream, drawn: View | None) -> View | None:
        """The run's last frame (of view `drawn`, None if it drew none) is out: the view to
        draw again if another was picked since (of a run that drew no frame: any view
        picked while it ran, to be drawn on `stream.shown`), else None."""
        with self._lock:
            streams = self._open.get(session) if session is not None else None
            if streams and stream in streams:
                streams.remove(stream)
                if not streams:
                    del self._open[session]
            if drawn is None:
                return stream.view if stream.picked else None
            return stream.view if stream.view != drawn else None


__all__ = [
    "GENERATION_RUNNING",
    "REFUSED_AFTER_S",
    "STOPPING",
    "Stream",
    "Streams",
    "View",
    "stoppable",
    "stopping",
]
