"""Routed attention with Triton kernels: plan the launches, run the experts, mix.

The plan (torch, on the tensors' device): the routed rows of each expert in position
order (the per-expert permutation of kernels.rows), padded to whole blocks, and for
every row the slot of its output in each expert's buffer (-1 where the expert is not
used). Then three launches: the softmax experts (full + local, kernels.triton_softmax),
the linear expert (chunk states, their cumulative sum, routed rows;
kernels.triton_linear), and `mix_kernel`, which writes y_i = sum_e w_ie o_ie in q's
dtype, deterministically (no atomics), for hedged rows as for hard-routed ones.

With a learned feature map (kernels/feature_maps.py) the linear expert's q and k are
mapped in PyTorch before its launches (the kernels run with MAPPED, phi = identity); with
a given state only the keys from Tk - Tq on are mapped, and the linear launches see them
as a cache of Tq keys (nothing before is read). feature_map=None is elu + 1, in-kernel.

A decode step (few query rows) packs the query heads sharing a kv head into one block
(HG > 1), so each kv head's cache is read once.

No autograd (inference only: kernels.routed_attention sends gradients to the cpu path).
Never: know about routing policy, or fall back silently to another backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from metaattn_kernels.checks import triton_interpreted
from metaattn_kernels.experts import FULL, LINEAR, LOCAL
from metaattn_kernels.rows import sorted_rows
from metaattn_kernels.triton_launch import fewer_keys, launch
from metaattn_kernels.triton_linear import linear_chunk_state_kernel, routed_linear_kernel
from metaattn_kernels.triton_softmax import routed_softmax_kernel

BLOCK_M = 64  # query slots per program (rows x packed heads)
BLOCK_N = 64  # keys per inner step
LINEAR_CHUNK = 64  # keys per linear chunk (state checkpoint spacing)
PREFIX_CHUNK = 1024  # keys per partial sum when a missing state is summed from the cache


@triton.jit
def mix_kernel(
    Y,
    OS,
    OL,
    SLOT,
    W,
    stride_yb,
    stride_yh,
    stride_yt,
    stride_yd,
    stride_osb,
    stride_osh,
    stride_ost,
    stride_olb,
    stride_olh,
    stride_olt,
    batch,
    tq,
    hq,
    head_dim,
    E_LINEAR: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Y[b, h, t] = sum_e W[b, t, e] * O_e[b, h, SLOT[e, b, t]] (full and local outputs in OS,
    linear in OL)."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // hq
    h = pid_bh % hq
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < tq
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for e in tl.static_range(3):
        slot = tl.load(SLOT + (e * batch + b) * tq + t, mask=t_ok, other=-1)
        w = tl.load(W + (b * tq + t) * 3 + e, mask=t_ok, other=0.0)
        use = (slot >= 0)[:, None] & d_ok[None, :]
        if e == E_LINEAR:
            ptrs = OL + b * stride_olb + h * stride_olh + slot[:, None] * stride_olt + offs_d[None, :]
        else:
            ptrs = OS + b * stride_osb + h * stride_osh + slot[:, None] * stride_ost + offs_d[None, :]
        acc += w[:, None] * tl.load(ptrs, mask=use, other=0.0)
    tl.store(
        Y + b * stride_yb + h * stride_yh + t[:, None] * stride_yt + offs_d[None, :] * stride_yd,
        acc.to(Y.dtype.element_ty),
        mask=t_ok[:, None] & d_ok[None, :],
    )


def _next_pow2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _task_rows(active: torch.Tensor, rows_per_block: int):
    """Active rows in position order, padded to whole blocks: (rows [B, N] int32, valid [B, N], N)."""
    if not bool(active.any()):
        return None, None, 0
    sr = sorted_rows(active)
    pad = (-sr.rows.shape[1]) % rows_per_block
    rows = torch.cat([sr.rows, sr.rows[:, -1:].expand(-1, pad)], dim=1)
    valid = F.pad(sr.valid, (0, pad), value=False)
    return rows.to(torch.int32).contiguous(), valid, rows.shape[1]


def _linear_tiles_smaller(n_rows: int, n_heads: int, hg: int, block_m: int, block_d: int) -> list:
    """The linear launch's fallbacks where its tiles do not fit the GPU's shared memory even
    at one pipeline stage (a T4 at head dim 128, a 99 KiB GPU at 256: kernels/triton_launch.py),
    in the order tried: (grid, constexprs), each with half the query slots of the one before
    (not below 16, tl.dot's least) and half the output columns per program, down to 64, over
    a grid with more blocks and a third axis for the column blocks. The rows stay padded for
    the largest block, a multiple of the smaller ones."""
    plans, bm, dv = [], block_m, block_d
    while dv > 64:
        bm, dv = max(16, bm // 2), dv // 2
        plans.append(((n_rows // (bm // hg), n_heads, block_d // dv), dict(BLOCK_M=bm, BLOCK_DV=dv)))
    return plans


def _slots(rows, valid, offset, b, tq, device):
    """[B, Tq] slot of each row's output in its expert's buffer, -1 where the expert is not used."""
    slot = torch.full((b, tq + 1), -1, dtype=torch.int32, device=device)
    if rows is not None:
        task = torch.arange(rows.shape[1], dtype=torch.int32, device=device).expand(b, -1) + offset
        slot.scatter_(1, torch.where(valid, rows.long(), tq), task)  # padding lands in the spare column
    return slot[:, :tq]


def _chunk_states(k, v, start, end, chunk, block_d, ieee, mapped=False):
    """Per-chunk state contributions of keys [start, end): (KV [B, Hkv, nC, D, D],
    KZ [B, Hkv, nC, D]) float32."""
    b, hkv, _, d = k.shape
    n_ch = max(-(-(end - start) // chunk), 1)
    kv = torch.empty(b, hkv, n_ch, d, d, dtype=torch.float32, device=k.device)
    kz = torch.empty(b, hkv, n_ch, d, dtype=torch.float32, device=k.device)
    launch(
        linear_chunk_state_kernel,
        (n_ch, b * hkv),
        k,
        v,
        kv,
        kz,
        *k.stride(),
        *v.stride(),
        start,
        end,
        chunk,
        hkv,
        d,
        BLOCK_N=BLOCK_N,
        BLOCK_D=block_d,
        IEEE=ieee,
        MAPPED=mapped,
    )
    return kv, kz


def routed_attention_triton(
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
    feature_map=None,
    features=None,
):
    """Routed attention on the Triton kernels. Arguments as kernels.routed_attention."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g, p0, dev = hq // hkv, tk - tq, q.device
    scale = d**-0.5 if scale is None else float(scale)
    # float32 dots at full precision; the interpreter's bfloat16 dot is not trustworthy either
    ieee = q.dtype == torch.float32 or (q.dtype == torch.bfloat16 and triton_interpreted())
    block_d = max(16, _next_pow2(d))
    hg = min(_next_pow2(g), 16) if tq <= 16 else 1  # decode: pack a kv head's query heads together
    block_m = min(BLOCK_M, max(16, hg * _next_pow2(tq)))
    br = block_m // hg  # rows per block
    n_hg = -(-g // hg)
    active = weights > 0  # [B, Tq, 3]
    w = weights.to(torch.float32).contiguous()

    # softmax experts: full blocks first, then local blocks, in one launch
    rows_f, valid_f, n_f = _task_rows(active[..., FULL], br)
    rows_l, valid_l, n_l = _task_rows(active[..., LOCAL], br)
    n_soft = n_f + n_l
    o_soft = torch.empty(b, hq, max(n_soft, 1), d, dtype=torch.float32, device=dev)
    if n_soft:
        rows = torch.cat([r for r in (rows_f, rows_l) if r is not None], dim=1).contiguous()  # [B, NS]
        launch(
            routed_softmax_kernel,
            (n_soft // br, b * hkv * n_hg),
            q,
            k,
            v,
            o_soft,
            rows,
            *q.stride(),
            *k.stride(),
            *v.stride(),
            *o_soft.stride()[:3],
            n_soft,
            n_f // br,
            p0,
            tk,
            window,
            n_sink,
            scale,
            hkv,
            g,
            d,
            smaller=fewer_keys((n_soft // br, b * hkv * n_hg), BLOCK_N, block_d),
            HG=hg,
            BLOCK_M=block_m,
            BLOCK_N=BLOCK_N,
            BLOCK_D=block_d,
            IEEE=ieee,
        )

    # linear expert: its inputs (q, k as given, or their features), the state before each chunk, the rows
    mapped = feature_map is not None
    lq, lk, lv, lp0, ltk = q, k, v, p0, tk
    if mapped and (linear_state is not None or p0 == 0):  # keys before p0 are never read: map only the rest
        lq, lk = (feature_map.query(q), feature_map.key(k[:, :, p0:])) if features is None else features
        lv, lp0, ltk = v[:, :, p0:], 0, tq
    elif mapped:
        lq, lk = feature_map.query(q), feature_map.key(k)
    if linear_state is not None:
        s0, z0 = linear_state[0].to(torch.float32), linear_state[1].to(torch.float32)
    elif lp0 > 0:
        kv0, kz0 = _chunk_states(lk, lv, 0, lp0, PREFIX_CHUNK, block_d, ieee, mapped)
        s0, z0 = kv0.sum(2), kz0.sum(2)
    else:
        s0 = torch.zeros(b, hkv, d, d, dtype=torch.float32, device=dev)
        z0 = torch.zeros(b, hkv, d, dtype=torch.float32, device=dev)
    chunk = min(LINEAR_CHUNK, tq)
    # [B, Hkv, nC, D, D], [B, Hkv, nC, D]
    kv, kz = _chunk_states(lk, lv, lp0, ltk, chunk, block_d, ieee, mapped)
    cum_s, cum_z = kv.cumsum(2), kz.cumsum(2)
    new_state = (s0 + cum_s[:, :, -1], z0 + cum_z[:, :, -1])
    rows_n, valid_n, n_n = _task_rows(active[..., LINEAR], br)
    o_lin = torch.empty(b, hq, max(n_n, 1), d, dtype=torch.float32, device=dev)
    if n_n:
        s_before = (s0[:, :, None] + cum_s - kv).contiguous()  # [B, Hkv, nC, D, D]: state before chunk c
        z_before = (z0[:, :, None] + cum_z - kz).contiguous()
        launch(
            routed_linear_kernel,
            (n_n // br, b * hkv * n_hg, 1),
            lq,
            lk,
            lv,
            o_lin,
            rows_n,
            s_before,
            z_before,
            *lq.stride(),
            *lk.stride(),
            *lv.stride(),
            *o_lin.stride()[:3],
            n_n,
            kv.shape[2],
            lp0,
            ltk,
            chunk,
            eps,
            hkv,
            g,
            d,
            smaller=_linear_tiles_smaller(n_n, b * hkv * n_hg, hg, block_m, block_d),
            HG=hg,
            BLOCK_M=block_m,
            BLOCK_N=BLOCK_N,
            BLOCK_D=block_d,
            BLOCK_DV=block_d,
            IEEE=ieee,
            MAPPED=mapped,
        )

    slots = [None] * 3
    slots[FULL] = _slots(rows_f, valid_f, 0, b, tq, dev)
    slots[LOCAL] = _slots(rows_l, valid_l, n_f, b, tq, dev)  # local outputs follow the full ones
    slots[LINEAR] = _slots(rows_n, valid_n, 0, b, tq, dev)
    slots = torch.stack(slots).contiguous()  # [3, B, Tq]
    y = torch.empty(b, hq, tq, d, dtype=q.dtype, device=dev)
    block_t = 32
    launch(
        mix_kernel,
        (-(-tq // block_t), b * hq),
        y,
        o_soft,
        o_lin,
        slots,
        w,
        *y.stride(),
        *o_soft.stride()[:3],
        *o_lin.stride()[:3],
        b,
        tq,
        hq,
        d,
        E_LINEAR=LINEAR,
        BLOCK_T=block_t,
        BLOCK_D=block_d,
    )
    return y, new_state
