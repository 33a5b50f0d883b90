"""The Live tab's routing controls as one object: the sliders and radios that make a
`RoutingSettings` (budget, scope, hedge policy, threshold and measure, local window, cost
model), their labels, and the two ways between them and settings (`settings` from a
callback's values, `show` of a replayed run's). The sliders cannot hold every run's values: a
run routed without a budget is shown at its realised cost, and a budget, threshold or window
between the sliders' steps (the API and the CLI take any) at the nearest step, each with a
warning naming what Generate and a re-route use (`replay_notes`).
tab_live.py lays them out among its other controls.

A value is committed (and the text re-routed) when a slider is released, its box loses
focus, Enter is pressed in its box, or the arrow keys stop moving it (`COMMIT_JS`); never on
each keystroke, where "0.35" would pass through "0" and "0.3". The sliders hand their value
over as typed (the re-route's event skips Gradio's preprocessing; `as_typed`): an empty box
gets a sentence (`empty`), a number beyond the slider's ends is taken at the nearest end and
one between its steps at the nearest step (`on_step`), where the handle shows it, and the
box is set to it (`box_updates`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import Decimal

import gradio as gr

from metaattn_viz.app.errors import AppError
from metaattn_viz.app.requests import parse_settings
from metaattn_viz.core.settings import RoutingSettings

SCOPE_LABELS = {"global": "global (layers compete)", "layer": "per layer"}
HEDGE_MEASURE_LABELS = {"total": "total uncertainty", "epistemic": "epistemic (what it does not know)"}
COST_MODEL_LABELS = {"notional": "notional costs", "flops": "attention FLOPs (share of dense)"}
CONTROLLER_LABELS = {"bayes": "Bayesian", "priorfree": "prior-free"}
# the local-window slider's range (a replayed run's window is shown clamped to it)
WINDOW_MIN, WINDOW_MAX = 8, 256
# the sliders' element ids (COMMIT_JS finds them by these) and their names in sentences
SLIDER_IDS = {"budget": "budget", "hedge_threshold": "hedge-threshold", "window": "window"}
SLIDER_NAMES = {"budget": "budget", "hedge_threshold": "hedge threshold", "window": "local window"}
# the settings these controls make (the others keep their defaults)
CONTROL_FIELDS = (
    "budget",
    "scope",
    "hedge_policy",
    "hedge_threshold",
    "window",
    "hedge_measure",
    "cost_model",
)
COMMIT_DELAY_MS = 400  # after the last arrow key on a slider, its value is committed

# Run once by a hidden gr.HTML of the Live tab (its js_on_load: `trigger` fires that
# component's click event, which re-routes like a slider's release). Gradio's slider commits
# only on release (pointer up, or its box losing focus); the keyboard commits here too:
# Enter in a slider's box leaves the box (Gradio then commits and clamps it, as for Tab);
# arrow, Page and Home/End keys on a slider commit once they stop for COMMIT_DELAY_MS (one
# re-route per burst, not one per step).
COMMIT_JS = (
    f"const IDS = {list(SLIDER_IDS.values())!r}, DELAY = {COMMIT_DELAY_MS};"
    + r"""
const KEYS = new Set(['ArrowLeft', 'ArrowRight', 'ArrowUp', 'ArrowDown',
                     'PageUp', 'PageDown', 'Home', 'End']);
