"""Dirichlet maths of the meta-controller: the compute-aware prior, the closed-form KL,
and the uncertainty of a routing decision (docs/meta-attention.md §3-§5).

All functions take torch tensors whose last dimension is K (the experts) and broadcast
over the leading ones. Tested against torch.distributions and SciPy. Knows nothing of
models or kernels.
"""

from __future__ import annotations

import math

import torch

from metaattn_viz.core.settings import COSTS


def prior_concentration(costs=COSTS, strength: float | None = None, gamma: float = 1.0,
                        dtype=torch.float32) -> torch.Tensor:
    """alpha0_k = s * c_k^-gamma / sum_j c_j^-gamma: cheap experts favoured a priori."""
    c = torch.as_tensor(costs, dtype=torch.float64)
    s = float(len(costs)) if strength is None else float(strength)
    if s <= 0 or not math.isfinite(s):
        raise ValueError(f"prior strength must be a positive number, got {strength!r}")
    w = c.pow(-gamma)
    return (s * w / w.sum()).to(dtype)  # [K]


def kl_dirichlet(beta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """KL(Dir(beta) || Dir(alpha)) in closed form, over the last dimension."""
    alpha = alpha.to(beta.dtype).expand_as(beta)
    sb = beta.sum(-1)
    sa = alpha.sum(-1)
    return (torch.lgamma(sb) - torch.lgamma(beta).sum(-1) - torch.lgamma(sa)
            + torch.lgamma(alpha).sum(-1)
            + ((beta - alpha) * (torch.digamma(beta) - torch.digamma(sb).unsqueeze(-1))).sum(-1))


def posterior_mean(beta: torch.Tensor) -> torch.Tensor:
    return beta / beta.sum(-1, keepdim=True)


def entropy_of_mean(m: torch.Tensor) -> torch.Tensor:
    """Total uncertainty H[m] = -sum_k m_k log m_k (nats)."""
    return -(m * torch.log(m.clamp_min(1e-30))).sum(-1)


def expected_entropy(beta: torch.Tensor) -> torch.Tensor:
    """Aleatoric uncertainty E_{alpha~Dir(beta)} H[Cat(alpha)] = -sum m_k (psi(b_k+1) - psi(S+1))."""
    s = beta.sum(-1, keepdim=True)
    m = beta / s
    return -(m * (torch.digamma(beta + 1) - torch.digamma(s + 1))).sum(-1)


def mutual_information(beta: torch.Tensor) -> torch.Tensor:
    """Epistemic uncertainty: H[m] - E H[Cat(alpha)] (>= 0)."""
    return (entropy_of_mean(posterior_mean(beta)) - expected_entropy(beta)).clamp_min(0.0)


def vacuity(beta: torch.Tensor) -> torch.Tensor:
    """K / S: 1 for a flat Dir(1,..,1), towards 0 as evidence accumulates."""
    return beta.shape[-1] / beta.sum(-1)


def weight_variance(beta: torch.Tensor) -> torch.Tensor:
    """Var[alpha_k] = m_k (1 - m_k) / (S + 1)."""
    s = beta.sum(-1, keepdim=True)
    m = beta / s
    return m * (1 - m) / (s + 1)


def uncertainties(beta: torch.Tensor, point_estimate: bool = False) -> dict[str, torch.Tensor]:
    """All measures of §5 for concentrations beta [..., K].

    total and aleatoric are fractions of log K (0 = certain, 1 = uniform); epistemic is the
    mutual information in nats; vacuity is K/S. For a point estimate (the prior-free
    controller, whose "concentration" is its probability vector) there is no epistemic part:
    aleatoric = total, epistemic = vacuity = 0.
    """
    log_k = math.log(beta.shape[-1])
    m = posterior_mean(beta)
    total = entropy_of_mean(m)
    if point_estimate:
        zero = torch.zeros_like(total)
        return {"total": total / log_k, "aleatoric": total / log_k, "epistemic": zero,
                "vacuity": zero}
    ale = expected_entropy(beta)
    return {"total": total / log_k, "aleatoric": ale / log_k,
            "epistemic": (total - ale).clamp_min(0.0), "vacuity": vacuity(beta)}
