"""The page's named API endpoints for programs (gradio_client): `/generate` and `/reroute`
(JSON in, the trace JSON of `metaattn-viz route --json` out, plus kl_to_dense and notes),
`/figure` (a trace's maps as a standalone HTML page), `/status`, `/sql` (the read-only
console), `/runs` (History's runs table) and `/export` (the log, or one run's rows, as a
zip file).

Each endpoint parses its arguments like the page does (requests.py) and calls one engine
part; its defaults are the page's: the routing settings' (core.settings.DEFAULTS) and the
generation's (requests.GENERATION: the chat template on, the quality meter on). A
generation that ends at once says why in its notes. A gradio_client session is a visitor
like a browser session: on a public deployment its runs are its own, and `/sql`, `/runs`
and `/export` answer over them only (engine.deployment). Must be called inside the page's
gr.Blocks. Never holds model logic of its own.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
from decimal import Decimal

import gradio as gr
import numpy as np
import pandas as pd
from gradio.data_classes import FileData

from metaattn_viz.app import display, plots
from metaattn_viz.app.deployment import session_of
from metaattn_viz.app.engine import Engine
from metaattn_viz.app.exports import Downloads, run_label
from metaattn_viz.app.gradio_queue import client_gone
from metaattn_viz.app.requests import (
    GENERATION,
    choice,
    flag,
    parse_request,
    parse_settings,
    text_from_json,
    trace_from_json,
    whole,
    words,
)
from metaattn_viz.app.ui_errors import user_errors
from metaattn_viz.core.settings import CONTROLLER_KINDS, DEFAULTS, UNCERTAINTY_MEASURES

SQL_MAX_ROWS = 500  # the console's default row limit
SQL_ROWS_LIMIT = 10_000


def json_cell(v):
    """One table value as JSON carries it, exactly: a float at full precision (pandas'
    to_json kept 10 decimal places: 1.234e-12 read 0.0), a timestamp in ISO 8601 to the
    microsecond, NaN, NaT and other missing values as null, numpy scalars as Python ones,
    lists and structs by their members."""
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or v is pd.NaT or v is pd.NA:
        return None
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, Decimal):  # a number: an int where it has no fraction
        return int(v) if v == v.to_integral_value() else float(v)
    if isinstance(v, (dt.datetime, dt.date, dt.time)):
        return v.isoformat()
    if isinstance(v, dt.timedelta):
        return str(v)
    if isinstance(v, (list, tuple, np.ndarray)):
        return [json_cell(x) for x in v]
    if isinstance(v, dict):
        return {str(k): json_cell(x) for k, x in v.items()}
    return v


def table_json(df, notice: str | None = None) -> dict:
    """A DataFrame as the endpoints return tables: {columns, rows, notice}."""
    return {
        "columns": list(df.columns),
        "rows": [[json_cell(v) for v in row] for row in df.astype(object).itertuples(index=False)],
        "notice": notice,
    }


def trace_json(trace, notes=()) -> dict:
    """The trace as the endpoints return it: `trace.to_json()` plus the quality meter per
    token, the prompt as routed (control characters removed) and the notes."""
    d = trace.to_json()
    kl = trace.kl_to_dense
    d["kl_to_dense"] = None if kl is None else [round(float(x), 6) for x in kl]
    d["prompt"] = trace.prompt  # as routed: after removing control characters
    d["notes"] = list(notes)
    return d


def _notes(*notes: str | None) -> list[str]:
    """The notes that apply (None: a note that does not)."""
    return [n for n in notes if n]


API_POLL_S = 0.05  # how often /generate looks whether its job has ended


def add_endpoints(engine: Engine, downloads: Downloads) -> None:
    """Register the named endpoints on the page being built (files for /figure go to
    `downloads`)."""
    g = GENERATION

    @user_errors("generating", page=False)
    async def generate(
        prompt: str,
        budget: float = DEFAULTS.budget,
        max_new_tokens: int = g.max_new_tokens,
        controller: str = g.controller,
        temperature: float = g.temperature,
        top_p: float = g.top_p,
        seed: int = g.seed,
        chat: bool = g.chat,
        scope: str = DEFAULTS.scope,
        hedge_policy: str = DEFAULTS.hedge_policy,
        hedge_threshold: float = DEFAULTS.hedge_threshold,
        window: int = DEFAULTS.window,
        n_sink: int = DEFAULTS.n_sink,
        quality: bool = g.quality,
        model: str = "",
        hedge_measure: str = DEFAULTS.hedge_measure,
        cost_model: str = DEFAULTS.cost_model,
        request: gr.Request | None = None,
    ) -> dict:
        """Route a prompt and generate (greedy when temperature is 0; the chat template on
        by default, as on the page) on `model` (one of /status's models; "": the default).
        Returns the trace as JSON: the fields of `metaattn-viz route --json` plus
        kl_to_dense and notes (which say why when no token was generated). `hedge_measure`:
        what the hedge threshold reads (total or epistemic uncertainty); `cost_model`: what
        the budget counts (notional costs, or flops: a share of dense attention FLOPs)."""
        settings = parse_settings(
            budget, scope, hedge_policy, hedge_threshold, window, n_sink, hedge_measure, cost_model
        )
        req = parse_request(
            prompt, settings, controller, max_new_tokens, temperature, top_p, seed, chat, quality, model
        )
        job = engine.generations.start(req, owner=engine.deployment.owner(session_of(request)))
        gone = client_gone()
        try:
            # awaited, not blocked on (no thread held: a closing server never waits on one), so
            # that a call the client cancels (gradio_client's Job.cancel(), Gradio's /cancel) is
            # cancelled here; a dropped connection is looked for while the job runs
            while not job.join(0):
                if gone() and not job.stop_event.is_set():
                    job.stop(quality=False)  # nobody is left to receive the answer
                await asyncio.sleep(API_POLL_S)
        finally:
            if not job.done:  # cancelled: the generation ends with its call, logged "stopped"
                job.stop(quality=False)  # nobody is left to read the quality meter
        trace = job.result()
        empty = display.empty_generation_note(trace, req.max_new_tokens, req.chat)
        return trace_json(trace, [*job.notes, *_notes(empty, display.over_budget_note(trace))])

    @user_errors("re-routing", page=False)
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
        hedge_measure: str = DEFAULTS.hedge_measure,
        cost_model: str = DEFAULTS.cost_model,
        request: gr.Request | None = None,
    ) -> dict:
        """Route the same text (a trace returned by /generate or /reroute) again under other
        settings (those of /generate), as one prefill, on the model that made it; with
        quality, also KL to the dense model per token."""
        settings = parse_settings(
            budget, scope, hedge_policy, hedge_threshold, window, n_sink, hedge_measure, cost_model
        )
        quality = flag("Quality meter", quality)
        made_by = trace.get("model") if isinstance(trace, dict) else None
        routed = engine.host.routed_model(model=made_by if isinstance(made_by, str) and made_by else None)
        text = text_from_json(trace, routed.model.config.vocab_size)
        owner = engine.deployment.owner(session_of(request))
        new = engine.analysis.reroute(text, settings, controller or None, owner=owner)
        if quality and new.n_tokens > 1:
            new.kl_to_dense = engine.analysis.quality(new)
        return trace_json(new, _notes(display.over_budget_note(new)))

    @user_errors("drawing the figure", page=False)
    def figure(trace: dict, measure: str = "total", request: gr.Request | None = None) -> FileData:
        """The routing maps of a trace (as /generate or /reroute returned it) as a
        standalone HTML page that opens offline (plotly.js inlined). PNG and SVG are drawn
        in a browser, from a figure's toolbar: the server has no image renderer."""
        tr = trace_from_json(trace)
        measure = choice("Uncertainty measure", measure, UNCERTAINTY_MEASURES)
        path = downloads.figure(
            plots.routing_maps(tr, measure), session_of(request), "api-maps", run_label(tr)
        )
        return FileData(path=str(path), orig_name=path.name)

    def status() -> dict:
        """Model and routing-log status."""
        return engine.status()

    @user_errors("running the query", page=False)
    def sql(query: str, max_rows: int = SQL_MAX_ROWS, request: gr.Request | None = None) -> dict:
        """The read-only SQL console over the routing log (runs, tokens, routes, experts):
        {columns, rows, notice}. The server process holds the database, so programs read a
        live log through here (or through an export). On a public deployment the tables
        hold this client session's runs only."""
        n = whole("max_rows", max_rows, 1, SQL_ROWS_LIMIT)
        df, notice = engine.history.sql(
            words("query", query), max_rows=n, owner=engine.deployment.reader(session_of(request))
        )
        return table_json(df, notice)

    @user_errors("listing runs", page=False)
    def runs(
        text: str = "",
        status: str = "",
        controller: str = "",
        order_by: str = "-created_at",
        limit: int = 200,
        offset: int = 0,
        request: gr.Request | None = None,
    ) -> dict:
        """The runs of the History tab, newest first: {columns, rows, notice}; `text`
        searches prompt and output, `status` / `controller` filter (empty: any; a
        controller that is not one of CONTROLLER_KINDS is refused, not answered with no
        runs); `limit` runs from the `offset`-th on (0: the first)."""
        n = whole("limit", limit, 1, SQL_ROWS_LIMIT)
        skip = whole("offset", offset, 0, 2_147_483_647)
        kind = words("controller", controller)
        df = engine.history.runs(
            words("text", text),
            words("status", status) or None,
            choice("controller", kind, CONTROLLER_KINDS) if kind else None,
            words("order_by", order_by),
            n,
            owner=engine.deployment.reader(session_of(request)),
            offset=skip,
        )
        return table_json(df)

    @user_errors("exporting the routing log", page=False)
    def export(fmt: str = "parquet", run_id: str = "", request: gr.Request | None = None) -> FileData:
        """The routing log (on a public deployment: this session's runs) as partitioned
        Parquet or CSV in a zip file; with `run_id`, that run's rows only."""
        session = session_of(request)
        reader = engine.deployment.reader(session)
        run_id = words("run_id", run_id)
        if run_id:
            path = downloads.rows(engine.history, run_id, fmt, reader, session)
        else:
            path = downloads.log(engine.history, fmt, reader, session)
        return FileData(path=str(path), orig_name=path.name)

    limits = engine.deployment.limits
    gr.api(generate, api_name="generate", concurrency_id="model", concurrency_limit=limits.model)
    gr.api(reroute, api_name="reroute", concurrency_id="model", concurrency_limit=limits.model)
    gr.api(figure, api_name="figure")
    gr.api(status, api_name="status", queue=False)
    gr.api(sql, api_name="sql", concurrency_id="sql", concurrency_limit=limits.sql)
    gr.api(runs, api_name="runs")
    gr.api(export, api_name="export")


__all__ = ["add_endpoints", "trace_json", "table_json", "trace_from_json"]
