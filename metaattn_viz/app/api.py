"""The page's named API endpoints for programs (gradio_client): `/generate` and `/reroute`
(JSON in, the trace JSON of `metaattn-viz route --json` out, plus kl_to_dense and notes),
`/status` and `/sql` (the read-only console).

Each endpoint parses its arguments like the page does (requests.py) and calls one engine
part; defaults are the project's (core.settings.DEFAULTS). Must be called inside the page's
gr.Blocks. Never holds model logic of its own.
"""

from __future__ import annotations

import json

import gradio as gr

from metaattn_viz.app.engine import Engine
from metaattn_viz.app.requests import parse_request, parse_settings, text_from_json
from metaattn_viz.app.ui_errors import user_errors
from metaattn_viz.core.settings import DEFAULT_CONTROLLER, DEFAULTS

SQL_MAX_ROWS = 500  # the console's default (and fallback) row limit
SQL_ROWS_LIMIT = 10_000


def trace_json(trace, notes=()) -> dict:
    """The trace as the endpoints return it: `trace.to_json()` plus the quality meter per
    token, the prompt as routed (control characters removed) and the notes."""
    d = trace.to_json()
    kl = trace.kl_to_dense
    d["kl_to_dense"] = None if kl is None else [round(float(x), 6) for x in kl]
    d["prompt"] = trace.prompt  # as routed: after removing control characters
    d["notes"] = list(notes)
    return d


def add_endpoints(engine: Engine) -> None:
    """Register the named endpoints on the page being built."""

    @user_errors("generating")
    def generate(
        prompt: str,
        budget: float = DEFAULTS.budget,
        max_new_tokens: int = 16,
        controller: str = DEFAULT_CONTROLLER,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        chat: bool = False,
        scope: str = DEFAULTS.scope,
        hedge_policy: str = DEFAULTS.hedge_policy,
        hedge_threshold: float = DEFAULTS.hedge_threshold,
        window: int = DEFAULTS.window,
        n_sink: int = DEFAULTS.n_sink,
        quality: bool = False,
    ) -> dict:
        """Route a prompt and generate (greedy when temperature is 0). Returns the trace as
        JSON: the fields of `metaattn-viz route --json` plus kl_to_dense and notes."""
        settings = parse_settings(budget, scope, hedge_policy, hedge_threshold, window, n_sink)
        req = parse_request(
            prompt, settings, controller, max_new_tokens, temperature, top_p, seed, chat, quality
        )
        job = engine.generations.start(req)
        trace = job.result()
        return trace_json(trace, job.notes)

    @user_errors("re-routing")
    def reroute(
        trace: dict,
        budget: float = DEFAULTS.budget,
        controller: str = "",
        scope: str = DEFAULTS.scope,
        hedge_policy: str = DEFAULTS.hedge_policy,
        hedge_threshold: float = DEFAULTS.hedge_threshold,
        window: int = DEFAULTS.window,
        n_sink: int = DEFAULTS.n_sink,
        quality: bool = True,
    ) -> dict:
        """Route the same text (a trace returned by /generate or /reroute) again under other
        settings, as one prefill; with quality, also KL to the dense model per token."""
        settings = parse_settings(budget, scope, hedge_policy, hedge_threshold, window, n_sink)
        routed = engine.host.routed_model()
        text = text_from_json(trace, routed.model.config.vocab_size)
        new = engine.analysis.reroute(text, settings, controller or None)
        if quality and new.n_tokens > 1:
            new.kl_to_dense = engine.analysis.quality(new)
        return trace_json(new)

    def status() -> dict:
        """Model and routing-log status."""
        return engine.status()

    @user_errors("running the query")
    def sql(query: str, max_rows: int = SQL_MAX_ROWS) -> dict:
        """The read-only SQL console over the routing log (runs, tokens, routes, experts):
        {columns, rows, notice}. The server process holds the database, so programs read a
        live log through here (or through an export)."""
        n = (
            int(max_rows)
            if isinstance(max_rows, (int, float)) and 1 <= max_rows <= SQL_ROWS_LIMIT
            else SQL_MAX_ROWS
        )
        df, notice = engine.history.sql(query, max_rows=n)
        return {
            "columns": list(df.columns),
            "rows": json.loads(df.to_json(orient="values", date_format="iso")),
            "notice": notice,
        }

    gr.api(generate, api_name="generate", concurrency_id="model")
    gr.api(reroute, api_name="reroute", concurrency_id="model")
    gr.api(status, api_name="status", queue=False)
    gr.api(sql, api_name="sql")


__all__ = ["add_endpoints", "trace_json"]
