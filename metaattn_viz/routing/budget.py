"""Routing policy under a compute budget (docs/method.md, "Budget", "Hedging", "Decoding").

Hard routing: k_t(lambda) = argmax_k [log m_{t,k} - lambda c_{t,k}]. The mean cost falls
monotonically as lambda grows, so bisection finds the lambda whose realised mean cost is
closest to the budget B. Decode-time: lambda follows the running cost by dual ascent.
Hedging: a decision routed to a cheap expert whose uncertainty exceeds the threshold is
mixed softly over the experts with non-negligible weight, or escalated to full attention;
its real cost (every expert it computes) counts against the budget. A soft-hedged decision
can cost more than full attention (1.45 over all three), and raising lambda hedges more of
them, so under soft hedging the mean cost is not monotone in lambda: `solve_lambda` finds the
closest lambda exactly from where each decision's route changes (`_closest_lambda`)
instead of bisecting, and the dual ascent follows the hard
routes' cost (`steering_cost`), which does fall as lambda grows.

The costs c are the settings' cost model's (routing/costs.py), handed in by the caller: the
notional costs [K] by default (the same for every decision), or per-decision costs [N, K]
(cost_model "flops": what each expert spends at the decision's position, relative to dense).

The ends of the budget range are defined once, in `extreme_route`: B >= 1 routes every
decision to full attention (the dense model); under the notional costs B <= the cheapest
cost routes every decision to the cheapest expert, hedging or not (the all-linear anchor:
B = 0.151 with hedging on may spend far more, docs/method.md, "Budget"). Under "flops" the
cheapest expert depends on the position, so a budget at the bottom is solved like any other
(the bisection ends at +LAM_MAX: every decision to its cheapest expert, and the cost is what
that costs). At an extreme lambda sits at -LAM_MAX / +LAM_MAX and is never solved or moved.

Where no lambda brings the realised cost down to B (the floor is above it), the solver does
not leave lambda at an end of the range unless the routes need it (B at the bottom): under
hedging "full", whose escalations alone can spend more than B, lambda is the one at which
the hard routes spend B (as the dual ascent of soft hedging follows the hard routes), and a
cost that no lambda changes gives lambda 0. Decoding starts from that lambda, and a dual
ascent of about one unit per step could never bring it back from 1e4.

A decode step under a budget (`within_full`) never picks, nor hedges in, an expert that costs
more than full attention at its position. Full attention is exact (the dense model's own), so such an
expert is dominated: it spends more and reads no better. A prefill's lambda is solved with
every decision's cost in view (the group's mean meets max(B, floor)); a decode decision is
judged alone at the lambda it inherits, and the dual ascent corrects only after a step has
spent. Under the notional costs no expert costs more than full, so a step's cost stays in
[cheapest, 1] and nothing changes; under "flops" linear attention costs d / (p + 1) times
full below the head dimension d, and a small lambda (the one `solve_lambda` keeps at the
floor of a short prompt, solved in the prefill's units) let one step spend ~10x dense. With
the rule a step's route costs at most dense, as the dual ascent's step size assumes; a
hedged step pays its extra experts on top, as always, but never one dearer than full
(docs/method.md, "Budget", "Decoding").

Pure maths on [N, K] posteriors (tensors; `decide_one` in plain Python for one decode
decision): never sees the model, the kernels or the UI, and never computes a cost itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from metaattn_viz.core.dirichlet import mutual_information, total_uncertainty
from metaattn_viz.core.experts import COSTS, FULL, MIN_COST, K
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing.costs import notional_tensor

LAM_MAX = 1.0e4  # |lambda| beyond which every decision is already at an extreme
_TINY_WEIGHT = 1e-30  # a soft-hedged chosen expert's least weight
CHEAPEST = COSTS.index(MIN_COST)  # the expert of the lowest budget (linear attention)
_BISECT_STEPS = 64


@dataclass
class Decisions:
    routes: torch.Tensor  # [N] long: the expert each decision chose
    weights: torch.Tensor  # [N, K] mixing weights actually applied (one-hot unless hedged)
    hedged: torch.Tensor  # [N] bool
    cost: torch.Tensor  # [N] real cost under the cost model (sum over the experts computed)


def hedge_uncertainty(
    beta: torch.Tensor, settings: RoutingSettings, point_estimate: bool = False
) -> torch.Tensor:
    """What the hedge threshold is compared with, for concentrations beta [..., K] -> [N]:
    the settings' ``hedge_measure`` as a fraction of log K. A point estimate (the prior-free
    controller's probability vector) has no epistemic part: 0 under "epistemic"."""
    beta = beta.reshape(-1, K).float()
    if settings.hedge_measure == "epistemic":
        if point_estimate:
            return torch.zeros(beta.shape[0], device=beta.device)
        return mutual_information(beta) / math.log(K)
    return total_uncertainty(beta / beta.sum(-1, keepdim=True))


