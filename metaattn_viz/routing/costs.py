"""What a routing decision costs against the budget, under the settings' ``cost_model``
(docs/method.md, "Budget").

- "notional": the paper's cost of each expert (core.experts.COSTS: full 1, linear 0.15,
  local 0.3), the same for every decision wherever it stands.
- "flops": the real attention FLOPs the expert spends at the decision's position
  (``metaattn_kernels.flops.expert_flops``, the one model of them), relative to dense
  attention, so that a budget B is a share B of dense attention FLOPs:
  - decisions solved together (a prefill layer; in the global scope all layers): c[n, k] =
    flops(p_n)[k] / mean over the group of flops(p)[FULL]. The group's mean cost is then
    exactly its routed attention FLOPs over its dense ones (what the trace's
    ``attention_flops_ratio`` measures).
  - one decode decision at position p: c[k] = flops(p)[k] / flops(p)[FULL] (a group of one:
    relative to dense attention at that position); the dual ascent keeps the running mean
    of these near B. Under a budget such a decision never takes (nor hedges in) an expert
    costing more than 1 (dearer than full attention there: linear below the head
    dimension; budget.py's ``within_full``), so no decode step's route costs more than
    dense (a hedge's extra experts come on top, as always).
  Full attention costs 1 on average over a group, so B >= 1 is still exactly dense.

A ``CostModel`` is built once per session (its window, sinks and head dimension do not
change); a decode decision's costs are computed once per position and shared by every
layer and session (``_relative_at``, cached).
Never: decide routes (budget.py does, with these costs), or count FLOPs itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from metaattn_kernels.flops import expert_flops, lowest_flops_ratio
from metaattn_viz.core.experts import COSTS, FULL, MIN_COST
from metaattn_viz.core.settings import RoutingSettings

_COSTS_ON: dict[torch.device, torch.Tensor] = {}


def notional_tensor(device=None) -> torch.Tensor:
    """The notional costs [K] float32 on `device`; built once per device (a copy to a GPU per
    decision would synchronise with it). Shared: never modify it in place."""
    dev = torch.device(device if device is not None else "cpu")
    c = _COSTS_ON.get(dev)
    if c is None:
        c = _COSTS_ON[dev] = torch.tensor(COSTS, dtype=torch.float32, device=dev)
    return c


@lru_cache(maxsize=16384)
def _relative_at(position: int, window: int, n_sink: int, head_dim: int) -> tuple[float, ...]:
    """Each expert's attention FLOPs at `position` over full attention's there (K floats)."""
    flops = expert_flops(np.array([position]), window, n_sink, head_dim)[0]
    return tuple(float(f) for f in flops / flops[FULL])


@dataclass(frozen=True)
class CostModel:
    """The costs of routing decisions under one ``cost_model`` (module docstring). ``head_dim``,
    ``window`` and ``n_sink`` matter to "flops" only."""

    name: str = "notional"
    window: int = 64
    n_sink: int = 4
    head_dim: int = 0

    @classmethod
    def of(cls, settings: RoutingSettings, head_dim: int | None = None) -> CostModel:
        """The settings' cost model; "flops" needs the model's attention head dimension."""
        if settings.cost_model == "notional":
            return NOTIONAL
        if not head_dim:
            raise ValueError(f"cost_model={settings.cost_model!r} needs the attention head dimension")
        return cls(settings.cost_model, settings.window, settings.n_sink, int(head_dim))

    @property
    def notional(self) -> bool:
        return self.name == "notional"

    def group(self, positions: torch.Tensor) -> torch.Tensor:
        """Costs of decisions solved together at `positions` [N] (absolute, a tensor on the
        decisions' device): [K] float32 for "notional" (every decision alike), else [N, K]
        float32 (module docstring). Nothing is read back from the device."""
        if self.notional:
            return notional_tensor(positions.device)
        flops = expert_flops(positions, self.window, self.n_sink, self.head_dim)  # [N, K] float64
        return (flops / flops[:, FULL].mean()).float()

    def one(self, position: int) -> tuple[float, ...]:
        """The K costs of one decode decision at `position`, as Python floats."""
        if self.notional:
            return COSTS
        return _relative_at(position, self.window, self.n_sink, self.head_dim)

    def dense_mean(self, n_tokens: int, start: int = 0) -> float:
        """Mean full-attention FLOPs of the positions start..n_tokens-1 (the unit of a group's
        costs; 1 for "notional")."""
        if self.notional:
            return 1.0
        flops = expert_flops(np.arange(start, n_tokens), self.window, self.n_sink, self.head_dim)
        return float(flops[:, FULL].mean())

    def lowest_mean(self, n_tokens: int) -> float:
        """The lowest mean cost a group of the positions 0..n_tokens-1 can reach (every
        decision to its cheapest expert): the cheapest notional cost, or under "flops" that
        routing's share of dense attention FLOPs (1 for a text no longer than the local window
        and the head dimension)."""
        if self.notional:
            return MIN_COST
        return lowest_flops_ratio(np.arange(n_tokens), self.window, self.n_sink, self.head_dim)

    def carry_lambda(self, lam: float, solved_on: int, routed: int, solved_from: int = 0) -> float:
        """A lambda solved over the positions solved_from..solved_on-1 (a pilot's), for
        routing the positions 0..routed-1: the same price per FLOP (lambda over the group's
        unit), so every decision of the solve is routed as in the solve. Unchanged for
        "notional"."""
        if self.notional or (solved_from == 0 and solved_on == routed):
            return lam
        return lam * self.dense_mean(routed) / self.dense_mean(solved_on, solved_from)


NOTIONAL = CostModel()


__all__ = ["CostModel", "NOTIONAL", "notional_tensor"]
