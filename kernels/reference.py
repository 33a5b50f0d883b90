"""PyTorch reference twins of the three attention experts and of routed attention.

These functions are the specification every fast path (kernels/cpu.py, the Triton
kernels) is tested against: they are written to be read, not to be fast. Each expert
is computed densely for every query row, with explicit masks and repeated K/V heads.

The linear expert's feature map is elu + 1 (`feature_map=None`) or a learned per-head
map (`feature_map=FeatureMap`, kernels/feature_maps.py), applied to q and k before the
linear expert's sums; the softmax experts never see it.

Layout (KV-cache convention): q [B, Hq, Tq, D]; k, v [B, Hkv, Tk, D], Tk >= Tq. Query
row i sits at absolute position Tk - Tq + i, key j at position j.

Never: import anything from metaattn_viz, know about routing policy (controllers,
Dirichlets, budgets), or take a shortcut that a fast path could share a bug with.
"""

from __future__ import annotations

import torch

from metaattn_kernels.experts import FULL, LINEAR, LOCAL
from metaattn_kernels.feature_maps import FeatureMap, elu_plus_one, phi_key, phi_query


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32 for half types, float64 stays float64."""
    return torch.promote_types(dtype, torch.float32)


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1, the default feature map of the linear expert (kernels/feature_maps.py)."""
    return elu_plus_one(x)


def query_positions(tq: int, tk: int, device=None) -> torch.Tensor:
    """Absolute positions of the Tq query rows in a cache of Tk keys."""
    return torch.arange(tk - tq, tk, device=device)  # [Tq]


def _repeat_kv(x: torch.Tensor, hq: int) -> torch.Tensor:
    return x.repeat_interleave(hq // x.shape[1], dim=1)  # [B, Hq, Tk, D]


def _masked_softmax_attention(q, k, v, allowed, scale):
    ct = compute_dtype(q.dtype)
    k, v = _repeat_kv(k, q.shape[1]).to(ct), _repeat_kv(v, q.shape[1]).to(ct)
    scores = (q.to(ct) @ k.transpose(-1, -2)) * scale  # [B, Hq, Tq, Tk]
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v).to(q.dtype)  # [B, Hq, Tq, D]


def full_attention(q, k, v, scale: float | None = None) -> torch.Tensor:
    """Causal softmax attention over all keys j <= p_i."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tq, tk = q.shape[2], k.shape[2]
    qpos = query_positions(tq, tk, q.device)[:, None]  # [Tq, 1]
    kpos = torch.arange(tk, device=q.device)[None, :]  # [1, Tk]
    return _masked_softmax_attention(q, k, v, kpos <= qpos, scale)


def local_attention(q, k, v, window: int, n_sink: int, scale: float | None = None) -> torch.Tensor:
    """Sliding-window softmax attention: keys in [p_i - window + 1, p_i] plus the first n_sink keys."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    tq, tk = q.shape[2], k.shape[2]
    qpos = query_positions(tq, tk, q.device)[:, None]  # [Tq, 1]
    kpos = torch.arange(tk, device=q.device)[None, :]  # [1, Tk]
    allowed = (kpos <= qpos) & ((kpos > qpos - window) | (kpos < n_sink))  # [Tq, Tk]
    return _masked_softmax_attention(q, k, v, allowed, scale)


