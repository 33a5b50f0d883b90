"""What the page (or an API client) sends, parsed and checked: prompts, routing settings,
generation requests, and texts to re-route.

Every function either returns a value the engine can use as it is or raises AppError with
a sentence that names the control and its valid range. The routing choices and defaults
come from their one definition (core.settings, routing.controller.KINDS); the generation
defaults (GENERATION: what the page's controls start at and what `/generate` assumes) and
the limits on what the app takes are defined here. Pure functions: never touches the model, the log or gradio.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

from metaattn_viz.app.environment import whole_from_env
from metaattn_viz.app.errors import AppError, quoted
from metaattn_viz.core.settings import (
    COST_MODELS,
    DEFAULT_CONTROLLER,
    DEFAULTS,
    HEDGE_MEASURES,
    HEDGE_POLICIES,
    MIN_COST,
    SCOPES,
    RoutingSettings,
)
from metaattn_viz.core.trace import RoutingTrace
from metaattn_viz.routing.controller import KINDS

MAX_PROMPT_CHARS = 16_000
MAX_NEW_TOKENS = 256
SEED_MAX = 2**31 - 1  # a generation's seed is a whole number from 0 to this
# The app routes at most this many tokens (prompt + generation; the prompt is cut from the
# left): every view and the sweep stay interactive on two CPU cores.
# At least the most new tokens plus one prompt token, so the longest generation fits.
APP_MAX_CONTEXT = whole_from_env("METAATTN_APP_MAX_CONTEXT", 512, MAX_NEW_TOKENS + 1)


# Bidirectional embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069): they
# make the text shown read in another order than the text the model sees ("Trojan Source").
# The marks U+200E/U+200F and right-to-left scripts themselves are kept.
BIDI_CONTROLS = frozenset(chr(c) for c in (*range(0x202A, 0x202F), *range(0x2066, 0x206A)))


def _strip_controls(text: str) -> tuple[str, int, int]:
    """`text` without control characters (other than newline and tab), unpaired
    surrogates and bidirectional controls (BIDI_CONTROLS), CRLF as LF, and how many control
    characters or surrogates, and how many bidirectional controls, were removed."""
    kept, dropped, bidi = [], 0, 0
    for ch in text.replace("\r\n", "\n"):
        cat = unicodedata.category(ch)
        if (cat == "Cc" and ch not in "\n\t") or cat == "Cs":
            dropped += 1
        elif ch in BIDI_CONTROLS:
            bidi += 1
        else:
            kept.append(ch)
    return "".join(kept), dropped, bidi


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'s' if n != 1 else ''}"


def _too_long(name: str, n: int) -> str:
    return (
        f"The {name} is {n:,} characters long; the app takes at most "
        f"{MAX_PROMPT_CHARS:,} (the model routes the last {APP_MAX_CONTEXT} "
        "tokens anyway). Shorten it and try again."
    )


def clean_prompt(text) -> tuple[str, list[str]]:
    """The prompt as the model will see it, and notes on what was changed. Control
    characters (other than newline and tab), unpaired surrogates and bidirectional controls
    are removed; mixed scripts, right-to-left text and emoji pass unchanged. Empty or
    over-long prompts raise AppError."""
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise AppError(f"The prompt must be text, got {type(text).__name__}.")
    notes = []
    if len(text) > MAX_PROMPT_CHARS:
        raise AppError(_too_long("prompt", len(text)))
    text, dropped, bidi = _strip_controls(text)
    if dropped:
        notes.append(f"Removed {_plural(dropped, 'control character')} from the prompt.")
    if bidi:
        notes.append(
            f"Removed {_plural(bidi, 'bidirectional control character')} (U+202A-U+202E, "
            "U+2066-U+2069) from the prompt: they make the text shown read in another order "
            "than the text the model sees."
        )
    if not text.strip():
        raise AppError("The prompt is empty: type some text (or pick an example) first.")
    return text, notes


def trace_text(name: str, value) -> str:
    """A trace's `prompt` or `output_text` as sent by a client, by the prompt's rules
    (clean_prompt) except that it may be empty: None or absent is empty text, anything but
    text is refused, more than MAX_PROMPT_CHARS characters is refused, control characters
    unpaired surrogates and bidirectional controls are removed (a NUL or a lone surrogate
    would reach the log)."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise AppError(f"The trace's {name} must be text, got {type(value).__name__}.")
    if len(value) > MAX_PROMPT_CHARS:
        raise AppError(_too_long(f"trace's {name}", len(value)))
    return _strip_controls(value)[0]


def _bound(x: float) -> str:
    """A range's end as a person reads it: 0.05, 256, 2,147,483,647 (not 2.14748e+09)."""
    return f"{int(x):,}" if float(x).is_integer() else f"{x:g}"


