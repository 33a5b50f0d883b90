"""Hedging on the epistemic uncertainty (RoutingSettings.hedge_measure): the measure against
an independent Monte Carlo reference (torch.distributions), which decisions it hedges, the
prior-free controller's point estimate, and the decode paths deciding alike."""

import math

import numpy as np
import pytest
import torch

from metaattn_viz.core.experts import COSTS, FULL
from metaattn_viz.core.settings import HEDGE_MEASURES, RoutingSettings
from metaattn_viz.routing import budget as budget_mod
from metaattn_viz.routing.policies import BudgetPolicy


def test_the_setting_is_validated():
    assert HEDGE_MEASURES == ("total", "epistemic") and RoutingSettings().hedge_measure == "total"
    for bad in ("", "Epistemic", None, "vacuity"):
        with pytest.raises(ValueError, match="hedge_measure must be one of total, epistemic"):
            RoutingSettings(hedge_measure=bad)


def test_epistemic_measure_matches_a_monte_carlo_mutual_information():
    """MI = H[E p] - E H[p] for p ~ Dir(beta), as a fraction of log K, estimated by sampling."""
    beta = torch.tensor([[0.4, 0.7, 1.3], [5.0, 2.0, 1.0], [40.0, 35.0, 30.0], [0.2, 0.2, 3.0]])
    got = budget_mod.hedge_uncertainty(beta, RoutingSettings(hedge_measure="epistemic"))
    p = torch.distributions.Dirichlet(beta.double()).sample((200_000,)).clamp_min(1e-300)  # [S, N, K]
    mean = beta.double() / beta.double().sum(-1, keepdim=True)
    h_mean = -(mean * mean.log()).sum(-1)
    e_h = -(p * p.log()).sum(-1).mean(0)
    want = (h_mean - e_h) / math.log(3)
    assert torch.allclose(got.double(), want, atol=4e-3)
    total = budget_mod.hedge_uncertainty(beta, RoutingSettings())
    assert torch.allclose(total.double(), h_mean / math.log(3), atol=1e-6)
    # one decision in plain Python: the same numbers
    for b, e, t in zip(beta.tolist(), got.tolist(), total.tolist(), strict=True):
        m = [v / sum(b) for v in b]
        assert budget_mod.hedge_uncertainty_one(b, m, RoutingSettings(hedge_measure="epistemic"), False) == (
            pytest.approx(e, abs=1e-6)
        )
        assert budget_mod.hedge_uncertainty_one(b, m, RoutingSettings(), False) == pytest.approx(t, abs=1e-6)


def test_epistemic_hedging_spares_a_well_evidenced_even_split_and_hedges_a_vague_one():
    """Two posteriors with the same (uniform) mean, so the same total uncertainty: one
    backed by much evidence (the experts are equally good: nothing to learn), one by little
    (the controller does not know). Only the second is hedged on the epistemic measure."""
    beta = torch.tensor([[30.0, 31.0, 30.0], [0.3, 0.31, 0.3]])
    m = beta / beta.sum(-1, keepdim=True)
    for measure, want in (("total", [True, True]), ("epistemic", [False, True])):
        s = RoutingSettings(hedge_policy="full", hedge_threshold=0.3, hedge_measure=measure)
        dec = budget_mod.decide(m, budget_mod.hedge_uncertainty(beta, s), 0.0, s)
        assert dec.hedged.tolist() == want, measure
        assert [bool(r) for r in (dec.weights[:, FULL] == 1.0)] == want
        for i, b in enumerate(beta.tolist()):
            route, w, hedged, cost = budget_mod.decide_one(b, 0.0, s)
            assert hedged == want[i] and cost == pytest.approx(float(dec.cost[i]))


def test_a_point_estimate_has_no_epistemic_part_and_is_never_hedged_on_it():
    probs = torch.tensor([[0.33, 0.34, 0.33]])  # the prior-free controller's output: linear
    s = RoutingSettings(hedge_policy="full", hedge_threshold=0.01, hedge_measure="epistemic")
    assert budget_mod.hedge_uncertainty(probs, s, point_estimate=True).tolist() == [0.0]
    assert not budget_mod.decide_one(probs[0].tolist(), 0.0, s, point_estimate=True)[2]
    assert budget_mod.decide_one(probs[0].tolist(), 0.0, s.with_(hedge_measure="total"), True)[2]


