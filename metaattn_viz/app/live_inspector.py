"""The Live tab's two panels over the trace shown: the token inspector (one token's
posterior by layer and the attention it actually used) and the budget sweep (quality
against cost for both controllers and the baselines).

Each panel builds its components where it is made (inside the Live tab's layout) and
`wire(...)` attaches its events, next to them. Both follow a new trace on the page
(tab_live.LiveTab.follow): `TokenInspector.refresh` inspects the same token again when the
new text has the same tokens up to it and anything it shows changed, else goes back to
"Pick a token"; `BudgetSweep.refresh` clears a sweep of another text. Never holds model
logic of its own.
"""

from __future__ import annotations

import hashlib

import gradio as gr
import numpy as np
import pandas as pd

from metaattn_viz.app import attention_maps, display, plots
from metaattn_viz.app.deployment import session_of
from metaattn_viz.app.engine import Engine
from metaattn_viz.app.errors import AppError
from metaattn_viz.app.exports import Downloads, run_label
from metaattn_viz.app.live_exports import download, download_button, no_download
from metaattn_viz.app.live_stream import GENERATION_RUNNING
from metaattn_viz.app.plotly_html import figure_value, plotly_view
from metaattn_viz.app.shown_frame import shown_frame
from metaattn_viz.app.ui_errors import user_errors, warn
from metaattn_viz.core.trace import RoutingTrace

PICK_A_TOKEN = "Pick a token to see the attention it used."
# while a run goes on the page's trace is still the previous run (live_stream.py)
INSPECT_WHILE_STREAMING = (
    f"{GENERATION_RUNNING}: the inspector works on its tokens once it ends (or stop it first)."
)
SWEEP_WHILE_STREAMING = f"{GENERATION_RUNNING}: the sweep works on its text once it ends (or stop it first)."
# On a phone (390 px) two figures or tables side by side were 124-160 px wide each: a row's
# children get this width at least, and the row wraps below it.
FIGURE_MIN_PX = 340
SWEEP_NOTE_CHARS = 80


def shown_key(trace: RoutingTrace, pos: int) -> tuple:
    """What the inspector shows of token `pos`: the text up to it (`ids`) and a digest of
    everything it draws from the trace (the decisions up to the token, which the attention
    it used depends on, and the token's own concentrations, costs and lambda)."""
    ids = tuple(int(i) for i in trace.token_ids[: pos + 1])
    h = hashlib.sha1(f"{trace.model}|{trace.controller_id}|{ids}".encode())
    for a in (trace.weights[:, : pos + 1], trace.hedged[:, : pos + 1]):
        h.update(np.ascontiguousarray(a).tobytes())
    for a in (trace.concentration, trace.cost, trace.lam):
        h.update(np.ascontiguousarray(a[:, pos]).tobytes())
    return ids, h.hexdigest()


def sweep_note(trace: RoutingTrace) -> str:
    """Which text a sweep is of (a new text clears the sweep)."""
    prompt = " ".join((trace.prompt or "".join(trace.tokens)).split())
    cut = prompt if len(prompt) <= SWEEP_NOTE_CHARS else prompt[: SWEEP_NOTE_CHARS - 1] + "\u2026"
    return f"A sweep of the text shown ({trace.n_tokens} tokens; prompt \u201c{cut}\u201d)."


