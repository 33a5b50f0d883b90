"""Static per-layer expert maps, calibrated on the calibration split: the baselines that give
each layer one expert for all of its tokens (docs/method.md, "Budget").

A per-token router is only worth its controller if it beats the best map that ignores the
token. Two such maps, both measured on a few windows of the calibration split (the training
articles of training/data.py, the ones calibrate.py trains on; never the validation
windows), with the mean KL of the next-token distribution to the dense model's as the loss.
Each measurement is one routed forward pass of those windows together.

- Static ranking (rows "static-layers"): each layer alone goes local, the others full, one
  pass per layer; the layers are ranked by the KL that causes, most sensitive first. At a
  budget B at or above the local cost the k most sensitive layers get full attention and
  the rest local, k the largest with (k * 1 + (L - k) * 0.30) / L <= B; below the local
  cost the most sensitive layers get local and the rest linear, by the same ranking
  (training/baselines.py, ``units_within``). Rows "static-layers-up": the same ranking with
  the fewest full layers whose cost reaches B (one layer more than "static-layers" unless B
  falls on a step), the cheapest static map a controller that spends B competes with at
  equal or lower cost.
- Greedy, DuoAttention-style (rows "greedy-layers"): DuoAttention (Xiao et al., 2024) keeps
  full attention for the heads that retrieve and streaming (sink + window) attention for the
  rest; here at layer granularity, chosen greedily. Start all-local; in each round try
  switching every remaining layer to full and keep the switch that lowers the calibration KL
  the most per unit of cost (every switch costs the same 0.70 / L, so: the lowest KL).
  Unlike the ranking, each choice is conditional on the layers already full: a layer that
  matters only once another is full, or two layers that repair the same damage, are seen.
  A round over r remaining layers is r passes; rounds stop at the number of full layers
  the largest evaluated budget allows. Only at budgets at or above the local cost: like
  DuoAttention it mixes full and local attention, never linear.

Both are cached on the calibrator and reused across budgets (the greedy order grows when a
larger budget asks for more rounds). Never: read validation text, or route per token.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metaattn_viz.core.experts import COSTS, EXPERTS, FULL, LOCAL
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing.controller import KINDS
from metaattn_viz.routing.model import RoutedModel, kl_per_token
from metaattn_viz.training.baselines import layer_map_policy, units_within

# calibration windows per pass: 2 x 256 tokens keeps the greedy's hundreds of passes (about
# 400 up to budget 0.75 on 30 layers) within tens of minutes on a CPU; the layers' KLs span
# orders of magnitude, so their order is stable at this size
DEFAULT_CALIB_WINDOWS = 2


def static_map(ranking: Sequence[int], budget: float, at_least: bool = False) -> list[int] | None:
    """The expert of each layer at `budget`, from layers ranked most sensitive first: the
    first k take the expensive expert, the rest the cheap one (None below the cheapest cost);
    k the most within the budget, or with ``at_least`` the fewest that reach it."""
    n = len(ranking)
    split = units_within(budget, n, at_least)
    if split is None:
        return None
    hi, lo, k = split
    experts = [lo] * n
    for layer in ranking[:k]:
        experts[layer] = hi
    return experts


def full_layers(budget: float, n_layers: int) -> int | None:
    """How many layers may be full (the rest local) within `budget`; None below the local cost."""
    if budget < COSTS[LOCAL]:
        return None
    split = units_within(budget, n_layers)
    assert split is not None and split[0] == FULL
    return split[2]


def greedy_map(order: Sequence[int], budget: float, n_layers: int) -> list[int] | None:
    """The expert of each layer at `budget` from a greedy order of full layers (the first
    ``full_layers`` of it full, the rest local); None below the local cost."""
    k = full_layers(budget, n_layers)
    if k is None:
        return None
    if k > len(order):
        raise ValueError(f"the greedy order has {len(order)} layers, budget {budget} needs {k}")
    experts = [LOCAL] * n_layers
    for layer in order[:k]:
        experts[layer] = FULL
    return experts


def describe(experts: Sequence[int]) -> list[str]:
    """A layer map by expert name, for the JSON rows."""
    return [EXPERTS[e] for e in experts]


class LayerMapCalibrator:
    """The calibration passes of both maps on fixed windows [n, T] of the calibration split,
    with their results cached. ``settings``: window and sinks of the local expert."""

    def __init__(
        self,
        routed: RoutedModel,
        windows: torch.Tensor,
        settings: RoutingSettings,
        controller: str = KINDS[0],
    ):
        self.routed = routed
        self.windows = windows
        # a baseline's routes replace the controller's, which only has to run
        self.settings = settings.with_(budget=None)
        self.controller = controller
        self.n_layers = routed.n_layers
        self.passes = 0
        self._dense = [routed.dense_logits(windows[i : i + 1])[0, :-1] for i in range(windows.shape[0])]
        self._sensitivity: list[float] | None = None
        self._order: list[int] = []
        self._order_kl: list[float] = []
        self.greedy_passes = 0  # passes the greedy's rounds have run so far

    def describe(self) -> dict:
        """What the maps were calibrated on, for the JSON rows."""
        n, t = self.windows.shape
        return {"split": "training", "windows": int(n), "seq_len": int(t), "tokens": int(n * (t - 1))}

    def kl(self, experts: Sequence[int]) -> float:
        """Mean KL to dense per token of the calibration windows under one layer map."""
        res = self.routed.prefill(
            self.windows, self.settings, self.controller, use_cache=False, policy=layer_map_policy(experts)
        )
        self.passes += 1
        total = sum(
            float(kl_per_token(dense, res.logits[i, :-1]).sum()) for i, dense in enumerate(self._dense)
        )
        return total / sum(d.shape[0] for d in self._dense)

    def sensitivity(self) -> list[float]:
        """KL to dense when layer l alone goes local (the others full), per layer."""
        if self._sensitivity is None:
            n = self.n_layers
            self._sensitivity = [
                self.kl([LOCAL if j == layer else FULL for j in range(n)]) for layer in range(n)
            ]
        return self._sensitivity

    def ranking(self) -> list[int]:
        """Layers, most sensitive first (ties: lower layer first)."""
        s = self.sensitivity()
        return sorted(range(self.n_layers), key=lambda layer: (-s[layer], layer))

    def greedy_order(self, n_full: int) -> tuple[list[int], list[float]]:
        """The first `n_full` layers the greedy switches to full, and the calibration KL after
        each switch."""
        n_full = min(n_full, self.n_layers)
        while len(self._order) < n_full:
            chosen = set(self._order)
            best: tuple[float, int] | None = None
            for layer in range(self.n_layers):
                if layer in chosen:
                    continue
                kl = self.kl([FULL if j in chosen or j == layer else LOCAL for j in range(self.n_layers)])
                self.greedy_passes += 1
                if best is None or kl < best[0]:
                    best = (kl, layer)
            assert best is not None
            self._order.append(best[1])
            self._order_kl.append(best[0])
        return self._order[:n_full], self._order_kl[:n_full]
