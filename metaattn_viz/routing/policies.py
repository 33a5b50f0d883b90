"""The routing modes of a session, one policy object each: given a layer's concentrations,
decide the mixing weights of its experts (docs/method.md, "Budget", "Decoding", "ELBO").

- ``BudgetPolicy``: the method itself. Hard routes under the budget (or a fixed lambda);
  lambda is solved per layer on a prefill and follows the running cost by dual ascent on
  decode steps. It alone has the decode fast path ``decide_one`` (plain Python, one token).
- ``ForcedPolicy``: the weights are given (replaying a trace, attention maps).
- ``BaselinePolicy``: a baseline router replaces the budget solver (evaluation's static,
  random and salience policies).
- ``TrainPolicy``: calibration; a reparameterised Dirichlet sample (or the prior-free
  point estimate) mixes the experts, with the graph kept for the loss.

Every policy answers ``decide(layer, beta, offset, x) -> (weights [B, T, K], record)``; the
session (routing/session.py) runs the experts with the weights. A policy's class
attributes tell the session what it may do around it. A decode step off the CPU float32
path is decided by ``decide_step`` (``BudgetPolicy``): the same maths as ``decide`` on one
token with lambda kept as a tensor on the device, so the step never waits for the GPU.
What a decision costs is the settings' cost model's (routing/costs.py): ``decide`` knows
its decisions' positions (offset..offset+T-1), and ``decide_one`` / ``decide_step`` are
always handed the decode decision's position (the "flops" cost model reads it; the
notional costs are the same everywhere).
Never: run attention, or know transformers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from metaattn_viz.core.dirichlet import total_uncertainty
from metaattn_viz.core.experts import COSTS, K
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing import budget as budget_mod
from metaattn_viz.routing.budget import Decisions
from metaattn_viz.routing.costs import NOTIONAL, CostModel, notional_tensor
from metaattn_viz.routing.records import DeviceRecord, OneRecord, Record, record

# A baseline router: (layer, x [B, T, D], m [N, K], uncertainty [N]) -> Decisions
Baseline = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], Decisions]


class RoutingPolicy:
    """How one session decides its routes. Subclasses implement ``decide``."""

    fast_decode = False  # whether a one-token decode step may use ``decide_one``
    # whether, at budget 1, the session may run plain SDPA (exactly the dense model)
    # instead of the experts with these weights
    sdpa_when_dense = True
    backend: str | None = None  # the kernel backend to use instead of the settings'

    def __init__(self, n_layers: int, lam: list[float | None] | None = None):
        # lambda per layer, reported with the result (None: not solved / not routed by one)
        self.lam: list[float | None] = list(lam) if lam is not None else [None] * n_layers

    def decide(
        self, layer: int, beta: torch.Tensor, offset: int, x: torch.Tensor
    ) -> tuple[torch.Tensor, Record | None]:
        """beta [B, T, K]: the layer's concentrations for the queries at positions offset..;
        x [B, T, D]: their residual stream. -> (weights [B, T, K], the record or None).
        beta carries autograd's graph when it has one; policies that do not train detach it."""
        raise NotImplementedError

    def decide_one(self, layer: int, beta: list[float], position: int) -> tuple[list[float], OneRecord]:
        """One decode decision from K concentrations, in plain Python (``fast_decode``);
        ``position``: the token's absolute position."""
        raise NotImplementedError

    def decide_step(self, layer: int, beta: torch.Tensor, position: int) -> tuple[torch.Tensor, DeviceRecord]:
        """One decode decision from beta [1, 1, K] on the device, without a host
        synchronisation (``fast_decode``): (weights [1, 1, K] float32, its record);
        ``position`` as for ``decide_one``."""
        raise NotImplementedError

    def current_lam(self) -> list[float | None]:
        """``lam`` as it stands now (a device-side lambda read back)."""
        return self.lam


