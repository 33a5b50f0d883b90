"""Dirichlet maths of the meta-controller: the compute-aware prior, the closed-form KL,
and the uncertainty of a routing decision (docs/method.md, "Prior", "ELBO" and
"Uncertainty").

Every function takes arrays whose last dimension is K (the experts) and broadcasts over
the leading ones. The uncertainty measures have one implementation each that runs on
torch tensors (the routing hot path, autograd) and on numpy arrays (the trace and the
store's writer thread): only log, digamma and the clamp are looked up per array type, and
the numpy path stays numpy in float64 (SciPy's digamma) because per-op torch overhead on
small arrays cost more than the work. The prior and the KL are torch only (training).
Tested against torch.distributions and SciPy. Never imports torch at module level (the
store must not), and knows nothing of models or kernels.
"""

from __future__ import annotations

import math
from functools import cache
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from metaattn_viz.core.experts import COSTS

if TYPE_CHECKING:
    import torch

# Lower bound on a probability inside a log: 0 log 0 = 0 without a NaN gradient.
_TINY = 1e-30


class _Ops(NamedTuple):
    """The few elementwise ops whose spelling differs between numpy and torch."""

    log: Any
    digamma: Any
    clamp_min: Any  # (x, lo) -> max(x, lo)
    zeros_like: Any


@cache
def _ops_for(is_numpy: bool) -> _Ops:
    if is_numpy:
        from scipy.special import digamma

        return _Ops(np.log, digamma, np.maximum, np.zeros_like)
    import torch

    return _Ops(torch.log, torch.digamma, torch.clamp_min, torch.zeros_like)


def _prepare(x):
    """(x, ops): a torch tensor as it is; anything else as a float64 numpy array."""
    if isinstance(x, np.ndarray) or not hasattr(x, "detach"):
        return np.asarray(x, np.float64), _ops_for(True)
    return x, _ops_for(False)


def prior_concentration(
    costs=COSTS, strength: float | None = None, gamma: float = 1.0, dtype=None
) -> torch.Tensor:
    """alpha0_k = s * c_k^-gamma / sum_j c_j^-gamma: cheap experts favoured a priori
    (docs/method.md, "Prior"). s defaults to K; dtype to float32."""
    import torch

    c = torch.as_tensor(costs, dtype=torch.float64)
    s = float(len(costs)) if strength is None else float(strength)
    if s <= 0 or not math.isfinite(s):
        raise ValueError(f"prior strength must be a positive number, got {strength!r}")
    w = c.pow(-gamma)
    return (s * w / w.sum()).to(torch.float32 if dtype is None else dtype)  # [K]


def kl_dirichlet(beta: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """KL(Dir(beta) || Dir(alpha)) in closed form, over the last dimension (the ELBO's
    prior term)."""
    import torch

    alpha = alpha.to(beta.dtype).expand_as(beta)
    sb = beta.sum(-1)
    sa = alpha.sum(-1)
    return (
        torch.lgamma(sb)
        - torch.lgamma(beta).sum(-1)
        - torch.lgamma(sa)
        + torch.lgamma(alpha).sum(-1)
        + ((beta - alpha) * (torch.digamma(beta) - torch.digamma(sb).unsqueeze(-1))).sum(-1)
    )


def posterior_mean(beta):
    """m = beta / S, S = sum_k beta_k."""
    beta, _ = _prepare(beta)
    return beta / beta.sum(-1)[..., None]


def entropy_of_mean(m):
    """Total uncertainty H[m] = -sum_k m_k log m_k (nats)."""
    m, op = _prepare(m)
    return -(m * op.log(op.clamp_min(m, _TINY))).sum(-1)


def total_uncertainty(m):
    """H[m] as a fraction of log K: 0 = certain, 1 = uniform. The hedge threshold's scale."""
    m, _ = _prepare(m)
    return entropy_of_mean(m) / math.log(m.shape[-1])


def expected_entropy(beta):
    """Aleatoric uncertainty E_{alpha~Dir(beta)} H[Cat(alpha)] = -sum m_k (psi(b_k+1) - psi(S+1))."""
    beta, op = _prepare(beta)
    s = beta.sum(-1)[..., None]
    return -((beta / s) * (op.digamma(beta + 1) - op.digamma(s + 1))).sum(-1)


def mutual_information(beta):
    """Epistemic uncertainty: H[m] - E H[Cat(alpha)] (>= 0)."""
    beta, op = _prepare(beta)
    return op.clamp_min(entropy_of_mean(posterior_mean(beta)) - expected_entropy(beta), 0.0)


def vacuity(beta):
    """K / S: 1 for a flat Dir(1,..,1), towards 0 as evidence accumulates."""
    beta, _ = _prepare(beta)
    return beta.shape[-1] / beta.sum(-1)


def weight_variance(beta):
    """Var[alpha_k] = m_k (1 - m_k) / (S + 1)."""
    beta, _ = _prepare(beta)
    s = beta.sum(-1)[..., None]
    m = beta / s
    return m * (1 - m) / (s + 1)


def uncertainties(beta, point_estimate: bool = False) -> dict:
    """All measures of docs/method.md, "Uncertainty", for concentrations beta [..., K].

    total and aleatoric are fractions of log K (0 = certain, 1 = uniform); epistemic is the
    mutual information in nats; vacuity is K/S. For a point estimate (the prior-free
    controller, whose "concentration" is its probability vector) there is no epistemic part:
    aleatoric = total, epistemic = vacuity = 0. Returns arrays of beta's kind (numpy in
    float64 for anything that is not a torch tensor).
    """
    beta, op = _prepare(beta)
    log_k = math.log(beta.shape[-1])
    total = entropy_of_mean(posterior_mean(beta))
    if point_estimate:
        zero = op.zeros_like(total)
        return {"total": total / log_k, "aleatoric": total / log_k, "epistemic": zero, "vacuity": zero}
    ale = expected_entropy(beta)
    return {
        "total": total / log_k,
        "aleatoric": ale / log_k,
        "epistemic": op.clamp_min(total - ale, 0.0),
        "vacuity": vacuity(beta),
    }
