"""The Live tab's quality meter: a checkbox asking for the dense shadow pass (how far the
routed model's next-token distributions are from the dense model's, in the meters).

Generate reads the box as its run starts, and such a run measures itself (app/generation.py).
Otherwise `wire`'s callback measures the page's trace: when the box is ticked and after each
event in `after` (a re-route, the end of a run). While a run of the session goes on, the
page's trace is still the previous run's (live_stream.py): a tick then measures nothing
there, and is measured on the run's own text at its end (`pending`), unless the box has
been cleared again by then. `pending` keeps at most live_stream.MAX_SESSIONS sessions (the
oldest go first): a page closed mid-run never ends its run's wait.
"""

from __future__ import annotations

import gradio as gr

from metaattn_viz.app import plots
from metaattn_viz.app.deployment import session_of
from metaattn_viz.app.engine import Engine
from metaattn_viz.app.live_stream import MAX_SESSIONS
from metaattn_viz.app.requests import GENERATION
from metaattn_viz.app.ui_errors import user_errors


class QualityMeter:
    """The checkbox (`box`, built where it is made) and its events."""

    def __init__(self):
        self.box = gr.Checkbox(GENERATION.quality, label="Quality meter (dense shadow pass)")
        # sessions that ticked the box while a run went on (a dict: ordered, oldest first)
        self.pending: dict[str | None, None] = {}

    def wire(self, engine: Engine, trace: gr.State, meters: gr.HTML, going_on, after: list, ended) -> list:
        """Measure the page's `trace` into `meters` when the box is ticked and after each event
        of `after`; after `ended` (a generation) only where the box was ticked while it ran.
        `going_on(session)`: whether a run goes on there. Returns the events after which the
        page's trace is final (the exports refresh after each): those after `after` and
        `ended` stand for them. The check after `ended` is not queued behind other model work
        (it usually measures nothing), as a tick is not."""

        def measure(shown, wanted: bool):
            if not wanted or shown is None or shown.n_tokens < 2 or shown.kl_to_dense is not None:
                return gr.skip(), gr.skip()
            shown.kl_to_dense = engine.analysis.quality(shown)
            return plots.meters(shown), shown

        @user_errors("measuring quality")
        def measure_quality(shown, wanted, request: gr.Request):
            if going_on(session_of(request)):  # the run's text is measured at its end
                if wanted:
                    self._remember(session_of(request))
                return gr.skip(), gr.skip()
            return measure(shown, wanted)

        @user_errors("measuring quality")
        def measure_after_run(shown, wanted, request: gr.Request):
            if session_of(request) not in self.pending or going_on(session_of(request)):
                return gr.skip(), gr.skip()  # the run measured itself, or a newer one goes on
            self.pending.pop(session_of(request), None)
            return measure(shown, wanted)

        model = {"concurrency_id": "model", "concurrency_limit": engine.deployment.limits.model}
        quiet = {"api_visibility": "private", "show_progress": "hidden"}
        io = ([trace, self.box], [meters, trace])
        events = [event.then(measure_quality, *io, **model, **quiet) for event in after]
        events.append(ended.then(measure_after_run, *io, **quiet))
        events.append(self.box.input(measure_quality, *io, **quiet))
        return events

    def _remember(self, session: str | None) -> None:
        """`session` ticked the box mid-run; the oldest beyond MAX_SESSIONS forgotten."""
        self.pending.pop(session, None)
        self.pending[session] = None
        while len(self.pending) > MAX_SESSIONS:
            del self.pending[next(iter(self.pending))]


__all__ = ["QualityMeter"]