class TokenInspector:
    """The token inspector's components (an accordion) and events."""

    def __init__(self, initial: RoutingTrace | None):
        """`initial`: the trace shown before the first run (the slider spans it)."""
        with gr.Accordion(
            "Token inspector: posterior by layer and the attention actually used",
            open=True,
            elem_id="inspector",
        ):
            with gr.Row(equal_height=True):
                # sized to the example run shown before any run (clicking its token 20 was
                # refused: "Value 20 is greater than maximum value 1")
                n = initial.n_tokens if initial is not None else 0
                self.pos = gr.Slider(
                    0,
                    max(n - 1, 1),
                    value=max(n - 1, 0),
                    step=1,
                    label="Token position",
                    elem_id="inspect-pos",
                    scale=4,
                )
                self.inspect = gr.Button("Inspect token", elem_id="inspect", scale=1)
                self.ternary_html = download_button("Posterior plot (HTML)", "download-ternary")
            self.note = gr.Markdown("", elem_id="inspect-note")
            with gr.Row():  # side by side on a wide screen, one above the other on a phone
                with gr.Column(min_width=FIGURE_MIN_PX):
                    self.ternary = plotly_view(
                        plots.ternary_placeholder(), "ternary", 440, "metaattn-posterior"
                    )
                with gr.Column(min_width=FIGURE_MIN_PX):
                    self.conc_table = gr.Dataframe(
                        headers=plots.concentration_columns(),
                        label="Concentrations and decisions by layer",
                        interactive=False,
                        elem_id="conc-table",
                        max_height=440,
                        wrap=False,
                    )
            with gr.Tabs():
                with gr.Tab("bertviz head view"):
                    self.head_view = shown_frame(attention_maps.message(PICK_A_TOKEN), "head-view")
                with gr.Tab("bertviz model view"):
                    self.model_view = shown_frame(attention_maps.message(PICK_A_TOKEN), "model-view")
        # the token shown, (pos, *shown_key), or None: a new trace re-inspects or clears it
        self.inspected = gr.State(None)
        self._inspected = None  # the views of a token: set by wire

    @property
    def outputs(self) -> list:
        """What inspecting a token (or clearing the inspector) updates."""
        return [
            self.ternary,
            self.ternary_html,
            self.conc_table,
            self.head_view,
            self.model_view,
            self.note,
            self.inspected,
        ]

    def show_positions(self, trace) -> gr.Slider:
        """The token-position slider over `trace`, at its last token."""
        return gr.Slider(maximum=max(trace.n_tokens - 1, 1), value=trace.n_tokens - 1)

    def cleared(self) -> dict:
        """The inspector as before any pick."""
        note = attention_maps.message(PICK_A_TOKEN)
        return {
            self.ternary: figure_value(plots.ternary_placeholder()),
            self.ternary_html: no_download(),
            self.conc_table: pd.DataFrame(columns=plots.concentration_columns()),
            self.head_view: note,
            self.model_view: note,
            self.note: "",
            self.inspected: None,
        }

    def refresh(self, trace, shown, request) -> dict:
        """After a new trace: the token shown (`shown`, the inspected state) inspected again
        when the new text has the same tokens up to it and anything it shows changed;
        cleared for another text; nothing where nothing changed."""
        if shown is None:
            return {}
        pos, before, digest = shown
        ids = tuple(int(i) for i in trace.token_ids[: pos + 1]) if trace is not None else None
        if ids != tuple(before):
            return self.cleared()
        if shown_key(trace, pos) == (tuple(before), digest):
            return {}
        return {**self._inspected(trace, pos, request), self.pos: pos}

    def wire(
        self, engine: Engine, downloads: Downloads, trace: gr.State, strip: gr.HighlightedText, going_on
    ) -> None:
        """Inspect on the button and on a click in the token `strip`; `trace`: the page's;
        `going_on(session)`: whether a run goes on there (live_stream.Streams.going_on),
        whose tokens are not in `trace` yet: the inspector says so and waits for its end."""

        def inspected(shown: RoutingTrace, pos: int, request) -> dict:
            """The inspector's views of token `pos` of `shown`."""
            fig = plots.ternary(shown, pos)
            label = f"{run_label(shown)}-token{pos}"
            out = {
                self.ternary: figure_value(fig),
                self.ternary_html: download(downloads.figure(fig, session_of(request), "posterior", label)),
                self.conc_table: plots.concentration_table(shown, pos),
                self.inspected: (pos, *shown_key(shown, pos)),
            }
            try:
                view = engine.analysis.inspect(shown, pos)
            except AppError as exc:
                msg = attention_maps.message(str(exc))
                return {**out, self.head_view: msg, self.model_view: msg, self.note: str(exc)}
            head = attention_maps.iframe(
                attention_maps.head_view_page(view), min(640, 110 + 23 * len(view.positions)), "head view"
            )
            model = attention_maps.iframe(attention_maps.model_view_page(view), 720, "model view")
            return {
                **out,
                self.head_view: head,
                self.model_view: model,
                self.note: display.inspect_note(shown, pos, view),
            }

        self._inspected = inspected

        @user_errors("inspecting the token")
        def inspect_token(shown, pos, request: gr.Request):
            if going_on(session_of(request)):
                warn([INSPECT_WHILE_STREAMING])
                return gr.skip()
            if shown is None or shown.n_tokens == 0:
                raise AppError("Nothing to inspect yet: generate (or replay) a text first.")
            return inspected(shown, min(max(int(pos), 0), shown.n_tokens - 1), request)

        self.inspect.click(inspect_token, [trace, self.pos], self.outputs, api_visibility="private")

        def pick_token(evt: gr.SelectData, request: gr.Request):
            if going_on(session_of(request)):  # the slider spans the previous run
                return gr.skip()
            return evt.index if isinstance(evt.index, int) else evt.index[0]

        strip.select(pick_token, None, self.pos, api_visibility="private", queue=False).then(
            inspect_token, [trace, self.pos], self.outputs, api_visibility="private"
        )


