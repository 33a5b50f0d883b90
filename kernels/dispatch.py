"""Routed attention: one dispatch API over the experts' kernels.

`routed_attention(q, k, v, weights, ...)` mixes three causal attention experts per
token (full, linear, local; ids FULL, LINEAR, LOCAL) and runs each only on the rows
routed to it. Backends: "reference" (dense PyTorch twins, the specification),
"cpu" (fast PyTorch path, also the autograd path on any device), "triton" (CUDA, or
the Triton interpreter when TRITON_INTERPRET=1; inference only: it refuses inputs that
require grad), "auto" (triton for CUDA tensors of a dtype it takes that need no gradient,
cpu otherwise). Triton is imported lazily, only when used.

`kernels.decode.decode_step` is the CPU hot path of token-by-token generation for trusted
callers (the routed model): routes as plain floats, no argument checks, a lazily
caught-up linear state.

The linear expert's feature map is one argument everywhere: `feature_map=None` is
elu + 1 (bit-identical to before it existed), a `FeatureMap` (kernels/feature_maps.py)
is one layer's learned Hedgehog map, used the same way by every backend and by
`decode_step`.

Never: import metaattn_viz, or know how the routing weights were chosen (no
controllers, Dirichlets, budgets here).
"""

from __future__ import annotations

import torch

from metaattn_kernels.checks import TRITON_DTYPES, check_routed_attention_args, grad_inputs, needs_grad
from metaattn_kernels.experts import EXPERTS, FULL, LINEAR, LOCAL
from metaattn_kernels.feature_maps import FeatureMap
from metaattn_kernels.flops import attention_flops

__all__ = [
    "FULL",
    "LINEAR",
    "LOCAL",
    "EXPERTS",
    "routed_attention",
    "routes_to_weights",
    "attention_flops",
    "resolve_backend",
    "FeatureMap",
]


def resolve_backend(backend: str, *tensors: torch.Tensor) -> str:
    """The backend "auto" stands for with these tensors (q first, then every input a gradient
    may flow to); other names are returned as given. Triton only where it can serve the call
    in full: q on CUDA in a dtype its kernels take (float64 would be refused) and no tensor
    needing a gradient (they have no backward); the cpu path otherwise."""
    if backend != "auto":
        return backend
    if tensors[0].is_cuda and tensors[0].dtype in TRITON_DTYPES and not needs_grad(*tensors):
        return "triton"
    return "cpu"


def routed_attention(
    q,
    k,
    v,
    weights,
    *,
    window: int,
    n_sink: int,
    scale: float | None = None,
    linear_state=None,
    backend: str = "auto",
    eps: float = 1e-6,
    feature_map: FeatureMap | None = None,
    features: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """Per-token mixture of the full, linear and local attention experts.

    q: [B, Hq, Tq, D]; k, v: [B, Hkv, Tk, D], Tk >= Tq, Hq % Hkv == 0 (grouped-query).
    Query i sits at absolute position Tk - Tq + i, key j at position j (KV-cache layout).
    weights: [B, Tq, 3] non-negative mixing weights over (full, linear, local), shared by
    all heads; an expert is computed only for rows where its weight is > 0.
    Experts (causal): full = softmax(scale q k^T) over keys j <= p_i; local = softmax
    over j in [p_i - window + 1, p_i] plus the first n_sink keys; linear = phi(q)^T S_i /
    (phi(q)^T z_i + eps), S_i, z_i summing phi(k_j) v_j^T, phi(k_j) over j <= p_i; phi = elu + 1
    when feature_map is None, else the layer's learned map (feature_map.query for q, .key for k).
    linear_state: None or (S [B, Hkv, D, D], z [B, Hkv, D]) float32 summarising the keys
    before position Tk - Tq (None: summed from k, v).
    features: with a feature_map, (feature_map.query(q), feature_map.key(k[:, :, Tk - Tq:]))
    where the caller has computed them already (the routed model's controllers map the same
    q and keys for their attention signals), read instead of mapping again by the cpu
    backend, and by triton unless it must map keys before Tk - Tq too (no linear_state with
    Tk > Tq); the reference maps q and k itself.
    Returns (y [B, Hq, Tq, D] in q's dtype, (S, z) float32 after all Tk keys).
    Bad arguments raise ValueError naming the argument; so does backend="triton" when an input
    requires grad (its kernels have no backward; "auto" takes the cpu path then).
    """
    check_routed_attention_args(
        q, k, v, weights, window, n_sink, scale, linear_state, backend, eps, feature_map, features
    )
    args = dict(window=window, n_sink=n_sink, scale=scale, linear_state=linear_state, eps=eps)
    if feature_map is not None:  # None adds no keyword: the elu + 1 calls stay exactly as they were
        args["feature_map"] = feature_map
    backend = resolve_backend(backend, *(x for _, x in grad_inputs(q, k, v, weights, linear_state, features)))
    if backend == "reference":
        from metaattn_kernels.reference import routed_attention_reference

        return routed_attention_reference(q, k, v, weights, **args)
    if backend == "cpu":
        from metaattn_kernels.cpu import routed_attention_cpu

        if features is not None:
            args["features"] = features
        return routed_attention_cpu(q, k, v, weights, **args)
    if q.dtype == torch.float64:
        raise ValueError("backend='triton' takes float16, bfloat16 or float32 tensors, got torch.float64")
    from metaattn_kernels.triton_routed import routed_attention_triton

    if features is not None:
        args["features"] = features
    return routed_attention_triton(q, k, v, weights, **args)


def routes_to_weights(routes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Hard routes [B, T] of expert ids -> one-hot weights [B, T, 3]; unknown ids raise ValueError."""
    if not isinstance(routes, torch.Tensor) or routes.dtype.is_floating_point or routes.dtype == torch.bool:
        raise ValueError("routes must be an integer tensor of expert ids")
    if routes.numel() and (int(routes.min()) < 0 or int(routes.max()) >= len(EXPERTS)):
        raise ValueError(
            f"routes must hold expert ids in 0..{len(EXPERTS) - 1} {EXPERTS}, "
            f"got values in [{int(routes.min())}, {int(routes.max())}]"
        )
    return torch.nn.functional.one_hot(routes.long(), len(EXPERTS)).to(dtype)