def hedge_uncertainty_one(
    beta: list[float], m: list[float], settings: RoutingSettings, point_estimate: bool
) -> float:
    """`hedge_uncertainty` of one decision in plain Python (m: its posterior mean)."""
    if settings.hedge_measure == "epistemic":
        return 0.0 if point_estimate else float(mutual_information(beta)) / math.log(K)
    return -sum(p * math.log(p) for p in m if p > 0) / math.log(len(m))


def decide(
    m: torch.Tensor,
    uncertainty: torch.Tensor,
    lam,
    settings: RoutingSettings,
    costs: torch.Tensor | None = None,
    within_full: bool = False,
) -> Decisions:
    """Route N decisions. m: [N, K] posterior means; uncertainty: [N] (`hedge_uncertainty`);
    lam: scalar, 0-d or [N] tensor; costs: [K] or [N, K] float32 on m's device (None: the
    notional costs); `within_full`: an expert costing more than full attention at the
    decision is no candidate (a decode step under a budget, module docstring). Off the CPU
    nothing here waits for the device (no data-dependent branch), so a decode step can
    decide without a host synchronisation."""
    c = notional_tensor(m.device) if costs is None else costs
    lam_t = torch.as_tensor(lam, dtype=torch.float32, device=m.device)
    if lam_t.dim() == 1:
        lam_t = lam_t[:, None]
    score = torch.log(m.float().clamp_min(1e-30)) - lam_t * c  # [N, K]
    dearer = c > c[..., FULL : FULL + 1] if within_full else None  # [K] or [N, K]
    if dearer is not None:
        score = score.masked_fill(dearer, -math.inf)
    routes = score.argmax(-1)  # [N]
    weights = torch.nn.functional.one_hot(routes, K).to(m.dtype)  # [N, K]
    hedged = torch.zeros_like(routes, dtype=torch.bool)
    if settings.hedge_policy != "off":
        hedged = (routes != FULL) & (uncertainty > settings.hedge_threshold)
        # the CPU skips the soft weights when nothing is hedged; a GPU would have to wait
        # for that answer, so there they are always computed (torch.where picks the same)
        if m.device.type != "cpu" or hedged.any():
            if settings.hedge_policy == "full":
                soft = torch.nn.functional.one_hot(torch.full_like(routes, FULL), K)
                soft = soft.to(m.dtype)
            else:
                keep = (m >= settings.hedge_min_weight) | weights.bool()
                if dearer is not None:  # nor is such an expert hedged in
                    keep = keep & ~dearer
                # the chosen expert stays in the mix even where its mean is exactly 0 (a
                # prior-free softmax that underflowed): its weight is then tiny, not 0
                soft = m.clamp_min(_TINY_WEIGHT) * keep
                soft = soft / soft.sum(-1, keepdim=True)
            weights = torch.where(hedged[:, None], soft, weights)
    cost = ((weights > 0).to(c.dtype) * c).sum(-1)  # [N]
    return Decisions(routes, weights, hedged, cost)


