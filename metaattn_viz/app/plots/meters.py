"""The meters and the token strip: realised cost against the budget (under the run's cost
model, which the meter names), the routing variety next to it (how token-dependent the
routing is, core/variety.py), attention-FLOPs ratio, tokens/s, KL to the dense model (an
HTML panel: cheap to redraw), and the text with each token's share of full attention (a
gr.HighlightedText value). A trace whose controllers are untrained says so above the
meters. Never imports gradio."""

from __future__ import annotations

import html
import math

import numpy as np

from metaattn_viz.app.plots.maps import UNTRAINED_TITLE
from metaattn_viz.app.plots.style import EXPERT_COLOURS, strip_text
from metaattn_viz.core.trace import RoutingTrace
from metaattn_viz.core.variety import routing_variety

# How the cost meter names what its cost counts, per RoutingSettings.cost_model
COST_MODEL_WORDS = {
    "notional": "realised notional cost per decision",
    # each decision's FLOPs relative to dense (a prefill's over the group, a decode step's at
    # its position), averaged: what the budget counts; the FLOPs meter is the whole run's share
    "flops": "realised cost per decision, in dense attention FLOPs",
}
VARIETY_EXPLANATION = (
    "share of decisions that differ from their layer's usual expert: 0 % is a fixed "
    "per-layer map, higher means routing that follows the token"
)


def token_strip(trace: RoutingTrace) -> list[tuple[str, float]]:
    """(token text, share of layers giving it full attention) per token, for a
    gr.HighlightedText: the darker a token, the more layers attended to it in full. A token
    with nothing visible in it shows its whitespace as glyphs (style.strip_text)."""
    shares = trace.full_share_per_token()
    pairs = zip(trace.tokens, shares.tolist(), strict=True)
    return [(strip_text(text), round(float(s), 3)) for text, s in pairs]


def _finite(x) -> float | None:
    return None if x is None or not math.isfinite(float(x)) else float(x)


def meter_values(trace: RoutingTrace) -> dict:
    """The numbers behind the meters (None where not measured)."""
    kl = trace.kl_to_dense
    kl_mean = None
    if kl is not None and len(kl) > 1:
        kl_mean = _finite(np.nanmean(np.asarray(kl, np.float64)[:-1]))  # last: no next token
        # a KL is never below 0: a tiny negative mean is float rounding ("-0.0000" on the meter)
        kl_mean = None if kl_mean is None else max(0.0, kl_mean)
    return {
        "budget": trace.settings.budget,
        "cost_model": trace.settings.cost_model,
        "realized_cost": _finite(trace.realized_cost) if trace.n_tokens else None,
        "flops_ratio": _finite(trace.attention_flops_ratio) if trace.n_tokens else None,
        "tokens_per_s": _finite(trace.timings.get("tokens_per_s")),
        "kl_to_dense": kl_mean,
        "routing_variety": routing_variety(trace.routes) if trace.n_tokens else None,
        "n_tokens": trace.n_tokens,
    }


def _fmt(value, fmt: str) -> str:
    return "\u2014" if value is None else format(value, fmt)


def meters(trace: RoutingTrace) -> str:
    """The meters as a small HTML panel (plain DOM: cheap to redraw four times a second):
    realised cost as a bar with the budget as a tick (its words and data-cost-model name the
    cost model), the routing variety (with its
    one-line explanation), attention-FLOPs ratio, tokens/s, KL(dense || routed) per token.
    Each value is also in a data- attribute; untrained controllers are said above them."""
    v = meter_values(trace)
    cost, budget = v["realized_cost"], v["budget"]
    top = max(1.0, cost or 0.0, budget or 0.0)
    bar = 0.0 if cost is None else 100 * cost / top
    tick = (
        ""
        if budget is None
        else (
            f"<div title='budget' style='position:absolute;left:{100 * budget / top:.2f}%;"
            "top:-4px;bottom:-4px;width:3px;background:#000'></div>"
        )
    )
    budget_text = "no budget" if budget is None else f"budget {budget:.2f}"
    cost_words = COST_MODEL_WORDS.get(v["cost_model"], v["cost_model"])

    def cell(key, label, value, fmt, hint):
        data = "" if value is None else f" data-value='{value:.6g}'"
        return (
            f"<div class='meter' data-meter='{key}'{data} title='{html.escape(hint)}' "
            "style='flex:1;min-width:120px;padding:4px 10px'>"
            f"<div style='font-size:12px;color:#555'>{label}</div>"
            f"<div style='font-size:22px;font-weight:600'>{_fmt(value, fmt)}</div></div>"
        )

    cost_data = "" if cost is None else f" data-value='{cost:.6g}'"
    budget_data = "" if budget is None else f" data-budget='{budget:.6g}'"
    variety = v["routing_variety"]
    variety_data = "" if variety is None else f" data-value='{variety:.6g}'"
    variety_text = "\u2014" if variety is None else f"{100 * variety:.1f} %"
    warning = (
        f"<div class='meter-warning' data-untrained='true' style='flex-basis:100%;padding:2px 10px;"
        f"font-weight:600;color:#a33'>\u26a0 {UNTRAINED_TITLE}</div>"
        if trace.n_tokens and not trace.controller_trained
        else ""
    )
    return (
        "<div class='metaattn-meters' style='display:flex;flex-wrap:wrap;gap:8px;"
        "align-items:center;font-family:Inter,Helvetica,Arial,sans-serif;color:#111'>"
        + warning
        + f"<div class='meter' data-meter='cost'{cost_data}{budget_data} "
        f"data-cost-model='{html.escape(v['cost_model'], quote=True)}' "
        "style='flex:2;min-width:260px;padding:4px 10px'>"
        f"<div style='font-size:12px;color:#555'>{html.escape(cost_words)} ({budget_text})"
        f"</div><div style='display:flex;align-items:center;gap:10px'>"
        f"<div style='position:relative;flex:1;height:14px;background:#eef2f6;"
        f"border-radius:3px'><div style='width:{bar:.2f}%;height:100%;border-radius:3px;"
        f"background:{EXPERT_COLOURS['full']}'></div>{tick}</div>"
        f"<div style='font-size:22px;font-weight:600'>{_fmt(cost, '.3f')}</div></div></div>"
        f"<div class='meter' data-meter='variety'{variety_data} "
        f"title='{html.escape(VARIETY_EXPLANATION, quote=True)}' "
        "style='flex:1.5;min-width:200px;padding:4px 10px'>"
        "<div style='font-size:12px;color:#555'>routing variety</div>"
        f"<div style='font-size:22px;font-weight:600'>{variety_text}</div>"
        f"<div class='meter-note' style='font-size:11px;color:#555'>{html.escape(VARIETY_EXPLANATION)}"
        "</div></div>"
        + cell(
            "flops",
            "attention FLOPs / dense",
            v["flops_ratio"],
            ".2f",
            "real attention FLOPs of the decisions taken, relative to all-full attention",
        )
        + cell(
            "speed",
            "tokens / s",
            v["tokens_per_s"],
            ".1f",
            "generation speed (after a re-route: the re-route's own rate)",
        )
        + cell(
            "kl",
            "KL to dense (nats/token)",
            v["kl_to_dense"],
            ".4f",
            "mean KL(dense || routed) of the next-token distribution, from a dense shadow pass",
        )
        + "</div>"
    )
