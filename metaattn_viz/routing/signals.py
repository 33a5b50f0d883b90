"""The controllers' attention signals (docs/method.md, "Controller"): what a layer's
controller may read of that layer's own attention inputs, the "attention" feature group of
``controller.ControllerStack.features``. Per query head ln(||q_t|| / sqrt(d)) and the far-mass
feature, per kv head ln(||k_t|| / sqrt(d)); the far mass is the linear read-out's estimate of
the share of the attention weight that lies beyond the local window and its sinks (what
going local would lose), from running sums of the linear expert's key features carried per
layer across decode steps (``SignalState``).

Two implementations of the same maths: ``attention_signals`` (torch, any batch, block of
queries, device or dtype) and ``signals_one`` (numpy, one decode token on CPU float32, in
place: the decode hot path). Never imports gradio, the kernels at module load, or the store.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

FAR_MASS_FLOOR = 1e-4  # far-mass feature: ln(share + floor) / ln(1 / floor), in [-1, ~0]


@dataclass
class AttentionView:
    """What a layer's controller may read of that layer's attention inputs: q [B, Hq, Tq, D]
    and k [B, Hkv, Tk, D] (post-RoPE, cache included: the queries are the last Tq
    positions), the linear expert's feature map (None: elu + 1), the local window and sinks,
    and the session's ``SignalState`` that carries the running sums across decode steps."""

    q: torch.Tensor
    k: torch.Tensor
    feature_map: Any
    window: int
    n_sink: int
    state: SignalState


class SignalState:
    """Per session and layer: (z_all [B, Hkv, F], z_far [B, Hkv, F], n), the sums of the
    linear expert's key features over keys [0, n) and over the far keys [n_sink, n - window)
    of the last query seen (position n - 1), and the feature map they were summed with
    (after a numpy step, ``signals_one``, also the array [2, Hkv, F] both sums are views of).
    ``phi``: per layer, what the last one-token decode step computed on the way (numpy,
    ``signals_one``): (n, feature map, phi(q) [Hq, F], phi(k_{n-1}) [Hkv, F]), which the
    linear expert of the same step may reuse instead of mapping q and the key again; the
    arrays are views of ``buffers``, which the next layer's step overwrites: read them only
    within the same layer's step.
    ``mapped``: per layer, what ``attention_signals`` computed on the way under a learned map:
    (q, k, feature map, phi(q) [B, Hq, Tq, F], phi(k) [B, Hkv, Tq, F] of the keys from
    Tk - Tq), which the linear expert of the same call may take instead of mapping q and the
    keys again (``take_mapped``)."""

    def __init__(self, n_layers: int):
        self.sums: list[tuple | None] = [None] * n_layers
        self.phi: list[tuple | None] = [None] * n_layers
        self.mapped: list[tuple | None] = [None] * n_layers
        self.buffers: _SignalBuffers | None = None  # signals_one's working arrays


