"""How the page follows Gradio's light or dark theme: the figures' palette is chosen in the
browser, and the plain-HTML views are recoloured by CSS.

Gradio marks dark mode with the `dark` class on <body> (`?__theme=dark`, the settings
menu, or the system's preference), or on the app's container when the page is embedded
(a Space). The server cannot know which theme a browser shows, so:

- `THEME_JS` is the part of a plotly view's script (plotly_html.py) that finds the theme
  the page shows (`metaattnDark`), recolours a figure's layout with that theme's palette
  (`metaattnThemed`: backgrounds, text, grid and axis lines; plots.style.THEMES) and
  watches for the class to change (`metaattnWatchTheme`), so each figure redraws itself
  at once when the theme switches. The data colours (experts, Viridis, the policies)
  stay the same, except black lines and markers off a heatmap, which take the dark
  theme's text colour (`metaattnThemedData`).
- `PAGE_CSS` recolours the meters' text (plain HTML) for the dark theme with Gradio's own
  CSS variable, keeps bertviz's frames readable on a narrow screen (a phone), and gives
  sliders and radio buttons the keyboard focus ring Gradio 6's CSS takes away
  (`FOCUS_RING`).

Downloaded HTML figures are drawn light (exports.py); a PNG or SVG taken from a figure's
toolbar is drawn as the page shows it. bertviz's views are pages of their own (light, in a
frame). Never builds figures; never imports gradio.
"""

from __future__ import annotations

import json

from metaattn_viz.app.plots.style import THEMES

THEME_JS = (
    "const METAATTN_THEMES = "
    + json.dumps(THEMES)
    + r""";
function metaattnDark(el) {
  return !!(el && el.closest && el.closest('.dark')) || document.body.classList.contains('dark');
}
function metaattnThemed(layout, dark) {
  const t = METAATTN_THEMES[dark ? 'dark' : 'light'];
  const l = Object.assign({}, layout);
  l.paper_bgcolor = t.paper;
  l.plot_bgcolor = t.plot;
  l.font = Object.assign({}, layout.font || {}, {color: t.font});
  for (const k of Object.keys(l)) {
    if (/^[xy]axis[0-9]*$/.test(k)) {
      l[k] = Object.assign({}, l[k], {gridcolor: t.grid, linecolor: t.line,
                                      zerolinecolor: t.grid, tickcolor: t.line});
    }
  }
  if (l.ternary) {
    const tern = Object.assign({}, l.ternary, {bgcolor: t.plot});
    for (const a of ['aaxis', 'baxis', 'caxis']) {
      tern[a] = Object.assign({}, tern[a] || {}, {gridcolor: t.grid, linecolor: t.line});
    }
    l.ternary = tern;
  }
  return l;
}
function metaattnInk(c, t) {
  // black ink (pure black, or black with an alpha) becomes the theme's text colour
  if (typeof c !== 'string') return c;
  const s = c.replace(/\s/g, '').toLowerCase();
  if (s === '#000' || s === '#000000' || s === 'black') return t.font;
  const m = s.match(/^rgba\(0,0,0,([0-9.]+)\)$/);
  if (!m) return c;
  const h = t.font.replace('#', '');
  const rgb = [0, 2, 4].map((i) => parseInt(h.slice(i, i + 2), 16));
  return 'rgba(' + rgb.join(',') + ',' + m[1] + ')';
}
function metaattnThemedData(data, dark) {
  // lines and markers drawn in black (the sweep's dense point and Pareto front) would
  // vanish on a dark background; marks drawn over a heatmap's colours stay as they are
  if (!dark || data.some((tr) => tr.type === 'heatmap')) return data;
  const t = METAATTN_THEMES.dark;
  return data.map((tr) => {
    const out = Object.assign({}, tr);
    if (tr.line) out.line = Object.assign({}, tr.line, {color: metaattnInk(tr.line.color, t)});
    if (tr.marker) {
      out.marker = Object.assign({}, tr.marker, {color: metaattnInk(tr.marker.color, t)});
      if (tr.marker.line) {
        out.marker.line = Object.assign({}, tr.marker.line, {color: metaattnInk(tr.marker.line.color, t)});
      }
    }
    return out;
  });
}
function metaattnWatchTheme(el, onChange) {
  // the class moves on <body> or, embedded, on an ancestor of the app: watch them all
  let dark = metaattnDark(el);
  const obs = new MutationObserver(() => {
    const now = metaattnDark(el);
    if (now !== dark) { dark = now; onChange(now); }
  });
  for (let n = el; n; n = n.parentElement) {
    obs.observe(n, {attributes: true, attributeFilter: ['class']});
  }
  return () => dark;
}
"""
)

# The meters are plain HTML with dark text written in (plots/meters.py): under the dark
# theme their text takes Gradio's text colour (the bar keeps its light track and dark tick).
# bertviz's head view draws its two token columns 225 px apart, each 110 px wide, in a frame
# as wide as the inspector: at 390 px (a 300 px frame) the right column's labels were cut.
# Its frame keeps BERTVIZ_MIN_PX and scrolls sideways in its slot (shown_frame.py) instead.
BERTVIZ_MIN_PX = 360
# Gradio 6 draws no focus on a slider (its range input has `outline: none`) and only a faint
# border change on a radio button, so a keyboard user could not see where Tab had landed. A
# ring in the theme's accent colour (Gradio defines --color-accent for light and dark) on
# :focus-visible: shown for the keyboard, not on every click.
FOCUS_RING = "2px solid var(--color-accent)"
PAGE_CSS = f"""
.dark .metaattn-meters, .dark .metaattn-meters .meter div {{ color: var(--body-text-color) !important; }}
.metaattn-frame-slot {{ overflow-x: auto; }}
.metaattn-frame-slot iframe.metaattn-bertviz {{ min-width: {BERTVIZ_MIN_PX}px; }}
input[type=range]:focus-visible, input[type=radio]:focus-visible {{
  outline: {FOCUS_RING} !important; outline-offset: 2px !important;
}}
"""


__all__ = ["THEME_JS", "PAGE_CSS", "BERTVIZ_MIN_PX", "FOCUS_RING"]