class BudgetSweep:
    """The budget sweep's components (an accordion) and events."""

    def __init__(self):
        with gr.Accordion(
            "Budget sweep: quality against cost for both controllers and the baselines",
            open=False,
            elem_id="sweep",
        ):
            with gr.Row():
                self.button = gr.Button("Sweep budgets", elem_id="sweep-button", scale=3)
                self.pareto_html = download_button("Sweep plot (HTML)", "download-pareto")
            self.note = gr.Markdown("", elem_id="sweep-note")
            self.pareto = plotly_view(plots.pareto([]), "pareto", 440, "metaattn-sweep")
            self.table = gr.Dataframe(
                headers=display.SWEEP_COLUMNS, interactive=False, label="Sweep", max_height=300
            )
        # the token ids of the text swept, or None: a new text clears the sweep
        self.swept = gr.State(None)

    @property
    def outputs(self) -> list:
        """What a sweep (or clearing it) updates."""
        return [self.pareto, self.pareto_html, self.table, self.note, self.swept]

    def cleared(self) -> dict:
        """The sweep as before any sweep."""
        return {
            self.pareto: figure_value(plots.pareto([])),
            self.pareto_html: no_download(),
            self.table: pd.DataFrame(columns=display.SWEEP_COLUMNS),
            self.note: "",
            self.swept: None,
        }

    def refresh(self, trace, swept) -> dict:
        """After a new trace: a sweep of another text cleared (a re-route keeps it)."""
        ids = tuple(int(i) for i in trace.token_ids) if trace is not None else None
        return self.cleared() if swept is not None and ids != tuple(swept) else {}

    def wire(self, engine: Engine, downloads: Downloads, trace: gr.State, routing, going_on) -> None:
        """Sweep the page's `trace` from the routing controls' settings (`routing`, a
        routing_controls.RoutingControls); refused while a run goes on in the session
        (`going_on(session)`), whose text is not the page's trace yet."""

        @user_errors("sweeping budgets")
        def sweep(data, request: gr.Request, progress=gr.Progress()):  # noqa: B008 (gradio injects a tracker here)
            if going_on(session_of(request)):
                warn([SWEEP_WHILE_STREAMING])
                return gr.skip()
            shown = data[trace]
            if shown is None:
                raise AppError("Nothing to sweep yet: generate (or replay) a text first.")
            base = routing.settings(data)
            rows = engine.analysis.sweep(shown, base, progress=lambda f, d: progress(f, desc=d))
            fig = plots.pareto(rows)
            page = downloads.figure(fig, session_of(request), "sweep", run_label(shown))
            return {
                self.pareto: figure_value(fig),
                self.pareto_html: download(page),
                self.table: display.sweep_table(rows),
                self.note: sweep_note(shown),
                self.swept: tuple(int(i) for i in shown.token_ids),
            }

        self.button.click(
            sweep,
            {trace, *routing.inputs},
            self.outputs,
            api_visibility="private",
            concurrency_limit=engine.deployment.limits.sweep,
            concurrency_id="sweep",
        )


__all__ = [
    "BudgetSweep",
    "INSPECT_WHILE_STREAMING",
    "PICK_A_TOKEN",
    "SWEEP_WHILE_STREAMING",
    "TokenInspector",
    "shown_key",
    "sweep_note",
]
