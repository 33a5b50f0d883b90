"""Calibration for the decisions made (issue 14): the error-ranking auxiliary target, hard
routes under a sampled budget, the learned linear map and the attention features on a tiny
model, and the calibrate command's new flags."""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import random_maps, routed_tiny, routed_with_maps

from metaattn_viz.core.experts import COSTS, FULL, LINEAR, K
from metaattn_viz.routing.controller import ControllerStack
from metaattn_viz.routing.policies import TrainPolicy, TrainRouting
from metaattn_viz.training import oracle
from metaattn_viz.training.calibrate import CalibrationConfig, _budget_of_step, calibrate, ranking_aux

ROOT = Path(__file__).resolve().parent.parent
EXCERPT = ROOT / "tests" / "data" / "wikitext2_excerpt.txt"


def _weights_ranking(local_err, linear_err, sign=1.0):
    """Routing weights whose ranking scores are exactly (sign times) the targets."""
    s = torch.zeros(*local_err.shape, K)
    s[..., FULL] = sign * torch.log(local_err + 1e-3)
    s[..., LINEAR] = -sign * (linear_err - local_err)
    return torch.softmax(s, -1)


def test_ranking_aux_is_zero_for_the_errors_own_ranking_and_four_for_its_reverse():
    g = torch.Generator().manual_seed(0)
    local_err = torch.rand(3, 2, 16, generator=g)
    linear_err = local_err + torch.randn(3, 2, 16, generator=g)
    assert ranking_aux(
        _weights_ranking(local_err, linear_err), local_err, linear_err
    ).item() == pytest.approx(0.0, abs=1e-5)
    assert ranking_aux(
        _weights_ranking(local_err, linear_err, -1.0), local_err, linear_err
    ).item() == pytest.approx(4.0, abs=1e-5)
    # scale-free: sharper posteriors with the same ranking score the same
    m = _weights_ranking(local_err, linear_err)
    sharp = torch.softmax(3 * torch.log(m), -1)
    assert ranking_aux(sharp, local_err, linear_err).item() == pytest.approx(0.0, abs=1e-5)
    # "layer" scope ranks within each layer only: an offset per layer costs nothing there,
    # but does globally
    shifted = m.log().clone()
    shifted[..., FULL] += torch.tensor([0.0, 5.0, -5.0])[:, None, None]
    shifted = torch.softmax(shifted, -1)
    assert ranking_aux(shifted, local_err, linear_err, "layer").item() == pytest.approx(0.0, abs=1e-5)
    glob = ranking_aux(shifted, local_err, linear_err, "global").item()
    assert glob > 0.1
    # "both": the mean of the two correlations, so here half the global term
    assert ranking_aux(shifted, local_err, linear_err, "both").item() == pytest.approx(glob / 2, abs=1e-5)


def test_hard_training_routes_meet_the_sampled_budget_and_keep_the_gradient():
    g = torch.Generator().manual_seed(1)
    beta = (torch.rand(1, 200, K, generator=g) * 3 + 0.1).requires_grad_(True)
    for budget in (0.25, 0.5, 0.75):
        torch.manual_seed(0)
        policy = TrainPolicy(TrainRouting(hard=True, budget=budget), False, 1, [])
        w, _ = policy.decide(0, beta, 0, torch.zeros(1, 200, 4))
        hard = w.detach().round()
        torch.testing.assert_close(w.detach(), hard, atol=1e-6, rtol=0)  # one-hot forward
        assert torch.all(hard.sum(-1) == 1)
        cost = (hard * torch.tensor(COSTS)).sum(-1).mean().item()
        assert abs(cost - budget) < 0.01, (budget, cost)
        (grad,) = torch.autograd.grad((w * torch.arange(K)).sum(), beta)
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0  # straight-through
    # the budget only shapes hard steps; a resumed run draws the same budget per step
    cfg = CalibrationConfig(train_budgets=(0.25, 0.5, 0.75), seed=3)
    draws = [_budget_of_step(cfg, s) for s in range(40)]
    assert draws == [_budget_of_step(cfg, s) for s in range(40)] and set(draws) == {0.25, 0.5, 0.75}
    assert _budget_of_step(CalibrationConfig(), 5) is None


def test_dense_pass_errors_are_the_oracles_and_the_logits_the_dense_models():
    r = routed_tiny(seed=2)
    ids = torch.randint(0, 250, (1, 40), generator=torch.Generator().manual_seed(2))
    logits, local_err, linear_err = oracle.dense_pass_errors(r.model, ids, 8, 2)
    torch.testing.assert_close(logits, r.dense_logits(ids), atol=1e-4, rtol=1e-4)
    le, li = oracle.expert_errors(r.model, ids, 8, 2)
    assert torch.equal(le, local_err) and torch.equal(li, linear_err)
    assert local_err.shape == (3, 1, 40) and torch.all(local_err[:, :, :10] < 1e-5)  # window covers all
    assert torch.all(local_err[:, :, 10:].mean(-1) > 1e-3)


@pytest.mark.parametrize("kind", ["bayes", "priorfree"])
def test_calibrate_with_learned_maps_attention_features_and_targets_on_a_tiny_model(tmp_path, kind):
    r = routed_with_maps(random_maps(), seed=1, spread=1.0)
    common = dict(controller=kind, steps=16, seq_len=48, val_windows=1, soft_fraction=0.5, checkpoint_every=8)
    cfg = CalibrationConfig(
        linear_map="learned",
        features=("base", "attention"),
        aux_weight=1.0,
        train_budgets=(0.25, 0.5, 0.75),
        **common,
    )
    hist: list = []
    meta = calibrate(
        r, EXCERPT, cfg, out_dir=tmp_path / "a", progress=False, model_slug="t", on_step=hist.append
    )
    loaded = ControllerStack.load(tmp_path / "a")
    assert loaded.config.features == ("base", "attention") and loaded.uses_attention
    assert meta["hyperparameters"]["linear_map"] == "learned"
    assert list(meta["hyperparameters"]["train_budgets"]) == [0.25, 0.5, 0.75]
    assert meta["feature_maps"]["linear_map"] == "learned"
    assert all("budget" in h for h in hist if h["hard"]) and not any(
        "budget" in h for h in hist if not h["hard"]
    )
    aux = [h["aux"] for h in hist]
    assert sum(aux[-4:]) / 4 < sum(aux[:4]) / 4, aux  # the ranking target is learned
    assert math.isfinite(meta["final_validation_terms"]["aux"])
    # the learned maps are what the linear expert ran with: elu + 1 trains differently
    elu = CalibrationConfig(
        linear_map="elu",
        features=("base", "attention"),
        aux_weight=1.0,
        **(common | {"steps": 1, "soft_fraction": 1.0}),
    )
    hist_elu: list = []
    calibrate(
        r, EXCERPT, elu, out_dir=tmp_path / "b", progress=False, model_slug="t", on_step=hist_elu.append
    )
    assert hist_elu[0]["task"] != hist[0]["task"]


@pytest.mark.parametrize(
    "flags, match",
    [
        (["--features", "base,magic"], "features (--features) must name base"),
        (["--train-budgets", "0.5,2"], "budget"),
        (["--aux-weight", "-1"], "aux_weight must be a finite number >= 0"),
    ],
)
def test_calibrate_cli_refuses_bad_new_flags_plainly(tmp_path, flags, match):
    out = subprocess.run(
        [sys.executable, "-m", "metaattn_viz", "calibrate", "--data", str(EXCERPT), *flags],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 2 and match in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
