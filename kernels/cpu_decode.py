"""One decode step in numpy: the routed model's CPU float32 hot path.

A decode step is one query per layer: on a CPU its cost is per-op overhead, and a numpy call
costs a fraction of a torch op. `decode_step_numpy` is kernels.decode.decode_step for one
sequence of float32 CPU tensors (the same maths, in the same order of experts; float32
rounding may differ in the last bits): the tensors are read through numpy views (no copy),
the local expert scores its sinks and its window in place (no gather of the keys), and the
learned feature maps run on numpy copies of their weights.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch
import torch.nn.functional as F

from metaattn_kernels.decode import decode_step
from metaattn_kernels.experts import FULL, LINEAR, LOCAL
from metaattn_kernels.feature_maps import FeatureMap, input_scale

# FeatureMap -> ((its tensors, their _versions), numpy arrays); weak keys: a map dropped drops
# its copies. Read-only once built: safe across threads.
_NP_MAPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def numpy_feature_map(fm: FeatureMap) -> tuple[np.ndarray, np.ndarray, int]:
    """(W [Hq + Hkv, D, D/2], b [Hq + Hkv, 1, D/2], Hq): float32 numpy copies of a FeatureMap's
    query maps then key maps, one array for both (phi of a query and of keys in one matmul);
    rebuilt when a tensor is replaced or changed in place (its _version moves)."""
    ts = (fm.q_weight, fm.q_bias, fm.k_weight, fm.k_bias)
    cached = _NP_MAPS.get(fm)
    if cached is not None:
        held, versions, arrays = cached
        if (
            held[0] is ts[0]
            and held[2] is ts[2]
            and versions == (ts[0]._version, ts[1]._version, ts[2]._version, ts[3]._version)
        ):
            return arrays
    qw, qb, kw, kb = (t.detach().to("cpu", torch.float32).numpy() for t in ts)
    arrays = (
        np.ascontiguousarray(np.concatenate([qw, kw])),
        np.ascontiguousarray(np.concatenate([qb, kb])[:, None, :]),
        qw.shape[0],
    )
    _NP_MAPS[fm] = (ts, tuple(t._version for t in ts), arrays)
    return arrays


def phi_numpy(x: np.ndarray, fm: FeatureMap | None, heads: slice) -> np.ndarray:
    """kernels.feature_maps.phi_query / phi_key in numpy: x [H, m, D] float32 -> [H, m, D].
    `heads`: which of the map's heads x holds, in numpy_feature_map's order (query heads, then
    key heads): slice(0, Hq) for queries, slice(Hq, None) for keys, slice(None) for both."""
    if fm is None:  # elu + 1 as torch computes it: x > 0 ? x : expm1(x), then + 1
        out = np.expm1(np.minimum(x, np.float32(0.0)))
        np.copyto(out, x, where=x > 0.0)
        out += np.float32(1.0)
        return out
    w, b, _ = numpy_feature_map(fm)
    z = np.matmul(x * np.float32(input_scale(x.shape[-1])), w[heads])  # [H, m, D/2]
    z += b[heads]
    zz = np.empty((*z.shape[:-1], 2, z.shape[-1]), np.float32)  # softmax(z), softmax(-z)
    zz[..., 0, :] = z
    np.negative(z, out=zz[..., 1, :])
    zz -= np.maximum.reduce(zz, axis=-1, keepdims=True)  # ndarray.max / .sum without their wrappers
    np.exp(zz, out=zz)
    zz /= np.add.reduce(zz, axis=-1, keepdims=True)
    return zz.reshape(*z.shape[:-1], 2 * z.shape[-1])


def _softmax_rows(s: np.ndarray) -> np.ndarray:
    """exp(s - max) in place over the last axis; returns the row sums [..., 1]. (The ufuncs'
    reductions are what ndarray.max and .sum call, without their Python wrappers.)"""
    s -= np.maximum.reduce(s, axis=-1, keepdims=True)
    np.exp(s, out=s)
    return np.add.reduce(s, axis=-1, keepdims=True)


def decode_step_numpy(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights,
    *,
    window: int,
    n_sink: int,
    scale: float | None = None,
    state=None,
    eps: float = 1e-6,
    feature_map: FeatureMap | None = None,
    phi: tuple | None = None,
):
    """kernels.decode.decode_step for B = 1, float32 CPU tensors without autograd (else it hands
    over to decode_step): q [1, Hq, 1, D], k, v [1, Hkv, Tk, D], weights K floats. Returns
    (y [1, Hq, 1, D], the linear state (S, z, n) caught up to Tk if the step used the linear
    expert, else `state` unchanged). `phi`: (phi(q) [Hq, D], phi(k_{Tk-1}) [Hkv, D]) as numpy
    float32 arrays, the features of the query and of the last key under `feature_map`,
    where the caller has them already (else they are computed here)."""
    b, hq, _, d = q.shape
    if (
        b != 1
        or q.dtype != torch.float32
        or k.dtype != torch.float32
        or v.dtype != torch.float32
        or q.device.type != "cpu"
        or torch.is_grad_enabled()
        or (state is not None and state[0].requires_grad)
    ):
        return decode_step(
            q,
            k,
            v,
            weights,
            window=window,
            n_sink=n_sink,
            scale=scale,
            state=state,
            eps=eps,
            feature_map=feature_map,
        )
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    scale = d**-0.5 if scale is None else float(scale)
    kn, vn = k.numpy()[0], v.numpy()[0]  # [Hkv, Tk, D]: views of the cache
    qn = q.numpy()[0, :, 0]  # [Hq, D]
    y = None

    def add(y, w, o):
        if w != 1.0:
            o *= np.float32(w)
        return o if y is None else y + o

    w_full, w_lin, w_loc = weights[FULL], weights[LINEAR], weights[LOCAL]
    if w_full > 0:  # SDPA's kernel: as fast as numpy at short contexts, faster at long ones
        o = F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=g > 1)
        y = add(y, w_full, o.numpy()[0, :, 0].reshape(hkv, g, d))
    if w_loc > 0:
        qs = (qn * np.float32(scale)).reshape(hkv, g, d)
        lo = max(tk - window, 0)
        ns = min(n_sink, lo)  # sinks inside the window are already in it
        s = np.empty((hkv, g, ns + tk - lo), np.float32)  # scores: sinks, then the window
        np.matmul(qs, kn[:, lo:].transpose(0, 2, 1), out=s[..., ns:])
        if ns:
            np.matmul(qs, kn[:, :ns].transpose(0, 2, 1), out=s[..., :ns])
        den = _softmax_rows(s)
        o = np.matmul(s[..., ns:], vn[:, lo:])
        if ns:
            o += np.matmul(s[..., :ns], vn[:, :ns])
        o /= den
        y = add(y, w_loc, o)
    if w_lin > 0:
        if state is None:
            sn, zn, have = np.zeros((hkv, d, d), np.float32), np.zeros((hkv, d), np.float32), 0
        else:
            sn, zn, have = state[0].numpy()[0], state[1].numpy()[0], state[2]
        if have > tk:
            raise ValueError(f"linear state summarises {have} keys, more than the {tk} asked for")
        if have < tk:  # catch up with the keys since the state was last read
            if phi is not None and have == tk - 1:  # the last key's features are given
                pk = phi[1][:, None]
            else:
                pk = phi_numpy(kn[:, have:tk], feature_map, slice(hq, None))  # [Hkv, m, D]
            sn = sn + np.matmul(pk.transpose(0, 2, 1), vn[:, have:tk])
            zn = zn + pk.sum(axis=1)
            state = (torch.from_numpy(sn[None]), torch.from_numpy(zn[None]), tk)
        if phi is not None:
            pq = phi[0].reshape(hkv, g, d)
        else:
            pq = phi_numpy(qn[:, None], feature_map, slice(0, hq)).reshape(hkv, g, d)
        o = np.matmul(pq, sn)  # [Hkv, G, D]
        den = np.matmul(pq, zn[:, :, None])
        den += np.float32(eps)
        o /= den
        y = add(y, w_lin, o)
    if y is None:
        return torch.zeros_like(q), state
    return torch.from_numpy(y.reshape(1, hq, 1, d)), state
