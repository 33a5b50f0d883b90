"""The Live tab's routing controls as one object: the sliders and radios that make a
`RoutingSettings` (budget, scope, hedge policy, threshold and measure, local window, cost
model), their labels, and the two ways between them and settings (`settings` from a
callback's values, `show` of a replayed run's). tab_live.py lays them out among its other
controls.
"""

from __future__ import annotations

from dataclasses import dataclass

import gradio as gr

from metaattn_viz.app.requests import parse_settings
from metaattn_viz.core.settings import RoutingSettings

SCOPE_LABELS = {"global": "global (layers compete)", "layer": "per layer"}
HEDGE_MEASURE_LABELS = {"total": "total uncertainty", "epistemic": "epistemic (what it does not know)"}
COST_MODEL_LABELS = {"notional": "notional costs", "flops": "attention FLOPs (share of dense)"}
CONTROLLER_LABELS = {"bayes": "Bayesian", "priorfree": "prior-free"}
# the local-window slider's range (a replayed run's window is shown clamped to it)
WINDOW_MIN, WINDOW_MAX = 8, 256


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

    def settings(self, data: dict) -> RoutingSettings:
        """The settings from a callback's input values (AppError if one is out of range)."""
        return parse_settings(
            data[self.budget],
            data[self.scope],
            data[self.hedge_policy],
            data[self.hedge_threshold],
            data[self.window],
            hedge_measure=data[self.hedge_measure],
            cost_model=data[self.cost_model],
        )

    def show(self, s: RoutingSettings) -> dict:
        """The controls set to `s` (a replayed run's settings)."""
        return {
            self.budget: s.budget if s.budget is not None else 1.0,
            self.scope: s.scope,
            self.hedge_policy: s.hedge_policy,
            self.hedge_threshold: s.hedge_threshold,
            self.window: min(max(s.window, WINDOW_MIN), WINDOW_MAX),
            self.hedge_measure: s.hedge_measure,
            self.cost_model: s.cost_model,
        }


__all__ = [
    "RoutingControls",
    "SCOPE_LABELS",
    "HEDGE_MEASURE_LABELS",
    "COST_MODEL_LABELS",
    "CONTROLLER_LABELS",
    "WINDOW_MIN",
    "WINDOW_MAX",
]
