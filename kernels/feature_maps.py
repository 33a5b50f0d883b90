"""The linear expert's feature map phi: elu + 1, or a learned per-head Hedgehog map.

The linear expert approximates softmax attention by phi(q)^T phi(k) (docs/method.md,
Experts). elu + 1 is the fixed map (`feature_map=None` everywhere in metaattn_kernels:
today's behaviour, bit for bit). A `FeatureMap` holds one layer's learned maps, after
Zhang et al. 2024 ("The Hedgehog & the Porcupine"):

    phi(x) = [softmax(x' W + b), softmax(-(x' W + b))],  x' = x * D^-1/4,

with W [D, D/2] and b [D/2] per head, the softmax over the feature axis. Why this form:

- exp(x' W) is the shape of the softmax kernel exp(q k / sqrt D) (the D^-1/4 on each side
  gives the 1/sqrt D of the product), and the negated half lets a feature respond to
  negative projections, as the paper does; softmax instead of exp keeps the features in
  [0, 1] (no overflow in float16, a positive denominator always).
- F = 2 * D/2 = D features, so the linear state S [Hkv, F, D] keeps the shape the CPU and
  Triton kernels, the decode state and its argument checks already use.
- Query heads and key heads have their own maps: Hq query maps, Hkv key maps (grouped-
  query attention: each key map serves the G query heads of its kv head).

Applying phi is one batched matmul and two softmaxes per tensor, done here in PyTorch in
the compute dtype; every backend (reference, cpu, decode, Triton) maps q and k with the
functions below and then runs its linear kernels on the features (the Triton kernels
take them pre-mapped).

Never: train maps (metaattn_viz.training.feature_maps does), read files, import
metaattn_viz, or know about routing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def elu_plus_one(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1, the fixed positive feature map (the default linear expert)."""
    return F.elu(x) + 1.0


def input_scale(head_dim: int) -> float:
    """D^-1/4: applied to q and to k, it gives their product the softmax's 1/sqrt(D)."""
    return float(head_dim) ** -0.25


def hedgehog(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-head Hedgehog features: x [B, H, T, D], weight [H, D, D/2], bias [H, D/2] ->
    [softmax(z), softmax(-z)] [B, H, T, D] with z = (x * scale) W + b. Differentiable."""
    z = torch.einsum("bhtd,hdf->bhtf", x * scale, weight) + bias[:, None, :]
    return torch.cat([torch.softmax(z, dim=-1), torch.softmax(-z, dim=-1)], dim=-1)


@dataclass(frozen=True, eq=False)  # tensors: compared by identity, never elementwise by accident
class FeatureMap:
    """One layer's learned feature maps (inference: no gradients kept).

    q_weight [Hq, D, D/2], q_bias [Hq, D/2]: one map per query head;
    k_weight [Hkv, D, D/2], k_bias [Hkv, D/2]: one map per key/value head.
    Tensors are float32; `query`/`key` move them to the input's device and compute dtype.
    """

    q_weight: torch.Tensor
    q_bias: torch.Tensor
    k_weight: torch.Tensor
    k_bias: torch.Tensor

    def __post_init__(self):
        for name in ("q_weight", "q_bias", "k_weight", "k_bias"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise ValueError(f"FeatureMap.{name} must be a torch.Tensor")
        hq, d, f = self.q_weight.shape
        hkv = self.k_weight.shape[0]
        if 2 * f != d:
            raise ValueError(f"FeatureMap: q_weight must be [Hq, D, D/2], got {tuple(self.q_weight.shape)}")
        if tuple(self.k_weight.shape) != (hkv, d, f):
            raise ValueError(
                f"FeatureMap: k_weight must be [Hkv, {d}, {f}], got {tuple(self.k_weight.shape)}"
            )
        if tuple(self.q_bias.shape) != (hq, f) or tuple(self.k_bias.shape) != (hkv, f):
            raise ValueError(
                f"FeatureMap: biases must be [Hq, {f}] and [Hkv, {f}], got "
                f"{tuple(self.q_bias.shape)} and {tuple(self.k_bias.shape)}"
            )

    def to(self, device) -> FeatureMap:
        """The same map with its tensors on `device` (do it once: `query`/`key` would copy per call)."""
        return FeatureMap(*(t.to(device) for t in (self.q_weight, self.q_bias, self.k_weight, self.k_bias)))

    @property
    def q_heads(self) -> int:
        return self.q_weight.shape[0]

    @property
    def kv_heads(self) -> int:
        return self.k_weight.shape[0]

    @property
    def head_dim(self) -> int:
        return self.q_weight.shape[1]

    def _apply(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ct = torch.promote_types(x.dtype, torch.float32)
        w, b = weight.to(x.device, ct), bias.to(x.device, ct)
        return hedgehog(x.to(ct), w, b, input_scale(x.shape[-1]))

    def query(self, q: torch.Tensor) -> torch.Tensor:
        """phi of queries q [B, Hq, T, D] -> [B, Hq, T, D] in the compute dtype."""
        return self._apply(q, self.q_weight, self.q_bias)

    def key(self, k: torch.Tensor) -> torch.Tensor:
        """phi of keys k [B, Hkv, T, D] -> [B, Hkv, T, D] in the compute dtype."""
        return self._apply(k, self.k_weight, self.k_bias)


def phi_query(fm: FeatureMap | None, q: torch.Tensor) -> torch.Tensor:
    """The linear expert's query features: elu + 1 when `fm` is None, else the learned map."""
    return elu_plus_one(q) if fm is None else fm.query(q)


def phi_key(fm: FeatureMap | None, k: torch.Tensor) -> torch.Tensor:
    """The linear expert's key features: elu + 1 when `fm` is None, else the learned map."""
    return elu_plus_one(k) if fm is None else fm.key(k)


def check_feature_map(fm, hq: int, hkv: int, d: int) -> None:
    """ValueError unless `fm` is None or a FeatureMap for Hq query heads, Hkv kv heads, head dim D."""
    if fm is None:
        return
    if not isinstance(fm, FeatureMap):
        raise ValueError(f"feature_map must be None (elu + 1) or a FeatureMap, got {type(fm).__name__}")
    if (fm.q_heads, fm.kv_heads, fm.head_dim) != (hq, hkv, d):
        raise ValueError(
            f"feature_map is for {fm.q_heads} query heads, {fm.kv_heads} kv heads, head dim "
            f"{fm.head_dim}; the tensors have {hq}, {hkv}, {d}"
        )
