"""The Gradio page: watch routing live, drag the budget, inspect a token, sweep budgets,
export and share a run, replay and query the routing log.

`build_app` lays out the page: the header (model status, refreshed until the model is
loaded), the Live tab (tab_live.py, with its Export and share panel, live_exports.py, and
its token inspector and budget sweep, live_inspector.py), the History tab
(tab_history.py), the About tab (about.py), and the named API endpoints
(api.py: `/generate`, `/reroute`, `/figure`, `/status`, `/sql`, `/runs`, `/export`). Each
tab wires its own events next to its components; a shared link is opened when the page
loads. Every callback is a thin adapter over one engine part; user mistakes surface as
plain sentences (ui_errors.py). The page's CSS for the dark theme and the focus ring
(theme.PAGE_CSS) goes to `launch` (server.py); what it adds for screen readers and the
keyboard in the browser (accessibility.py) runs from a hidden element. Never holds model
logic of its own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gradio as gr

from metaattn_viz.app import attention_maps, display
from metaattn_viz.app import examples as example_runs
from metaattn_viz.app.about import INTRO, about_markdown
from metaattn_viz.app.accessibility import ACCESSIBILITY_JS
from metaattn_viz.app.api import add_endpoints
from metaattn_viz.app.deployment import Deployment
from metaattn_viz.app.engine import Engine
from metaattn_viz.app.exports import Downloads
from metaattn_viz.app.plotly_html import PLOTLY_JS
from metaattn_viz.app.tab_history import HistoryTab
from metaattn_viz.app.tab_live import LiveTab
from metaattn_viz.paths import ASSETS_DIR

log = logging.getLogger(__name__)

EXAMPLES_FILE = ASSETS_DIR / "examples.json"
STATUS_REFRESH_S = 1.0  # the header polls the model's status until it is loaded (or failed)


def load_examples(path: Path = EXAMPLES_FILE) -> list[dict]:
    """The example prompts under the prompt box (none, with a warning, if unreadable)."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
        return [e for e in items if isinstance(e, dict) and e.get("prompt")]
    except (OSError, ValueError):
        log.warning("no example prompts at %s", path)
        return []


def build_app(
    model: str | list[str] | None = None,
    db: str | None = None,
    log_runs: bool = True,
    engine: Engine | None = None,
    deployment: Deployment | None = None,
    downloads: Downloads | None = None,
) -> gr.Blocks:
    """The page over `engine` (or a new Engine for model / db / log_runs / deployment);
    downloadable files go to `downloads` (a new temporary folder by default)."""
    engine = engine or Engine(model, db, log_runs, deployment=deployment)
    downloads = downloads or Downloads()
    # served as they are (no copy into Gradio's cache): vendored scripts, plotly.js, downloads
    gr.set_static_paths([attention_maps.VENDOR_DIR, PLOTLY_JS, downloads.root])
    examples = load_examples()
    with gr.Blocks(title="metaattn-viz") as demo:
        demo.engine = engine  # for tests and the benchmark
        demo.downloads = downloads
        gr.Markdown(INTRO)
        status = gr.Markdown(display.status_markdown(engine.status()), elem_id="model-status")
        timer = gr.Timer(STATUS_REFRESH_S)
        # before any run the page shows a shipped example, replayed with no model
        initial = example_runs.initial_trace()
        trace = gr.State(initial)
        with gr.Tabs(selected="live") as tabs:
            with gr.Tab("Live", id="live"):
                live = LiveTab(trace, examples, engine.host.choices(), initial)
            with gr.Tab("History", id="history") as history_tab:
                history = HistoryTab(history_tab)
            with gr.Tab("About", id="about"):
                gr.Markdown(about_markdown(), elem_id="about")
        # live regions, reset buttons' names, radio groups (accessibility.py): out of sight
        gr.HTML(
            "",
            elem_id="accessibility",
            js_on_load=ACCESSIBILITY_JS,
            visible="hidden",
            apply_default_css=False,
        )
        _wire_header(engine, status, timer)
        live.wire(engine, downloads)
        history.wire(engine, live, tabs, downloads)
        live.exports.wire(engine, live, downloads, demo)  # after every tab added its events
        add_endpoints(engine, downloads)
    return demo


def _wire_header(engine: Engine, status: gr.Markdown, timer: gr.Timer) -> None:
    def tick():
        s = engine.status()
        done = s["model_ready"] or s["model_error"] is not None
        return display.status_markdown(s), gr.Timer(active=not done)

    timer.tick(tick, None, [status, timer], api_visibility="private", queue=False, show_progress="hidden")


__all__ = ["build_app", "load_examples"]