def _posterior_means(beta: torch.Tensor) -> torch.Tensor:
    """beta [B, T, K] -> the posterior means m [N, K] in float32."""
    return (beta / beta.sum(-1, keepdim=True)).reshape(-1, K).float()


def _group_costs(costs: CostModel, beta: torch.Tensor, offset: int) -> torch.Tensor:
    """The costs of the decisions of beta [B, T, K] (queries at offset..offset+T-1), solved
    together: [K] (notional) or [B * T, K]."""
    if costs.notional:
        return notional_tensor(beta.device)
    b, t, _ = beta.shape
    positions = torch.arange(offset, offset + t, device=beta.device).repeat(b)
    return costs.group(positions)


class BudgetPolicy(RoutingPolicy):
    """Hard routes under the settings' budget or fixed lambda (docs/method.md, "Budget")."""

    fast_decode = True

    def __init__(
        self,
        settings: RoutingSettings,
        n_layers: int,
        lam: list[float | None] | None = None,
        point_estimate: bool = False,
        head_dim: int | None = None,
    ):
        """``head_dim``: the model's attention head dimension (the "flops" cost model's)."""
        super().__init__(n_layers, lam)
        self.settings = settings
        self.point_estimate = point_estimate  # the prior-free controller: no epistemic part
        self.costs = CostModel.of(settings, head_dim)
        # whether a decision's costs depend on its position (the "flops" cost model)
        self.reads_position = not self.costs.notional
        # decode steps under a budget leave out any expert dearer than full attention at
        # their position: full is exact, so it is dominated, and one such step (linear below
        # the head dimension) could spend many times dense before the dual ascent reacts
        # (budget.py's module docstring). Only "flops" has such experts: the notional costs
        # are decided exactly as before.
        self.within_full = self.reads_position and settings.lam is None and settings.budget is not None
        # decide_step under "flops": (position, its costs [1, K] on the device), per token
        self._step_costs: tuple[int, torch.Tensor] | None = None
        self.n_layers = n_layers
        self.lam_given = lam is not None  # global scope and replays bring their lambdas
        self._extreme = budget_mod.settings_extreme(settings)
        if self._extreme is not None:  # built once: decode steps reuse it (never mutated)
            self._extreme_weights = [float(k == self._extreme[0]) for k in range(K)]
        self._decode_cost = 0.0  # global scope: this token's cost summed over the layers so far
        # decode steps on the device (decide_step): lambda per layer [L] float64 and the global
        # scope's cost sum there, made from `lam` at the first such step
        self._lam_t: torch.Tensor | None = None
        self._cost_t: torch.Tensor | None = None

    def decide(self, layer, beta, offset, x):
        beta = beta.detach()
        m = _posterior_means(beta)
        # the notional costs as ever (None); else these decisions', solved together
        costs = None if self.costs.notional else _group_costs(self.costs, beta, offset)
        if self._extreme is not None:
            expert, lam = self._extreme
            dec = budget_mod.all_to(expert, m.shape[0], None if costs is None else costs.device, costs)
        else:
            unc = budget_mod.hedge_uncertainty(beta, self.settings, self.point_estimate)
            layer_lam = self.lam[layer]
            if layer_lam is None or (offset == 0 and not self.lam_given):
                # a prefill: this layer's lambda meets the budget over its own decisions
                dec, lam = budget_mod.route_under_budget(m, unc, self.settings, costs)
                self.lam[layer] = lam
            else:
                lam = layer_lam
                # a decode step (offset > 0): no expert dearer than full; lambda follows the running cost
                cap = self.within_full and offset > 0
                dec = budget_mod.decide(m, unc, lam, self.settings, costs, within_full=cap)
                if offset > 0:
                    steer = budget_mod.steering_cost(dec, self.settings, costs)
                    self._dual_ascent(layer, float(steer.mean()))
        b, t, _ = beta.shape
        return dec.weights.view(b, t, K), record(beta, dec, lam)

    def decide_one(self, layer, beta, position):
        """The same maths as ``decide`` without a dozen tiny tensor ops, which would dominate
        a decode step on a CPU (budget.decide_one); the costs at ``position`` are computed
        once per position (costs.CostModel.one)."""
        # the notional costs are the same everywhere
        costs = self.costs.one(position) if self.reads_position else COSTS
        if self._extreme is not None:
            route, lam = self._extreme
            w, hedged, cost = self._extreme_weights, False, costs[route]
        else:
            layer_lam = self.lam[layer]
            assert layer_lam is not None, "a decode step before the prefill solved lambda"
            lam = layer_lam
            route, w, hedged, cost = budget_mod.decide_one(
                beta, lam, self.settings, self.point_estimate, costs, within_full=self.within_full
            )
            self._dual_ascent(layer, budget_mod.steering_cost_one(route, cost, self.settings, costs))
        return w, (beta, route, hedged, w, cost, lam)

    def _costs_at(self, position: int, device: torch.device) -> torch.Tensor | None:
        """decide_step's costs: None (notional), else those at ``position`` [1, K] on the
        device, made once per token (every layer's step at a position shares them)."""
        if not self.reads_position:
            return None
        held = self._step_costs
        if held is None or held[0] != position or held[1].device != device:
            at = torch.arange(position, position + 1, device=device)  # no host-device copy
            held = self._step_costs = (position, self.costs.group(at))
        return held[1]

    def decide_step(self, layer, beta, position):
        """``decide`` on one decode token with lambda on the device (float64, like the
        Python path's floats) and its dual ascent there: no value comes back to the host."""
        beta = beta.detach()
        dev = beta.device
        m = _posterior_means(beta)  # [1, K]
        costs = self._costs_at(position, dev)
        if self._extreme is not None:
            expert, lam_value = self._extreme
            dec = budget_mod.all_to(expert, 1, dev, costs)
            lam = torch.full((), lam_value, dtype=torch.float64, device=dev)
        else:
            if self._lam_t is None:
                assert all(v is not None for v in self.lam), "a decode step before the prefill solved lambda"
                self._lam_t = torch.tensor(self.lam, dtype=torch.float64, device=dev)
                self._cost_t = torch.zeros((), dtype=torch.float64, device=dev)
            lam = self._lam_t[layer].clone()  # the record keeps the lambda this decision used
            unc = budget_mod.hedge_uncertainty(beta, self.settings, self.point_estimate)
            dec = budget_mod.decide(m, unc, lam, self.settings, costs, within_full=self.within_full)
            self._dual_ascent_t(layer, budget_mod.steering_cost(dec, self.settings, costs)[0].double())
        rec = DeviceRecord(beta.reshape(K), dec.routes[0], dec.hedged[0], dec.weights[0], dec.cost[0], lam)
        return dec.weights.view(1, 1, K).float(), rec

    def current_lam(self):
        if self._lam_t is not None:
            self.lam = [float(v) for v in self._lam_t.tolist()]
        return self.lam

    def _dual_ascent_t(self, layer: int, cost: torch.Tensor) -> None:
        """``_dual_ascent`` on the device tensors (in place, so the step's launches are fixed)."""
        s = self.settings
        if s.lam is not None or s.budget is None:
            return
        lam_t, cost_t = self._lam_t, self._cost_t
        assert lam_t is not None and cost_t is not None
        if s.scope == "layer":
            lam_t[layer] = budget_mod.dual_ascent(lam_t[layer], cost, s)
            return
        cost_t += cost
        if layer == self.n_layers - 1:
            lam_t.copy_(budget_mod.dual_ascent(lam_t[layer], cost_t / self.n_layers, s).expand_as(lam_t))
            cost_t.zero_()

    def _dual_ascent(self, layer: int, cost: float) -> None:
        """Decode time: per layer in layer scope; in global scope once per token, on the
        mean cost over all layers, after the last one (docs/method.md, "Decoding")."""
        s = self.settings
        if s.lam is not None or s.budget is None:
            return
        lam = self.lam[layer]
        assert lam is not None
        if s.scope == "layer":
            self.lam[layer] = budget_mod.dual_ascent(lam, cost, s)
            return
        self._decode_cost += cost
        if layer == self.n_layers - 1:
            new = budget_mod.dual_ascent(lam, self._decode_cost / self.n_layers, s)
            self.lam = [new] * self.n_layers
            self._decode_cost = 0.0


