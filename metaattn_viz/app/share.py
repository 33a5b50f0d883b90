"""Shareable runs: the link that opens the page on a run, and what the page makes of one.

A link is the page's address with a query string: `run=<run_id>` plus the settings the run
was made with (the model that made it; routing: budget, controller, scope, hedge policy,
threshold and measure, local window, cost model; generation: max new tokens, temperature,
top-p, seed, chat template; the uncertainty measure shown) and its prompt, when the prompt
is short enough for a link (MAX_LINK_PROMPT characters). Opening it, the page replays the
run from its routing log with the run's own settings; when the run is not in this server's
log, or is another visitor's on a public deployment, it opens with the link's settings and
prompt alone and says so (ui.py wires this to the page's load event). A link without
`model` (made before links carried it) leaves the page's model as it is.

Pure functions of plain values: never imports gradio, never reads the log. A value in a
link that the page would refuse is left out, and the note says which and why. The model is
only checked to be a plausible name here (which models a server offers is the page's to
know: tab_live.LiveTab.show_linked leaves out one it does not offer, and says so).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlencode, urlsplit, urlunsplit

from metaattn_viz.app.errors import AppError, quoted
from metaattn_viz.app.requests import (
    MAX_NEW_TOKENS,
    choice,
    clean_prompt,
    number,
    whole,
)
from metaattn_viz.core.settings import (
    COST_MODELS,
    HEDGE_MEASURES,
    HEDGE_POLICIES,
    MIN_COST,
    SCOPES,
    UNCERTAINTY_MEASURES,
)
from metaattn_viz.routing.controller import KINDS

MAX_LINK_PROMPT = 2000  # longer prompts are left out of a link (the run itself still replays)
RUN_ID_CHARS = 64
MODEL_CHARS = 128  # a model's name in a link (a trace's `model`, or a model id), at most
TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")

# The link's parameters, in the order they are written: name -> (the control's words, parser).
# Each parser takes the text from the link and returns the control's value or raises AppError.
PARAMETERS = {
    "model": ("Model", lambda v: _model_name(v)),
    "budget": ("Budget", lambda v: number("Budget", v, MIN_COST, 1.0)),
    "controller": ("Controller", lambda v: choice("Controller", v, KINDS)),
    "scope": ("Budget scope", lambda v: choice("Budget scope", v, SCOPES)),
    "hedge": ("Hedge policy", lambda v: choice("Hedge policy", v, HEDGE_POLICIES)),
    "threshold": ("Hedge threshold", lambda v: number("Hedge threshold", v, 0.0, 1.0)),
    "hedge_measure": ("Hedge measure", lambda v: choice("Hedge measure", v, HEDGE_MEASURES)),
    "window": ("Local window", lambda v: whole("Local window", v, 1, 4096)),
    "cost_model": ("Cost model", lambda v: choice("Cost model", v, COST_MODELS)),
    "max_new": ("Max new tokens", lambda v: whole("Max new tokens", v, 0, MAX_NEW_TOKENS)),
    "temperature": ("Temperature", lambda v: number("Temperature", v, 0.0, 2.0)),
    "top_p": ("Top-p", lambda v: number("Top-p", v, 0.01, 1.0)),
    "seed": ("Seed", lambda v: whole("Seed", v, 0, 2**31 - 1)),
    "chat": ("Chat template", lambda v: _flag(v)),
    "measure": ("Uncertainty measure", lambda v: choice("Uncertainty measure", v, UNCERTAINTY_MEASURES)),
}


def _model_name(v: str) -> str:
    """A model's name as a link gives it: printable text of at most MODEL_CHARS characters,
    without < or > (it is quoted back in a note if the server does not offer it)."""
    s = str(v).strip()
    if len(s) > MODEL_CHARS or not s.isprintable() or "<" in s or ">" in s:
        raise AppError(
            f"Model must be a model's name (at most {MODEL_CHARS} printable characters, "
            f"no < or >), got {quoted(v)}."
        )
    return s


def _flag(v: str) -> bool:
    s = str(v).strip().lower()
    if s in TRUE:
        return True
    if s in FALSE:
        return False
    raise AppError(f"Chat template must be 1 or 0, got {quoted(v)}.")


@dataclass
class SharedRun:
    """What a link asks for: a run to replay (or None), the controls' values it names
    (keys of PARAMETERS, parsed) and its prompt, and notes on what was left out."""

    run_id: str | None = None
    values: dict = field(default_factory=dict)
    prompt: str | None = None
    notes: list[str] = field(default_factory=list)


# a link's generation parameters -> RoutingTrace.generation's keys (core.trace.GENERATION_KEYS)
GENERATION_PARAMETERS = {
    "max_new": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "chat": "chat",
}


def share_query(trace, values: Mapping) -> str:
    """The query string (with its "?") that opens the page on `trace`'s run: its run id (if
    logged), the model that made it (the trace's `model`; where it has none, the control's
    value), its routing settings and controller, how its text was generated (the trace's
    `generation`; where it has none, as for a run logged before the log kept it, the
    controls' `values` stand in), the other controls' `values` (keys of PARAMETERS:
    measure), and its prompt if it is at most MAX_LINK_PROMPT characters. A run routed with
    no budget has no `budget` (a link cannot say "none": opened, the run's replay says so)."""
    s = trace.settings
    params: dict[str, str] = {}
    if trace.run_id:
        params["run"] = str(trace.run_id)
    made = trace.generation or {}
    given = {
        **{k: v for k, v in values.items() if k in PARAMETERS and v is not None},
        **{k: made[key] for k, key in GENERATION_PARAMETERS.items() if key in made},
        **({"model": trace.model} if trace.model else {}),
        "controller": trace.controller,
        "scope": s.scope,
        "hedge": s.hedge_policy,
        "threshold": s.hedge_threshold,
        "hedge_measure": s.hedge_measure,
        "window": s.window,
        "cost_model": s.cost_model,
    }
    # a run with no budget: none in the link (the budget slider's value, which stands in
    # for it on the page, is not the run's)
    if s.budget is None:
        given.pop("budget", None)
    else:
        given["budget"] = s.budget
    for key in PARAMETERS:
        if key in given:
            params[key] = _text(given[key])
    prompt = trace.prompt or ""
    if prompt and len(prompt) <= MAX_LINK_PROMPT:
        params["prompt"] = prompt
    return "?" + urlencode(params)


def _text(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        return format(v, "g")
    return str(v)


def parse_shared(query: Mapping[str, str]) -> SharedRun | None:
    """What the page's query parameters ask for; None if they name no run, setting or
    prompt (an ordinary visit). Values the page would refuse are left out, with a note."""
    shared = SharedRun()
    known = False
    run_id = str(query.get("run") or "").strip()
    if run_id:
        known = True
        if len(run_id) <= RUN_ID_CHARS and all(c.isalnum() or c in "-_" for c in run_id):
            shared.run_id = run_id
        else:
            shared.notes.append("The link's run id is not one this page makes; it was left out.")
    for key, (words, parse) in PARAMETERS.items():
        raw = query.get(key)
        if raw is None or str(raw).strip() == "":
            continue
        known = True
        try:
            shared.values[key] = parse(str(raw).strip())
        except AppError as exc:
            shared.notes.append(f"The link's {words.lower()} was left out: {exc}")
    prompt = query.get("prompt")
    if prompt:
        known = True
        try:
            shared.prompt, cleaned = clean_prompt(str(prompt))
            shared.notes.extend(cleaned)
        except AppError as exc:
            shared.notes.append(f"The link's prompt was left out: {exc}")
    return shared if known else None


def page_url(referer: str | None) -> str:
    """The page's address without its query (from the Referer of a request the page
    made), or "" when unknown (the link is then the query alone)."""
    if not referer:
        return ""
    parts = urlsplit(referer)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return ""
    return urlunsplit((parts.scheme, parts.netloc, parts.path or "/", "", ""))


def share_link(referer: str | None, query: str) -> str:
    """The full link: the page's address (page_url) and the query."""
    return page_url(referer) + query


def fallback_note(run_id: str | None) -> str:
    """What the page says when a link's run cannot be replayed here."""
    if run_id is None:
        return "Opened with the link's settings; press Generate to run it."
    return (
        f"Run `{run_id}` is not in this server's routing log (or it is another visitor's): "
        "the page opened with the link's settings and prompt instead; press Generate to "
        "run it again."
    )


__all__ = [
    "SharedRun",
    "PARAMETERS",
    "GENERATION_PARAMETERS",
    "MAX_LINK_PROMPT",
    "MODEL_CHARS",
    "share_query",
    "parse_shared",
    "page_url",
    "share_link",
    "fallback_note",
]
