"""Every plotly figure of the page, drawn and redrawn in place: a gr.HTML whose value is the
figure's JSON, drawn by plotly.js with Plotly.react on one div, in the page's light or dark
theme, with PNG and SVG downloads in its toolbar.

Why not gr.Plot: gr.Plot remounts its plot on every new value (a full newPlot, twice per
update in Gradio 6.31, ~0.2 s each on a slow CPU), which drops the zoom and, at four frames
a second, floods the browser until clicks wait for seconds; and its figures cannot follow
the theme or take a toolbar configuration. Here only the latest frame is drawn, while the
previous draw finishes; the figure is recoloured for the theme the page shows and redrawn
when it switches (theme.py); a figure drawn while hidden (a closed accordion, another tab)
is resized when it is shown. The toolbar's camera saves a PNG and the extra button an SVG,
both drawn in the browser by plotly.js (the server has no image renderer). To a screen
reader each plot is an image named by its figure's title (plotly's SVG, read out tick
label by tick label, is hidden from it; the toolbar is not). plotly.js is
served from the installed plotly package, so the page works offline. Never builds figures
(plots/ does).
"""

from __future__ import annotations

import json
from pathlib import Path

import gradio as gr
import plotly as plotly_package

from metaattn_viz.app.theme import THEME_JS

PLOTLY_JS = Path(plotly_package.__file__).parent / "package_data" / "plotly.min.js"
DEFAULT_NAME = "Plot"  # a plot's accessible name where its figure has no title
PLOTLY_VIEW_JS = (
    THEME_JS
    + r"""
let busy = false, pending = false, config = null;
function plotConfig() {
  // one object for the life of the view: Plotly.react redraws from scratch when it changes
  if (!config) {
    const Plotly = window.Plotly;
    config = {
      responsive: true,
      displaylogo: false,
      showSendToCloud: false,  // plotly.js offers to upload the chart (its data: the prompt) by default
      toImageButtonOptions: {format: 'png', filename: FILENAME, scale: 2},
      modeBarButtonsToAdd: [{
        name: 'metaattn-svg',
        title: 'Download plot as an SVG',
        icon: Plotly.Icons.camera,
        click: (gd) => Plotly.downloadImage(gd, {format: 'svg', filename: FILENAME}),
      }],
    };
  }
  return config;
}
// On a narrow screen (a phone) the title and the toolbar, both at the top, overlap and the
// one-line title and notes run past the right edge (a placeholder's centred message past
// both): smaller type, lines broken to the width, and the toolbar gets a strip of its own
// above the title (upright at the right, it covered the colorbars' labels). A ternary
// leaves room at its right for the colorbar (its corner's "local" met the colorbar's ticks).
const NARROW_PX = 640;
const TOOLBAR_PX = 30;  // the height of plotly's toolbar strip
const TERNARY_SHARE = 0.84;  // of the plot area's width, for the triangle (the rest: its corner's label)
function wrapped(text, chars) {
  // break at spaces into lines of at most `chars` visible characters (tags do not count)
  const lines = [];
  let line = '';
  for (const word of String(text).split(' ')) {
    const visible = (line + ' ' + word).replace(/<[^>]*>/g, '').length;
    if (line && visible > chars) {
      lines.push(line);
      line = word;
    } else {
      line = line ? line + ' ' + word : word;
    }
  }
  if (line) lines.push(line);
  return lines.join('<br>');
}
function narrowed(layout) {
  const width = element.offsetWidth;
  if (width === 0 || width >= NARROW_PX) return layout;
  const out = Object.assign({}, layout);
  const count = (text) => text.split('<br>').length;
  let extra = 0;  // px more at the top: the title's extra lines, and a top note's
  if (out.annotations) {
    out.annotations = out.annotations.map((a) => {
      if (a.xanchor !== 'left') {
        // centred on the plot area (a placeholder), off the figure's middle by half the
        // margins' difference: lines as wide as the room on its nearer edge allows
        const m = out.margin || {};
        const room = width - Math.abs((m.l ?? 80) - (m.r ?? 80)) - 16;
        const text = wrapped(a.text || '', Math.max(12, Math.floor(room / 7.5)));
        const font = Object.assign({}, a.font, {size: Math.min((a.font || {}).size || 12, 12)});
        return Object.assign({}, a, {text: text, align: 'center', font: font});
      }
      const text = wrapped(a.text || '', Math.floor(width / 6.5));
      if ((a.y || 0) >= 0.99) extra = Math.max(extra, 11 * (count(text) - 1));
      const font = Object.assign({}, a.font, {size: Math.min((a.font || {}).size || 12, 9)});
      return Object.assign({}, a, {text: text, align: 'left', font: font});
    });
  }
  if (out.title) {
    const title = typeof out.title === 'string' ? {text: out.title} : out.title;
    const text = wrapped(title.text || '', Math.floor(width / 7.5));
    extra += 14 * (count(text) - 1) + 10;  // and the pad above the title
    out.title = Object.assign({}, title, {
      text: text, font: Object.assign({}, title.font, {size: 12}),
      // from the top down, below the toolbar's strip and above the notes
      yref: 'container', y: 1, yanchor: 'top', pad: {t: 16 + TOOLBAR_PX},
    });
  }
  if (out.ternary) {
    out.ternary = Object.assign({}, out.ternary, {domain: {x: [0, TERNARY_SHARE], y: [0, 1]}});
  }
  extra += TOOLBAR_PX;
  out.margin = Object.assign({}, out.margin, {t: ((out.margin || {}).t || 60) + extra});
  return out;
}
function plotName(fig) {
  // the plot's accessible name: its title as plain text, without plotly's tags (<br>, <b>,
  // <sup>...) but with a token's name such as <U+200B>, which plotly shows as text
  const t = (fig && fig.layout && fig.layout.title) || '';
  const text = typeof t === 'string' ? t : t.text || '';
  const tags = /<\/?(br|b|i|em|sup|sub|span|a|s|u)(\s[^>]*)?\/?>/gi;
  return text.replace(tags, ' ').replace(/\s+/g, ' ').trim() || DEFAULT_NAME;
}
const isDark = metaattnWatchTheme(element, () => draw());
function draw() {
  const div = element.querySelector('.metaattn-plot');
  if (!window.Plotly || !div) { setTimeout(draw, 100); return; }
  if (busy) { pending = true; return; }
  const value = props.value;
  if (!value) return;
  busy = true;
  const fig = typeof value === 'string' ? JSON.parse(value) : value;
  div.setAttribute('aria-label', plotName(fig));
  const dark = isDark();
  const data = metaattnThemedData(fig.data, dark), layout = narrowed(metaattnThemed(fig.layout, dark));
  Promise.resolve(window.Plotly.react(div, data, layout, plotConfig()))
    .then(() => {
      div.dataset.theme = dark ? 'dark' : 'light';
      // the picture is read as its name: its tick labels one by one said nothing useful
      // (the toolbar's buttons, outside these, stay reachable)
      for (const svg of div.querySelectorAll('svg.main-svg')) svg.setAttribute('aria-hidden', 'true');
    })
    .catch((e) => console.error('metaattn plot', e))
    .finally(() => {
      busy = false;
      if (pending) { pending = false; requestAnimationFrame(draw); }
    });
}
new ResizeObserver(() => {
  const div = element.querySelector('.metaattn-plot');
  if (window.Plotly && div && div._fullLayout && element.offsetWidth > 0) window.Plotly.Plots.resize(div);
}).observe(element);
draw();
watch('value', draw);
"""
)


