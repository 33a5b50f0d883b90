"""A gr.HTML that puts its value (an `<iframe srcdoc>` page from attention_maps.iframe, or
a plain note) into the page only while the component is showing: the bertviz head and
model views, which sit in two tabs of the token inspector.

Why: both views arrive with the same event, one of them in a hidden tab. Loaded at once,
the two frames raced for the same scripts and a frame drawn while hidden has no size, and
in Chromium the shown view could stay blank (issue 16; the script race itself is fixed in
attention_maps). Here a frame is loaded when its value arrives if it is showing, else the
moment its tab is shown (a ResizeObserver sees the component get a size), so whichever
tab is showing draws when the content arrives and the other draws when it is shown.
Never builds the pages (attention_maps does).
"""

from __future__ import annotations

import gradio as gr

SHOWN_FRAME_JS = r"""
let shown = null;  // the value now in the page
function showing() { return element.offsetWidth > 0 && element.offsetHeight > 0; }
function place() {
  const slot = element.querySelector('.metaattn-frame-slot');
  const value = props.value || '';
  if (!slot || value === shown) return;
  // a note goes in at once; a frame waits until the component is showing
  if (value.indexOf('<iframe') >= 0 && !showing()) return;
  slot.innerHTML = value;
  shown = value;
}
new ResizeObserver(place).observe(element);
place();
watch('value', place);
"""


def shown_frame(value: str, elem_id: str) -> gr.HTML:
    """A gr.HTML for attention_maps.iframe / attention_maps.message values, loaded only
    while it is showing."""
    return gr.HTML(
        value,
        elem_id=elem_id,
        html_template="<div class='metaattn-frame-slot' style='min-height:40px'></div>",
        js_on_load=SHOWN_FRAME_JS,
        apply_default_css=False,
    )


__all__ = ["shown_frame", "SHOWN_FRAME_JS"]