class ForcedPolicy(RoutingPolicy):
    """Given weights: [L] tensors [B, T, K], one per layer. Decisions mixing more than one
    expert are recorded as hedged; each costs every expert it computes, under ``costs`` (the
    settings' cost model; a layer's decisions are one group)."""

    sdpa_when_dense = False  # the given weights are what must run

    def __init__(self, weights: list[torch.Tensor], n_layers: int, costs: CostModel = NOTIONAL):
        super().__init__(n_layers)
        self.weights = weights
        self.costs = costs

    def decide(self, layer, beta, offset, x):
        beta = beta.detach()
        w = self.weights[layer].reshape(-1, K).to(device=beta.device, dtype=torch.float32)
        used = w > 0
        dec = Decisions(
            w.argmax(-1), w, used.sum(-1) > 1, (used.float() * _group_costs(self.costs, beta, offset)).sum(-1)
        )
        b, t, _ = beta.shape
        return w.view(b, t, K), record(beta, dec, 0.0)


class BaselinePolicy(RoutingPolicy):
    """A baseline router (a function, see ``Baseline``) instead of the budget solver."""

    def __init__(self, router: Baseline, n_layers: int):
        super().__init__(n_layers)
        self.router = router

    def decide(self, layer, beta, offset, x):
        beta = beta.detach()
        m = _posterior_means(beta)
        dec = self.router(layer, x, m, total_uncertainty(m))
        b, t, _ = beta.shape
        # a baseline may build its weights on the CPU; the experts run where beta is
        return dec.weights.view(b, t, K).to(beta.device), record(beta, dec, 0.0)