def decide_one(
    beta: list[float],
    lam: float,
    settings: RoutingSettings,
    point_estimate: bool = False,
    costs: tuple[float, ...] = COSTS,
    within_full: bool = False,
) -> tuple[int, list[float], bool, float]:
    """`decide` for one decision in plain Python (the decode-time hot path):
    concentrations (or probabilities, `point_estimate`) of K experts and their K costs ->
    (route, weights, hedged, cost); `within_full` as `decide` takes it."""
    total = sum(beta)
    m = [b / total for b in beta]
    scores = [math.log(max(p, 1e-30)) - lam * c for p, c in zip(m, costs, strict=True)]
    if within_full:
        scores = [-math.inf if c > costs[FULL] else v for v, c in zip(scores, costs, strict=True)]
    route = max(range(len(scores)), key=scores.__getitem__)  # first max, like argmax
    weights = [0.0] * K
    weights[route] = 1.0
    hedged = False
    if settings.hedge_policy != "off" and route != FULL:
        if hedge_uncertainty_one(beta, m, settings, point_estimate) > settings.hedge_threshold:
            hedged = True
            if settings.hedge_policy == "full":
                weights = [1.0] + [0.0] * (K - 1)
            else:
                keep = [
                    max(p, _TINY_WEIGHT)
                    if (p >= settings.hedge_min_weight or k == route)
                    and not (within_full and costs[k] > costs[FULL])
                    else 0.0
                    for k, p in enumerate(m)
                ]
                z = sum(keep)
                weights = [p / z for p in keep]
    cost = sum(c for w, c in zip(weights, costs, strict=True) if w > 0)
    return route, weights, hedged, cost


def all_to(expert: int, n: int, device=None, costs: torch.Tensor | None = None) -> Decisions:
    """N decisions all routed to `expert`; costs: [K] or [N, K] (None: the notional costs)."""
    routes = torch.full((n,), expert, dtype=torch.long, device=device)
    weights = torch.nn.functional.one_hot(routes, K).float()
    if costs is None:
        cost = torch.full((n,), COSTS[expert], device=device)
    else:
        cost = costs[..., expert].to(torch.float32).expand(n)
    return Decisions(routes, weights, torch.zeros(n, dtype=torch.bool, device=device), cost)


def extreme_route(budget: float | None, cost_model: str = "notional") -> tuple[int, float] | None:
    """(expert, lambda) of a budget at either end of the range: B >= 1 sends every decision
    to full attention (lambda = -LAM_MAX); under the notional costs B <= the cheapest cost
    sends every decision to the cheapest expert (+LAM_MAX). None in between, at the bottom
    under "flops" (the cheapest expert depends on the position: solved, see the module
    docstring), or without a budget: lambda is solved."""
    if budget is None:
        return None
    if budget >= 1.0:
        return FULL, -LAM_MAX
    if budget <= MIN_COST and cost_model == "notional":
        return CHEAPEST, LAM_MAX
    return None


def settings_extreme(settings: RoutingSettings) -> tuple[int, float] | None:
    """`extreme_route` of the settings' budget, unless a fixed lambda overrides the budget."""
    return None if settings.lam is not None else extreme_route(settings.budget, settings.cost_model)


def extreme_lambda(budget: float | None, cost_model: str = "notional") -> float | None:
    """The lambda of a budget at either end of the range, or None if it must be solved."""
    ext = extreme_route(budget, cost_model)
    return None if ext is None else ext[1]


def solve_lambda(
    m: torch.Tensor,
    uncertainty: torch.Tensor,
    budget: float,
    settings: RoutingSettings,
    costs: torch.Tensor | None = None,
) -> float:
    """The lambda whose realised mean cost over these decisions is closest to the budget
    (costs: as `decide` takes them). A budget at or below what these decisions cost at
    their cheapest is met as closely as it can be: under the notional costs at +LAM_MAX;
    under "flops" (where that is common: a short text, on which linear attention costs more
    than full) at the least lambda that routes as +LAM_MAX does, so that decoding, which
    starts from this lambda, can move it by dual ascent. Under hedging "full", where the
    escalations alone keep the cost above B, the lambda at which the hard routes spend B
    (module docstring)."""
    ext = extreme_lambda(budget, settings.cost_model)
    if ext is not None:
        return ext

    def mean_cost(lam: float) -> float:
        return float(decide(m, uncertainty, lam, settings, costs).cost.mean())

    if settings.hedge_policy == "soft":  # not monotone in lambda (module docstring)
        return _closest_lambda(m, uncertainty, budget, settings, costs)
    lo, hi = -LAM_MAX, LAM_MAX  # cost(lo) >= budget > cost(hi) is what we keep
    c_lo, c_hi = mean_cost(lo), mean_cost(hi)
    if c_hi >= budget:
        if settings.hedge_policy == "full":  # the escalations spend it: steer the hard routes
            return solve_lambda(m, uncertainty, budget, replace(settings, hedge_policy="off"), costs)
        return hi if settings.cost_model == "notional" else _least_lambda_at(mean_cost, c_hi)
    if c_lo <= budget:
        return lo
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        c_mid = mean_cost(mid)
        if c_mid >= budget:
            lo, c_lo = mid, c_mid
        else:
            hi, c_hi = mid, c_mid
        if hi - lo < 1e-6:
            break
    return lo if abs(c_lo - budget) <= abs(c_hi - budget) else hi


