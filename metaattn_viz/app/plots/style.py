"""What every figure of the app shares: the expert colours, the constant uirevision, the
layout, the light and dark palettes, token axis labels and strip texts, and the empty
placeholder. Never
imports gradio, torch or the model."""

from __future__ import annotations

import unicodedata

import numpy as np
import plotly.graph_objects as go

from metaattn_viz.core.trace import RoutingTrace

# Okabe & Ito (2008): vermillion, sky blue, yellow stay apart in luminance and hue under
# protanopia, deuteranopia and tritanopia.
EXPERT_COLOURS = {"full": "#D55E00", "linear": "#56B4E9", "local": "#F0E442"}
UIREVISION = "metaattn-routing"  # constant: Plotly.react keeps zoom/pan across updates
MEASURE_LABELS = {
    "total": "total uncertainty (entropy of the posterior mean, share of log 3)",
    "aleatoric": "aleatoric uncertainty (expected entropy, share of log 3)",
    "epistemic": "epistemic uncertainty (mutual information, nats)",
    "vacuity": "vacuity (K / sum of concentrations)",
}
OPEN_BOX, THIN_SPACE = "\u2423", "\u2009"
FONT = dict(family="Inter, Helvetica, Arial, sans-serif", size=12)
# The figures' colours under the page's light and dark themes: backgrounds, text, grid and
# axis lines. Figures are built light (base_layout); the page redraws them with the palette
# of the theme it shows (app/theme.py). The data colours (experts, Viridis) stay the same.
THEMES = {
    "light": dict(paper="#ffffff", plot="#ffffff", font="#444444", grid="#eeeeee", line="#444444"),
    "dark": dict(paper="#0b0f19", plot="#111827", font="#e5e7eb", grid="#374151", line="#9ca3af"),
}


# How a token with nothing visible in it shows in the token strip: each whitespace character
# as a glyph (no line break: each token is a box of its own, which a line break would only
# make taller), any other invisible one (a
# format or control character: U+200B, U+200D, U+FEFF) as its code point, and an empty
# token as U+2205, so every token of the strip can be seen, clicked and named by a screen
# reader.
WHITESPACE_GLYPHS = {" ": OPEN_BOX, "\t": "\u21e5", "\n": "\u21b5", "\r": "\u240d"}
EMPTY_TOKEN = "\u2205"


def _invisible(c: str) -> bool:
    return c.isspace() or unicodedata.category(c) in ("Cc", "Cf", "Zs", "Zl", "Zp")


def _glyph(c: str) -> str:
    if c in WHITESPACE_GLYPHS:
        return WHITESPACE_GLYPHS[c]
    return OPEN_BOX if c.isspace() else f"<U+{ord(c):04X}>"


def printable(text: str) -> str:
    """`text` on one line with nothing invisible in it, for an axis label, a hover or a
    bertviz token: newline, tab and carriage return escaped (\\n), any other character that
    is not printable named as the token strip names it (`_glyph`: U+00A0 as OPEN_BOX,
    U+200B as <U+200B>; they were all U+FFFD, the mark of a token holding part of a
    character, which keeps its U+FFFD: routing/model.py)."""
    shown = text.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    return "".join(c if c.isprintable() else _glyph(c) for c in shown)


def token_label(pos: int, text: str, width: int = 12) -> str:
    """A unique, printable axis label for the token at `pos` (`printable`)."""
    shown = printable(text)
    if len(shown) > width:
        shown = shown[: width - 1] + "\u2026"
    if not shown.strip():
        shown = shown.replace(" ", OPEN_BOX) or OPEN_BOX
    return f"{pos}{THIN_SPACE}{shown}"


def strip_text(text: str) -> str:
    """`text` as the token strip shows it: unchanged where it has a visible character,
    otherwise each character as a glyph (WHITESPACE_GLYPHS, a CRLF as one newline; other
    spaces, such as U+00A0 and U+3000, as OPEN_BOX; format characters as <U+200B>), or
    EMPTY_TOKEN."""
    if not all(_invisible(c) for c in text):
        return text
    return "".join(_glyph(c) for c in text.replace("\r\n", "\n")) or EMPTY_TOKEN


def token_labels(trace: RoutingTrace) -> np.ndarray:
    """[T] object array of axis labels (arrays, not lists: plotly deep-copies lists element
    by element when it builds and serialises a figure)."""
    return np.array([token_label(t, s) for t, s in enumerate(trace.tokens)], dtype=object)


def base_layout(title: str, height: int, **extra) -> dict:
    """The common layout: no template (the default one adds ~6 KB to every frame), constant
    uirevision, the light palette (the page recolours it for the dark theme)."""
    light = THEMES["light"]
    layout = dict(
        template="none",
        title=dict(text=title, x=0.01, font=dict(size=14)),
        height=height,
        margin=dict(l=56, r=16, t=40, b=40),
        uirevision=UIREVISION,
        font=FONT,
        plot_bgcolor=light["plot"],
        paper_bgcolor=light["paper"],
    )
    layout.update(extra)
    return layout


def figure(data: list[dict], layout: dict) -> go.Figure:
    """A figure from plain dicts, skipping plotly's per-element validation (it walks every
    list element in Python: ~90 ms for one layers x tokens map, 10x the rest of a frame).
    tests/test_plots.py validates each figure's JSON with plotly instead."""
    return go.Figure(data=data, layout=layout, _validate=False)


def styled(fig: go.Figure, title: str, height: int) -> go.Figure:
    fig.update_layout(**base_layout(title, height))
    return fig


def empty(title: str, message: str, height: int = 300) -> go.Figure:
    note = dict(
        text=message,
        showarrow=False,
        x=0.5,
        y=0.5,
        xref="paper",
        yref="paper",
        font=dict(size=14, color="#666"),
    )
    return figure(
        [],
        base_layout(title, height, annotations=[note], xaxis=dict(visible=False), yaxis=dict(visible=False)),
    )