@dataclass
class TrainRouting:
    """How a calibration session mixes experts: a reparameterised Dirichlet sample (Bayes) or
    the softmax point estimate (prior-free); with ``hard`` the forward pass uses the one-hot
    argmax and the gradient flows through the soft weights (straight-through). With a
    ``budget`` the hard route is the one inference takes under that budget instead of the
    argmax: argmax_k [ln w_k - lambda c_k], lambda solved on the layer's (sampled) weights
    so that their mean cost meets it (budget.route_under_budget, layer scope)."""

    hard: bool = False
    budget: float | None = None


class TrainPolicy(RoutingPolicy):
    """Calibration: sampled (or point-estimate) weights with their graph. Every layer's
    concentrations, with graph, are appended to ``beta_graph`` for the KL term."""

    sdpa_when_dense = False
    backend = "reference"  # differentiable

    def __init__(
        self,
        train: TrainRouting,
        point_estimate: bool,
        n_layers: int,
        beta_graph: list[tuple[int, torch.Tensor]],
    ):
        super().__init__(n_layers)
        self.hard = train.hard
        self.budget = train.budget
        self.point_estimate = point_estimate
        self.beta_graph = beta_graph

    def decide(self, layer, beta, offset, x):
        if self.point_estimate:
            w = beta
        else:
            w = torch.distributions.Dirichlet(beta).rsample()
            w = w.clamp_min(1e-6)
            w = w / w.sum(-1, keepdim=True)
        if self.hard:
            if self.budget is None:
                routes = w.argmax(-1)
            else:
                flat = w.detach().reshape(-1, K).float()
                settings = RoutingSettings(budget=self.budget, scope="layer")
                dec, _ = budget_mod.route_under_budget(flat, torch.zeros(flat.shape[0]), settings)
                routes = dec.routes.view(w.shape[:-1]).to(w.device)
            hard = torch.nn.functional.one_hot(routes, K).to(w.dtype)
            w = hard + w - w.detach()
        self.beta_graph.append((layer, beta))
        return w, None
