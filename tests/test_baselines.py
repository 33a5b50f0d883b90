"""The evaluation's baselines of issue 14 (training/baselines.py, layer_maps.py, oracle.py) and
the routing-variety column, on tiny random models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import random_maps, routed_tiny, routed_with_maps

from metaattn_viz.core.experts import COSTS, FULL, LINEAR, LOCAL
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.core.variety import layer_majority, routing_variety
from metaattn_viz.routing.model import kl_per_token
from metaattn_viz.training import layer_maps, oracle
from metaattn_viz.training.baselines import (
    layer_map_policy,
    random_policy,
    routes_policy,
    salience_policy,
    units_within,
)
from metaattn_viz.training.evaluate import evaluate
from metaattn_viz.training.report import paired_differences, tables

EXCERPT = Path(__file__).resolve().parent / "data" / "wikitext2_excerpt.txt"
WINDOW, N_SINK, SEQ = 8, 2, 48
SETTINGS = RoutingSettings(window=WINDOW, n_sink=N_SINK)
NEW = ("static-layers", "greedy-layers", "oracle-tokens")


def _ids(n: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, SEQ), generator=torch.Generator().manual_seed(seed))


def _one_layer_matters(layer: int, n_layers: int = 4):
    """A tiny model whose attention output is zero in every layer but `layer`: only that
    layer's routing can change the logits."""
    r = routed_tiny(seed=1, num_hidden_layers=n_layers)
    with torch.no_grad():
        for i, block in enumerate(r.model.model.layers):
            if i != layer:
                block.self_attn.o_proj.weight.zero_()
            else:
                block.self_attn.o_proj.weight.mul_(4.0)
    return r


def _kl_of_map(r, ids, experts) -> float:
    """KL to dense of a layer map, through forced weights (not the calibrator's baseline path)."""
    total, n = 0.0, 0
    for i in range(ids.shape[0]):
        row = ids[i : i + 1]
        forced = [torch.nn.functional.one_hot(torch.full((1, SEQ), e), 3).float() for e in experts]
        res = r.prefill(row, SETTINGS, forced_weights=forced, use_cache=False)
        dense = r.dense_logits(row)
        total += float(kl_per_token(dense[0, :-1], res.logits[0, :-1]).sum())
        n += SEQ - 1
    return total / n


def test_routing_variety_by_hand():
    # layer 0: majority full, one decision differs; layer 1: a 2-2 tie, two differ
    routes = np.array([[[FULL, FULL, LOCAL, FULL]], [[LOCAL, LINEAR, LINEAR, LOCAL]]])  # [L, B, T]
    assert routing_variety(routes) == pytest.approx(3 / 8)
    assert routing_variety(np.full((3, 2, 5), LOCAL)) == 0.0
    # the majority is per layer: stripes of different experts vary not at all
    assert routing_variety(np.array([[FULL] * 4, [LOCAL] * 4, [LINEAR] * 4])) == 0.0


def test_units_within_never_exceeds_the_budget():
    for n in (1, 3, 30, 7680):
        for b in np.linspace(COSTS[LINEAR], 1.0, 61):
            hi, lo, k = units_within(float(b), n)
            cost = (k * COSTS[hi] + (n - k) * COSTS[lo]) / n
            assert cost <= b + 1e-9
            assert cost > b - (COSTS[hi] - COSTS[lo]) / n - 1e-9  # no unit left unspent
    assert units_within(0.5, 30) == (FULL, LOCAL, 8)  # (8 + 22 * 0.3) / 30 = 0.4867
    assert units_within(0.1, 30) is None


@pytest.mark.parametrize("make", [lambda b: random_policy(b, seed=0), salience_policy])
def test_random_and_salience_spend_what_units_within_gives_never_past_the_budget(make):
    """They rounded to the nearest count: at B = 0.75 a window of 256 tokens spent 0.751."""
    for n in (1, 7, 30, 256):
        x = torch.randn(1, n, 8, generator=torch.Generator().manual_seed(n))
        for b in (0.15, 0.2, 0.25, 0.3, 0.5, 0.75, 1.0):
            d = make(b)(0, x, torch.zeros(n, 3), torch.zeros(n))
            hi, lo, k = units_within(b, n)
            assert set(d.routes.tolist()) <= {hi, lo} and int((d.routes == hi).sum()) == k, (b, n)
            assert float(d.cost.mean()) <= b + 1e-6, (b, n)
    with pytest.raises(ValueError, match=r"budget 0.1 is below the cheapest cost: give at least 0.15"):
        make(0.1)


