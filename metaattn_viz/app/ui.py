"""The Gradio page: watch routing live, drag the budget, inspect a token, sweep budgets,
replay and query the routing log.

Every callback is a thin adapter: parse the controls (engine.parse_*), call one Engine
method, draw with plots / attention_maps. User mistakes surface as gr.Warning / gr.Error
in plain words; anything unexpected is logged with its traceback and shown as one short
sentence. Events are wired in one place (`_wire`). Named API endpoints (gr.api):
`/generate`, `/reroute` (both return the trace JSON of `route --json`) and `/status`.
Never holds model logic of its own.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from pathlib import Path

import gradio as gr
import plotly as plotly_package

from metaattn_viz.app import attention_maps
from metaattn_viz.app import plots
from metaattn_viz.app.engine import (APP_MAX_CONTEXT, CONTROLLERS, DEFAULTS, MAX_NEW_TOKENS,
                                 AppError, Engine, parse_request, parse_settings,
                                 text_from_json)
from metaattn_viz.paths import ASSETS_DIR
from metaattn_viz.core.settings import HEDGE_POLICIES, SCOPES, UNCERTAINTY_MEASURES

log = logging.getLogger(__name__)

EXAMPLES_FILE = ASSETS_DIR / "examples.json"
SCOPE_LABELS = {"global": "global (layers compete)", "layer": "per layer"}
SORTS = {"newest first": "-created_at", "oldest first": "created_at",
         "most tokens": "-n_tokens", "lowest cost": "realized_cost",
         "highest cost": "-realized_cost", "budget": "budget", "status": "status"}
DEFAULT_SQL = ("SELECT layer, avg((expert = 0)::DOUBLE) AS full_share,\n"
               "       avg(uncertainty) AS mean_uncertainty\n"
               "FROM routes GROUP BY layer ORDER BY layer")
INTRO = """# metaattn-viz
Every token in every layer of a real language model is routed to **full**, **linear** or
**local** attention by a Bayesian meta-controller under a compute budget. Generate, watch the
decisions fill in, drag the budget, click a token to see its posterior and the attention it
actually used."""


def load_examples(path: Path = EXAMPLES_FILE) -> list[dict]:
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
        return [e for e in items if isinstance(e, dict) and e.get("prompt")]
    except (OSError, ValueError):
        log.warning("no example prompts at %s", path)
        return []


# ---------------------------------------------------------------------------------------
# Error adapter: AppError -> gr.Error with its sentence; the unexpected -> logged + short
# ---------------------------------------------------------------------------------------
def _as_gr_error(exc: BaseException, what: str):
    if isinstance(exc, gr.Error):
        return exc
    if isinstance(exc, AppError):
        return gr.Error(str(exc), print_exception=False)
    log.error("%s failed", what, exc_info=exc)
    return gr.Error(f"Something went wrong while {what} ({type(exc).__name__}). The server log "
                    "has the details; the app is still running.", print_exception=False)


def user_errors(what: str):
    """Decorate a callback (plain or generator) so that failures become plain messages."""
    def wrap(fn):
        if inspect.isgeneratorfunction(fn):
            @functools.wraps(fn)
            def gen(*args, **kwargs):
                try:
                    yield from fn(*args, **kwargs)
                except Exception as exc:
                    raise _as_gr_error(exc, what) from None
            return gen

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                raise _as_gr_error(exc, what) from None
        return call
    return wrap


def _warn(notes) -> None:
    for note in notes:
        gr.Warning(note)


def status_markdown(engine: Engine) -> str:
    s = engine.status()
    if s["model_error"]:
        model = f"**Model unavailable:** {s['model_error']}"
    elif not s["model_ready"]:
        model = "Loading the model\u2026 (the page works; Generate waits for it)"
    else:
        untrained = [k for k, c in s["controllers"].items() if not c["trained"]]
        model = f"Model **{s['model']}** ready"
        if s["load_seconds"]:
            model += f" (loaded in {s['load_seconds']:.1f} s)"
        if untrained:
            model += (f". \u26a0 Untrained controllers: {', '.join(untrained)} (routing is "
                      "not calibrated; run `metaattn-viz calibrate`)")
    logging_ = (f"runs logged to `{s['log_path']}`" if s["logging"]
                else f"runs not logged: {s['log_problem']}")
    return f"{model}. {logging_}. At most {s['max_context']} tokens are routed."


def _run_status(job, snap) -> str:
    n = snap.n_tokens if snap is not None else 0
    new = n - (snap.n_prompt_tokens if snap is not None else 0)
    tps = snap.timings.get("tokens_per_s") if snap is not None else None
    rate = f", {tps:.1f} tokens/s" if tps else ""
    if job.phase in ("starting", "prefill"):
        return "Routing the prompt\u2026"
    if job.phase == "decoding":
        return f"Generating\u2026 {n} tokens ({new} new{rate})"
    if job.phase == "quality":
        return f"Measuring quality against the dense model\u2026 ({n} tokens)"
    if job.status == "failed":
        return "The generation failed."
    what = "Stopped" if job.status == "interrupted" else "Done"
    logged = f"; run `{job.run_id}`" if job.run_id else ""
    return f"{what}: {n} tokens ({new} generated{rate}){logged}."


def _views(trace, measure: str):
    return plots.live_views(trace, measure if measure in UNCERTAINTY_MEASURES else "total")


# The live maps are redrawn in place by plotly.js in the page (Plotly.react on one div, the
# latest frame only, while the previous draw finishes), instead of through gr.Plot: gr.Plot
# remounts its plot on every new value (a full newPlot, twice per update in Gradio 6.31,
# ~0.2 s each on a slow CPU), which drops the zoom and, at four frames a second, floods the
# browser until clicks wait for seconds. plotly.js is served from the installed plotly
# package, so it works offline.
PLOTLY_JS = Path(plotly_package.__file__).parent / "package_data" / "plotly.min.js"
PLOTLY_STREAM_JS = r"""
let busy = false, pending = false;
function draw() {
  const div = element.querySelector('.metaattn-plot');
  if (!window.Plotly || !div) { setTimeout(draw, 100); return; }
  if (busy) { pending = true; return; }
  const value = props.value;
  if (!value) return;
  busy = true;
  const fig = typeof value === 'string' ? JSON.parse(value) : value;
  Promise.resolve(window.Plotly.react(div, fig.data, fig.layout,
                                      {responsive: true, displaylogo: false}))
    .catch((e) => console.error('metaattn maps', e))
    .finally(() => {
      busy = false;
      if (pending) { pending = false; requestAnimationFrame(draw); }
    });
}
draw();
watch('value', draw);
"""


def plotly_stream(fig, elem_id: str, height: int):
    """A gr.HTML whose value is a plotly figure's JSON, drawn and updated in place."""
    return gr.HTML(fig.to_json(), elem_id=elem_id,
                   html_template=f"<div class='metaattn-plot' style='width:100%;"
                                 f"min-height:{int(height)}px'></div>",
                   head=f"<script src='gradio_api/file={PLOTLY_JS.as_posix()}'></script>",
                   js_on_load=PLOTLY_STREAM_JS, apply_default_css=False)


