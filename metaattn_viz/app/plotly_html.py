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
both drawn in the browser by plotly.js (the server has no image renderer). plotly.js is
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
const isDark = metaattnWatchTheme(element, () => draw());
function draw() {
  const div = element.querySelector('.metaattn-plot');
  if (!window.Plotly || !div) { setTimeout(draw, 100); return; }
  if (busy) { pending = true; return; }
  const value = props.value;
  if (!value) return;
  busy = true;
  const fig = typeof value === 'string' ? JSON.parse(value) : value;
  const dark = isDark();
  const data = metaattnThemedData(fig.data, dark), layout = metaattnThemed(fig.layout, dark);
  Promise.resolve(window.Plotly.react(div, data, layout, plotConfig()))
    .then(() => { div.dataset.theme = dark ? 'dark' : 'light'; })
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
    must serve PLOTLY_JS (gr.set_static_paths)."""
    name = filename or f"metaattn-{elem_id}"
    return gr.HTML(
        figure_value(fig),
        elem_id=elem_id,
        html_template=f"<div class='metaattn-plot' style='width:100%;min-height:{int(height)}px'></div>",
        head=f"<script src='gradio_api/file={PLOTLY_JS.as_posix()}'></script>",
        js_on_load=f"const FILENAME = {json.dumps(name)};\n" + PLOTLY_VIEW_JS,
        apply_default_css=False,
    )


__all__ = ["plotly_view", "figure_value", "PLOTLY_JS", "PLOTLY_VIEW_JS"]