def number(name: str, value, lo: float, hi: float) -> float:
    """`value` as a finite float in [lo, hi], or AppError naming the control `name` (an
    empty box, None or blank, said as such)."""
    span = f"{_bound(lo)} and {_bound(hi)}"
    if value is None or (isinstance(value, str) and not value.strip()):  # a box left empty
        raise AppError(f"{name} is empty: give a number between {span}.")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AppError(f"{name} must be a number between {span}, got {quoted(value)}.") from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise AppError(f"{name} must be between {span}, got {quoted(value)}.")
    return v


def whole(name: str, value, lo: int, hi: int) -> int:
    """`value` as an int in [lo, hi] (booleans refused), or AppError naming `name`."""

    def refused() -> AppError:
        span = f"between {_bound(lo)} and {_bound(hi)}"
        return AppError(f"{name} must be a whole number {span}, got {quoted(value)}.")

    if isinstance(value, bool):
        raise refused()
    v = number(name, value, lo, hi)
    if v != int(v):
        raise refused()
    return int(v)


_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def flag(name: str, value) -> bool:
    """`value` as a bool: a bool, 0 or 1, or the words true/false, yes/no, on/off, 1/0 (any
    case; an API client may send text), else AppError naming the control `name`. Never
    Python's truth of a string, which makes "false" true."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise AppError(f"{name} must be true or false, got {quoted(value)}.")


def words(name: str, value) -> str:
    """`value` as text (None as empty text), else AppError naming `name`: an API client may
    send a number or a list where the page sends text."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise AppError(f"{name} must be text, got {type(value).__name__} {quoted(value)}.")
    return value


def choice(name: str, value, options) -> str:
    """`value` if it is one of `options`, else AppError listing them."""
    if value not in options:
        raise AppError(f"{name} must be one of {', '.join(map(str, options))}, got {quoted(value)}.")
    return value


def parse_settings(
    budget=DEFAULTS.budget,
    scope=DEFAULTS.scope,
    hedge_policy=DEFAULTS.hedge_policy,
    hedge_threshold=DEFAULTS.hedge_threshold,
    window=DEFAULTS.window,
    n_sink=DEFAULTS.n_sink,
    hedge_measure=DEFAULTS.hedge_measure,
    cost_model=DEFAULTS.cost_model,
) -> RoutingSettings:
    """RoutingSettings from the controls; budget None means no budget (the argmax)."""
    b = None if budget is None else number("Budget", budget, MIN_COST, 1.0)
    try:
        return RoutingSettings(
            budget=b,
            scope=choice("Budget scope", scope, SCOPES),
            hedge_policy=choice("Hedge policy", hedge_policy, HEDGE_POLICIES),
            hedge_threshold=number("Hedge threshold", hedge_threshold, 0.0, 1.0),
            window=whole("Local window", window, 1, 4096),
            n_sink=whole("Attention sinks", n_sink, 0, 64),
            hedge_measure=choice("Hedge measure", hedge_measure, HEDGE_MEASURES),
            cost_model=choice("Cost model", cost_model, COST_MODELS),
        )
    except ValueError as exc:  # anything RoutingSettings refuses beyond these checks
        raise AppError(str(exc)) from None


@dataclass(frozen=True)
class GenerationDefaults:
    """What a generation does when nobody says otherwise: the page's controls start at
    these values, the `/generate` endpoint's parameters default to them, and so does a
    GenerateRequest. The chat template is on because the bundled model is an instruct
    model: given a plain prompt it often ends its answer at once (end-of-text). The
    quality meter is on: a dense shadow pass after the text is complete."""

    controller: str = DEFAULT_CONTROLLER
    max_new_tokens: int = 48
    temperature: float = 0.0  # greedy
    top_p: float = 1.0
    seed: int = 0
    chat: bool = True
    quality: bool = True


GENERATION = GenerationDefaults()  # the one definition of the defaults (page and API)


@dataclass(frozen=True)
class GenerateRequest:
    """One generation, checked: the prompt as routed, its settings and sampling, and the
    notes on what parsing changed (shown to the user)."""

    prompt: str
    settings: RoutingSettings
    controller: str = GENERATION.controller
    max_new_tokens: int = GENERATION.max_new_tokens
    temperature: float = GENERATION.temperature
    top_p: float = GENERATION.top_p
    seed: int = GENERATION.seed
    chat: bool = GENERATION.chat
    quality: bool = GENERATION.quality
    notes: tuple = ()
    model: str = ""  # the offered model to use (an id or name, app/models.py); "": the default


