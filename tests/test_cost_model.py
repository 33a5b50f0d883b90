"""The cost model of the budget (RoutingSettings.cost_model, routing/costs.py): "notional"
(the paper's costs, the default, unchanged) or "flops" (each decision's real attention FLOPs
relative to dense, so that a budget is a share of dense attention FLOPs). The realised
FLOPs ratio is measured independently, by the trace (core/trace.py through
metaattn_kernels.flops)."""

from __future__ import annotations

import asyncio
from urllib.parse import parse_qsl

import duckdb
import numpy as np
import pytest
import torch
from helpers import assert_same_trace, count, routed_tiny, stream_run, synthetic_trace, writing_schema_version

from metaattn_kernels.flops import expert_flops
from metaattn_viz import store
from metaattn_viz.core.experts import COSTS, FULL
from metaattn_viz.core.settings import COST_MODELS, RoutingSettings
from metaattn_viz.routing import budget as budget_mod
from metaattn_viz.routing.costs import NOTIONAL, CostModel
from metaattn_viz.routing.policies import BudgetPolicy
from metaattn_viz.store import RunLog

WINDOW, SINKS = 8, 2


def ids_of(n: int, seed: int = 3) -> list[int]:
    return torch.randint(0, 250, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def flops_settings(budget, **kw) -> RoutingSettings:
    return RoutingSettings(budget=budget, cost_model="flops", window=WINDOW, n_sink=SINKS, **kw)


@pytest.fixture(scope="module")
def routed():
    return routed_tiny(seed=1, spread=30.0)  # head_dim 16: linear is dearer than full below p = 15


# -- the setting ----------------------------------------------------------------------------
def test_the_setting_is_validated_and_notional_by_default():
    assert COST_MODELS == ("notional", "flops") and RoutingSettings().cost_model == "notional"
    for bad in ("", "FLOPs", None, "real"):
        with pytest.raises(ValueError, match="cost_model must be one of notional, flops"):
            RoutingSettings(cost_model=bad)
    assert CostModel.of(RoutingSettings()) is NOTIONAL
    with pytest.raises(ValueError, match="cost_model='flops' needs the attention head dimension"):
        CostModel.of(flops_settings(0.5))


# -- the costs ------------------------------------------------------------------------------
def test_group_costs_average_to_the_flops_ratio_and_a_decode_decision_is_relative_to_dense():
    model = CostModel.of(flops_settings(0.5), head_dim=16)
    positions = torch.arange(40)
    c = model.group(positions)  # [40, K]
    flops = expert_flops(np.arange(40), WINDOW, SINKS, 16)
    assert c.shape == (40, 3) and float(c[:, FULL].mean()) == pytest.approx(1.0, abs=1e-6)
    weights = np.eye(3)[np.random.default_rng(0).integers(0, 3, 40)]
    routed_flops = (flops * weights).sum() / flops[:, FULL].sum()
    assert float((c.numpy() * weights).sum(-1).mean()) == pytest.approx(routed_flops, rel=1e-6)
    for p in (0, 7, 15, 100):
        one = model.one(p)
        assert one[FULL] == 1.0
        assert one == pytest.approx(tuple(expert_flops(np.array([p]), WINDOW, SINKS, 16)[0] / (64 * (p + 1))))
        assert model.one(p) is one  # computed once per position
        assert torch.allclose(model.group(torch.tensor([p]))[0], torch.tensor(one, dtype=torch.float32))
    assert NOTIONAL.one(5) == COSTS and NOTIONAL.carry_lambda(2.0, 10, 100) == 2.0


def test_notional_decisions_are_unchanged():
    """costs=None and the notional costs handed in decide alike, bit for bit."""
    torch.manual_seed(0)
    m = torch.distributions.Dirichlet(torch.ones(3)).sample((200,))
    unc = torch.rand(200)
    s = RoutingSettings(hedge_policy="soft", hedge_threshold=0.5)
    costs = CostModel.of(s).group(torch.arange(200))
    for lam in (-1.0, 0.0, 2.5):
        a, b = budget_mod.decide(m, unc, lam, s), budget_mod.decide(m, unc, lam, s, costs)
        for f in ("routes", "weights", "hedged", "cost"):
            assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert budget_mod.solve_lambda(m, unc, 0.4, s) == budget_mod.solve_lambda(m, unc, 0.4, s, costs)
    assert budget_mod.extreme_route(0.15) == (budget_mod.CHEAPEST, budget_mod.LAM_MAX)
    assert budget_mod.extreme_route(0.15, "flops") is None  # solved: see below
    assert budget_mod.extreme_route(1.0, "flops") == (FULL, -budget_mod.LAM_MAX)


def test_notional_routing_of_a_model_is_unchanged(routed):
    s = RoutingSettings(budget=0.4, window=WINDOW, n_sink=SINKS)
    a = routed.route(ids_of(30), s, max_new_tokens=6)
    b = routed.route(ids_of(30), s.with_(cost_model="notional"), max_new_tokens=6)
    assert a.token_ids == b.token_ids and np.array_equal(a.routes, b.routes)
    assert np.array_equal(a.cost, b.cost)
    assert np.allclose(a.cost, (a.weights > 0) @ np.array(COSTS, np.float32))  # notional costs


# -- a prefill under "flops" -------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("budget", [0.5, 0.7, 0.9])
def test_a_prefill_spends_the_budget_as_a_share_of_dense_attention_flops(routed, scope, budget):
    trace = routed.route(ids_of(60), flops_settings(budget, scope=scope))
    assert trace.settings.cost_model == "flops"
    # the trace's FLOPs ratio is counted apart (core/trace.py), from the weights alone
    assert trace.attention_flops_ratio == pytest.approx(budget, abs=0.02)
    assert trace.realized_cost == pytest.approx(trace.attention_flops_ratio, abs=1e-5)


def test_hedged_decisions_pay_every_expert_they_compute(routed):
    s = flops_settings(0.6, scope="layer", hedge_policy="soft", hedge_threshold=0.8)
    trace = routed.route(ids_of(60), s)
    assert 0.1 < trace.hedged.mean() < 0.9
    assert trace.realized_cost == pytest.approx(trace.attention_flops_ratio, abs=1e-5)
    assert trace.attention_flops_ratio == pytest.approx(0.6, abs=0.02)
    # hedging everything it can, the budget is overspent, and the cost says so truly
    over = routed.route(ids_of(60), s.with_(hedge_threshold=0.5))
    assert (
        over.realized_cost == pytest.approx(over.attention_flops_ratio, abs=1e-5) and over.realized_cost > 0.9
    )


def test_the_budget_extremes_under_flops(routed):
    dense = routed.route(ids_of(40), flops_settings(1.0))
    assert (dense.routes == FULL).all() and dense.attention_flops_ratio == 1.0
    assert dense.realized_cost == pytest.approx(1.0, abs=1e-6)
    # the bottom of the range: every decision to its cheapest expert at its position (on a
    # short text that costs more than 0.15 of dense), and that real cost reported
    low = routed.route(ids_of(40), flops_settings(0.15, scope="layer"))
    flops = expert_flops(np.arange(40), WINDOW, SINKS, routed.head_dim)  # [T, K]
    spent = (flops[None] * (low.weights > 0)).sum(-1)  # [L, T]
    assert np.array_equal(spent, np.broadcast_to(flops.min(-1), spent.shape))
    assert low.realized_cost == pytest.approx(low.attention_flops_ratio, abs=1e-5)
    assert low.attention_flops_ratio > 0.15
    assert np.all(np.abs(low.lam) < budget_mod.LAM_MAX)  # decoding can move it from there


def test_a_flops_budget_below_the_cheapest_routing_is_said_to_be_out_of_reach(routed):
    """The floor of a FLOPs budget is what the bottom of the range realises; the page's
    notes name it when the budget lies below it, and stay silent otherwise."""
    from metaattn_viz.app import display

    low = routed.route(ids_of(40), flops_settings(0.15, scope="layer"))
    assert low.lowest_flops_ratio == pytest.approx(low.attention_flops_ratio, rel=1e-9)
    short = routed.route(ids_of(8), flops_settings(0.5))  # every position within the window
    assert short.lowest_flops_ratio == 1.0 and short.attention_flops_ratio == 1.0
    short.timings["reroute_ms"] = 12.0
    note = display.reroute_note(short)
    assert "Budget 0.50 is out of reach" in note and "these 8 tokens spends 1.00 of dense attention" in note
    reachable = routed.route(ids_of(40), flops_settings(0.9))
    reachable.timings["reroute_ms"] = 12.0
    assert reachable.lowest_flops_ratio < 0.9 and "out of reach" not in display.reroute_note(reachable)
    notional = routed.route(ids_of(12), RoutingSettings(budget=0.5))
    assert display.over_budget_note(notional) is None
    # the global scope's search stops at the first solved pass: no re-solve can get nearer
    res = routed.prefill(torch.tensor([ids_of(8)]), flops_settings(0.5))
    assert res.passes == 2 and res.pilot_tokens == 8  # the whole-text pilot, one solved pass
    assert CostModel.of(flops_settings(0.5), routed.head_dim).lowest_mean(8) == 1.0
    assert NOTIONAL.lowest_mean(8) == min(COSTS)


def test_a_forced_route_costs_its_flops(routed):
    ids = torch.tensor([ids_of(30)])
    rng = np.random.default_rng(1)
    forced = [torch.from_numpy(np.eye(3, dtype=np.float32)[rng.integers(0, 3, (1, 30))]) for _ in range(3)]
    res = routed.prefill(ids, flops_settings(0.5), forced_weights=forced)
    w = np.stack([f.numpy()[0] for f in forced])  # [L, T, K]
    flops = expert_flops(np.arange(30), WINDOW, SINKS, routed.head_dim)
    want = (flops * w).sum() / (3 * flops[:, FULL].sum())
    assert float(res.records["cost"].mean()) == pytest.approx(want, rel=1e-5)


def test_a_pilots_lambda_is_carried_to_the_whole_text_at_the_same_price_per_flop():
    model = CostModel.of(flops_settings(0.5), head_dim=16)
    torch.manual_seed(2)
    m = torch.distributions.Dirichlet(torch.ones(3)).sample((200,))
    unc = torch.zeros(200)
    s = flops_settings(0.5)
    lam = budget_mod.solve_lambda(m[:50], unc[:50], 0.5, s, model.group(torch.arange(50)))
    carried = model.carry_lambda(lam, 50, 200)
    prefix = budget_mod.decide(m[:50], unc[:50], lam, s, model.group(torch.arange(50)))
    whole = budget_mod.decide(m, unc, carried, s, model.group(torch.arange(200)))
    assert torch.equal(prefix.routes, whole.routes[:50])  # the prefix is routed as solved
    assert carried > lam


def test_a_lambda_solved_on_a_pilots_later_half_is_carried_at_the_same_price_per_flop():
    """The global scope solves on positions [25, 50) of a pilot (prefill.pilot_span): carried
    to the whole text, those decisions are routed as in the solve."""
    model = CostModel.of(flops_settings(0.5), head_dim=16)
    torch.manual_seed(3)
    m = torch.distributions.Dirichlet(torch.ones(3)).sample((200,))
    unc = torch.zeros(200)
    s = flops_settings(0.5)
    half = model.group(torch.arange(25, 50))
    lam = budget_mod.solve_lambda(m[25:50], unc[25:50], 0.5, s, half)
    carried = model.carry_lambda(lam, 50, 200, solved_from=25)
    solved = budget_mod.decide(m[25:50], unc[25:50], lam, s, half)
    whole = budget_mod.decide(m, unc, carried, s, model.group(torch.arange(200)))
    assert torch.equal(solved.routes, whole.routes[25:50])
    assert model.carry_lambda(lam, 50, 200, solved_from=25) != model.carry_lambda(lam, 50, 200)
    assert NOTIONAL.carry_lambda(lam, 50, 200, solved_from=25) == lam


# -- decoding under "flops" ------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_decode_steps_keep_the_running_cost_near_the_budget(routed, scope):
    trace = routed.route(ids_of(40), flops_settings(0.5, scope=scope), max_new_tokens=120)
    n = trace.n_prompt_tokens
    decode = trace.cost[:, n:]
    assert decode.shape[1] == 120
    assert float(decode[:, 60:].mean()) == pytest.approx(0.5, abs=0.05)  # once lambda settled
    # each decode decision costs its FLOPs relative to dense attention at its position
    flops = expert_flops(np.arange(n, trace.n_tokens), WINDOW, SINKS, routed.head_dim)
    rel = flops / flops[:, FULL : FULL + 1]
    want = (rel[None] * (trace.weights[:, n:] > 0)).sum(-1)
    assert np.allclose(decode, want, atol=1e-6)


@pytest.mark.parametrize("path", ["host", "device"])
@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("budget", [0.3, 0.9])
def test_a_short_prompt_never_spends_more_than_dense_under_a_budget(monkeypatch, budget, scope, path):
    """A reviewer's case: untrained controllers (at the prior, which prefers linear) and a
    5-token prompt with 8 new tokens, every position below the head dimension (16), so that
    the cheapest routing costs exactly dense. The prefill's lambda, solved at that floor
    (the least lambda that routes there), let the first decode step send every layer to
    linear attention at 16 / 6 = 2.7x dense (10.7x with SmolLM2's head dimension 64), and
    the run spent more than dense under a budget below 1. No decode step under a budget may
    pick an expert dearer than full attention at its position (budget.py)."""
    import metaattn_viz.routing.session as session_mod

    if path == "device":  # decide_step, as on a GPU
        monkeypatch.setattr(session_mod, "host_decode", lambda device, dtype: False)
    routed = routed_tiny(seed=0)
    assert routed.head_dim == 16
    s = RoutingSettings(budget=budget, scope=scope, cost_model="flops")
    trace = routed.route(ids_of(5), s, max_new_tokens=8)
    n = trace.n_prompt_tokens
    assert (n, trace.n_tokens) == (5, 13) and trace.lowest_flops_ratio == 1.0
    m = trace.concentration / trace.concentration.sum(-1, keepdims=True)
    assert (m.argmax(-1) == 1).all()  # every posterior prefers linear attention
    assert trace.attention_flops_ratio <= max(budget, trace.lowest_flops_ratio) + 1e-6
    assert trace.realized_cost == pytest.approx(1.0, abs=1e-5)
    assert (trace.routes[:, n:] != 1).all() and np.allclose(trace.cost[:, n:], 1.0)


def test_a_decode_step_under_a_budget_leaves_out_experts_dearer_than_full():
    """The rule itself, in each decode path: below the head dimension linear attention costs
    more than full, so it is no candidate however much the posterior prefers it and whatever
    lambda (negative: spending up); from the head dimension on it is. Without a budget (the
    posterior's own argmax) or at a fixed lambda the decisions stay as they were, and the
    notional costs never leave an expert out (none costs more than full)."""
    beta = [0.2, 5.0, 0.5]  # linear first by far
    fast, tensor = (BudgetPolicy(flops_settings(0.5), 1, [-3.0], head_dim=16) for _ in range(2))
    for pos in (3, 10, 14):
        _, (_, route, _, _, cost, _) = fast.decide_one(0, beta, pos)
        weights, rec = tensor.decide(0, torch.tensor(beta).view(1, 1, 3), offset=pos, x=torch.zeros(1, 1, 8))
        assert route == int(rec["routes"][0, 0]) != 1 and cost <= 1.0
    at_d = BudgetPolicy(flops_settings(0.5), 1, [0.0], head_dim=16)
    _, (_, route, _, _, cost, _) = at_d.decide_one(0, beta, 15)
    assert route == 1 and cost == 1.0  # at p = d - 1 linear costs what full does
    for s in (flops_settings(None), flops_settings(0.5, lam=0.0)):
        _, (_, route, _, _, cost, _) = BudgetPolicy(s, 1, [0.0], head_dim=16).decide_one(0, beta, 3)
        assert route == 1 and cost == pytest.approx(4.0)
    _, (_, route, _, _, cost, _) = BudgetPolicy(RoutingSettings(budget=0.5), 1, [-3.0]).decide_one(0, beta, 3)
    assert route == 1 and cost == COSTS[1]
    m = torch.tensor([beta]) / sum(beta)
    c = torch.tensor([COSTS])
    a = budget_mod.decide(m, torch.zeros(1), -3.0, RoutingSettings(), c)
    b = budget_mod.decide(m, torch.zeros(1), -3.0, RoutingSettings(), c, within_full=True)
    assert torch.equal(a.routes, b.routes) and torch.equal(a.cost, b.cost)


def test_a_soft_hedge_never_mixes_in_an_expert_dearer_than_full():
    """Soft hedging adds every expert of posterior weight >= hedge_min_weight to the route;
    below the head dimension under a budget it leaves out linear attention as the route
    does (it made one step cost 34x dense on the bundled model), and keeps it from there on.
    Every decode path agrees."""
    beta = [0.8, 3.0, 3.5]  # local first, linear close behind, full above hedge_min_weight
    s = flops_settings(0.5, hedge_policy="soft", hedge_threshold=0.0)
    for pos in (3, 20):
        fast, tensor, step = (BudgetPolicy(s, 1, [0.0], head_dim=16) for _ in range(3))
        w, (_, route, hedged, _, cost, _) = fast.decide_one(0, beta, pos)
        weights, rec = tensor.decide(0, torch.tensor(beta).view(1, 1, 3), offset=pos, x=torch.zeros(1, 1, 8))
        w_step, _ = step.decide_step(0, torch.tensor(beta).view(1, 1, 3), pos)
        assert route == 2 and hedged
        assert np.allclose(w, weights.view(-1).numpy(), atol=1e-6)
        assert np.allclose(w, w_step.view(-1).numpy(), atol=1e-6)
        if pos < 16:  # linear dearer than full: not in the mix, and the step pays local + full
            assert w[1] == 0.0 and w[0] > 0 and cost == pytest.approx(2.0)
        else:
            assert w[1] > 0
    # with the notional costs (none dearer than full) the hedge is as before
    _, (_, route, _, _, cost, _) = BudgetPolicy(
        RoutingSettings(budget=0.5, hedge_policy="soft", hedge_threshold=0.0), 1, [0.0]
    ).decide_one(0, beta, 3)
    assert cost == pytest.approx(sum(COSTS))


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("hedge", ["off", "soft"])
def test_the_decode_paths_agree_under_flops(scope, hedge):
    """Plain Python (decide_one), the tensor path (decide on one token) and the device step
    (decide_step) make the same decisions, costs and dual ascent, position after position."""
    n_layers, n_tokens, start_pos = 4, 60, 10
    g = torch.Generator().manual_seed(7)
    betas = torch.rand(n_tokens, n_layers, 3, generator=g) * 6 + 0.05
    s = flops_settings(0.4, scope=scope, hedge_policy=hedge, hedge_threshold=0.7)
    start = [-1.0, 0.0, 0.5, 2.0]
    fast, tensor, step = (BudgetPolicy(s, n_layers, list(start), head_dim=16) for _ in range(3))
    assert fast.reads_position and not BudgetPolicy(RoutingSettings(), 4, head_dim=16).reads_position
    routes, x = set(), torch.zeros(1, 1, 8)
    for t in range(n_tokens):
        pos = start_pos + t
        for layer in range(n_layers):
            beta = betas[t, layer]
            w, (_, route, hedged, _, cost, lam) = fast.decide_one(layer, beta.tolist(), pos)
            weights, rec = tensor.decide(layer, beta.view(1, 1, 3), offset=pos, x=x)
            w_step, dev = step.decide_step(layer, beta.view(1, 1, 3), pos)
            _, dev_route, dev_hedged, _, dev_cost, _ = dev.fields
            assert route == int(rec["routes"][0, 0]) == int(dev_route)
            assert hedged == bool(rec["hedged"][0, 0]) == bool(dev_hedged)
            assert np.allclose(w, weights.view(-1).numpy(), atol=1e-6)
            assert np.allclose(w, w_step.view(-1).numpy(), atol=1e-6)
            assert cost == pytest.approx(float(rec["cost"][0, 0]), abs=1e-6)
            assert cost == pytest.approx(float(dev_cost), abs=1e-6)
            assert lam == pytest.approx(float(rec["lam"][0, 0]), abs=1e-4)
            routes.add(route)
        assert fast.lam == pytest.approx(tensor.lam, abs=1e-4)
        assert fast.lam == pytest.approx(step.current_lam(), abs=1e-4)
    assert len(routes) >= 2 and fast.lam != start


def test_the_device_decisions_equal_the_fast_path_under_flops(routed, monkeypatch):
    import metaattn_viz.routing.session as session_mod

    s = flops_settings(0.5, scope="global", hedge_policy="soft", hedge_threshold=0.6)
    fast = routed.route(ids_of(30), s, max_new_tokens=16)
    monkeypatch.setattr(session_mod, "host_decode", lambda device, dtype: False)
    dev = routed.route(ids_of(30), s, max_new_tokens=16)
    assert dev.token_ids == fast.token_ids
    assert np.array_equal(dev.routes, fast.routes) and np.array_equal(dev.hedged, fast.hedged)
    assert np.allclose(dev.cost, fast.cost, atol=1e-6) and np.allclose(dev.lam, fast.lam, atol=1e-5)


# -- what says which cost model was used ------------------------------------------------------
def test_the_trace_the_json_and_the_cli_name_the_cost_model(routed):
    from metaattn_viz.cli import build_parser, settings_from_args

    trace = routed.route(ids_of(20), flops_settings(0.6))
    data = trace.to_json()
    assert data["cost_model"] == "flops" == data["settings"]["cost_model"]
    assert type(trace).from_json(data).settings.cost_model == "flops"
    parser = build_parser()
    assert settings_from_args(parser.parse_args(["route", "--prompt", "x"])).cost_model == "notional"
    args = parser.parse_args(["route", "--prompt", "x", "--cost-model", "flops"])
    assert settings_from_args(args).cost_model == "flops"
    with pytest.raises(SystemExit):
        parser.parse_args(["route", "--prompt", "x", "--cost-model", "real"])


def test_the_meter_says_which_cost_model_counts(routed):
    from metaattn_viz.app import plots

    html = plots.meters(routed.route(ids_of(20), flops_settings(0.6)))
    # per decision, in dense FLOPs: a mean of decode steps' own ratios is not the run's share
    # of dense FLOPs (the FLOPs meter beside it), which the label said it was
    assert (
        "data-cost-model='flops'" in html and "realised cost per decision, in dense attention FLOPs" in html
    )
    html = plots.meters(routed.route(ids_of(20), RoutingSettings(budget=0.6)))
    assert "data-cost-model='notional'" in html and "realised notional cost" in html


def test_the_sweep_under_flops_puts_every_row_at_its_share_of_dense_flops(routed):
    """The controllers' rows were shares of dense FLOPs and the baselines' notional costs, on
    one axis labelled notional: at 0.3 random routing looked as cheap as the controller
    while spending 2.5x its FLOPs. Every row is now at its FLOPs share, and the axis says so."""
    from metaattn_viz.app import plots
    from metaattn_viz.app.analysis import sweep_rows

    rows = sweep_rows(routed, ids_of(96), flops_settings(0.3), [0.3])
    assert all(r["cost_model"] == "flops" for r in rows)
    for r in rows:
        assert r["realized_cost"] == pytest.approx(r["flops_ratio"], abs=1e-6), r
    random_row = next(r for r in rows if r["policy"] == "random")
    assert abs(random_row["realized_cost"] - 0.3) > 0.05  # met 0.3 in notional costs, not in FLOPs
    fig = plots.pareto(rows)
    assert fig.layout.xaxis.title.text == "realised share of dense attention FLOPs"
    notional = sweep_rows(routed, ids_of(96), RoutingSettings(budget=0.3), [0.3])
    assert next(r for r in notional if r["policy"] == "random")["realized_cost"] == pytest.approx(
        0.3, abs=0.02
    )
    assert plots.pareto(notional).layout.xaxis.title.text == "realised notional cost per decision"


# -- the routing log --------------------------------------------------------------------------
def test_the_routing_log_keeps_the_cost_model(tmp_path):
    trace = synthetic_trace(n_layers=3, n_tokens=9, seed=90)
    trace.settings = trace.settings.with_(cost_model="flops")
    with RunLog(tmp_path / "routing.duckdb") as log:
        rid = stream_run(log, trace)
        assert log.get_run(rid)["cost_model"] == "flops"
        assert_same_trace(log.load_trace(rid), trace)


def test_a_log_of_schema_version_4_is_migrated_and_its_runs_spent_notional_costs(tmp_path, monkeypatch):
    """Version 5 adds the runs column cost_model. Runs logged before it spent the notional
    costs, the only cost model there was: they read 'notional' and replay so."""
    db = tmp_path / "routing.duckdb"
    traces = [synthetic_trace(n_layers=3, n_tokens=8, seed=91 + i) for i in range(2)]
    with writing_schema_version(monkeypatch, 4):
        with RunLog(db) as log:
            ids = [stream_run(log, tr) for tr in traces]
    with duckdb.connect(str(db)) as con:
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 4
        assert "cost_model" not in {r[0] for r in con.execute("DESCRIBE runs").fetchall()}
    with RunLog(db) as log:
        assert count(log, "SELECT max(version) FROM schema_version") == store.latest_schema_version()
        for rid, tr in zip(ids, traces, strict=True):
            assert log.get_run(rid)["cost_model"] == "notional"
            assert_same_trace(log.load_trace(rid), tr)
        tr = synthetic_trace(n_layers=3, n_tokens=5, seed=93)
        tr.settings = tr.settings.with_(cost_model="flops")
        rid = stream_run(log, tr)
        assert log.load_trace(rid).settings.cost_model == "flops"


# -- the page, its links and its API (hedge_measure travels the same way) ----------------------
def test_the_page_controls_and_links_carry_the_cost_model_and_the_hedge_measure():
    import gradio as gr

    from metaattn_viz.app import share
    from metaattn_viz.app.tab_live import LiveTab

    with gr.Blocks():
        live = LiveTab(gr.State(None), [])
    r = live.routing
    assert {r.hedge_measure, r.cost_model} <= r.inputs
    data = {r.budget: 0.4, r.scope: "layer", r.hedge_policy: "soft", r.hedge_threshold: 0.6, r.window: 32}
    got = r.settings({**data, r.hedge_measure: "epistemic", r.cost_model: "flops"})
    assert (got.hedge_measure, got.cost_model, got.budget) == ("epistemic", "flops", 0.4)
    shown = r.show(got)
    assert shown[r.hedge_measure] == "epistemic" and shown[r.cost_model] == "flops"
    assert live.link_controls["cost_model"] is r.cost_model
    assert live.link_controls["hedge_measure"] is r.hedge_measure
    trace = synthetic_trace(n_layers=3, n_tokens=6, seed=5)
    trace.settings = trace.settings.with_(hedge_measure="epistemic", cost_model="flops")
    back = share.parse_shared(dict(parse_qsl(share.share_query(trace, {})[1:])))
    assert back.values["cost_model"] == "flops" and back.values["hedge_measure"] == "epistemic"
    bad = share.parse_shared({"cost_model": "real", "hedge_measure": "vacuity"})
    assert bad.values == {} and "cost model was left out" in " ".join(bad.notes)


def test_generate_and_reroute_take_the_cost_model_and_the_hedge_measure(routed, tmp_path):
    import inspect

    from metaattn_viz.app.engine import Engine
    from metaattn_viz.app.exports import Downloads
    from metaattn_viz.app.ui import build_app
    from metaattn_viz.core.settings import DEFAULTS

    engine = Engine(routed=routed, db=str(tmp_path / "log.duckdb"))
    try:
        demo = build_app(engine=engine, downloads=Downloads(tmp_path / "dl"))
        fns = {d.api_name: d.fn for d in demo.fns.values() if d.api_name in ("generate", "reroute")}
        for fn in fns.values():
            params = inspect.signature(fn).parameters
            assert params["cost_model"].default == DEFAULTS.cost_model
            assert params["hedge_measure"].default == DEFAULTS.hedge_measure
        out = asyncio.run(  # the endpoint is a coroutine (a cancelled call stops its job)
            fns["generate"](
                "A text to route. " * 2,
                budget=0.6,
                max_new_tokens=2,
                chat=False,
                quality=False,
                cost_model="flops",
                hedge_measure="epistemic",
            )
        )
        assert out["cost_model"] == "flops" and out["settings"]["hedge_measure"] == "epistemic"
        assert out["realized_cost"] == pytest.approx(out["attention_flops_ratio"], abs=0.05)
        again = fns["reroute"](out, budget=0.6, quality=False, cost_model="flops")
        assert again["settings"]["cost_model"] == "flops" and again["settings"]["hedge_measure"] == "total"
        assert again["realized_cost"] == pytest.approx(again["attention_flops_ratio"], abs=1e-5)
    finally:
        engine.close()


def test_hedging_above_the_budget_is_said_with_what_to_change():
    """Hedge policy "full" at threshold 0 hedges every decision to full attention: the run
    spends 1.0 against a budget of 0.5; the status and the API say why (a page visitor saw
    the meter at 1.000 under "at budget 0.50" and no word)."""
    from metaattn_viz.app import display

    r = routed_tiny()
    t = r.route("Hello there, this is a test of hedging and budgets.", max_new_tokens=0)
    full = r.reroute(t, RoutingSettings(budget=0.5, hedge_policy="full", hedge_threshold=0.0))
    note = display.over_budget_note(full)
    assert full.realized_cost == pytest.approx(1.0)
    # lambda is where the hard routes spend 0.5: those routed to full are not hedged
    share = round(100 * float(full.hedged.mean()))
    assert 0 < share < 100
    assert "Hedging spends 1.00, above the budget 0.50" in note
    assert f"{share}% of the decisions hedged" in note
    held = r.reroute(t, RoutingSettings(budget=0.5, hedge_policy="soft", hedge_threshold=0.9))
    assert display.over_budget_note(held) is None