def test_units_within_at_least_reaches_the_budget_with_the_fewest_units():
    for n in (1, 3, 30, 7680):
        for b in np.linspace(COSTS[LINEAR], 1.0, 61):
            hi, lo, k = units_within(float(b), n, at_least=True)
            cost = (k * COSTS[hi] + (n - k) * COSTS[lo]) / n
            assert cost >= b - 1e-9
            assert cost < b + (COSTS[hi] - COSTS[lo]) / n + 1e-9  # one unit fewer would miss it
    assert units_within(0.5, 30, at_least=True) == (FULL, LOCAL, 9)  # (9 + 21 * 0.3) / 30 = 0.51
    assert units_within(0.44, 10, at_least=True) == units_within(0.44, 10) == (FULL, LOCAL, 2)  # on a step


def test_static_ranking_puts_the_one_layer_that_matters_first():
    r = _one_layer_matters(2)
    ids = _ids()
    cal = layer_maps.LayerMapCalibrator(r, ids, SETTINGS)
    s = cal.sensitivity()
    assert cal.ranking()[0] == 2
    assert s[2] > 1e-3
    assert max(s[i] for i in (0, 1, 3)) < 1e-6  # their attention never reaches the logits
    # the sensitivities are the KLs of "this layer alone local", measured another way
    for layer in range(4):
        experts = [LOCAL if j == layer else FULL for j in range(4)]
        assert s[layer] == pytest.approx(_kl_of_map(r, ids, experts), rel=1e-4, abs=1e-7)
    assert cal.passes == 4
    cal.ranking()
    assert cal.passes == 4  # cached: the budgets reuse one ranking
    # at budget 0.5 with 4 layers one layer is full, (1 + 3 * 0.3) / 4 = 0.475: the one that matters
    assert layer_maps.static_map(cal.ranking(), 0.5) == [LOCAL, LOCAL, FULL, LOCAL]
    # below the local cost the most sensitive layer keeps local, the rest go linear
    below = layer_maps.static_map(cal.ranking(), 0.2)
    assert below == [LINEAR, LINEAR, LOCAL, LINEAR]


def test_static_ranking_follows_the_measured_kl_on_a_random_model():
    r = routed_tiny(seed=4, num_hidden_layers=4)
    cal = layer_maps.LayerMapCalibrator(r, _ids(seed=3), SETTINGS)
    s = cal.sensitivity()
    ranked = [s[i] for i in cal.ranking()]
    assert ranked == sorted(ranked, reverse=True)


class _Synthetic(layer_maps.LayerMapCalibrator):
    """A calibrator whose loss has a conditional effect: layers 0 and 1 are redundant (either
    one full repairs the same damage), layer 2 matters on its own."""

    def kl(self, experts):
        self.passes += 1
        redundant = 1.0 if experts[0] != FULL and experts[1] != FULL else 0.0
        alone = 0.6 if experts[2] != FULL else 0.0
        return redundant + alone


def test_greedy_sees_conditional_effects_the_static_ranking_misses():
    cal = _Synthetic(routed_tiny(seed=0, num_hidden_layers=3), _ids(1), SETTINGS)
    # alone local: layers 0 and 1 cost nothing (the other covers), layer 2 costs 0.6
    assert cal.ranking() == [2, 0, 1]
    order, kls = cal.greedy_order(2)
    assert order[0] == 0 and kls[0] == pytest.approx(0.6)  # from all-local, 0 (or 1) repairs 1.0
    assert order[1] == 2 and kls[1] == pytest.approx(0.0)
    # one full layer (budget 0.55 with 3 layers: (1 + 2 * 0.3) / 3 = 0.533)
    static = layer_maps.static_map(cal.ranking(), 0.55)
    greedy = layer_maps.greedy_map(order, 0.55, 3)
    assert static == [LOCAL, LOCAL, FULL] and greedy == [FULL, LOCAL, LOCAL]
    assert cal.kl(greedy) < cal.kl(static)
    passes = cal.passes
    cal.greedy_order(1)  # cached: a smaller budget reuses the order
    assert cal.passes == passes
    assert layer_maps.greedy_map(order, 0.25, 3) is None  # full + local only


