"""Dirichlet maths against torch.distributions and SciPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import special, stats

from metaattn_viz.core import dirichlet as D

torch.manual_seed(0)
BETAS = torch.tensor([[0.05, 0.05, 0.05], [1.0, 1.0, 1.0], [0.27, 1.82, 0.91],
                      [12.0, 0.3, 2.5], [200.0, 150.0, 90.0]], dtype=torch.float64)


def test_prior_matches_the_paper():
    a0 = D.prior_concentration()
    assert torch.allclose(a0, torch.tensor([0.2727, 1.8182, 0.9091]), atol=1e-3)
    assert math.isclose(float(a0.sum()), 3.0, rel_tol=1e-6)
    sharper = D.prior_concentration(gamma=2.0)
    assert sharper[1] / sharper[0] > a0[1] / a0[0]
    with pytest.raises(ValueError, match="prior strength"):
        D.prior_concentration(strength=0)


def test_kl_matches_torch_distributions():
    alpha0 = D.prior_concentration(dtype=torch.float64)
    ref = torch.distributions.kl_divergence(torch.distributions.Dirichlet(BETAS),
                                            torch.distributions.Dirichlet(alpha0.expand_as(BETAS)))
    assert torch.allclose(D.kl_dirichlet(BETAS, alpha0), ref, atol=1e-10)
    assert float(D.kl_dirichlet(alpha0, alpha0)) == pytest.approx(0.0, abs=1e-12)


def test_entropy_of_mean_matches_scipy():
    m = D.posterior_mean(BETAS).numpy()
    ref = np.array([stats.entropy(row) for row in m])
    assert np.allclose(D.entropy_of_mean(torch.from_numpy(m)).numpy(), ref, atol=1e-12)


def test_expected_entropy_matches_monte_carlo():
    gen = torch.Generator().manual_seed(1)
    for beta in BETAS[1:]:  # (very small concentrations make MC log(0) unstable)
        samples = torch._sample_dirichlet(beta.expand(200_000, 3).contiguous(), gen)
        samples = samples.clamp_min(1e-300)
        mc = float(-(samples * samples.log()).sum(-1).mean())
        assert float(D.expected_entropy(beta)) == pytest.approx(mc, abs=4e-3)


def test_expected_entropy_closed_form_with_scipy_digamma():
    b = BETAS.numpy()
    s = b.sum(-1, keepdims=True)
    ref = -((b / s) * (special.digamma(b + 1) - special.digamma(s + 1))).sum(-1)
    assert np.allclose(D.expected_entropy(BETAS).numpy(), ref, atol=1e-12)


def test_mutual_information_vacuity_variance():
    mi = D.mutual_information(BETAS)
    assert (mi >= 0).all()
    # more evidence with the same mean -> less epistemic uncertainty
    assert float(D.mutual_information(torch.tensor([2.0, 1.0, 1.0]))) > float(
        D.mutual_information(torch.tensor([200.0, 100.0, 100.0])))
    assert torch.allclose(D.vacuity(BETAS), 3 / BETAS.sum(-1))
    ref_var = torch.distributions.Dirichlet(BETAS).variance
    assert torch.allclose(D.weight_variance(BETAS), ref_var, atol=1e-12)


def test_uncertainties_are_normalised_and_point_estimate_has_no_epistemic():
    u = D.uncertainties(BETAS)
    assert float(u["total"][1]) == pytest.approx(1.0)  # Dir(1,1,1): uniform mean
    assert ((u["total"] >= 0) & (u["total"] <= 1 + 1e-12)).all()
    assert torch.allclose(u["epistemic"], D.mutual_information(BETAS))
    p = torch.tensor([[0.7, 0.2, 0.1]])
    up = D.uncertainties(p, point_estimate=True)
    assert float(up["epistemic"]) == 0.0 and float(up["vacuity"]) == 0.0
    assert float(up["total"]) == pytest.approx(stats.entropy([0.7, 0.2, 0.1]) / math.log(3))
