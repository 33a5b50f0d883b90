"""One decoding step with its routing weights on the device: the GPU hot path of
token-by-token generation, with no host synchronisation.

`kernels.decode.decode_step` (the CPU hot path) reads the route as Python floats and runs
only the experts it needs; on a GPU, reading the route back would stall the stream once per
layer. Here the weights stay a device tensor [B, 1, 3] and every step is the same fixed
sequence of launches, whatever the route:

- the softmax experts: `decode_softmax_kernel`, launched once for full attention (keys
  [0, Tk)) and once for the local expert (the sinks, then the last `window` keys). Each
  program reads its expert's weight from device memory and returns at once when it is 0, so
  a step routed to local never reads the rest of the cache, and one routed to full reads it
  once. Keys are split across programs (flash-decoding) so that a long context fills the GPU;
  the splits' partial softmaxes are merged in PyTorch (`merge_splits`, a log-sum-exp merge).
  A program serves the query heads that share one kv head (grouped-query: the cache is read
  once per kv head).
- the linear expert: its state is caught up every step (one key: an outer product) and read
  out in PyTorch; both are a few small device ops whose cost does not depend on the context,
  so they always run and the weight multiplies the read-out in (0 where unused).

Shapes change with Tk only through launch arguments (grid sizes and key counts are Python
ints known from the shapes), never through a value read from the device.

Same maths as kernels.reference and kernels.decode.decode_step (tested against them under
TRITON_INTERPRET=1 on CPU tensors). Callers are trusted (the routed model).
Never: import metaattn_viz, or know how the weights were chosen.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from metaattn_kernels.checks import triton_interpreted
from metaattn_kernels.decode import State, linear_readout, linear_state_upto
from metaattn_kernels.experts import FULL, LINEAR, LOCAL
from metaattn_kernels.feature_maps import FeatureMap
from metaattn_kernels.triton_launch import fewer_keys, launch

BLOCK_N = 64  # keys per inner step
MIN_SPLIT_KEYS = 256  # a split covers at least this many keys
TARGET_PROGRAMS = 256  # enough programs to fill a large GPU at batch 1


@triton.jit
def decode_softmax_kernel(
    Q,
    K,
    V,
    W,
    ACC,
    M,
    L,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    hkv,
    group,
    head_dim,
    n_first,
    second_start,
    n_keys,
    split_keys,
    n_splits,
    scale,
    W_INDEX: tl.constexpr,
    IEEE: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Partial softmax attention of one split of the keys for the `group` query heads of one
    kv head. The key set is keys [0, n_first) then [second_start, second_start + n_keys -
    n_first) (full: n_first = 0, second_start = 0; local: the sinks, then the window).
    Writes ACC [B, Hq, S, D] (unnormalised sum of p v), M and L [B, Hq, S] (running max and
    sum of exp); a split with no key, or whose expert weight W[b, 0, W_INDEX] is 0, writes
    M = -inf, L = 0, ACC = 0."""
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = pid_bh // hkv
    kvh = pid_bh % hkv
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    g_ok = offs_g < group
    d_ok = offs_d < head_dim
    heads = kvh * group + offs_g
    q = tl.load(
        Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    if IEEE:
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
    w = tl.load(W + b * 3 + W_INDEX)
    start = pid_s * split_keys
    end = tl.minimum(start + split_keys, n_keys)
    if w > 0:
        k_base = K + b * stride_kb + kvh * stride_kh
        v_base = V + b * stride_vb + kvh * stride_vh
        for n0 in range(start, end, BLOCK_N):
            idx = n0 + offs_n
            n_ok = idx < end
            key = tl.where(idx < n_first, idx, second_start + idx - n_first)
            kv_mask = n_ok[:, None] & d_ok[None, :]
            k_off = key[:, None] * stride_kt + offs_d[None, :] * stride_kd
            v_off = key[:, None] * stride_vt + offs_d[None, :] * stride_vd
            k = tl.load(k_base + k_off, mask=kv_mask, other=0.0)
            v = tl.load(v_base + v_off, mask=kv_mask, other=0.0)
            if IEEE:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k)) * scale
            s = tl.where(n_ok[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.exp(s - m_new[:, None])
            alpha = tl.exp(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            if IEEE:
                pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
            else:
                pv = tl.dot(p.to(v.dtype), v)
            acc = acc * alpha[:, None] + pv
            m_i = m_new
    row = (b * hkv * group + heads) * n_splits + pid_s  # [BLOCK_G] rows of M, L; ACC rows x D
    tl.store(M + row, m_i, mask=g_ok)
    tl.store(L + row, l_i, mask=g_ok)
    tl.store(ACC + row[:, None] * head_dim + offs_d[None, :], acc, mask=g_ok[:, None] & d_ok[None, :])


def plan_splits(n_keys: int, programs_per_split: int) -> tuple[int, int]:
    """(keys per split, number of splits) for `n_keys` keys when each split runs
    `programs_per_split` programs (B x Hkv): enough splits to reach about TARGET_PROGRAMS
    programs, none under MIN_SPLIT_KEYS keys, split sizes whole blocks of BLOCK_N."""
    if n_keys <= 0:
        return BLOCK_N, 1
    want = max(1, TARGET_PROGRAMS // max(1, programs_per_split))
    split = max(MIN_SPLIT_KEYS, math.ceil(n_keys / want))
    split = math.ceil(split / BLOCK_N) * BLOCK_N
    return split, math.ceil(n_keys / split)


def merge_splits(acc: torch.Tensor, m: torch.Tensor, l_sum: torch.Tensor) -> torch.Tensor:
    """The softmax attention from its splits: acc [B, Hq, S, D], m and l [B, Hq, S] ->
    [B, Hq, D] float32 (0 where no split saw a key)."""
    m_max = m.amax(-1, keepdim=True)
    m_max = torch.where(torch.isfinite(m_max), m_max, torch.zeros_like(m_max))
    r = torch.exp(m - m_max)  # 0 for empty splits (m = -inf)
    den = (l_sum * r).sum(-1, keepdim=True)
    num = (acc * r[..., None]).sum(-2)
    return num / den.clamp_min(torch.finfo(torch.float32).tiny)


def _softmax_expert(q, k, v, weights, w_index, n_first, second_start, n_keys, scale) -> torch.Tensor:
    """One softmax expert for the decode query: [B, Hq, D] float32, unweighted (0 when its
    weight is 0)."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    split, n_splits = plan_splits(n_keys, b * hkv)
    acc = q.new_empty(b, hq, n_splits, d, dtype=torch.float32)
    m = q.new_empty(b, hq, n_splits, dtype=torch.float32)
    l_sum = q.new_empty(b, hq, n_splits, dtype=torch.float32)
    ieee = q.dtype == torch.float32 or triton_interpreted()
    launch(
        decode_softmax_kernel,
        (b * hkv, n_splits),
        q,
        k,
        v,
        weights,
        acc,
        m,
        l_sum,
        q.stride(0),
        q.stride(1),
        q.stride(3),
        *k.stride(),
        *v.stride(),
        hkv,
        group,
        d,
        n_first,
        second_start,
        n_keys,
        split,
        n_splits,
        float(scale),
        W_INDEX=w_index,
        IEEE=ieee,
        # where a GPU cannot hold the tiles (a T4 at head dim 128 in float32)
        smaller=fewer_keys((b * hkv, n_splits), BLOCK_N, max(16, triton.next_power_of_2(d))),
        BLOCK_G=max(16, triton.next_power_of_2(group)),
        BLOCK_N=BLOCK_N,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
    )
    return merge_splits(acc, m, l_sum)


def decode_step_device(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    weights: torch.Tensor,
    *,
    window: int,
    n_sink: int,
    scale: float | None = None,
    state: State | None = None,
    eps: float = 1e-6,
    feature_map: FeatureMap | None = None,
) -> tuple[torch.Tensor, State]:
    """q [B, Hq, 1, D] (the query at position Tk - 1); k, v [B, Hkv, Tk, D] (views of a
    cache are fine); weights [B, 1, 3] (full, linear, local) on the device; state: the linear
    expert's (S, z, n) over keys [0, n), n <= Tk, built with `feature_map` (None: elu + 1).
    Returns (y [B, Hq, 1, D] in q's dtype, the linear state caught up to Tk)."""
    b, hq, _, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    scale = d**-0.5 if scale is None else float(scale)
    w = weights.reshape(b, 3).float().contiguous()
    lo = max(tk - window, 0)
    n_s = min(n_sink, lo)  # sinks inside the window are already in it
    full = _softmax_expert(q, k, v, w, FULL, 0, 0, tk, scale)
    local = _softmax_expert(q, k, v, w, LOCAL, n_s, lo, n_s + tk - lo, scale)
    state = linear_state_upto(state, k, v, tk, feature_map)
    lin = linear_readout(q, state[0], state[1], hkv, eps, feature_map).view(b, hq, d)
    w_lin = w[:, LINEAR].view(b, 1, 1)
    y = (
        w[:, FULL].view(b, 1, 1) * full
        + w[:, LOCAL].view(b, 1, 1) * local
        + torch.where(w_lin > 0, w_lin * lin.float(), torch.zeros_like(full))
    )
    return y.view(b, hq, 1, d).to(q.dtype), state
