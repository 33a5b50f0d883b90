"""The Gradio page: watch routing live, drag the budget, inspect a token, sweep budgets,
replay and query the routing log.

`build_app` lays out the page: the header (model status, refreshed until the model is
loaded), the Live tab (tab_live.py), the History tab (tab_history.py), the About tab, and
the named API endpoints (api.py: `/generate`, `/reroute`, `/status`, `/sql`, `/runs`,
`/export`). Each tab wires
its own events next to its components. Every callback is a thin adapter over one engine
part; user mistakes surface as plain sentences (ui_errors.py). Never holds model logic of
its own.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import gradio as gr

from metaattn_viz.app import attention_maps, display
from metaattn_viz.app.api import add_endpoints
from metaattn_viz.app.deployment import Deployment
from metaattn_viz.app.engine import Engine
from metaattn_viz.app.plotly_html import PLOTLY_JS
from metaattn_viz.app.tab_history import HistoryTab
from metaattn_viz.app.tab_live import LiveTab
from metaattn_viz.paths import ASSETS_DIR

log = logging.getLogger(__name__)

EXAMPLES_FILE = ASSETS_DIR / "examples.json"
STATUS_REFRESH_S = 1.0  # the header polls the model's status until it is loaded (or failed)
INTRO = """# metaattn-viz
Every token in every layer of a real language model is routed to **full**, **linear** or
**local** attention by a Bayesian meta-controller under a compute budget. Generate, watch the
decisions fill in, drag the budget, click a token to see its posterior and the attention it
actually used."""
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
- **History**: every run, replayable without the model; the SQL console is read-only. On
  a public Space each visitor sees only the runs of their own browser session (unless the
  operator shares the log, and then the header says so).
"""


def load_examples(path: Path = EXAMPLES_FILE) -> list[dict]:
    """The example prompts under the prompt box (none, with a warning, if unreadable)."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
        return [e for e in items if isinstance(e, dict) and e.get("prompt")]
    except (OSError, ValueError):
        log.warning("no example prompts at %s", path)
        return []


def build_app(
    model: str | None = None,
    db: str | None = None,
    log_runs: bool = True,
    engine: Engine | None = None,
    deployment: Deployment | None = None,
) -> gr.Blocks:
    """The page over `engine` (or a new Engine for model / db / log_runs / deployment)."""
    engine = engine or Engine(model, db, log_runs, deployment=deployment)
    gr.set_static_paths([attention_maps.VENDOR_DIR, PLOTLY_JS])
    examples = load_examples()
    with gr.Blocks(title="metaattn-viz") as demo:
        demo.engine = engine  # for tests and the benchmark
        gr.Markdown(INTRO)
        status = gr.Markdown(display.status_markdown(engine.status()), elem_id="model-status")
        timer = gr.Timer(STATUS_REFRESH_S)
        trace = gr.State(None)
        with gr.Tabs(selected="live") as tabs:
            with gr.Tab("Live", id="live"):
                live = LiveTab(trace, examples)
            with gr.Tab("History", id="history") as history_tab:
                history = HistoryTab(history_tab)
            with gr.Tab("About", id="about"):
                gr.Markdown(ABOUT)
        _wire_header(engine, status, timer)
        live.wire(engine)
        history.wire(engine, live, tabs)
        add_endpoints(engine)
    return demo


def _wire_header(engine: Engine, status: gr.Markdown, timer: gr.Timer) -> None:
    def tick():
        s = engine.status()
        done = s["model_ready"] or s["model_error"] is not None
        return display.status_markdown(s), gr.Timer(active=not done)

    timer.tick(tick, None, [status, timer], api_visibility="private", queue=False, show_progress="hidden")


__all__ = ["build_app", "load_examples"]