def test_greedy_first_pick_is_the_best_single_full_layer():
    r = routed_tiny(seed=5, num_hidden_layers=4)
    ids = _ids(seed=7)
    cal = layer_maps.LayerMapCalibrator(r, ids, SETTINGS)
    order, kls = cal.greedy_order(1)
    singles = [_kl_of_map(r, ids, [FULL if j == i else LOCAL for j in range(4)]) for i in range(4)]
    assert order[0] == int(np.argmin(singles))
    assert kls[0] == pytest.approx(min(singles), rel=1e-4)


def test_oracle_errors_are_the_local_experts_errors_on_the_dense_pass():
    r = routed_tiny(seed=2, num_hidden_layers=3)
    ids = _ids(1)
    local_err, linear_err = oracle.expert_errors(r.model, ids, WINDOW, N_SINK)
    assert local_err.shape == linear_err.shape == (3, 1, SEQ)
    # within the window (and its sinks) local attention is full attention
    assert local_err[:, :, : WINDOW + N_SINK].abs().max() < 1e-5
    assert local_err[:, :, WINDOW + N_SINK :].min() > 0
    # layer 0 reads the embeddings in any pass: the session's own diagnosis of an all-local
    # pass measures the same error there
    forced = [torch.nn.functional.one_hot(torch.full((1, SEQ), LOCAL), 3).float()] * 3
    res = r.prefill(ids, SETTINGS, forced_weights=forced, use_cache=False, diagnose=True)
    assert np.allclose(res.records["rel_error"][0, 0], local_err[0, 0].numpy(), atol=1e-4)
    # the model routes again afterwards (its attention implementation is restored)
    assert r.prefill(ids, SETTINGS.with_(budget=0.5), use_cache=False).records["routes"].shape == (3, 1, SEQ)


def test_oracle_at_budget_one_is_dense_and_at_the_local_cost_all_local():
    r = routed_tiny(seed=2, num_hidden_layers=3)
    ids = _ids(1)
    local_err, linear_err = oracle.expert_errors(r.model, ids, WINDOW, N_SINK)
    dense = r.dense_logits(ids)
    unrouted = RoutingSettings(window=WINDOW, n_sink=N_SINK, budget=None)

    def kl_at(budget):
        routes = oracle.oracle_routes(local_err[:, 0], linear_err[:, 0], budget)
        res = r.prefill(ids, unrouted, use_cache=False, policy=routes_policy(routes))
        return routes, float(kl_per_token(dense[0, :-1], res.logits[0, :-1]).mean()), res

    routes, kl, _ = kl_at(1.0)
    assert (routes == FULL).all() and kl == pytest.approx(0.0, abs=1e-6)
    routes, kl, _ = kl_at(COSTS[LOCAL])
    assert (routes == LOCAL).all() and kl > 1e-4
    # in between: the largest local errors go full, globally across the layers
    routes, _, res = kl_at(0.5)
    full = routes == FULL
    assert local_err[:, 0][full].min() >= local_err[:, 0][~full].max()
    assert float(res.records["cost"].mean()) <= 0.5 + 1e-6
    # below the local cost: local where linear departs most beyond local, the rest linear
    routes = oracle.oracle_routes(local_err[:, 0], linear_err[:, 0], 0.2)
    gain = (linear_err - local_err)[:, 0]
    assert gain[routes == LOCAL].min() >= gain[routes == LINEAR].max()