# ---------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------
def build_app(model: str | None = None, db: str | None = None, log_runs: bool = True,
              engine: Engine | None = None):
    engine = engine or Engine(model, db, log_runs)
    gr.set_static_paths([attention_maps.VENDOR_DIR, PLOTLY_JS])
    examples = load_examples()
    ui = {}
    with gr.Blocks(title="metaattn-viz") as demo:
        demo.engine = engine  # for tests and the benchmark
        gr.Markdown(INTRO)
        ui["status"] = gr.Markdown(status_markdown(engine), elem_id="model-status")
        ui["timer"] = gr.Timer(1.0)
        ui["trace"] = gr.State(None)
        with gr.Tabs(selected="live") as ui_tabs:
            ui["tabs"] = ui_tabs
            with gr.Tab("Live", id="live"):
                _live_tab(ui, examples)
            with gr.Tab("History", id="history") as history:
                ui["history_tab"] = history
                _history_tab(ui)
            with gr.Tab("About", id="about"):
                gr.Markdown(ABOUT)
        _wire(ui, engine)
        _api(engine)
    return demo


def _live_tab(ui, examples) -> None:
    with gr.Row():
        with gr.Column(scale=3):
            ui["prompt"] = gr.Textbox(label="Prompt", lines=3, max_lines=10, elem_id="prompt",
                                      placeholder="Type a prompt, or pick an example below")
            with gr.Row():
                ui["generate"] = gr.Button("Generate", variant="primary", elem_id="generate")
                ui["stop"] = gr.Button("Stop", variant="stop", elem_id="stop")
        with gr.Column(scale=2):
            ui["max_new"] = gr.Slider(0, MAX_NEW_TOKENS, value=48, step=1, label="Max new tokens",
                                      elem_id="max-new")
            with gr.Row():
                ui["temperature"] = gr.Slider(0.0, 2.0, value=0.0, step=0.05,
                                              label="Temperature (0 = greedy)")
                ui["top_p"] = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p")
            with gr.Row():
                ui["seed"] = gr.Number(0, precision=0, label="Seed", minimum=0)
                ui["chat"] = gr.Checkbox(True, label="Chat template (instruct model)",
                                         elem_id="chat")
    if examples:
        gr.Examples([[e["prompt"], bool(e.get("chat", True))] for e in examples],
                    inputs=[ui["prompt"], ui["chat"]], label="Example prompts",
                    example_labels=[e.get("label") or e["prompt"][:60] for e in examples])
    with gr.Row(equal_height=True):
        ui["budget"] = gr.Slider(0.15, 1.0, value=DEFAULTS.budget, step=0.01, elem_id="budget",
                                 scale=3,
                                 label="Compute budget: mean notional cost per decision "
                                       "(full 1.0, local 0.3, linear 0.15); re-routes on release")
        ui["controller"] = gr.Radio([("Bayesian", "bayes"), ("prior-free", "priorfree")],
                                    value="bayes", label="Controller", elem_id="controller")
        ui["scope"] = gr.Radio([(SCOPE_LABELS.get(s, s), s) for s in SCOPES],
                               value=DEFAULTS.scope, label="Budget scope")
    with gr.Row(equal_height=True):
        ui["hedge_policy"] = gr.Radio(list(HEDGE_POLICIES), value=DEFAULTS.hedge_policy,
                                      label="Hedge policy")
        ui["hedge_threshold"] = gr.Slider(0.0, 1.0, value=DEFAULTS.hedge_threshold, step=0.01,
                                          label="Hedge threshold (total uncertainty)")
        ui["window"] = gr.Slider(8, 256, value=DEFAULTS.window, step=8,
                                 label="Local window (tokens)")
        ui["quality"] = gr.Checkbox(True, label="Quality meter (dense shadow pass)")
    ui["meters"] = gr.HTML(plots.meters(plots_empty_trace()), elem_id="meters")
    ui["run_status"] = gr.Markdown("", elem_id="run-status")
    ui["measure"] = gr.Dropdown(list(UNCERTAINTY_MEASURES), value="total",
                                label="Uncertainty measure (bottom map)", elem_id="measure")
    ui["maps"] = plotly_stream(plots.routing_maps(plots_empty_trace()), "routing-maps", 780)
    ui["strip"] = gr.HighlightedText(
        label="Text: darker = more layers gave the token full attention (click a token to "
              "inspect it)", elem_id="strip", show_legend=False, combine_adjacent=False,
        show_inline_category=False, interactive=False)
    with gr.Accordion("Token inspector: posterior by layer and the attention actually used",
                      open=True, elem_id="inspector"):
        with gr.Row(equal_height=True):
            ui["pos"] = gr.Slider(0, 1, value=0, step=1, label="Token position",
                                  elem_id="inspect-pos", scale=4)
            ui["inspect"] = gr.Button("Inspect token", elem_id="inspect", scale=1)
        ui["inspect_note"] = gr.Markdown("", elem_id="inspect-note")
        with gr.Row():
            ui["ternary"] = gr.Plot(plots.ternary_placeholder(), show_label=False,
                                    elem_id="ternary")
            ui["conc_table"] = gr.Dataframe(headers=plots.concentration_columns(),
                                            label="Concentrations and decisions by layer",
                                            interactive=False, elem_id="conc-table",
                                            max_height=440, wrap=False)
        with gr.Tabs():
            with gr.Tab("bertviz head view"):
                ui["head_view"] = gr.HTML(attention_maps.message(
                    "Pick a token to see the attention it used."), elem_id="head-view")
            with gr.Tab("bertviz model view"):
                ui["model_view"] = gr.HTML(attention_maps.message(
                    "Pick a token to see the attention it used."), elem_id="model-view")
    with gr.Accordion("Budget sweep: quality against cost for both controllers and the "
                      "baselines", open=False, elem_id="sweep"):
        ui["sweep"] = gr.Button("Sweep budgets", elem_id="sweep-button")
        ui["pareto"] = gr.Plot(plots.pareto([]), show_label=False, elem_id="pareto")
        ui["sweep_table"] = gr.Dataframe(interactive=False, label="Sweep", max_height=300)


