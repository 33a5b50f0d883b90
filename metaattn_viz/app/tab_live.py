"""The Live tab: generate and watch routing fill in, re-route on any routing control, the
quality meter (live_quality.py); with the token inspector and the budget sweep (live_inspector.py), which
follow every new trace (`follow`).

`LiveTab(trace, examples)` builds the components (inside the page's gr.Tab) and
`wire(engine, downloads)` attaches their events, each callback a thin adapter: read the
named inputs, parse them (requests.py; Generate's through live_request.py, checked before it
queues), call one engine part, draw (plots, attention_maps)
and word (display) the result. Inputs are passed as a set, so callbacks read them by
component, never by position. The controls start at the project's defaults
(core.settings.DEFAULTS, requests.GENERATION). Every event that puts a new trace on the
page is kept in `trace_events`, so the Export and share panel (live_exports.py) refreshes
after each. A replay or a shared link sets the model dropdown to the run's model where this
server offers it (models.offered_model), and says which model Generate uses where it does
not (models.missing_model_note). While a run streams the page's trace is still the previous
run's: `streams` (live_stream.py) tells the events that read it. Never holds model logic.
"""

from __future__ import annotations

import gradio as gr

from metaattn_viz.app import display, plots
from metaattn_viz.app.deployment import session_of
from metaattn_viz.app.engine import Engine
from metaattn_viz.app.exports import Downloads
from metaattn_viz.app.gradio_queue import session_pending
from metaattn_viz.app.live_exports import ExportPanel
from metaattn_viz.app.live_inspector import FIGURE_MIN_PX, BudgetSweep, TokenInspector
from metaattn_viz.app.live_quality import QualityMeter
from metaattn_viz.app.live_request import generation_request
from metaattn_viz.app.live_stream import GENERATION_RUNNING, STOPPING, Streams, stopping
from metaattn_viz.app.models import missing_model_note, offered_model
from metaattn_viz.app.plotly_html import plotly_view
from metaattn_viz.app.requests import GENERATION, MAX_NEW_TOKENS
from metaattn_viz.app.routing_controls import (
    COMMIT_JS,
    CONTROLLER_LABELS,
    COST_MODEL_LABELS,
    HEDGE_MEASURE_LABELS,
    SCOPE_LABELS,
    SLIDER_IDS,
    WINDOW_MAX,
    WINDOW_MIN,
    RoutingControls,
    as_typed,
)
from metaattn_viz.app.share import GENERATION_PARAMETERS
from metaattn_viz.app.ui_errors import user_errors, warn
from metaattn_viz.core.settings import (
    COST_MODELS,
    DEFAULTS,
    HEDGE_MEASURES,
    HEDGE_POLICIES,
    MIN_COST,
    SCOPES,
    UNCERTAINTY_MEASURES,
)
from metaattn_viz.core.trace import RoutingTrace
from metaattn_viz.routing.controller import KINDS

CONTROL_MIN_PX = 200  # a control's least width: a row of them wraps below it on a phone