def linear_state(
    k: torch.Tensor, v: torch.Tensor, fm: FeatureMap | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Recurrent state summarising the given keys: S = sum phi(k) v^T [B, Hkv, D, D],
    z = sum phi(k) [B, Hkv, D]; phi = elu + 1, or the learned map `fm`."""
    ct = compute_dtype(k.dtype)
    pk = phi_key(fm, k.to(ct))  # [B, Hkv, T, D]
    return pk.transpose(-1, -2) @ v.to(ct), pk.sum(dim=2)


def _initial_state(k, v, tq, state, fm=None):
    """The state of all keys before the first query (given, or summed from the cache)."""
    if state is not None:
        ct = compute_dtype(k.dtype)
        return state[0].to(ct), state[1].to(ct)
    p0 = k.shape[2] - tq
    return linear_state(k[:, :, :p0], v[:, :, :p0], fm)


def linear_attention(q, k, v, state=None, eps: float = 1e-6, feature_map: FeatureMap | None = None):
    """Causal linear attention, parallel (quadratic) form.

    Keys before the first query come from `state` when given (then k, v before
    position Tk - Tq are not read), else from k, v. Returns (o [B, Hq, Tq, D],
    (S, z) after all Tk keys). feature_map: None (elu + 1) or a layer's learned FeatureMap.
    """
    fm = feature_map
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    ct = compute_dtype(q.dtype)
    s0, z0 = _initial_state(k, v, tq, state, fm)  # [B, Hkv, D, D], [B, Hkv, D]
    kn, vn = k[:, :, tk - tq :].to(ct), v[:, :, tk - tq :].to(ct)  # the keys of the query rows
    pq = phi_query(fm, q.to(ct))  # [B, Hq, Tq, D]
    pk = _repeat_kv(phi_key(fm, kn), hq)  # [B, Hq, Tq, D]
    causal = torch.ones(tq, tq, dtype=torch.bool, device=q.device).tril()
    a = (pq @ pk.transpose(-1, -2)).masked_fill(~causal, 0.0)  # [B, Hq, Tq, Tq]
    num = a @ _repeat_kv(vn, hq) + pq @ _repeat_kv(s0, hq)  # [B, Hq, Tq, D]
    den = a.sum(-1) + (pq * _repeat_kv(z0[:, :, None, :], hq)).sum(-1)  # [B, Hq, Tq]
    o = num / (den[..., None] + eps)
    s1, z1 = linear_state(kn, vn, fm)
    return o.to(q.dtype), ((s0 + s1).float(), (z0 + z1).float())


def linear_attention_recurrent(q, k, v, state=None, eps: float = 1e-6, feature_map: FeatureMap | None = None):
    """Causal linear attention, recurrent form: one state update per key, step by step.

    Same contract as `linear_attention`; this is how a decoder sees it.
    """
    fm = feature_map
    b, hq, tq, d = q.shape
    tk = k.shape[2]
    ct = compute_dtype(q.dtype)
    s, z = _initial_state(k, v, tq, state, fm)
    outs = []
    for i in range(tq):
        j = tk - tq + i
        pk = phi_key(fm, k[:, :, j, None].to(ct))[:, :, 0]  # [B, Hkv, D]
        s = s + pk[..., :, None] * v[:, :, j, None, :].to(ct)  # [B, Hkv, D, D]
        z = z + pk
        pq = phi_query(fm, q[:, :, i, None].to(ct))[:, :, 0]  # [B, Hq, D]
        num = (pq[..., None, :] @ _repeat_kv(s, hq)).squeeze(-2)  # [B, Hq, D]
        den = (pq * _repeat_kv(z[:, :, None, :], hq).squeeze(2)).sum(-1)  # [B, Hq]
        outs.append(num / (den[..., None] + eps))
    o = torch.stack(outs, dim=2) if outs else q.new_zeros(q.shape, dtype=ct)
    return o.to(q.dtype), (s.float(), z.float())


def routed_attention_reference(
    q,
    k,
    v,
    weights,
    *,
    window: int,
    n_sink: int,
    scale: float | None = None,
    linear_state=None,
    eps: float = 1e-6,
    feature_map: FeatureMap | None = None,
):
    """Every expert computed densely for every row, then mixed: y_i = sum_e weights[i, e] o_i^(e)."""
    o_full = full_attention(q, k, v, scale)
    o_local = local_attention(q, k, v, window, n_sink, scale)
    o_lin, new_state = linear_attention(q, k, v, linear_state, eps, feature_map)
    ct = compute_dtype(q.dtype)
    w = weights.to(ct).transpose(1, 2)[..., None]  # [B, 3, Tq, 1], broadcast over heads
    y = (
        w[:, None, FULL] * o_full.to(ct)
        + w[:, None, LINEAR] * o_lin.to(ct)
        + w[:, None, LOCAL] * o_local.to(ct)
    )  # [B, Hq, Tq, D]
    return y.to(q.dtype), new_state
