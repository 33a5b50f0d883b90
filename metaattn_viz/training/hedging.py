"""Hedging evaluated against the budget it spends (docs/method.md, "Hedging").

A hedged row escalates a cheap decision to full attention when its uncertainty (the total,
or the epistemic part alone: ``RoutingSettings.hedge_measure``) exceeds a threshold. Under a
budget the lambda solve counts every escalation's cost (routing/budget.py), so a hedged
row at budget B spends what the plain row at B spends: the comparison is at equal cost,
and hedging helps only if the uncertain cheap decisions are worth more than the decisions
the solve makes cheaper to pay for them.

The threshold is set on the calibration split, never on the text a row is scored on: the
``QUANTILE`` of the measure over all the controller's decisions at that budget. A decision
above it gets full attention whatever lambda is, so about one decision in ten is taken out
of the budget's trade (whether or not it was full already) and every budget from
0.1 + 0.9 x the cheapest cost up stays reachable. (A quantile over the cheap decisions
alone was tried first: where the uncertain decisions are mostly the full ones, as on an
untrained controller, it put half of all decisions above the threshold and no lambda could
meet the budget.) Never: scores anything, or reads the validation text.
"""

from __future__ import annotations

import numpy as np
import torch

from metaattn_viz.core.experts import K
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing.budget import hedge_uncertainty

QUANTILE = 0.9  # of the measure over all decisions: where the threshold sits
POLICY = "full"  # what a hedged row does with an uncertain cheap decision


def threshold(routed, windows: torch.Tensor, settings: RoutingSettings, controller: str) -> float:
    """The hedge threshold for ``settings`` (its budget, scope and ``hedge_measure``) from
    the windows [n, T] of the calibration split: ``QUANTILE`` of the measure over every
    decision of the controller routing them with hedging off."""
    plain = settings.with_(hedge_policy="off")
    point_estimate = routed.controller(controller).point_estimate
    values = []
    for i in range(windows.shape[0]):
        rec = routed.prefill(windows[i : i + 1], plain, controller, use_cache=False, logits_to_keep=1).records
        u = hedge_uncertainty(torch.from_numpy(rec["beta"]).reshape(-1, K), plain, point_estimate)
        values.append(u.numpy())
    return float(np.clip(np.quantile(np.concatenate(values), QUANTILE), 0.0, 1.0))


def hedged_settings(settings: RoutingSettings, measure: str, value: float) -> RoutingSettings:
    """The row's settings: escalate (``POLICY``) cheap decisions whose ``measure`` exceeds
    ``value``."""
    return settings.with_(hedge_policy=POLICY, hedge_measure=measure, hedge_threshold=value)
