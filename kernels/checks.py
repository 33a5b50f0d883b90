"""Argument checks for `routed_attention`, shared by every backend.

Bad input must fail loudly here with a ValueError naming the argument, before any
kernel runs: a fast path must never turn a malformed call into a silent wrong answer
or a crash of the process. Never: compute attention or change the inputs.
"""

from __future__ import annotations

import math
import os

import torch

from metaattn_kernels.experts import EXPERTS
from metaattn_kernels.feature_maps import check_feature_map

BACKENDS = ("auto", "reference", "cpu", "triton")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def triton_interpreted() -> bool:
    """True when Triton runs in interpreter mode (kernels on CPU tensors, for tests)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def grad_inputs(q, k, v, weights, linear_state=None, features=None) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a routed_attention call a gradient may flow to, by name (the optional
    linear_state and features where given)."""
    named = [("q", q), ("k", k), ("v", v), ("weights", weights)]
    if linear_state is not None:
        named += [("linear_state S", linear_state[0]), ("linear_state z", linear_state[1])]
    if features is not None:
        named += [("features phi(q)", features[0]), ("features phi(k)", features[1])]
    return named


def needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records a graph through any of `tensors`: grad mode is on and one of
    them requires grad. Such a call must keep its graph: the Triton kernels have no backward,
    so it takes the cpu path (kernels.dispatch), which then differentiates (kernels.cpu)."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _check_tensor(name: str, x, ndim: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def check_routed_attention_args(
    q, k, v, weights, window, n_sink, scale, linear_state, backend, eps, feature_map=None, features=None
) -> None:
    """Raise ValueError naming the first bad argument of a routed_attention call."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x, 4)
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one dtype, got q {q.dtype}, k {k.dtype}, v {v.dtype}")
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    b, hq, tq, d = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    bk, hkv, tk, dk = k.shape
    if bk != b:
        raise ValueError(f"q and k must have the same batch size, got q {b}, k {bk}")
    if dk != d:
        raise ValueError(f"q and k must have the same head dim, got q {d}, k {dk}")
    if hkv < 1 or hq % hkv != 0:
        raise ValueError(f"q heads ({hq}) must be a multiple of k/v heads ({hkv})")
    if tq < 1 or d < 1 or b < 1 or hq < 1:
        raise ValueError(
            f"q must have at least one batch row, head, query and feature, got shape {tuple(q.shape)}"
        )
    if tk < tq:
        raise ValueError(f"k must hold at least as many positions as q (Tk >= Tq), got Tk={tk}, Tq={tq}")

    _check_tensor("weights", weights, 3)
    if tuple(weights.shape) != (b, tq, len(EXPERTS)):
        raise ValueError(
            f"weights must have shape [B, Tq, {len(EXPERTS)}] = {[b, tq, len(EXPERTS)]}, "
            f"got {list(weights.shape)}"
        )
    if not weights.is_floating_point():
        raise ValueError(f"weights must be a float tensor, got {weights.dtype}")
    if weights.device != q.device:
        raise ValueError(f"weights must be on the device of q ({q.device}), got {weights.device}")
    # Non-finite q, k or v: the backends would each give another wrong answer (the cpu local
    # expert's additive band mask spreads a NaN key to earlier rows, the reference's dense mix
    # spreads it through experts of weight 0, triton's elu + 1 maps NaN to 1). One host
    # synchronisation for every tensor's least and greatest value (aminmax propagates NaN; one
    # pass with no temporary, about 20 times cheaper than isfinite().all() on the CPU), in
    # float64 (a finite float64 beyond float32's range stays finite). Of k and v only the
    # positions of this call's queries: the cache before them was checked when it was new,
    # and a decode step must not scan the whole cache in every layer.
    new_k, new_v = k[:, :, tk - tq :], v[:, :, tk - tq :]
    named = (("weights", weights), ("q", q), ("k", new_k), ("v", new_v))
    extremes = torch.stack([e.double() for _, x in named for e in torch.aminmax(x)]).tolist()
    for i, (name, _) in enumerate(named):
        if not all(math.isfinite(e) for e in extremes[2 * i : 2 * i + 2]):
            raise ValueError(f"{name} must be finite (found NaN or inf)")
    if extremes[0] < 0:
        raise ValueError("weights must be non-negative")

    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if isinstance(n_sink, bool) or not isinstance(n_sink, int) or n_sink < 0:
        raise ValueError(f"n_sink must be an int >= 0, got {n_sink!r}")
    if scale is not None and (not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be None or a finite number > 0, got {scale!r}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")

    if linear_state is not None:
        if not isinstance(linear_state, (tuple, list)) or len(linear_state) != 2:
            raise ValueError("linear_state must be None or a pair (S [B, Hkv, D, D], z [B, Hkv, D])")
        s, z = linear_state
        _check_tensor("linear_state S", s, 4)
        _check_tensor("linear_state z", z, 3)
        if tuple(s.shape) != (b, hkv, d, d):
            raise ValueError(f"linear_state S must have shape {[b, hkv, d, d]}, got {list(s.shape)}")
        if tuple(z.shape) != (b, hkv, d):
            raise ValueError(f"linear_state z must have shape {[b, hkv, d]}, got {list(z.shape)}")
        for name, x in (("linear_state S", s), ("linear_state z", z)):
            if not x.is_floating_point():
                raise ValueError(f"{name} must be a float tensor, got {x.dtype}")
            if x.device != q.device:
                raise ValueError(f"{name} must be on the device of q ({q.device}), got {x.device}")

    check_feature_map(feature_map, hq, hkv, d)
    if features is not None:
        if feature_map is None:
            raise ValueError("features are a learned feature map's: pass them with its feature_map")
        if not isinstance(features, (tuple, list)) or len(features) != 2:
            raise ValueError(
                "features must be None or a pair (phi(q) [B, Hq, Tq, D], phi(k) [B, Hkv, Tq, D])"
            )
        for name, x, want in (
            ("features phi(q)", features[0], (b, hq, tq, d)),
            ("features phi(k)", features[1], (b, hkv, tq, d)),
        ):
            _check_tensor(name, x, 4)
            if tuple(x.shape) != want or x.device != q.device or not x.is_floating_point():
                raise ValueError(
                    f"{name} must be a float tensor of shape {list(want)} on {q.device}, "
                    f"got {x.dtype} {list(x.shape)} on {x.device}"
                )

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "triton":
        if q.dtype not in TRITON_DTYPES:
            raise ValueError(f"backend='triton' takes float16, bfloat16 or float32 tensors, got {q.dtype}")
        inputs = grad_inputs(q, k, v, weights, linear_state, features)
        if needs_grad(*(x for _, x in inputs)):
            # its output would carry no graph: a loss would silently lose this attention's terms
            name = next(n for n, x in inputs if x.requires_grad)
            raise ValueError(
                f"backend='triton' has no backward, but {name} requires grad: use backend='cpu' "
                "(or 'auto', which takes it for gradients), or call under torch.no_grad()"
            )
        if not q.is_cuda and not triton_interpreted():
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the interpreter)"
            )
