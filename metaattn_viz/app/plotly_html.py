"""A plotly figure drawn and redrawn in place in the page: a gr.HTML whose value is the
figure's JSON, drawn by plotly.js with Plotly.react on one div.

Why not gr.Plot for the live maps: gr.Plot remounts its plot on every new value (a full
newPlot, twice per update in Gradio 6.31, ~0.2 s each on a slow CPU), which drops the zoom
and, at four frames a second, floods the browser until clicks wait for seconds. Here only
the latest frame is drawn, while the previous draw finishes. plotly.js is served from the
installed plotly package, so the page works offline. Never builds figures (plots.py does).
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import plotly as plotly_package

PLOTLY_JS = Path(plotly_package.__file__).parent / "package_data" / "plotly.min.js"
PLOTLY_STREAM_JS = r"""
let busy = false, pending = false;
function draw() {
  const div = element.querySelector('.metaattn-plot');
  if (!window.Plotly || !div) { setTimeout(draw, 100); return; }
  if (busy) { pending = true; return; }
  const value = props.value;
  if (!value) return;
  busy = true;
  const fig = typeof value === 'string' ? JSON.parse(value) : value;
  Promise.resolve(window.Plotly.react(div, fig.data, fig.layout,
                                      {responsive: true, displaylogo: false}))
    .catch((e) => console.error('metaattn maps', e))
    .finally(() => {
      busy = false;
      if (pending) { pending = false; requestAnimationFrame(draw); }
    });
}
draw();
watch('value', draw);
"""


def plotly_stream(fig, elem_id: str, height: int) -> gr.HTML:
    """A gr.HTML whose value is a plotly figure's JSON, drawn and updated in place (the
    page must serve PLOTLY_JS: gr.set_static_paths)."""
    return gr.HTML(
        fig.to_json(),
        elem_id=elem_id,
        html_template=f"<div class='metaattn-plot' style='width:100%;min-height:{int(height)}px'></div>",
        head=f"<script src='gradio_api/file={PLOTLY_JS.as_posix()}'></script>",
        js_on_load=PLOTLY_STREAM_JS,
        apply_default_css=False,
    )


__all__ = ["plotly_stream", "PLOTLY_JS"]
