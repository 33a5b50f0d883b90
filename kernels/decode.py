"""One decoding step with its route known in Python: the CPU hot path of token-by-token
generation.

A decode step has one query per layer, so on a CPU it is all per-op overhead: a
`routed_attention` call (argument checks, weight tensors, `bool(...)` syncs, masks) costs
more than the attention it computes at short contexts. Here the routing weights come as
plain floats (the routed model decides in Python, `budget.decide_one`), only the experts
with weight > 0 run, and the linear expert's state is caught up lazily:

- full: one SDPA call over the whole cache (grouped-query, no repeated K/V);
- local: the window's keys (a view of the cache) plus the sinks before it;
- linear: the state (S, z, n) summarises keys [0, n); the step first adds keys [n, Tk)
  (all of them since the last linear step, whatever their routes), then reads it.
  A step that does not route to linear never touches the state, so a context decoded
  mostly to full/local pays nothing for it.

The linear expert's feature map: elu + 1 (`feature_map=None`) or a layer's learned
FeatureMap (kernels/feature_maps.py), applied to the new keys as the state catches up and to
the query at read-out; the state has the same shape either way.

Same maths as kernels.reference (tested against it, and against routed_attention).
Callers are trusted (the routed model): shapes and values are not checked here; use
`routed_attention` for anything else.

Never: import metaattn_viz, or know how the weights were chosen.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from metaattn_kernels.experts import FULL, LINEAR, LOCAL
from metaattn_kernels.feature_maps import FeatureMap
from metaattn_kernels.reference import linear_state

State = tuple  # (S [B, Hkv, D, D] float32, z [B, Hkv, D] float32, n keys summarised)


def _phi(x: torch.Tensor) -> torch.Tensor:
    return F.elu(x).add_(1.0)


def window_keys(k: torch.Tensor, v: torch.Tensor, window: int, n_sink: int):
    """The local expert's keys and values for the query at position Tk - 1: the last
    `window` positions (a view) plus the sinks before them. Also kernels.cpu's decode step."""
    lo = max(k.shape[2] - window, 0)
    n_s = min(n_sink, lo)  # sinks inside the window are already in it
    kl, vl = k[:, :, lo:], v[:, :, lo:]
    if n_s:
        kl, vl = torch.cat([k[:, :, :n_s], kl], dim=2), torch.cat([v[:, :, :n_s], vl], dim=2)
    return kl, vl


def linear_readout(
    q: torch.Tensor,
    s: torch.Tensor,
    z: torch.Tensor,
    hkv: int,
    eps: float,
    feature_map: FeatureMap | None = None,
) -> torch.Tensor:
    """phi(q)^T S / (phi(q)^T z + eps) for one query per row: q [b, Hq, 1, D], S [b, Hkv, D, D],
    z [b, Hkv, D] -> [b, Hq, 1, D]. Also kernels.cpu's decode step."""
    b, hq, _, d = q.shape
    x = q.to(s.dtype)
    pq = (_phi(x) if feature_map is None else feature_map.query(x).to(s.dtype)).view(b, hkv, hq // hkv, d)
    o = (pq @ s) / ((pq * z[:, :, None]).sum(-1, keepdim=True) + eps)
    return o.view(q.shape)


def linear_state_upto(
    state: State | None, k: torch.Tensor, v: torch.Tensor, n: int, feature_map: FeatureMap | None = None
) -> State:
    """The linear expert's state (S, z, n) after keys [0, n) of k, v [B, Hkv, Tk, D],
    from `state` (which summarises a prefix of them; None: nothing yet), with the feature
    map the state was started with (None: elu + 1)."""
    b, hkv, _, d = k.shape
    if state is None:
        s = k.new_zeros(b, hkv, d, d, dtype=torch.float32)
        z = k.new_zeros(b, hkv, d, dtype=torch.float32)
        have = 0
    else:
        s, z, have = state
    if have > n:
        raise ValueError(f"linear state summarises {have} keys, more than the {n} asked for")
    if have < n:
        ds, dz = linear_state(k[:, :, have:n], v[:, :, have:n], feature_map)
        s, z = s + ds.float(), z + dz.float()
    return s, z, n


def decode_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: Sequence[float],
    *,
    window: int,
    n_sink: int,
    scale: float | None = None,
    state: State | None = None,
    eps: float = 1e-6,
    feature_map: FeatureMap | None = None,
) -> tuple[torch.Tensor, State | None]:
    """q [B, Hq, 1, D] (the query at position Tk - 1); k, v [B, Hkv, Tk, D]; weights: K floats
    (full, linear, local) shared by the batch; feature_map: the layer's learned map (None:
    elu + 1; it must be the one `state` was built with). Returns (y [B, Hq, 1, D], the linear
    state: caught up to Tk if the step used the linear expert, else `state` unchanged)."""
    b, hq, _, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    gqa = hq != hkv
    y = None

    def add(y, w, o):
        o = o if w == 1.0 else o * w
        return o if y is None else y + o

    if weights[FULL] > 0:
        y = add(y, weights[FULL], F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=gqa))
    if weights[LOCAL] > 0:
        kl, vl = window_keys(k, v, window, n_sink)
        y = add(y, weights[LOCAL], F.scaled_dot_product_attention(q, kl, vl, scale=scale, enable_gqa=gqa))
    if weights[LINEAR] > 0:
        state = linear_state_upto(state, k, v, tk, feature_map)
        y = add(y, weights[LINEAR], linear_readout(q, state[0], state[1], hkv, eps, feature_map).to(q.dtype))
    if y is None:
        y = torch.zeros_like(q)
    return y, state
