"""What the page adds for screen-reader and keyboard users where Gradio 6's own markup
falls short, applied in the browser (the server cannot reach these elements).

`ACCESSIBILITY_JS` is the js_on_load of one hidden gr.HTML of the page (ui.py). Gradio
draws and redraws its components at will (a new value, a replay, new choices), so the
script applies its changes once and again after every change to the page's elements (a
MutationObserver, at most once an animation frame); each change is idempotent.

- The Live tab's status line (`LIVE_REGIONS`: Done, Stopped, Re-routed, "Stopping the
  generation…", a failure) is a polite live region (`role="status"`, `aria-live`), so a
  screen reader says it when it changes. The region is the line's text (Gradio's markdown
  element), not its block: the block also holds Gradio's progress timer ("0.1s"), which
  would be read out ten times a second.
- Each slider's "Reset to default value" button is named after its slider ("Reset Local
  window to its default value"): all seven had the same name.
- Each radio group's buttons share one `name`: Gradio gives every button a name of its
  own, which makes each its own group (arrow keys moved nothing; each button was a Tab stop
  of its own). Shared, they are one group as the browser knows it: Tab reaches the checked
  button, the arrow keys move the choice (a change, as a click is).

The keyboard focus ring is CSS (theme.PAGE_CSS); the plots' names are set where they are
drawn (plotly_html.py). Never imports gradio.
"""

from __future__ import annotations

import json

# the elem_ids of the status lines read out when they change
LIVE_REGIONS = ("run-status",)
# a slider's name, for its reset button: its label up to the first ":" or " (" (the budget's
# label runs on with what the budget counts)
RESET_LABEL = "Reset {name} to its default value"
RADIO_GROUP_PREFIX = "metaattn-radio-"

ACCESSIBILITY_JS = (
    f"const LIVE_REGIONS = {json.dumps(list(LIVE_REGIONS))};\n"
    f"const RESET_LABEL = {json.dumps(RESET_LABEL)};\n"
    f"const RADIO_GROUP_PREFIX = {json.dumps(RADIO_GROUP_PREFIX)};\n"
    + r"""
function metaattnSet(el, name, value) {
  if (el.getAttribute(name) !== value) el.setAttribute(name, value);
}
function metaattnSliderName(block) {
  const info = block && block.querySelector('[data-testid=block-info]');
  const label = info ? info.textContent.trim() : '';
  return label.split(/:| \(/)[0].trim();
}
let metaattnGroups = 0;
function metaattnAccessible() {
  for (const id of LIVE_REGIONS) {
    const line = document.querySelector('#' + id + ' [data-testid=markdown]');
    if (line) {
      metaattnSet(line, 'role', 'status');
      metaattnSet(line, 'aria-live', 'polite');
    }
  }
  for (const button of document.querySelectorAll('button.reset-button')) {
    const name = metaattnSliderName(button.closest('.block'));
    if (name) metaattnSet(button, 'aria-label', RESET_LABEL.replace('{name}', name));
  }
  for (const group of document.querySelectorAll('fieldset')) {
    const radios = group.querySelectorAll('input[type=radio]');
    if (radios.length < 2) continue;
    if (!group.dataset.metaattnGroup) group.dataset.metaattnGroup = RADIO_GROUP_PREFIX + ++metaattnGroups;
    for (const radio of radios) {
      if (radio.name !== group.dataset.metaattnGroup) radio.name = group.dataset.metaattnGroup;
    }
  }
}
if (!window.metaattnAccessibility) {
  window.metaattnAccessibility = true;
  let queued = false;
  new MutationObserver(() => {
    if (queued) return;
    queued = true;
    requestAnimationFrame(() => { queued = false; metaattnAccessible(); });
  }).observe(document.body, {childList: true, subtree: true});
}
metaattnAccessible();
"""
)


__all__ = ["ACCESSIBILITY_JS", "LIVE_REGIONS", "RESET_LABEL"]