def attention_signals(view: AttentionView, layer: int) -> torch.Tensor:
    """The "attention" feature group for the queries of `view`: [B, Tq, 2 Hq + Hkv] float32,
    [ln(||q|| / sqrt(d)) per query head, far-mass per query head, ln(||k|| / sqrt(d)) per kv head].

    far mass of the query at t: phi(q_t) . sum_{n_sink <= s <= t - w} phi(k_s) over
    phi(q_t) . sum_{s <= t} phi(k_s), the linear expert's estimate of the share of the
    attention weight that falls outside the local window [t - w + 1, t] and the sinks; phi is
    the linear expert's map. The sums continue from ``view.state`` when it stops at the
    first query's position (a decode step adds two keys' features), else start from key 0;
    either way the numbers are the same (a tested property)."""
    from metaattn_kernels.feature_maps import phi_key, phi_query

    q, k, w, ns = view.q.detach(), view.k.detach(), view.window, view.n_sink
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    off = tk - tq
    held = view.state.sums[layer]
    if held is not None and held[2] == off and held[3] is view.feature_map and held[0].shape[0] == b:
        z_all, z_far, n = held[0], held[1], off
    else:
        z_all = z_far = None
        n = 0
    f32 = torch.float32
    pk_new = phi_key(view.feature_map, k[:, :, n:tk].to(f32))  # keys [n, tk)
    c_all = pk_new.cumsum(2)[:, :, off - n :]  # [B, Hkv, Tq, F] sums over [n, t]
    if z_all is not None:
        c_all = c_all + z_all[:, :, None]
    a, e = max(ns, n - w), tk - w  # far keys that join: [a, e)
    far = torch.zeros_like(c_all) if z_far is None else z_far[:, :, None].expand_as(c_all).clone()
    if e > a:  # (plain integers: no value is read back from the device)
        # [B, Hkv, e - a, F]: the far keys' features are among the new keys' unless some came before n
        pk_far = (
            pk_new[:, :, a - n : e - n] if a >= n else phi_key(view.feature_map, k[:, :, a:e].to(f32))
        ).cumsum(2)
        first = max(off, a + w)  # the first query with a new far key; query t's last is t - w
        far[:, :, first - off :] += pk_far[:, :, first - w - a : tk - w - a]
    view.state.sums[layer] = (c_all[:, :, -1].clone(), far[:, :, -1].clone(), tk, view.feature_map)
    pq = phi_query(view.feature_map, q.to(f32))  # [B, Hq, Tq, F]
    if view.feature_map is not None and tq > 1:  # for the linear expert of this call (take_mapped)
        view.state.mapped[layer] = (view.q, view.k, view.feature_map, pq, pk_new[:, :, off - n :])
    rep = hq // hkv
    m_all = (pq * c_all.repeat_interleave(rep, 1)).sum(-1)  # [B, Hq, Tq]
    m_far = (pq * far.repeat_interleave(rep, 1)).sum(-1)
    share = (m_far / m_all.clamp_min(1e-30)).clamp(0.0, 1.0)
    far_mass = torch.log(share + FAR_MASS_FLOOR) / math.log(1.0 / FAR_MASS_FLOOR)
    half_log_d = 0.5 * math.log(d)
    qn = torch.log(q.float().norm(dim=-1).clamp_min(1e-12)) - half_log_d  # [B, Hq, Tq]
    kn = torch.log(k[:, :, off:].float().norm(dim=-1).clamp_min(1e-12)) - half_log_d  # [B, Hkv, Tq]
    return torch.cat([qn, far_mass, kn], dim=1).transpose(1, 2)  # [B, Tq, 2 Hq + Hkv]


def take_mapped(state: SignalState, layer: int, q: torch.Tensor, k: torch.Tensor, feature_map):
    """(phi(q), phi(k) of the keys from Tk - Tq) that ``attention_signals`` left for this
    layer, when they are of these very q and k under this map (and neither needs gradients:
    the signals read q and k detached), else None; either way the layer's slot is emptied
    (the features of a long prefill are large)."""
    held, state.mapped[layer] = state.mapped[layer], None
    if held is None or held[0] is not q or held[1] is not k or held[2] is not feature_map:
        return None
    if q.requires_grad or k.requires_grad:
        return None
    return held[3], held[4]


# signals_one's float32 constants, made once (a numpy scalar costs a call)
_LOG_INV_FLOOR = np.float32(math.log(1.0 / FAR_MASS_FLOOR))
_FLOOR, _ONE, _TINY, _NORM_MIN = (np.float32(v) for v in (FAR_MASS_FLOOR, 1.0, 1e-30, 1e-12))
_phi_numpy = None  # metaattn_kernels.cpu_decode.phi_numpy and numpy_feature_map, imported on first use
_numpy_map = None