def test_the_oracle_ranks_the_linear_expert_the_rows_route_with(monkeypatch):
    """Below the local cost the oracle weighs local against linear: with learned maps its
    linear errors must be the learned linear expert's, not elu + 1's (which put the shipped
    oracle row at 0.25 above random)."""
    r = routed_with_maps(random_maps(n_layers=3))
    seen = []
    measured = oracle.expert_errors

    def spy(model, ids, window, n_sink, feature_maps=None):
        seen.append(feature_maps)
        return measured(model, ids, window, n_sink, feature_maps)

    monkeypatch.setattr(oracle, "expert_errors", spy)
    try:
        rows = evaluate(
            r, EXCERPT, budgets=(0.25,), max_tokens=64, seq_len=64, window=16, n_sink=4,
            controllers=("bayes",), calib_windows=1, linear_map="learned",
        )  # fmt: skip
    finally:
        r.detach()
    assert any(row["controller"] == "oracle-tokens" for row in rows)
    assert seen and all(maps is r.feature_maps for maps in seen)


def test_the_new_baselines_keep_their_budget_in_eval():
    r = routed_tiny(seed=3, spread=10.0, num_hidden_layers=5)
    budgets = (0.2, 0.25, 0.5, 0.75, 1.0)
    rows = evaluate(
        r, EXCERPT, budgets=budgets, max_tokens=128, seq_len=64, window=16, n_sink=4,
        controllers=("bayes",), calib_windows=2,
    )  # fmt: skip
    assert all("routing_variety" in row for row in rows)
    for row in rows:  # two windows of 64 tokens: the row's KL is the mean of the windows'
        assert len(row["kl_windows"]) == 2
        assert np.mean(row["kl_windows"]) == pytest.approx(row["kl_to_dense"], rel=1e-6, abs=1e-9)
    got = {(row["controller"], row["budget"]): row for row in rows}
    for b in budgets[:-1]:
        for name in NEW:
            if name == "greedy-layers" and b < COSTS[LOCAL]:
                assert (name, b) not in got  # full + local only
                continue
            row = got[(name, b)]
            assert row["realized_cost"] <= b + 1e-6, (name, b)
            # no more than one unit (a layer; a decision of the window) left unspent
            unit = 0.7 / 5 if name != "oracle-tokens" else 0.7 / (5 * 64)
            unit = unit if b >= COSTS[LOCAL] else unit * 0.15 / 0.7
            assert row["realized_cost"] > b - unit - 1e-6, (name, b)
        # the fewest full (or local) layers that reach the budget: at most one unit above it
        up, unit = got[("static-layers-up", b)], (0.7 if b >= COSTS[LOCAL] else 0.15) / 5
        assert b - 1e-6 <= up["realized_cost"] < b + unit + 1e-6, b
        for name in ("static-layers", "static-layers-up", "greedy-layers"):
            if (name, b) in got:
                assert got[(name, b)]["routing_variety"] == 0.0  # one expert per layer
                assert got[(name, b)]["calibration"]["split"] == "training"
        assert got[("oracle-tokens", b)]["oracle"] is True
    assert all((name, 1.0) not in got for name in (*NEW, "static-layers-up"))
    # the greedy ran its rounds once, up to the largest budget's count of full layers
    assert len(got[("greedy-layers", 0.75)]["calibration"]["order"]) == 3  # (3 + 2 * 0.3) / 5 = 0.72
    text = tables(rows, "metaattn-viz eval --test")
    assert "routing variety %" in text
    for name in NEW:
        assert f"| {name} |" in text
    assert "oracle" in text.split("| oracle-tokens |")[-1]  # the note labels it an oracle


def test_paired_differences_against_scipy():
    from scipy import stats

    rng = np.random.default_rng(0)
    a, b = rng.gamma(2.0, 0.01, 16), rng.gamma(2.0, 0.01, 16)
    rows = [
        {"controller": "bayes", "budget": 0.5, "kl_windows": list(a)},
        {"controller": "priorfree", "budget": 0.5, "kl_windows": list(b)},
        {"controller": "bayes", "budget": None, "kl_windows": list(b)},
        {"controller": "priorfree", "budget": None, "kl_windows": list(a)},
        {"controller": "bayes", "budget": 0.75, "kl_windows": list(a)},  # no prior-free row: skipped
        {"controller": "static-layers", "budget": 0.5, "kl_windows": list(a)},
        {"controller": "priorfree", "budget": 0.25},  # a row made before kl_windows: skipped
        {"controller": "bayes", "budget": 0.25},
    ]
    got = {p["budget"]: p for p in paired_differences(rows)}
    assert set(got) == {0.5, None}
    d = a - b
    assert got[0.5]["mean"] == pytest.approx(d.mean())
    assert got[0.5]["se"] == pytest.approx(stats.sem(d))
    assert got[0.5]["lower"] == int((d < 0).sum()) and got[0.5]["windows"] == 16
    assert got[None]["mean"] == pytest.approx(-d.mean())
    base = {"seq_len": 64, "window": 16, "n_sink": 4, "tokens": 32, "dense_ppl": 10.0, "realized_cost": 0.5}
    full = [
        {**base, **r, "ppl": 11.0, "kl_to_dense": float(np.mean(r.get("kl_windows", [0.0]))),
         "attention_flops_ratio": 0.5, "routing_entropy": None, "routing_variety": 0.0,
         "expert_shares": {"full": 0.3, "linear": 0.0, "local": 0.7}}
        for r in rows[:4]
    ]  # fmt: skip
    assert "Bayesian minus prior-free, paired over the 16 validation windows" in tables(full, "eval")