def parse_request(
    prompt,
    settings: RoutingSettings,
    controller=GENERATION.controller,
    max_new_tokens=GENERATION.max_new_tokens,
    temperature=GENERATION.temperature,
    top_p=GENERATION.top_p,
    seed=GENERATION.seed,
    chat=GENERATION.chat,
    quality=GENERATION.quality,
    model="",
) -> GenerateRequest:
    text, notes = clean_prompt(prompt)
    if model is not None and not isinstance(model, str):
        raise AppError(f"Model must be the name of an offered model, got {quoted(model)}.")
    return GenerateRequest(
        prompt=text,
        settings=settings,
        controller=choice("Controller", controller, KINDS),
        max_new_tokens=whole("Max new tokens", max_new_tokens, 0, MAX_NEW_TOKENS),
        temperature=number("Temperature", temperature, 0.0, 2.0),
        top_p=number("Top-p", top_p, 0.01, 1.0),
        seed=whole("Seed", seed, 0, SEED_MAX),
        chat=flag("Chat template", chat),
        quality=flag("Quality meter", quality),
        notes=tuple(notes),
        model=(model or "").strip(),
    )


@dataclass
class Text:
    """What a re-route needs of a trace: the token ids and where they came from (a
    RoutingTrace has all of these; the API builds one from a trace's JSON)."""

    token_ids: list[int]
    tokens: list[str]
    prompt: str = ""
    n_prompt_tokens: int = 0
    truncated: int = 0
    output_text: str = ""
    controller: str = DEFAULT_CONTROLLER
    model: str = ""  # the model that made it ("": the default)


def _count(x) -> bool:
    """Whether `x` is a whole number >= 0 (an int, not a bool)."""
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def text_from_json(d, vocab_size: int) -> Text:
    """A Text from the JSON of a trace (`trace.to_json()`), checked."""
    if not isinstance(d, dict) or "token_ids" not in d:
        raise AppError(
            "Expected a trace as returned by the generate endpoint (a JSON object with token_ids)."
        )
    ids = d.get("token_ids")
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids)
    ):
        raise AppError(f"token_ids must be a non-empty list of token ids in [0, {vocab_size}).")
    if len(ids) > APP_MAX_CONTEXT:
        raise AppError(f"The trace has {len(ids)} tokens; the app re-routes at most {APP_MAX_CONTEXT}.")
    tokens = d.get("tokens")
    if not isinstance(tokens, list) or len(tokens) != len(ids):
        tokens = [str(i) for i in ids]
    controller = str(d["controller"]) if d.get("controller") in KINDS else DEFAULT_CONTROLLER
    n_prompt = d.get("n_prompt_tokens")
    n_prompt = n_prompt if _count(n_prompt) and n_prompt <= len(ids) else len(ids)
    truncated = d.get("truncated")  # informative only: a malformed value reads as none
    truncated = truncated if _count(truncated) else 0
    return Text(
        list(ids),
        [str(t) for t in tokens],
        trace_text("prompt", d.get("prompt")),
        n_prompt,
        truncated,
        trace_text("output_text", d.get("output_text")),
        controller,
        str(d.get("model") or ""),
    )


# The most layers a trace sent to the app may have (the largest open models have ~130):
# beyond it, no model made the trace, and its maps would only load the server.
MAX_TRACE_LAYERS = 1024


def trace_from_json(d) -> RoutingTrace:
    """A whole trace sent by a client (as /generate or /reroute returned it, for /figure),
    checked, or AppError in one sentence. Its size is refused before any array is built
    (at most APP_MAX_CONTEXT tokens and MAX_TRACE_LAYERS layers: what the app itself
    routes), then RoutingTrace.from_json checks every field (core.trace.record_problem,
    RoutingTrace.problem) and here the controller is one of routing.controller.KINDS."""
    lead = "Expected a trace as returned by the generate endpoint"
    if not isinstance(d, dict):
        raise AppError(f"{lead} (a JSON object), got {type(d).__name__}.")
    ids, n_layers = d.get("token_ids"), d.get("n_layers")
    if isinstance(ids, list) and len(ids) > APP_MAX_CONTEXT:
        raise AppError(
            f"The trace has {len(ids):,} tokens; the app takes traces of at most {APP_MAX_CONTEXT}."
        )
    if _count(n_layers) and n_layers > MAX_TRACE_LAYERS:
        raise AppError(
            f"The trace has {n_layers:,} layers; the app takes traces of at most {MAX_TRACE_LAYERS}."
        )
    if "controller" in d and d["controller"] not in KINDS:
        kinds = ", ".join(KINDS)
        raise AppError(f"{lead}: controller must be one of {kinds}, got {quoted(d['controller'])}.")
    try:
        return RoutingTrace.from_json(d)
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise AppError(f"{lead}: {str(exc).rstrip('.')}.") from None


__all__ = [
    "GENERATION",
    "GenerationDefaults",
    "GenerateRequest",
    "Text",
    "clean_prompt",
    "number",
    "whole",
    "choice",
    "parse_settings",
    "parse_request",
    "text_from_json",
    "trace_from_json",
    "trace_text",
    "MAX_TRACE_LAYERS",
    "MAX_PROMPT_CHARS",
    "MAX_NEW_TOKENS",
    "SEED_MAX",
    "APP_MAX_CONTEXT",
]