def plots_empty_trace():
    """An empty trace for the placeholders before the first run."""
    from metaattn_viz.core.settings import RoutingSettings
    from metaattn_viz.core.trace import RoutingTrace

    return RoutingTrace(model="", controller="bayes", controller_id="", controller_trained=False,
                        settings=RoutingSettings(), n_layers=1, head_dim=64)


def _history_tab(ui) -> None:
    gr.Markdown("Every generation and re-route is in the routing log (DuckDB). Click a row to "
                "pick it as run A (the previous pick becomes run B); replay it into the Live "
                "views without the model, or compare A and B.")
    with gr.Row(equal_height=True):
        ui["h_text"] = gr.Textbox(label="Search prompt and output", scale=3)
        ui["h_status"] = gr.Dropdown(["any", "running", "done", "interrupted", "failed"],
                                     value="any", label="Status")
        ui["h_controller"] = gr.Dropdown(["any", *CONTROLLERS], value="any", label="Controller")
        ui["h_sort"] = gr.Dropdown(list(SORTS), value="newest first", label="Sort")
        ui["h_refresh"] = gr.Button("Refresh", elem_id="history-refresh")
    ui["runs"] = gr.Dataframe(interactive=False, elem_id="runs", max_height=360, wrap=False)
    with gr.Row(equal_height=True):
        ui["run_a"] = gr.Textbox(label="Run A", elem_id="run-a", scale=3)
        ui["run_b"] = gr.Textbox(label="Run B", elem_id="run-b", scale=3)
        ui["replay"] = gr.Button("Replay run A", variant="primary", elem_id="replay")
        ui["compare"] = gr.Button("Compare A and B", elem_id="compare")
    ui["compare_note"] = gr.Markdown("", elem_id="compare-note")
    with gr.Row():
        ui["cmp_a"] = gr.Plot(plots.expert_map(plots_empty_trace(), height=360),
                              show_label=False, elem_id="compare-a")
        ui["cmp_b"] = gr.Plot(plots.expert_map(plots_empty_trace(), height=360),
                              show_label=False, elem_id="compare-b")
    ui["cmp_table"] = gr.Dataframe(
        headers=["pos", "token_a", "token_b", "same_token", "routes_a", "routes_b", "agreement",
                 "cost_a", "cost_b"], interactive=False, elem_id="compare-table",
        label="Token by token (F full, L linear, W local window; lower case = hedged)",
        max_height=360)
    with gr.Accordion("Read-only SQL console (tables: runs, tokens, routes, experts)",
                      open=False):
        ui["sql"] = gr.Code(DEFAULT_SQL, language="sql", label="Query", elem_id="sql")
        ui["sql_run"] = gr.Button("Run query", elem_id="sql-run")
        ui["sql_note"] = gr.Markdown("", elem_id="sql-note")
        ui["sql_result"] = gr.Dataframe(interactive=False, max_height=360, wrap=False,
                                        elem_id="sql-result")
    with gr.Accordion("Download the routing log", open=False):
        with gr.Row(equal_height=True):
            ui["export_fmt"] = gr.Radio(["parquet", "csv"], value="parquet",
                                        label="Format (partitioned by day, zipped)")
            ui["export"] = gr.Button("Prepare download", elem_id="export")
        ui["export_file"] = gr.File(label="Routing log", interactive=False, elem_id="export-file")