@pytest.mark.parametrize("hedge", ["soft", "full"])
@pytest.mark.parametrize("point_estimate", [False, True])
def test_decode_paths_agree_when_hedging_on_the_epistemic_measure(hedge, point_estimate):
    """BudgetPolicy's plain-Python decode path and its tensor path (and the device step)
    make the same decisions, token after token, with the budget's dual ascent."""
    n_layers, n_tokens = 4, 50
    g = torch.Generator().manual_seed(11)
    betas = torch.rand(n_tokens, n_layers, 3, generator=g) * 3 + 0.05
    if point_estimate:
        betas = betas / betas.sum(-1, keepdim=True)
    s = RoutingSettings(
        budget=0.5, scope="global", hedge_policy=hedge, hedge_threshold=0.1, hedge_measure="epistemic"
    )
    start = [-1.0, 0.0, 0.5, 2.0]
    fast, tensor, step = (BudgetPolicy(s, n_layers, list(start), point_estimate) for _ in range(3))
    hedged_any, x = False, torch.zeros(1, 1, 8)
    for t in range(n_tokens):
        for layer in range(n_layers):
            beta = betas[t, layer]
            w, (_, route, hedged, _, cost, lam) = fast.decide_one(layer, beta.tolist(), 10 + t)
            weights, rec = tensor.decide(layer, beta.view(1, 1, 3), offset=10 + t, x=x)
            w_step, dev = step.decide_step(layer, beta.view(1, 1, 3), 10 + t)
            _, dev_route, dev_hedged, *_ = dev.fields
            assert route == int(rec["routes"][0, 0]) == int(dev_route)
            assert hedged == bool(rec["hedged"][0, 0]) == bool(dev_hedged)
            assert np.allclose(w, weights.view(-1).numpy(), atol=1e-6)
            assert np.allclose(w, w_step.view(-1).numpy(), atol=1e-6)
            assert cost == pytest.approx(float(rec["cost"][0, 0]), abs=1e-6)
            hedged_any |= hedged
    assert hedged_any != point_estimate  # a point estimate is never hedged on this measure
    assert fast.lam == pytest.approx(tensor.lam, abs=1e-4)
    assert fast.lam == pytest.approx(step.current_lam(), abs=1e-4)


def test_the_global_scope_solves_lambda_with_the_measure_it_hedges_on():
    """A global-scope prefill solves its shared lambda on the decisions as they will be
    hedged: the lambda it returns is the one that meets the budget when the settings'
    measure (here the epistemic one) decides the hedges, recomputed here by scanning lambda."""
    from helpers import routed_tiny

    from metaattn_viz.routing import prefill as prefill_mod

    r = routed_tiny(seed=3, spread=10.0)
    ids = torch.randint(0, 200, (1, 48), generator=torch.Generator().manual_seed(0))
    plain = RoutingSettings(budget=0.5, window=8, n_sink=2)
    beta = r.prefill(ids, plain, "bayes", use_cache=False).records["beta"]
    b = torch.from_numpy(beta).reshape(-1, 3).double()
    m = b / b.sum(-1, keepdim=True)
    epi = budget_mod.hedge_uncertainty(b, RoutingSettings(hedge_measure="epistemic"))
    settings = plain.with_(
        hedge_policy="full", hedge_measure="epistemic", hedge_threshold=float(epi.quantile(0.8))
    )
    lam = prefill_mod.solve_global(beta, settings)

    def cost(lam_value: float) -> float:  # full for a full route or an uncertain cheap one
        route = (m.log() - lam_value * torch.tensor(COSTS, dtype=torch.float64)).argmax(-1)
        paid = torch.where(
            (route == FULL) | (epi > settings.hedge_threshold), 1.0, torch.tensor(COSTS)[route]
        )
        return float(paid.mean())

    grid = np.linspace(-20, 20, 4001)
    best = min(abs(cost(v) - 0.5) for v in grid)
    assert abs(cost(lam) - 0.5) <= best + 1e-9


@pytest.mark.parametrize(
    "beta, point_estimate, measure, threshold, want",
    [
        # threshold 0: only an uncertainty of exactly 0 is spared ...
        ([0.2, 0.5, 0.3], True, "epistemic", 0.0, False),  # a point estimate: epistemic part 0
        ([0.0, 1.0, 0.0], True, "total", 0.0, False),  # a certain decision: entropy 0
        ([0.0, 0.0, 1.0], True, "total", 0.0, False),
        ([0.01, 0.98, 0.01], True, "total", 0.0, True),  # ... any other is hedged
        ([0.5, 8.0, 0.5], False, "epistemic", 0.0, True),
        # threshold 1 (the top of the scale): not even the uniform posterior is hedged
        ([1.0, 1.0, 1.0], False, "total", 1.0, False),
        ([0.4, 0.4, 0.4], True, "total", 1.0, False),
    ],
)
def test_the_hedge_threshold_is_exclusive_at_both_ends_of_its_range(
    beta, point_estimate, measure, threshold, want
):
    """A decision is hedged when its uncertainty is strictly above the threshold: at 0 a
    point estimate (epistemic part 0) or a certain decision is never hedged; at 1 nothing is,
    the uniform posterior (total uncertainty exactly 1) included. The tensor path and the
    plain-Python decode path decide alike."""
    s = RoutingSettings(hedge_policy="full", hedge_threshold=threshold, hedge_measure=measure)
    t = torch.tensor([beta])
    m = t / t.sum(-1, keepdim=True)
    lam = 1.0  # a uniform posterior goes to a cheap expert, where hedging applies
    dec = budget_mod.decide(m, budget_mod.hedge_uncertainty(t, s, point_estimate), lam, s)
    route, weights, hedged, cost = budget_mod.decide_one(beta, lam, s, point_estimate)
    assert route != FULL and int(dec.routes[0]) == route
    assert bool(dec.hedged[0]) == hedged == want
    one_hot = [1.0 if k == (FULL if want else route) else 0.0 for k in range(3)]
    assert weights == dec.weights[0].tolist() == one_hot
    assert cost == pytest.approx(float(dec.cost[0])) == (1.0 if want else COSTS[route])