def _closest_lambda(
    m: torch.Tensor,
    uncertainty: torch.Tensor,
    budget: float,
    settings: RoutingSettings,
    costs: torch.Tensor | None,
) -> float:
    """The lambda whose mean cost is closest to `budget` where the cost is not monotone in
    lambda (soft hedging), found exactly: a decision's route changes only where two of its
    experts' scores cross, lambda = (ln m_j - ln m_k) / (c_j - c_k), so its cost is a step
    function with at most K(K-1)/2 steps. Each decision's cost on each of its own intervals
    (`decide` at their midpoints), sorted by where it changes, gives the mean cost on every
    interval of lambda at once; the best interval (on a tie: within the budget, then the
    least lambda) gives its midpoint, or where it runs to +-LAM_MAX its end nearest 0."""
    n = m.shape[0]
    logm = torch.log(m.float().clamp_min(1e-30))  # as `decide` scores
    c = (notional_tensor(m.device) if costs is None else costs).expand(n, K).float()
    cuts = []
    for j in range(K):
        for k in range(j + 1, K):
            dc = c[:, j] - c[:, k]
            cut = (logm[:, j] - logm[:, k]) / torch.where(dc == 0, torch.ones_like(dc), dc)
            cuts.append(torch.where(dc == 0, torch.full_like(cut, LAM_MAX), cut))  # equal costs never cross
    cuts_t = torch.stack(cuts, -1).double().clamp(-LAM_MAX, LAM_MAX).sort(-1).values  # [n, P]
    ends = torch.cat([torch.full((n, 1), -LAM_MAX, dtype=torch.float64), cuts_t.cpu()], -1)
    ends = torch.cat([ends, torch.full((n, 1), LAM_MAX, dtype=torch.float64)], -1)  # [n, P + 2]
    mids = 0.5 * (ends[:, :-1] + ends[:, 1:])  # [n, P + 1]: one lambda inside each interval
    step_cost = torch.stack(
        [
            decide(m, uncertainty, mids[:, i].to(m.device), settings, costs).cost.double().cpu()
            for i in range(mids.shape[1])
        ],
        -1,
    )  # [n, P + 1]
    where = cuts_t.cpu().reshape(-1)
    change = (step_cost[:, 1:] - step_cost[:, :-1]).reshape(-1)
    order = torch.argsort(where, stable=True)
    where, change = where[order], change[order]
    at, last = torch.unique_consecutive(where, return_counts=True)
    total = float(step_cost[:, 0].sum()) + torch.cumsum(change, 0)[torch.cumsum(last, 0) - 1]
    lows = torch.cat([torch.tensor([-LAM_MAX], dtype=torch.float64), at])
    highs = torch.cat([at, torch.tensor([LAM_MAX], dtype=torch.float64)])
    means = torch.cat([step_cost[:, 0].sum().reshape(1), total]) / n
    best = min(
        (i for i in range(len(means)) if highs[i] > lows[i]),
        key=lambda i: (abs(float(means[i]) - budget), float(means[i]) > budget, float(lows[i])),
    )
    last = best  # the intervals after it that cost the same (a cut no route's cost follows)
    while last + 1 < len(means) and float(means[last + 1]) == float(means[best]):
        last += 1
    lo, hi = float(lows[best]), float(highs[last])
    # an open end of the range: the lambda of the interval nearest the other end, so that
    # decoding, which starts from it, can move it (as _least_lambda_at does); else its middle
    if hi >= LAM_MAX > lo:
        lam = lo + max(1e-6, 1e-6 * abs(lo))
    elif lo <= -LAM_MAX < hi:
        lam = hi - max(1e-6, 1e-6 * abs(hi))
    else:
        lam = 0.5 * (lo + hi)
    if (
        abs(float(decide(m, uncertainty, lam, settings, costs).cost.double().mean()) - float(means[best]))
        > 1e-9
    ):
        lam = 0.5 * (lo + hi)  # too near a cut to route as the interval does (float32)
    return lam