ABOUT = """
### What you see
- **Expert map**: one cell per (layer, token): the expert the controller's posterior and the
  budget solver chose. Vermillion = full attention (cost 1.0), yellow = local sliding window
  (0.3), sky blue = linear attention (0.15); an **x** marks a hedged decision (an uncertain
  cheap decision that mixes in other experts). The dashed line separates prompt and output.
- **Uncertainty map**: total (entropy of the posterior mean), aleatoric, epistemic (mutual
  information) or vacuity (K / evidence). The prior-free controller is a point estimate: it
  has no epistemic part.
- **Meters**: realised notional cost against the budget, the real attention FLOPs against
  dense attention (for short texts linear attention costs more FLOPs than full), tokens per
  second, and KL(dense || routed) per token from a dense shadow pass (switch it off to save
  a forward pass per change). After a re-route the tokens/s meter shows the re-route's rate.
- **Budget slider**: on release the same text is routed again (prompt and output together,
  as a prefill), so the maps show what the controller would have done at that budget. The
  budget scope says who meets it: all layers together (global, the default: layers that
  need full attention get it, others give it up) or every layer on its own.
- **History**: every run, replayable without the model; the SQL console is read-only.
"""


# ---------------------------------------------------------------------------------------
# Callbacks (thin adapters) and wiring
# ---------------------------------------------------------------------------------------
def _wire(ui, engine: Engine) -> None:
    live_outputs = [ui["maps"], ui["strip"], ui["meters"]]
    settings_inputs = [ui["budget"], ui["scope"], ui["hedge_policy"], ui["hedge_threshold"],
                       ui["window"]]

    def settings_of(budget, scope, hedge_policy, hedge_threshold, window):
        return parse_settings(budget, scope, hedge_policy, hedge_threshold, window)

    def tick():
        done = engine.status()["model_ready"] or engine.status()["model_error"] is not None
        return status_markdown(engine), gr.Timer(active=not done)

    ui["timer"].tick(tick, None, [ui["status"], ui["timer"]], api_visibility="private",
                     queue=False, show_progress="hidden")

    # -- generate / stop ---------------------------------------------------------------------
    @user_errors("generating")
    def live_generate(prompt, max_new, temperature, top_p, seed, chat, budget, controller,
                      scope, hedge_policy, hedge_threshold, window, quality, measure,
                      request: gr.Request):
        settings = settings_of(budget, scope, hedge_policy, hedge_threshold, window)
        req = parse_request(prompt, settings, controller, max_new, temperature, top_p, seed,
                            chat, quality)
        key = request.session_hash if request is not None else None
        job = engine.start(req, key=key)
        skip = gr.skip()
        yield skip, skip, skip, "Routing the prompt\u2026", skip, skip
        warned = 0
        try:
            for snap in job.updates():
                if len(job.notes) > warned:
                    _warn(job.notes[warned:])
                    warned = len(job.notes)
                if snap is None:
                    continue
                pos = (gr.Slider(maximum=max(snap.n_tokens - 1, 1), value=snap.n_tokens - 1)
                       if job.done else skip)
                yield (*_views(snap, measure), _run_status(job, snap),
                       snap if job.done else skip, pos)
        finally:
            if not job.done:  # the page went away: stop the model, the run is interrupted
                job.stop()
        if len(job.notes) > warned:
            _warn(job.notes[warned:])
        if job.error is not None:
            raise job.error

    gen_inputs = [ui["prompt"], ui["max_new"], ui["temperature"], ui["top_p"], ui["seed"],
                  ui["chat"], *settings_inputs[:1], ui["controller"], *settings_inputs[1:],
                  ui["quality"], ui["measure"]]
    gen_outputs = [*live_outputs, ui["run_status"], ui["trace"], ui["pos"]]
    for trigger in (ui["generate"].click, ui["prompt"].submit):
        trigger(live_generate, gen_inputs, gen_outputs, api_visibility="private",
                concurrency_id="model", show_progress="minimal")

    def stop(request: gr.Request):
        if request is not None and engine.stop(request.session_hash):
            gr.Info("Stopping the generation\u2026")

    ui["stop"].click(stop, None, None, api_visibility="private", queue=False)

    # -- re-route on any routing control, then the quality meter ---------------------------
    @user_errors("re-routing")
    def live_reroute(trace, budget, controller, scope, hedge_policy, hedge_threshold, window,
                     measure, request: gr.Request):
        settings = settings_of(budget, scope, hedge_policy, hedge_threshold, window)
        skip = gr.skip()
        if trace is None:
            return skip, skip, skip, "The settings apply to the next generation.", skip
        if request is not None and engine.running(request.session_hash):
            gr.Warning("A generation is running: the new settings apply to the next one "
                       "(or stop it first).")
            return skip, skip, skip, skip, skip
        new = engine.reroute(trace, settings, controller)
        note = (f"Re-routed {new.n_tokens} tokens at budget {settings.budget:.2f} "
                f"({new.timings['reroute_ms']:.0f} ms).")
        return (*_views(new, measure), note, new)

    @user_errors("measuring quality")
    def measure_quality(trace, quality):
        if not quality or trace is None or trace.n_tokens < 2 or trace.kl_to_dense is not None:
            return gr.skip(), gr.skip()
        trace.kl_to_dense = engine.quality(trace)
        return plots.meters(trace), trace

    reroute_inputs = [ui["trace"], ui["budget"], ui["controller"], *settings_inputs[1:],
                      ui["measure"]]
    reroute_outputs = [*live_outputs, ui["run_status"], ui["trace"]]
    for trigger in (ui["budget"].release, ui["hedge_threshold"].release, ui["window"].release,
                    ui["controller"].input, ui["scope"].input, ui["hedge_policy"].input):
        trigger(live_reroute, reroute_inputs, reroute_outputs, api_visibility="private",
                concurrency_id="model", show_progress="minimal").then(
            measure_quality, [ui["trace"], ui["quality"]], [ui["meters"], ui["trace"]],
            api_visibility="private", concurrency_id="model", show_progress="hidden")
    ui["quality"].input(measure_quality, [ui["trace"], ui["quality"]],
                        [ui["meters"], ui["trace"]], api_visibility="private",
                        show_progress="hidden")

    @user_errors("redrawing the maps")
    def redraw_maps(trace, measure):
        return plots.routing_maps_json(trace if trace is not None else plots_empty_trace(),
                                       measure)

    ui["measure"].input(redraw_maps, [ui["trace"], ui["measure"]], ui["maps"],
                        api_visibility="private", queue=False)

    # -- inspector ---------------------------------------------------------------------------
    @user_errors("inspecting the token")
    def inspect_token(trace, pos):
        if trace is None or trace.n_tokens == 0:
            raise AppError("Nothing to inspect yet: generate (or replay) a text first.")
        pos = min(max(int(pos), 0), trace.n_tokens - 1)
        fig, table = plots.ternary(trace, pos), plots.concentration_table(trace, pos)
        try:
            view = engine.inspect(trace, pos)
        except AppError as exc:
            msg = attention_maps.message(str(exc))
            return fig, table, msg, msg, str(exc)
        head = attention_maps.iframe(attention_maps.head_view_page(view),
                                     min(640, 110 + 23 * len(view.positions)), "head view")
        model = attention_maps.iframe(attention_maps.model_view_page(view), 720, "model view")
        label = plots.token_label(pos, trace.tokens[pos], 30)
        note = (f"Token **{label}**. bertviz shows {len(view.positions)} of its "
                f"{pos + 1} visible positions (the attention sinks and the last ones), holding "
                f"{100 * view.shown_mass:.0f}% of its attention on average over layers and "
                "heads; each head's row mixes the experts by the weights the router applied.")
        return fig, table, head, model, note

    inspect_outputs = [ui["ternary"], ui["conc_table"], ui["head_view"], ui["model_view"],
                       ui["inspect_note"]]
    ui["inspect"].click(inspect_token, [ui["trace"], ui["pos"]], inspect_outputs,
                        api_visibility="private")

    def pick_token(evt: gr.SelectData):
        return evt.index if isinstance(evt.index, int) else evt.index[0]

    ui["strip"].select(pick_token, None, ui["pos"], api_visibility="private", queue=False).then(
        inspect_token, [ui["trace"], ui["pos"]], inspect_outputs, api_visibility="private")

    # -- sweep -------------------------------------------------------------------------------
    @user_errors("sweeping budgets")
    def sweep(trace, budget, scope, hedge_policy, hedge_threshold, window,
              progress=gr.Progress()):
        if trace is None:
            raise AppError("Nothing to sweep yet: generate (or replay) a text first.")
        base = settings_of(budget, scope, hedge_policy, hedge_threshold, window)
        rows = engine.sweep(trace, base, progress=lambda f, d: progress(f, desc=d))
        import pandas as pd

        table = pd.DataFrame(rows)[["policy", "budget", "label", "realized_cost",
                                    "kl_to_dense", "flops_ratio"]].round(4)
        return plots.pareto(rows), table

    ui["sweep"].click(sweep, [ui["trace"], *settings_inputs], [ui["pareto"], ui["sweep_table"]],
                      api_visibility="private", concurrency_limit=1, concurrency_id="sweep")

    # -- history -----------------------------------------------------------------------------
    @user_errors("listing runs")
    def list_runs(text, status, controller, sort):
        return engine.runs(text, None if status == "any" else status,
                           None if controller == "any" else controller,
                           SORTS.get(sort, "-created_at"))

    filters = [ui["h_text"], ui["h_status"], ui["h_controller"], ui["h_sort"]]
    for trigger in (ui["h_refresh"].click, ui["h_text"].submit, ui["h_status"].input,
                    ui["h_controller"].input, ui["h_sort"].input, ui["history_tab"].select):
        trigger(list_runs, filters, ui["runs"], api_visibility="private")

    def pick_run(run_a, evt: gr.SelectData):
        row = evt.row_value or []
        run_id = str(row[0]) if row else ""
        if not run_id or run_id == run_a:
            return gr.skip(), gr.skip()
        return run_id, run_a or gr.skip()

    ui["runs"].select(pick_run, [ui["run_a"]], [ui["run_a"], ui["run_b"]],
                      api_visibility="private", queue=False)

    @user_errors("replaying the run")
    def replay(run_id, measure):
        trace = engine.replay(run_id)
        s = trace.settings
        budget = s.budget if s.budget is not None else 1.0
        note = (f"Replayed run `{trace.run_id}` from the routing log: {trace.n_tokens} tokens, "
                f"{trace.controller} controller, budget {s.budget}.")
        return (*_views(trace, measure), note, trace,
                gr.Slider(maximum=max(trace.n_tokens - 1, 1), value=trace.n_tokens - 1),
                budget, trace.controller, s.scope, s.hedge_policy, s.hedge_threshold,
                min(max(s.window, 8), 256), gr.Tabs(selected="live"))

    ui["replay"].click(replay, [ui["run_a"], ui["measure"]],
                       [*live_outputs, ui["run_status"], ui["trace"], ui["pos"], ui["budget"],
                        ui["controller"], ui["scope"], ui["hedge_policy"],
                        ui["hedge_threshold"], ui["window"], ui["tabs"]],
                       api_visibility="private")

    @user_errors("comparing runs")
    def compare(run_a, run_b):
        a, b, df = engine.compare(run_a, run_b)
        note = (f"Run A `{a.run_id}` ({a.controller}, budget {a.settings.budget}, cost "
                f"{a.realized_cost:.3f}) against run B `{b.run_id}` ({b.controller}, budget "
                f"{b.settings.budget}, cost {b.realized_cost:.3f}): the same expert in "
                f"{100 * df.attrs['agreement']:.0f}% of decisions, the same token at "
                f"{100 * df.attrs['same_tokens']:.0f}% of positions.")
        fa = plots.expert_map(a, 360, f"A: budget {a.settings.budget}, {a.controller}")
        fb = plots.expert_map(b, 360, f"B: budget {b.settings.budget}, {b.controller}")
        return note, fa, fb, df.round(3)

    ui["compare"].click(compare, [ui["run_a"], ui["run_b"]],
                        [ui["compare_note"], ui["cmp_a"], ui["cmp_b"], ui["cmp_table"]],
                        api_visibility="private")

    @user_errors("running the query")
    def run_sql(query):
        df, notice = engine.sql(query)
        return df, notice

    ui["sql_run"].click(run_sql, ui["sql"], [ui["sql_result"], ui["sql_note"]],
                        api_visibility="private")

    @user_errors("exporting the routing log")
    def export(fmt):
        return str(engine.export(fmt))

    ui["export"].click(export, ui["export_fmt"], ui["export_file"], api_visibility="private")