class LiveTab:
    """The Live tab's components and events."""

    def __init__(
        self,
        trace: gr.State,
        examples: list[dict],
        models: list[tuple[str, str]] | None = None,
        initial: RoutingTrace | None = None,
    ):
        """`models`: the (label, id) choices of the model dropdown (host.choices(), the
        default first); `initial`: the trace shown before the first run (a shipped example,
        app/examples.py; replayed with no model), else empty placeholders."""
        self.trace = trace  # the page's current RoutingTrace (None before the first run)
        self.trace_events: list = []  # events after which the page shows a new trace
        self.streams = Streams()  # the runs streaming now (the trace is the previous run's)
        empty = initial if initial is not None else plots.empty_trace()
        models = models or []
        with gr.Row():
            with gr.Column(scale=3):
                self.prompt = gr.Textbox(
                    label="Prompt",
                    lines=3,
                    max_lines=10,
                    elem_id="prompt",
                    placeholder="Type a prompt, or pick an example below",
                )
                with gr.Row():
                    self.generate = gr.Button("Generate", variant="primary", elem_id="generate")
                    self.stop = gr.Button("Stop", variant="stop", elem_id="stop")
            with gr.Column(scale=2):
                g = GENERATION
                self.max_new = gr.Slider(
                    0,
                    MAX_NEW_TOKENS,
                    value=g.max_new_tokens,
                    step=1,
                    label="Max new tokens",
                    elem_id="max-new",
                )
                with gr.Row():
                    self.temperature = gr.Slider(
                        0.0, 2.0, value=g.temperature, step=0.05, label="Temperature (0 = greedy)"
                    )
                    self.top_p = gr.Slider(0.05, 1.0, value=g.top_p, step=0.05, label="Top-p")
                with gr.Row():
                    # no minimum: Gradio's check ("Value -1 is less than minimum value 0.")
                    # ran before the app's (live_request.seed) on every event reading it
                    self.seed = gr.Number(g.seed, precision=0, label="Seed")
                    self.chat = gr.Checkbox(g.chat, label="Chat template (instruct model)", elem_id="chat")
        if examples:
            gr.Examples(
                [[e["prompt"], bool(e.get("chat", GENERATION.chat))] for e in examples],
                inputs=[self.prompt, self.chat],
                label="Example prompts",
                example_labels=[e.get("label") or e["prompt"][:60] for e in examples],
            )
        with gr.Row(equal_height=True):
            budget = gr.Slider(
                MIN_COST,
                1.0,
                value=DEFAULTS.budget,
                step=0.01,
                elem_id=SLIDER_IDS["budget"],
                scale=3,
                min_width=2 * CONTROL_MIN_PX,
                label="Compute budget: mean cost per decision under the cost model (notional: "
                "full 1.0, local 0.3, linear 0.15; FLOPs: share of dense attention); re-routes "
                "on release or Enter",
            )
            self.model = gr.Dropdown(
                models,
                value=models[0][1] if models else None,
                label="Model (untrained controllers are labelled)",
                elem_id="model",
                visible=len(models) > 1,
                scale=2,
            )
            self.controller = gr.Radio(
                [(CONTROLLER_LABELS.get(k, k), k) for k in KINDS],
                value=GENERATION.controller,
                label="Controller",
                elem_id="controller",
                min_width=CONTROL_MIN_PX,
            )
            scope = gr.Radio(
                [(SCOPE_LABELS.get(s, s), s) for s in SCOPES],
                value=DEFAULTS.scope,
                label="Budget scope",
                min_width=CONTROL_MIN_PX,
            )
        # two rows of three: six in one row squeezed the threshold's label into five lines
        with gr.Row(equal_height=True):
            hedge_policy = gr.Radio(
                list(HEDGE_POLICIES),
                value=DEFAULTS.hedge_policy,
                label="Hedge policy",
                min_width=CONTROL_MIN_PX,
            )
            hedge_threshold = gr.Slider(
                0.0,
                1.0,
                value=DEFAULTS.hedge_threshold,
                step=0.01,
                label="Hedge threshold (the hedge measure, a fraction of log 3)",
                elem_id=SLIDER_IDS["hedge_threshold"],
                min_width=CONTROL_MIN_PX,
            )
            hedge_measure = gr.Radio(
                [(HEDGE_MEASURE_LABELS.get(m, m), m) for m in HEDGE_MEASURES],
                value=DEFAULTS.hedge_measure,
                label="Hedge measure",
                elem_id="hedge-measure",
                min_width=CONTROL_MIN_PX,
            )
        with gr.Row(equal_height=True):
            window = gr.Slider(
                WINDOW_MIN,
                WINDOW_MAX,
                value=DEFAULTS.window,
                step=8,
                label="Local window (tokens)",
                elem_id=SLIDER_IDS["window"],
                min_width=CONTROL_MIN_PX,
            )
            cost_model = gr.Radio(
                [(COST_MODEL_LABELS.get(c, c), c) for c in COST_MODELS],
                value=DEFAULTS.cost_model,
                label="Cost model (what the budget counts)",
                elem_id="cost-model",
                min_width=CONTROL_MIN_PX,
            )
            with gr.Column(min_width=CONTROL_MIN_PX):  # a checkbox ignores its own min_width
                self.quality_meter = QualityMeter()
                self.quality = self.quality_meter.box
        # commits a slider's value from the keyboard (routing_controls.COMMIT_JS): in the
        # page, out of sight
        self.commit_keys = gr.HTML(
            "", elem_id="commit-keys", js_on_load=COMMIT_JS, visible="hidden", apply_default_css=False
        )
        self.routing = RoutingControls(
            budget, scope, hedge_policy, hedge_threshold, window, hedge_measure, cost_model
        )
        self.meters = gr.HTML(plots.meters(empty), elem_id="meters")
        self.run_status = gr.Markdown(display.example_note(initial), elem_id="run-status")
        with gr.Row(equal_height=True):
            # in columns: a checkbox ignores its own min_width (Gradio 6.31), and the label
            # wrapped one word a line at 390 px
            with gr.Column(scale=2, min_width=CONTROL_MIN_PX):
                self.measure = gr.Dropdown(
                    list(UNCERTAINTY_MEASURES),
                    value="total",
                    label="Uncertainty measure (bottom map)",
                    elem_id="measure",
                )
            with gr.Column(scale=3, min_width=FIGURE_MIN_PX):
                self.relative = gr.Checkbox(
                    False,
                    label="Per-token view: grey each decision that matches its layer's usual expert",
                    elem_id="relative",
                )
        self.maps = plotly_view(plots.routing_maps(empty), "routing-maps", 780, "metaattn-maps")
        self.strip = gr.HighlightedText(
            label="Text: darker = more layers gave the token full attention (click a token to inspect it)",
            elem_id="strip",
            show_legend=False,
            combine_adjacent=False,
            show_inline_category=False,
            interactive=False,
            value=plots.token_strip(empty) if initial is not None else None,
        )
        self.exports = ExportPanel()
        self.inspector = TokenInspector(initial)
        self.sweep = BudgetSweep()

    # -- what several events draw -----------------------------------------------------------
    @property
    def views(self) -> list:
        """The components a new trace redraws: both maps, the token strip, the meters."""
        return [self.maps, self.strip, self.meters]

    def show(self, trace, measure: str, relative: bool = False) -> dict:
        """The views of `trace`, as updates of their components (the expert map relative to
        each layer's usual expert if `relative`)."""
        measure = measure if measure in UNCERTAINTY_MEASURES else "total"
        maps, strip, meters = plots.live_views(trace, measure, relative=bool(relative))
        return {self.maps: maps, self.strip: strip, self.meters: meters}

    @property
    def generation_controls(self) -> list:
        """The prompt and how it is generated: what Generate reads and a replay restores."""
        return [self.prompt, self.max_new, self.temperature, self.top_p, self.seed, self.chat]

    @property
    def run_outputs(self) -> list:
        """What `show_run` updates."""
        r = self.routing
        return [
            *self.views,
            self.trace,
            self.inspector.pos,
            *self.generation_controls,
            self.model,
            self.controller,
            r.budget,
            r.scope,
            r.hedge_policy,
            r.hedge_threshold,
            r.window,
            r.hedge_measure,
            r.cost_model,
        ]

    def show_run(self, trace, measure: str) -> dict:
        """A logged run on the page (a replay): its views, the trace, the token positions,
        its prompt, and its model, controller, routing settings and (where the log kept
        them, from schema version 6 on) generation settings on the controls, so that
        Generate makes the run again. A model this server does not offer leaves the
        dropdown as it is, and a run with no budget or with values between the sliders'
        steps sets them as they can (`RoutingControls.shown_settings`), each with a warning
        naming what Generate uses."""
        made = trace.generation or {}
        generation = {key: made[field] for key, field in GENERATION_PARAMETERS.items() if field in made}
        model = offered_model(trace.model, self.model.choices)
        if trace.model and model is None:
            warn([missing_model_note(trace.model, self.model.choices)])
        warn(self.routing.replay_notes(trace))
        return {
            **self.show(trace, measure),
            self.trace: trace,
            self.inspector.pos: self.inspector.show_positions(trace),
            **({self.prompt: trace.prompt} if trace.prompt else {}),
            **self.show_linked(generation),
            **({self.model: model} if model is not None else {}),
            self.controller: trace.controller,
            **self.routing.show(trace.settings, trace.realized_cost),
        }

    @property
    def link_controls(self) -> dict:
        """The controls a shareable link names, by its parameter (share.PARAMETERS)."""
        r = self.routing
        return {
            "model": self.model,
            "budget": r.budget,
            "controller": self.controller,
            "scope": r.scope,
            "hedge": r.hedge_policy,
            "threshold": r.hedge_threshold,
            "hedge_measure": r.hedge_measure,
            "window": r.window,
            "cost_model": r.cost_model,
            "max_new": self.max_new,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "chat": self.chat,
            "measure": self.measure,
        }

    def show_linked(self, values: dict, notes: list[str] | None = None) -> dict:
        """The controls set to a link's values (keys of link_controls), each kept within
        its control's range (a run made through the API may have a wider window); a value
        so moved is said in `notes` (the next Generate uses the control's value). A model
        this server does not offer is left out, said in `notes` too (the dropdown keeps its
        value: on the page's load, where links are opened, the default)."""
        out = {}
        for key, value in values.items():
            control = self.link_controls[key]
            if control is self.model:
                model = offered_model(value, control.choices)
                if model is None:
                    if notes is not None:
                        notes.append(missing_model_note(value, control.choices, control.value))
                    continue
                value = model
            elif isinstance(control, gr.Slider):
                kept = min(max(value, control.minimum), control.maximum)
                if kept != value and notes is not None:
                    notes.append(
                        f"{control.label.split(' (')[0]} {value:g} is outside the page's range "
                        f"({control.minimum:g}-{control.maximum:g}): set to {kept:g}."
                    )
                value = kept
            out[control] = value
        return out

    # -- events -----------------------------------------------------------------------------
    # The callbacks' names are their (private) endpoints' names; the named API endpoints
    # (api.py) own "generate" and "reroute".
    def wire(self, engine: Engine, downloads: Downloads) -> None:
        def going_on(session):  # a run of the session: its trace is not the page's yet
            return self.streams.going_on(session, engine.generations)

        self.inspector.wire(engine, downloads, self.trace, self.strip, going_on)
        self.sweep.wire(engine, downloads, self.trace, self.routing, going_on)
        generated = self._wire_generation(engine)
        rerouted = self._wire_reroute(engine)
        self.trace_events += self.quality_meter.wire(
            engine, self.trace, self.meters, going_on, after=[rerouted], ended=generated
        )

    def follow(self, event) -> None:
        """After `event`, which put a new trace on the page (a generation, a re-route, a
        replay), bring the token inspector and the budget sweep up to date with it (they
        stayed on the previous trace): each panel's `refresh`."""

        @user_errors("updating the inspector and the sweep")
        def refresh_after_trace(trace, shown, swept, request: gr.Request):
            out = {**self.sweep.refresh(trace, swept), **self.inspector.refresh(trace, shown, request)}
            return out or gr.skip()

        event.then(
            refresh_after_trace,
            [self.trace, self.inspector.inspected, self.sweep.swept],
            [*self.inspector.outputs, self.inspector.pos, *self.sweep.outputs],
            api_visibility="private",
            show_progress="hidden",
        )

    def _wire_generation(self, engine: Engine):
        @user_errors("generating")
        def live_generate(data, request: gr.Request):
            req = generation_request(self, data)
            key = session_of(request)
            job = engine.generations.start(req, key=key, owner=engine.deployment.owner(key))
            # the frames draw the measure and view picked now, or later while the run streams
            stream = self.streams.open(key, (data[self.measure], bool(data[self.relative])), job)
            warned, last, drawn = 0, None, None
            try:
                yield {self.run_status: STOPPING if stopping(job) else "Routing the prompt\u2026"}
                for snap in job.updates():
                    if stream.superseded:  # a newer Generate of the session draws the page
                        return
                    if len(job.notes) > warned:
                        warn(job.notes[warned:])
                        warned = len(job.notes)
                    if snap is None:
                        continue
                    last, drawn = snap, stream.view
                    out = {
                        **self.show(snap, *drawn),
                        # after Stop (its line) the status says so until the run's end
                        self.run_status: STOPPING if stopping(job) else display.run_status(job, snap),
                    }
                    if job.done:
                        positions = self.inspector.show_positions(snap)
                        out.update({self.trace: snap, self.inspector.pos: positions})
                    yield out
            finally:
                again = self.streams.close(key, stream, drawn)
                if not job.done:  # the page went away: the visitor ended the run ("stopped")
                    job.stop()
            if stream.superseded:
                return
            # no frame drawn (it failed first): the status line says how it ended, not Stop's
            end = {self.run_status: display.run_status(job, None)} if drawn is None else {}
            if again is not None:  # picked as the last frame went out, or while none was drawn
                shown = last or stream.shown or plots.empty_trace()  # the page's, if none drawn
                end[self.maps] = plots.routing_maps_json(shown, again[0], relative=again[1])
            if end:
                yield end
            if len(job.notes) > warned:
                warn(job.notes[warned:])
            if job.error is not None:
                raise job.error
            # an answer that ended at once says why (the status line says it too)
            empty = display.empty_generation_note(last, req.max_new_tokens, req.chat)
            if empty and job.status == "done":
                warn([empty])

        @user_errors("generating")
        def check_generate(data):
            # a refused Generate says so in its toast alone, and changes nothing: no outputs
            # here, where the generation's (the views) took Gradio's "Error" badges
            # (live_request.py); queued, as Gradio 6 shows no toast for an unqueued error
            generation_request(self, data)

        def stop_previous(request: gr.Request):
            # A new Generate in this tab ends the run still streaming there (logged
            # "stopped"), before the new one queues: with one model slot it would otherwise
            # wait for the old run to finish. Not queued, so it runs at once, and always
            # before its own generation (the chain below), never after it.
            if request is not None:
                session = session_of(request)
                engine.generations.stop(session)
                # the view picked from now is the run's
                self.streams.submit(session, session_pending(session))

        asked = {*self.generation_controls, self.controller, self.quality, self.model, *self.routing.inputs}
        # "multiple": Gradio drops a trigger while the event is pending ("once", its
        # default), which made a second Generate during a stream do nothing at all; the
        # values as sent (preprocess=False), which live_request reads with the app's words
        checked = gr.on(
            [self.generate.click, self.prompt.submit],
            check_generate,
            asked,
            None,
            api_visibility="private",
            concurrency_limit=None,  # no model: never waits for a run
            show_progress="hidden",
            trigger_mode="multiple",
            preprocess=False,
        )
        started = checked.success(
            stop_previous, None, None, api_visibility="private", queue=False, trigger_mode="multiple"
        )
        generated = started.then(
            live_generate,
            {*asked, self.measure, self.relative},
            [*self.views, self.run_status, self.trace, self.inspector.pos],
            api_visibility="private",
            concurrency_id="model",
            concurrency_limit=engine.deployment.limits.model,
            show_progress="minimal",
            trigger_mode="multiple",
            preprocess=False,
        )
        # in trace_events through the quality meter's check after it (live_quality.py), which
        # may add the KL: the exports refresh once, after both
        self.follow(generated)

        def stop(request: gr.Request):
            # Not queued: it acts at once, and answers, even with a full queue (a queued toast
            # was refused there); the status line says it until the run's end (Streams.stop)
            session = session_of(request) if request is not None else None
            said = self.streams.stop(session, engine.generations, session_pending(session))
            return STOPPING if said else gr.skip()

        self.stop.click(
            stop, None, self.run_status, api_visibility="private", queue=False, show_progress="hidden"
        )

        def pick_model(model):  # load a newly picked model while the visitor types
            if model:
                engine.host.start_loading(model)

        self.model.input(pick_model, self.model, None, api_visibility="private", queue=False)
        return generated

    def _wire_reroute(self, engine: Engine):
        @user_errors("re-routing")
        def live_reroute(data, request: gr.Request):
            trace = data[self.trace]
            empty = self.routing.empty(data)
            if empty:  # a sentence, and the box back at the value the maps show
                warn(empty)
                if trace is None:
                    return gr.skip()
                shown = self.routing.show(trace.settings, trace.realized_cost)
                return {c: shown[c] for c in self.routing.sliders.values() if as_typed(data[c]) is None}
            settings = self.routing.settings(data)
            boxes = self.routing.box_updates(data)  # a box between steps shows the step used
            if trace is None:
                return {**boxes, self.run_status: "The settings apply to the next generation."}
            if self.routing.unchanged(settings, trace) and data[self.controller] == trace.controller:
                # nothing changed (a box left with Tab, a slider released where it was):
                # no re-route, and no run in the log
                return boxes or gr.skip()
            if self.streams.going_on(session_of(request), engine.generations):
                gr.Warning(
                    f"{GENERATION_RUNNING}: the new settings apply to the next one (or stop it first)."
                )
                return boxes or gr.skip()
            owner = engine.deployment.owner(session_of(request))
            new = engine.analysis.reroute(trace, settings, data[self.controller], owner=owner)
            return {
                **self.show(new, data[self.measure], data[self.relative]),
                self.run_status: display.reroute_note(new),
                self.trace: new,
                **boxes,
            }

        r = self.routing
        # A slider commits its value on release (pointer up, or its box losing focus), on
        # Enter in its box and after arrow keys (commit_keys, routing_controls.COMMIT_JS);
        # not on `.input`, which fires at every keystroke in the box ("0.35" passes through
        # "0" and "0.3") and every step of a drag (a re-route and a logged run each).
        # "always_last": a value committed while a re-route runs is routed after it (the
        # default, "once", dropped it and the maps stayed on the earlier value).
        rerouted = gr.on(
            [
                r.budget.release,
                r.hedge_threshold.release,
                r.window.release,
                self.commit_keys.click,
                self.controller.input,
                r.scope.input,
                r.hedge_policy.input,
                r.hedge_measure.input,
                r.cost_model.input,
            ],
            live_reroute,
            {self.trace, self.controller, self.measure, self.relative, *r.inputs},
            [*self.views, self.run_status, self.trace, *r.sliders.values()],
            api_visibility="private",
            concurrency_id="model",
            concurrency_limit=engine.deployment.limits.model,
            show_progress="minimal",
            trigger_mode="always_last",
            # the values as sent: a slider's box may be empty or beyond its ends here (a
            # release dispatched before the box is clamped), which Gradio's preprocessing
            # refused with its own errors; RoutingControls reads them (the radios are
            # checked by parse_settings, the measure by show)
            preprocess=False,
        )
        # in trace_events through the quality meter's event after it (live_quality.py), which
        # may add the KL to the trace: the exports refresh once, after both
        self.follow(rerouted)

        @user_errors("redrawing the maps")
        def redraw_maps(trace, measure, relative, request: gr.Request):
            if self.streams.pick(session_of(request), (measure, bool(relative)), trace):
                return gr.skip()  # the run's frames draw it: the trace is the previous run's
            shown = trace if trace is not None else plots.empty_trace()
            return plots.routing_maps_json(shown, measure, relative=bool(relative))

        redrawn = gr.on(
            [self.measure.input, self.relative.input],
            redraw_maps,
            [self.trace, self.measure, self.relative],
            self.maps,
            api_visibility="private",
            queue=False,
        )
        self.trace_events.append(redrawn)  # the maps' page follows the measure and the view
        return rerouted


__all__ = ["LiveTab"]