function routingSlider(el) {
  return !!(el && el.closest) && IDS.some((id) => el.closest('#' + id));
}
if (!window.metaattnCommitKeys) {
  window.metaattnCommitKeys = true;
  let timer = null;
  document.addEventListener('keydown', (e) => {
    const t = e.target;
    if (e.key === 'Enter' && t.matches && t.matches('input[type=number]') && routingSlider(t)) {
      e.preventDefault();
      t.blur();
    }
  }, true);
  document.addEventListener('keyup', (e) => {
    const t = e.target;
    if (!KEYS.has(e.key) || !(t.matches && t.matches('input[type=range]') && routingSlider(t))) return;
    clearTimeout(timer);
    timer = setTimeout(() => window.metaattnCommit && window.metaattnCommit(), DELAY);
  }, true);
}
window.metaattnCommit = () => trigger('click');
"""
)


def as_typed(payload) -> float | None:
    """A slider's value as its box held it, unchecked (the re-route's event skips Gradio's
    preprocessing, which answered an empty box with its internal "Could not preprocess input
    component" error, and 5 with "Value 5 is greater than maximum value 1.0" while the box
    showed 1): a number, or None for an empty box."""
    if isinstance(payload, bool):
        return None
    try:
        value = float(payload)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


@dataclass(frozen=True)
class RoutingControls:
    """The controls that make a RoutingSettings (the controller is picked apart: it is not
    a setting)."""

    budget: gr.Slider
    scope: gr.Radio
    hedge_policy: gr.Radio
    hedge_threshold: gr.Slider
    window: gr.Slider
    hedge_measure: gr.Radio
    cost_model: gr.Radio

    @property
    def inputs(self) -> set:
        return {
            self.budget,
            self.scope,
            self.hedge_policy,
            self.hedge_threshold,
            self.window,
            self.hedge_measure,
            self.cost_model,
        }

    @property
    def sliders(self) -> dict:
        """The sliders by their settings' field names."""
        return {"budget": self.budget, "hedge_threshold": self.hedge_threshold, "window": self.window}

    def empty(self, data: dict) -> list[str]:
        """A sentence for each slider whose box was left empty."""
        return [
            f"The {SLIDER_NAMES[name]} box is empty: type a number from "
            f"{_num(slider.minimum)} to {_num(slider.maximum)}."
            for name, slider in self.sliders.items()
            if as_typed(data[slider]) is None
        ]

    def _value(self, data: dict, name: str):
        """A slider's value as its handle shows it: a number beyond its ends taken at the
        nearest one, one between its steps at the nearest step (`on_step`: a window of 13
        is 16, a budget of 0.151 is 0.15); the local window a whole number. The box shows
        it so after the re-route (`box_updates`)."""
        slider = self.sliders[name]
        value = as_typed(data[slider])
        if value is None:
            return None
        value = on_step(value, slider.minimum, slider.maximum, slider.step)
        return round(value) if name == "window" else value

    def box_updates(self, data: dict) -> dict:
        """The sliders whose box holds another number than the value used (`_value`: beyond
        an end, between steps), set to that value. Gradio's box clamps itself to the ends
        when it loses focus but keeps a number between steps, while the handle goes to the
        nearest step: the box said 13 over a window routed, and shown, as 16."""
        out = {}
        for name, slider in self.sliders.items():
            typed, used = as_typed(data[slider]), self._value(data, name)
            if typed is not None and typed != used:
                out[slider] = used
        return out

    def settings(self, data: dict) -> RoutingSettings:
        """The settings from a callback's input values (AppError with a sentence for an
        empty slider box)."""
        empty = self.empty(data)
        if empty:
            raise AppError(" ".join(empty))
        return parse_settings(
            self._value(data, "budget"),
            data[self.scope],
            data[self.hedge_policy],
            self._value(data, "hedge_threshold"),
            self._value(data, "window"),
            hedge_measure=data[self.hedge_measure],
            cost_model=data[self.cost_model],
        )

    @staticmethod
    def same(a: RoutingSettings, b: RoutingSettings) -> bool:
        """Whether `a` and `b` agree on every setting these controls make (a trace keeps its
        settings as resolved, e.g. linear_map "auto" as "learned", so not `a == b`)."""
        return all(getattr(a, f) == getattr(b, f) for f in CONTROL_FIELDS)

    def unchanged(self, settings: RoutingSettings, trace) -> bool:
        """Whether the controls' `settings` are those `trace` is shown with (`show`): `same`,
        with the run's settings as the sliders hold them (`shown_settings`), so that a
        commit that moves nothing (Tab through a box) does not re-route it."""
        return self.same(settings, self.shown_settings(trace.settings, trace.realized_cost))

    def shown_budget(self, s: RoutingSettings, realized_cost: float = math.nan) -> float:
        """The budget slider's value for a run of settings `s`: its budget on the slider's
        step, or for a run routed with no budget, which the slider cannot express, its
        `realized_cost` there (the budget that asks for what the run spent; the slider's
        default where there is none, a run of no decisions). It was 1, and Generate then
        made a dense run of a run that spent 0.29."""
        slider = self.budget
        if s.budget is not None:
            return on_step(s.budget, slider.minimum, slider.maximum, slider.step)
        if not math.isfinite(realized_cost):
            return float(slider.value)
        return on_step(realized_cost, slider.minimum, slider.maximum, slider.step)

    def shown_settings(self, s: RoutingSettings, realized_cost: float = math.nan) -> RoutingSettings:
        """`s` as the sliders hold it: the budget as `shown_budget`, the threshold and the
        window at the nearest step (a run made through the API or the CLI may lie between
        them: shown as typed, the next commit snapped them and re-routed a run that moved
        nothing, and Generate silently made another run)."""
        t, w = self.hedge_threshold, self.window
        return s.with_(
            budget=self.shown_budget(s, realized_cost),
            hedge_threshold=on_step(s.hedge_threshold, t.minimum, t.maximum, t.step),
            window=round(on_step(s.window, w.minimum, w.maximum, w.step)),
        )

    def replay_notes(self, trace) -> list[str]:
        """The warnings for a replayed run the sliders cannot hold as it was routed (no
        budget; a value between their steps), naming what Generate and a re-route use. A
        toast shows them as plain text: no Markdown (the status line names the run)."""
        s, cost = trace.settings, trace.realized_cost
        shown = self.shown_settings(s, cost)
        notes = []
        if s.budget is None:
            why = (
                f"the nearest it comes to the run's realised cost ({cost:.3f})"
                if math.isfinite(cost)
                else "its default (the run holds no decisions)"
            )
            notes.append(
                f"This run was routed with no budget (each decision the controller's own pick, "
                f"with no cost to meet), which the budget slider cannot express: it is set to "
                f"{shown.budget:g}, {why}. Generate and a re-route use budget {shown.budget:g}."
            )
        moved = [
            f"{label} {_num(getattr(s, f))} is shown as {_num(getattr(shown, f))}"
            for f, label in (("budget", "budget"), ("hedge_threshold", "threshold"), ("window", "window"))
            if getattr(s, f) is not None and getattr(s, f) != getattr(shown, f)
        ]
        if moved:
            notes.append(
                f"This run was routed with values the sliders cannot hold (made through the API "
                f"or the CLI): {'; '.join(moved)}, the nearest step, which Generate and a re-route use."
            )
        return notes

    def show(self, s: RoutingSettings, realized_cost: float = math.nan) -> dict:
        """The controls set to `s` (a replayed run's settings) as the sliders hold them
        (`shown_settings`: with no budget at the run's `realized_cost`, values between steps
        at the nearest one)."""
        shown = self.shown_settings(s, realized_cost)
        return {
            self.budget: shown.budget,
            self.scope: s.scope,
            self.hedge_policy: s.hedge_policy,
            self.hedge_threshold: shown.hedge_threshold,
            self.window: shown.window,
            self.hedge_measure: s.hedge_measure,
            self.cost_model: s.cost_model,
        }