class _SignalBuffers:
    """``signals_one``'s working arrays for one shape (Hq, Hkv, D), made once per session
    and reused by every layer and token: on a CPU a decode step costs per numpy call, so the
    step writes into these in place rather than building new arrays."""

    def __init__(self, hq: int, hkv: int, d: int):
        self.x = np.empty((hq + hkv, 2, d), np.float32)  # q per head (twice), k_t and k_j per kv head
        self.x0 = self.x[:, 0]  # the rows whose norms are features
        self.xs = np.empty_like(self.x)  # x * D^-1/4 (learned maps)
        self.zz = np.empty((hq + hkv, 2, 2, d // 2), np.float32)  # softmax(z), softmax(-z)
        self.zz0, self.zz1 = self.zz[:, :, 0], self.zz[:, :, 1]
        self.phi = self.zz.reshape(hq + hkv, 2, d)
        # the features in the order they are computed: squared norms (q heads, then kv
        # heads), then the far-mass shares (the last step writes them in the order of
        # ``attention_signals``)
        self.t = np.empty(2 * hq + hkv, np.float32)
        self.norms, self.share = self.t[: hq + hkv], self.t[hq + hkv :]
        self.qn, self.kn = self.norms[:hq], self.norms[hq:]
        self.half_log_d = np.float32(0.5 * math.log(d))
        self.scale = np.float32(d**-0.25)  # feature_maps.input_scale


def signals_one(view: AttentionView, layer: int, out: np.ndarray) -> bool:
    """``attention_signals`` of one decode step in numpy, written into `out` [2 Hq + Hkv]
    (float32), continuing the running sums of ``view.state`` and leaving them as the torch
    path does (same maths; float32 rounding may differ in the last bits). The query's and the
    two new keys' features (the token's key, and the key that leaves the window for the far
    keys) come from one matmul; the sums are added to in place, in a buffer of the layer's
    that the tensors in ``view.state.sums`` are views of (made at the first such step from
    the sums the torch path left). False (nothing done) where the step is not one the sums
    continue to: a batch, a query block, another dtype or device, autograd, or sums that
    stop elsewhere (the caller then takes the torch path, which starts over from key 0)."""
    global _phi_numpy, _numpy_map
    q, k = view.q, view.k
    b, hq, tq, d = q.shape
    if (
        b != 1
        or tq != 1
        or q.dtype != torch.float32
        or k.dtype != torch.float32
        or q.device.type != "cpu"
        or q.requires_grad
        or k.requires_grad
    ):
        return False
    hkv, tk = k.shape[1], k.shape[2]
    off = tk - 1
    state = view.state
    held = state.sums[layer]
    fm = view.feature_map
    if held is None or held[2] != off or held[3] is not fm or held[0].shape[0] != 1:
        return False
    if _phi_numpy is None:
        from metaattn_kernels.cpu_decode import numpy_feature_map, phi_numpy

        _phi_numpy, _numpy_map = phi_numpy, numpy_feature_map
    buf = state.buffers
    if buf is None or buf.x.shape != (hq + hkv, 2, d):
        buf = state.buffers = _SignalBuffers(hq, hkv, d)
    kn = k.numpy()[0]  # [Hkv, Tk, D]: a view of the cache, no copy
    j = off - view.window  # the key that joins the far keys [n_sink, t - w] of query t = off
    far_key = j >= view.n_sink
    # rows: the query heads (q twice: the second row is not read), then the kv heads (the
    # new key, and the key that turns far, or the new key again where none does)
    x = buf.x
    x[:hq] = q.numpy()[0]  # [Hq, 1, D], broadcast
    x[hq:, 0] = kn[:, off]
    x[hq:, 1] = kn[:, j if far_key else off]
    if fm is None:
        phi = _phi_numpy(x, None, slice(None))  # [Hq + Hkv, 2, F]
    else:  # phi_numpy's learned map, on the buffers: softmax(z) and softmax(-z), z = x' W + b
        w, bias, _ = _numpy_map(fm)
        np.multiply(x, buf.scale, out=buf.xs)
        zz = buf.zz
        np.add(np.matmul(buf.xs, w), bias, out=buf.zz0)
        np.negative(buf.zz0, out=buf.zz1)
        np.subtract(zz, np.maximum.reduce(zz, axis=-1, keepdims=True), out=zz)
        np.exp(zz, out=zz)
        np.divide(zz, np.add.reduce(zz, axis=-1, keepdims=True), out=zz)
        phi = buf.phi
    # the sums over all keys and the far keys [2, Hkv, F], added to in place
    z = held[4] if len(held) > 4 else None
    if z is None:  # sums the torch path left: copied into a buffer of this layer's
        z = np.concatenate([held[0].numpy(), held[1].numpy()])
        zt = torch.from_numpy(z)
        held = (zt[0:1], zt[1:2])
    if far_key:
        np.add(z, phi[hq:].transpose(1, 0, 2), out=z)
    else:
        np.add(z[0], phi[hq:, 0], out=z[0])
    state.sums[layer] = (held[0], held[1], tk, fm, z)
    state.phi[layer] = (tk, fm, phi[:hq, 0], phi[hq:, 0])
    m = np.matmul(phi[:hq, 0].reshape(hkv, hq // hkv, -1), z.transpose(1, 2, 0)).reshape(hq, 2)
    norms, share = buf.norms, buf.share
    np.einsum("hd,hd->h", buf.x0, buf.x0, out=norms)  # squared norms of q per head, then of k_t
    np.sqrt(norms, out=norms)
    # far mass share (>= 0: features are positive) -> ln(min(share, 1) + floor) / ln(1 / floor)
    np.maximum(m[:, 0], _TINY, out=share)
    np.divide(m[:, 1], share, out=share)
    np.minimum(share, _ONE, out=share)
    np.add(share, _FLOOR, out=share)
    t = buf.t
    np.maximum(t, _NORM_MIN, out=t)  # the norms' floor (the shares are >= the floor)
    np.log(t, out=t)
    np.subtract(buf.qn, buf.half_log_d, out=out[:hq])  # ln(||.|| / sqrt(d))
    np.divide(share, _LOG_INV_FLOOR, out=out[hq : 2 * hq])
    np.subtract(buf.kn, buf.half_log_d, out=out[2 * hq :])
    return True