def steering_cost(
    dec: Decisions, settings: RoutingSettings, costs: torch.Tensor | None = None
) -> torch.Tensor:
    """[N] the cost the decode-time dual ascent follows: the real cost, except under soft
    hedging, the hard route's cost. A soft-hedged decision's extra experts do not fall as
    lambda rises (a higher lambda only hedges more), so following them would push lambda
    up without end; its overspend shows in the realised cost (and the page says so)."""
    if settings.hedge_policy != "soft":
        return dec.cost
    c = notional_tensor(dec.routes.device) if costs is None else costs
    return c.expand(dec.routes.shape[0], K).gather(-1, dec.routes[:, None]).squeeze(-1)


def steering_cost_one(route: int, cost: float, settings: RoutingSettings, costs=COSTS) -> float:
    """`steering_cost` of one decision of `decide_one` (its route and real cost)."""
    return costs[route] if settings.hedge_policy == "soft" else cost


def _least_lambda_at(mean_cost, floor: float) -> float:
    """The least lambda (to 1e-6) whose mean cost is the floor, mean_cost(+LAM_MAX); 0 where
    every lambda costs the floor (no lambda changes a route's cost: -LAM_MAX would leave
    decoding at an end of the range)."""
    lo, hi = -LAM_MAX, LAM_MAX  # cost(lo) > floor >= cost(hi) is what we keep
    if mean_cost(lo) <= floor:
        return 0.0
    for _ in range(_BISECT_STEPS):
        mid = 0.5 * (lo + hi)
        if mean_cost(mid) <= floor:
            hi = mid
        else:
            lo = mid
        if hi - lo < 1e-6:
            break
    return hi


def route_under_budget(
    m: torch.Tensor,
    uncertainty: torch.Tensor,
    settings: RoutingSettings,
    costs: torch.Tensor | None = None,
) -> tuple[Decisions, float]:
    """One group of decisions (a layer, or all layers) meeting settings' budget or lambda
    (costs: as `decide` takes them, the group's under the settings' cost model)."""
    n = m.shape[0]
    if settings.lam is not None:
        return decide(m, uncertainty, settings.lam, settings, costs), settings.lam
    if settings.budget is None:
        return decide(m, uncertainty, 0.0, settings, costs), 0.0
    ext = extreme_route(settings.budget, settings.cost_model)
    if ext is not None:
        return all_to(ext[0], n, m.device, costs), ext[1]
    lam = solve_lambda(m, uncertainty, settings.budget, settings, costs)
    return decide(m, uncertainty, lam, settings, costs), lam


def dual_ascent(lam, cost, settings: RoutingSettings):
    """Decode-time update lambda <- lambda + eta (cost_t - B), so the running mean tracks B.
    Floats (the CPU decode path) or tensors on the device (no host synchronisation)."""
    if settings.lam is not None or settings.budget is None:
        return lam
    ext = extreme_route(settings.budget, settings.cost_model)
    if ext is not None:
        return torch.full_like(lam, ext[1]) if isinstance(lam, torch.Tensor) else ext[1]
    lam = lam + settings.dual_step * (cost - settings.budget)
    if isinstance(lam, torch.Tensor):
        return lam.clamp(-LAM_MAX, LAM_MAX)
    return float(min(max(lam, -LAM_MAX), LAM_MAX))