def test_layer_map_policy_routes_each_layer_to_its_expert():
    r = routed_tiny(seed=0, num_hidden_layers=3)
    ids = _ids(1)
    unrouted = RoutingSettings(window=WINDOW, n_sink=N_SINK, budget=None)
    res = r.prefill(ids, unrouted, use_cache=False, policy=layer_map_policy([FULL, LINEAR, LOCAL]))
    assert (res.records["routes"][:, 0] == np.array([[FULL], [LINEAR], [LOCAL]])).all()
    assert float(res.records["cost"].mean()) == pytest.approx(sum(COSTS) / 3)


def test_layer_majority_by_hand():
    routes = np.array([[[FULL, FULL, LOCAL, FULL]], [[LOCAL, LINEAR, LINEAR, LOCAL]], [[LINEAR] * 4]])
    # layer 1 is a tie: the lower id wins (LINEAR < LOCAL)
    assert layer_majority(routes).tolist() == [FULL, min(LINEAR, LOCAL), LINEAR]
    assert layer_majority(np.zeros((2, 0), dtype=int)).tolist() == [0, 0]


def test_a_report_shows_an_undefined_measure_as_a_dash_and_keeps_its_json_strict(tmp_path):
    """A float16 run's NaN KL (or a NaN perplexity) must neither crash the report nor print
    "nan" in its tables, and the raw rows it embeds must stay valid JSON."""
    import json
    import math

    from metaattn_viz.training.report import write_report

    base = {"seq_len": 64, "window": 16, "n_sink": 4, "tokens": 32, "realized_cost": 0.5}
    shares = {"full": 0.3, "linear": math.nan, "local": 0.7}
    rows = [
        {**base, "controller": "bayes", "budget": 0.5, "dense_ppl": math.nan, "ppl": 11.0,
         "kl_to_dense": math.nan, "attention_flops_ratio": math.inf, "routing_entropy": None,
         "routing_variety": math.nan, "expert_shares": shares, "kl_windows": [0.1, math.nan, 0.2]},
        {**base, "controller": "priorfree", "budget": 0.5, "dense_ppl": math.nan, "ppl": math.nan,
         "kl_to_dense": 0.2, "attention_flops_ratio": 0.5, "routing_entropy": 0.4,
         "routing_variety": 0.1, "expert_shares": shares, "kl_windows": [0.3, 0.4, 0.1]},
    ]  # fmt: skip
    path = tmp_path / "results.md"
    write_report(rows, path, "metaattn-viz eval")
    text = path.read_text(encoding="utf-8")
    tables_part = text.split("<details>")[0]
    assert "nan" not in tables_part.lower() and "inf" not in tables_part.lower()
    assert "Dense perplexity **–**" in text
    assert "| bayes | 0.50 | 0.500 | – | 11.00 | – | – |" in text
    raw = text.split("```json\n")[1].split("\n```")[0]
    assert json.loads(raw)[0]["kl_to_dense"] is None  # strict JSON: NaN became null
    # the paired differences skip the window undefined on one side: 2 of 3 paired
    assert "paired over the 2 validation windows" in text
    assert (tmp_path / "pareto.png").stat().st_size > 0  # the NaN point is left out of the plot