def figure_value(fig) -> str:
    """What a plotly view takes: the figure's JSON (a plotly Figure, or JSON already)."""
    return fig if isinstance(fig, str) else fig.to_json()


def plotly_view(fig, elem_id: str, height: int, filename: str | None = None) -> gr.HTML:
    """A gr.HTML whose value is a plotly figure's JSON (figure_value), drawn and updated in
    place; its toolbar saves `filename`.png / .svg (default: metaattn-<elem_id>). The page
    must serve PLOTLY_JS (gr.set_static_paths). The plot is an image to a screen reader
    (role="img"), named by each figure's title (DEFAULT_NAME where it has none)."""
    name = filename or f"metaattn-{elem_id}"
    return gr.HTML(
        figure_value(fig),
        elem_id=elem_id,
        html_template=(
            f"<div class='metaattn-plot' role='img' aria-label='{DEFAULT_NAME}' "
            f"style='width:100%;min-height:{int(height)}px'></div>"
        ),
        head=f"<script src='gradio_api/file={PLOTLY_JS.as_posix()}'></script>",
        js_on_load=(
            f"const FILENAME = {json.dumps(name)}, DEFAULT_NAME = {json.dumps(DEFAULT_NAME)};\n"
            + PLOTLY_VIEW_JS
        ),
        apply_default_css=False,
    )


__all__ = ["plotly_view", "figure_value", "PLOTLY_JS", "PLOTLY_VIEW_JS", "DEFAULT_NAME"]
