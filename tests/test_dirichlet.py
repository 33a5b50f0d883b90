"""Dirichlet maths against torch.distributions and SciPy."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import special, stats

from metaattn_viz.core import dirichlet as D

torch.manual_seed(0)
BETAS = torch.tensor(
    [[0.05, 0.05, 0.05], [1.0, 1.0, 1.0], [0.27, 1.82, 0.91], [12.0, 0.3, 2.5], [200.0, 150.0, 90.0]],
    dtype=torch.float64,
)


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
    ref = torch.distributions.kl_divergence(
        torch.distributions.Dirichlet(BETAS), torch.distributions.Dirichlet(alpha0.expand_as(BETAS))
    )
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
        D.mutual_information(torch.tensor([200.0, 100.0, 100.0]))
    )
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


# -- one implementation, two array types: numpy (trace, store) and torch (routing) -----------
MEASURES = ("total", "aleatoric", "epistemic", "vacuity")


@pytest.mark.parametrize("point_estimate", [False, True])
def test_numpy_path_matches_the_torch_path(point_estimate):
    betas = BETAS if not point_estimate else D.posterior_mean(BETAS)
    u_np = D.uncertainties(betas.numpy(), point_estimate=point_estimate)
    u_t = D.uncertainties(betas, point_estimate=point_estimate)
    for name in MEASURES:
        assert isinstance(u_np[name], np.ndarray) and u_np[name].dtype == np.float64, name
        assert isinstance(u_t[name], torch.Tensor), name
        np.testing.assert_allclose(u_np[name], u_t[name].numpy(), rtol=1e-12, atol=1e-14, err_msg=name)


def test_numpy_measures_against_torch_distributions_and_scipy():
    b = BETAS.numpy()
    dist = torch.distributions.Dirichlet(BETAS)
    m = dist.mean.numpy()
    ref_total = np.array([stats.entropy(row) for row in m])
    ref_ale = -(m * (special.digamma(b + 1) - special.digamma(b.sum(-1, keepdims=True) + 1))).sum(-1)
    np.testing.assert_allclose(D.posterior_mean(b), m, rtol=1e-12)
    np.testing.assert_allclose(D.entropy_of_mean(m), ref_total, atol=1e-12)
    np.testing.assert_allclose(D.total_uncertainty(m), ref_total / math.log(3), atol=1e-12)
    np.testing.assert_allclose(D.expected_entropy(b), ref_ale, atol=1e-12)
    np.testing.assert_allclose(D.mutual_information(b), np.maximum(ref_total - ref_ale, 0), atol=1e-12)
    np.testing.assert_allclose(D.vacuity(b), 3 / b.sum(-1), rtol=1e-12)
    np.testing.assert_allclose(D.weight_variance(b), dist.variance.numpy(), atol=1e-12)


def test_numpy_path_is_float64_whatever_the_input_dtype():
    b32 = BETAS.numpy().astype(np.float32)  # what a trace stores
    u = D.uncertainties(b32[None])  # [1, 5, K] broadcasts over leading dimensions
    assert u["total"].shape == (1, 5) and u["total"].dtype == np.float64
    np.testing.assert_allclose(
        u["aleatoric"][0], D.uncertainties(BETAS.float())["aleatoric"].numpy(), rtol=1e-5
    )
    # a point estimate with an exact zero: 0 log 0 = 0, no NaN
    p = np.array([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0]])
    up = D.uncertainties(p, point_estimate=True)
    np.testing.assert_allclose(up["total"], [0.0, math.log(2) / math.log(3)], atol=1e-12)
    assert not np.isnan(D.uncertainties(p)["epistemic"]).any()


def test_torch_path_keeps_dtype_and_gradient():
    beta = BETAS.float().requires_grad_()
    u = D.uncertainties(beta)
    assert u["total"].dtype == torch.float32
    (u["total"].sum() + u["epistemic"].sum()).backward()
    assert beta.grad is not None and torch.isfinite(beta.grad).all()


def test_numpy_path_never_imports_torch():
    # the store's writer thread and the trace call it; neither may pull torch in
    code = (
        "import sys, numpy as np\n"
        "from metaattn_viz.core.dirichlet import uncertainties\n"
        "u = uncertainties(np.array([[0.3, 1.8, 0.9]]))\n"
        "assert u['epistemic'][0] > 0\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.strip() == "False"