def _decimals(x: float) -> int:
    """How many decimals `x` is written with (0.01: 2, 8: 0)."""
    exponent = Decimal(repr(float(x))).normalize().as_tuple().exponent
    return max(0, -exponent) if isinstance(exponent, int) else 0


def on_step(value: float, lo: float, hi: float, step: float) -> float:
    """`value` where a slider from `lo` to `hi` by `step` puts its handle: within the ends,
    at the nearest step from `lo` (rounded to the decimals of `lo` and `step`, so 0.15 +
    0.01 is 0.16, not 0.16000000000000003). Only the page's sliders snap: the API and the
    CLI take any value in range."""
    value = min(max(value, lo), hi)
    if step and step > 0:
        value = lo + round((value - lo) / step) * step
        value = round(min(max(value, lo), hi), max(_decimals(lo), _decimals(step)))
    return value


def _num(x: float) -> str:
    return f"{x:g}"


__all__ = [
    "RoutingControls",
    "as_typed",
    "on_step",
    "COMMIT_JS",
    "SLIDER_IDS",
    "SCOPE_LABELS",
    "HEDGE_MEASURE_LABELS",
    "COST_MODEL_LABELS",
    "CONTROLLER_LABELS",
    "WINDOW_MIN",
    "WINDOW_MAX",
]
