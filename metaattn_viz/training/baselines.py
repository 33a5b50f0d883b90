"""Baseline routers for evaluation: functions that replace the budget solver, and how a
baseline spends a budget (docs/method.md, "Budget").

A baseline router is ``routing.policies.Baseline``: ``(layer, x [B, T, D], m [N, K],
uncertainty [N]) -> Decisions``, run by the session in place of the controller's decision.
Here: one expert everywhere (all-local, all-linear), random routing, salience top-k (the
tokens with the largest residual norm get the expensive expert; a Mixture-of-Depths-like
baseline), a fixed expert per layer (the static and greedy layer maps of
training/layer_maps.py), and given routes per layer (the oracle of training/oracle.py).

Budgets are met with two experts: full + local above the local cost, local + linear below
it (``budget_shares``). ``units_within`` is the one rule for how many of a policy's units
(layers, decisions) get the expensive expert without the notional cost passing the budget.
Pure functions of their inputs; never runs the model or decides from a controller's posterior.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from metaattn_viz.core.experts import COSTS, FULL, LINEAR, LOCAL, K
from metaattn_viz.routing.budget import Decisions
from metaattn_viz.routing.policies import Baseline

# slack on a unit count computed from a float budget: 0.5 * 30 / 30 must give 15, not 14
_COUNT_SLACK = 1e-9


def budget_shares(budget: float) -> tuple[int, int, float]:
    """A two-expert mix meeting the budget: (expensive, cheap, share of expensive).
    Full + local above the local cost, local + linear below it."""
    if budget >= COSTS[LOCAL]:
        return FULL, LOCAL, (budget - COSTS[LOCAL]) / (COSTS[FULL] - COSTS[LOCAL])
    return LOCAL, LINEAR, (budget - COSTS[LINEAR]) / (COSTS[LOCAL] - COSTS[LINEAR])


def units_within(budget: float, n: int, at_least: bool = False) -> tuple[int, int, int] | None:
    """How `n` units (layers, decisions) meet the budget with ``budget_shares``' two
    experts: (expensive, cheap, how many units get the expensive one), the count rounded
    down so the mean notional cost never exceeds the budget; ``at_least``: rounded up
    instead, the fewest units whose mean cost reaches the budget. None below the cheapest
    cost."""
    if budget < COSTS[LINEAR] - _COUNT_SLACK:
        return None
    hi, lo, share = budget_shares(budget)
    k = (
        math.ceil(min(share, 1.0) * n - _COUNT_SLACK)
        if at_least
        else math.floor(min(share, 1.0) * n + _COUNT_SLACK)
    )
    return hi, lo, max(0, min(n, k))


def decisions(routes: torch.Tensor) -> Decisions:
    """Hard decisions [N] -> ``Decisions`` (one-hot weights, nothing hedged, their costs)."""
    w = torch.nn.functional.one_hot(routes, K).float()
    return Decisions(routes, w, torch.zeros_like(routes, dtype=torch.bool), torch.tensor(COSTS)[routes])


def static_policy(expert: int) -> Baseline:
    """Every decision to one expert."""

    def policy(layer, x, m, unc):
        return decisions(torch.full((m.shape[0],), expert, dtype=torch.long))

    return policy


def _spending(budget: float) -> Callable[[int], tuple[int, int, int]]:
    """``units_within(budget, n)`` as a function of `n`; ValueError for a budget below the
    cheapest cost, which no baseline meets."""
    if units_within(budget, 1) is None:
        raise ValueError(f"budget {budget:g} is below the cheapest cost: give at least {COSTS[LINEAR]:g}")

    def spend(n: int) -> tuple[int, int, int]:
        within = units_within(budget, n)
        assert within is not None  # None depends on the budget alone
        return within

    return spend


def random_policy(budget: float, seed: int) -> Baseline:
    """Each layer sends a random share of its tokens to the expensive expert: as many as
    ``units_within`` gives, so the notional cost never passes the budget."""
    spend = _spending(budget)
    gen = torch.Generator().manual_seed(seed)

    def policy(layer, x, m, unc):
        n = m.shape[0]
        hi, lo, k = spend(n)
        pick = torch.randperm(n, generator=gen)[:k]
        routes = torch.full((n,), lo, dtype=torch.long)
        routes[pick] = hi
        return decisions(routes)

    return policy


def salience_policy(budget: float) -> Baseline:
    """Each layer sends its tokens of largest residual norm to the expensive expert: as many
    as ``units_within`` gives, so the notional cost never passes the budget."""
    spend = _spending(budget)

    def policy(layer, x, m, unc):
        sal = x.float().norm(dim=-1).reshape(-1)  # [N]
        n = sal.shape[0]
        hi, lo, k = spend(n)
        routes = torch.full((n,), lo, dtype=torch.long)
        routes[sal.topk(k).indices] = hi
        return decisions(routes)

    return policy


def layer_map_policy(experts: Sequence[int]) -> Baseline:
    """Every decision of layer l to ``experts[l]`` (a static per-layer map)."""

    def policy(layer, x, m, unc):
        return decisions(torch.full((m.shape[0],), int(experts[layer]), dtype=torch.long))

    return policy


def routes_policy(routes: torch.Tensor) -> Baseline:
    """Given routes [L, N] (long): layer l's N decisions are ``routes[l]``, in the order of
    the session's decisions (batch row-major, then position)."""

    def policy(layer, x, m, unc):
        if routes.shape[1] != m.shape[0]:
            raise ValueError(f"routes for {routes.shape[1]} decisions, the layer has {m.shape[0]}")
        return decisions(routes[layer].long())

    return policy