def _api(engine: Engine) -> None:
    """Named endpoints for programs (gradio_client): JSON in, trace JSON out."""

    def trace_json(trace, notes=()) -> dict:
        d = trace.to_json()
        kl = trace.kl_to_dense
        d["kl_to_dense"] = None if kl is None else [round(float(x), 6) for x in kl]
        d["prompt"] = trace.prompt  # as routed: after removing control characters
        d["notes"] = list(notes)
        return d

    @user_errors("generating")
    def generate(prompt: str, budget: float = DEFAULTS.budget, max_new_tokens: int = 16,
                 controller: str = "bayes", temperature: float = 0.0, top_p: float = 1.0,
                 seed: int = 0, chat: bool = False, scope: str = DEFAULTS.scope,
                 hedge_policy: str = DEFAULTS.hedge_policy,
                 hedge_threshold: float = DEFAULTS.hedge_threshold,
                 window: int = DEFAULTS.window, n_sink: int = DEFAULTS.n_sink,
                 quality: bool = False) -> dict:
        """Route a prompt and generate (greedy when temperature is 0). Returns the trace as
        JSON: the fields of `metaattn-viz route --json` plus kl_to_dense and notes."""
        settings = parse_settings(budget, scope, hedge_policy, hedge_threshold, window, n_sink)
        req = parse_request(prompt, settings, controller, max_new_tokens, temperature, top_p,
                            seed, chat, quality)
        job = engine.start(req)
        trace = job.result()
        return trace_json(trace, job.notes)

    @user_errors("re-routing")
    def reroute(trace: dict, budget: float = DEFAULTS.budget, controller: str = "",
                scope: str = DEFAULTS.scope, hedge_policy: str = DEFAULTS.hedge_policy,
                hedge_threshold: float = DEFAULTS.hedge_threshold,
                window: int = DEFAULTS.window, n_sink: int = DEFAULTS.n_sink,
                quality: bool = True) -> dict:
        """Route the same text (a trace returned by /generate or /reroute) again under other
        settings, as one prefill; with quality, also KL to the dense model per token."""
        settings = parse_settings(budget, scope, hedge_policy, hedge_threshold, window, n_sink)
        routed = engine.routed_model()
        text = text_from_json(trace, routed.model.config.vocab_size)
        new = engine.reroute(text, settings, controller or None)
        if quality and new.n_tokens > 1:
            new.kl_to_dense = engine.quality(new)
        return trace_json(new)

    def status() -> dict:
        """Model and routing-log status."""
        return engine.status()

    @user_errors("running the query")
    def sql(query: str, max_rows: int = 500) -> dict:
        """The read-only SQL console over the routing log (runs, tokens, routes, experts):
        {columns, rows, notice}. The server process holds the database, so programs read a
        live log through here (or through an export)."""
        n = int(max_rows) if isinstance(max_rows, (int, float)) and 1 <= max_rows <= 10_000 \
            else 500
        df, notice = engine.sql(query, max_rows=n)
        return {"columns": list(df.columns),
                "rows": json.loads(df.to_json(orient="values", date_format="iso")),
                "notice": notice}

    gr.api(generate, api_name="generate", concurrency_id="model")
    gr.api(reroute, api_name="reroute", concurrency_id="model")
    gr.api(status, api_name="status", queue=False)
    gr.api(sql, api_name="sql")


__all__ = ["build_app", "status_markdown", "load_examples", "user_errors", "APP_MAX_CONTEXT"]
