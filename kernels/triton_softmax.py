"""Triton kernel of the softmax experts (full and local) over routed query blocks.

One launch covers both experts. The routed rows of each expert, in position order (the
permutation kernels.rows builds), are cut into blocks; the first `n_full_blocks` blocks
are full-attention rows, the rest local rows. A block reads only the key blocks some
row of it needs: [0, last position] for full, [first position - window + 1, last
position] plus the sink blocks for local; every other key block is skipped. Online
softmax (flash attention) over those key blocks, float32 accumulation.

Heads: a program serves HG query heads of one kv head (HG = 1 for prefill; for a decode
step the G heads sharing a kv head are packed into the rows of one block so the cache
is read once per kv head). K/V are never repeated in memory.

IEEE: float32 dots at full precision (float32 inputs; also bfloat16 under the
interpreter, whose bfloat16 dot is not trustworthy). Otherwise half-precision dots.

Output: the expert output of every task row, unweighted, float32, [B, Hq, n_tasks, D];
kernels.triton_routed mixes them. Runs under TRITON_INTERPRET=1 on CPU tensors.
Never: know about routing policy, or read keys a row's route does not see.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _softmax_key_block(
    acc,
    m_i,
    l_i,
    q,
    k_ptrs,
    v_ptrs,
    start,
    qpos,
    win,
    n_sink,
    tk,
    scale,
    offs_n,
    d_ok,
    stride_kt,
    stride_vt,
    IEEE: tl.constexpr,
):
    """Fold keys [start, start + BLOCK_N) into the running softmax of the block's rows."""
    n = start + offs_n  # [BLOCK_N]
    n_ok = n < tk
    k = tl.load(k_ptrs + n[None, :] * stride_kt, mask=d_ok[:, None] & n_ok[None, :], other=0.0)  # [BD, BN]
    if IEEE:
        s = tl.dot(q, k.to(tl.float32), input_precision="ieee") * scale  # [BM, BN]
    else:
        s = tl.dot(q, k) * scale
    qp = qpos[:, None]
    allowed = (n[None, :] <= qp) & ((n[None, :] > qp - win) | (n[None, :] < n_sink)) & n_ok[None, :]
    s = tl.where(allowed, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
    alpha = tl.exp(m_i - m_safe)
    p = tl.exp(s - m_safe[:, None])
    v = tl.load(v_ptrs + n[:, None] * stride_vt, mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BN, BD]
    if IEEE:
        pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, m_new, l_i


@triton.jit
def routed_softmax_kernel(
    Q,
    K,
    V,
    Out,
    ROWS,
    stride_qb,
    stride_qh,
    stride_qt,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    stride_ob,
    stride_oh,
    stride_ot,
    n_tasks,
    n_full_blocks,
    p0,
    tk,
    window,
    n_sink,
    scale,
    hkv,
    groups,
    head_dim,
    HG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    BR: tl.constexpr = BLOCK_M // HG  # rows per block
    pid_blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_hg = (groups + HG - 1) // HG
    b = pid_bh // (hkv * n_hg)
    kvh = (pid_bh // n_hg) % hkv
    hg = pid_bh % n_hg

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    gh = hg * HG + offs_m % HG  # head within the kv group
    head_ok = gh < groups
    head = kvh * groups + gh  # [BM]
    task = pid_blk * BR + offs_m // HG  # [BM] index into this batch row's task list
    row = tl.load(ROWS + b * n_tasks + task)  # padding repeats real rows: every slot is a real row
    qpos = p0 + row

    is_local = pid_blk >= n_full_blocks
    p_first = tl.min(qpos, 0)
    p_last = tl.max(qpos, 0)
    win = tl.where(is_local, window, tk + 1)
    sinks = tl.where(is_local, n_sink, 0)
    lo = tl.where(is_local, tl.maximum(p_first - window + 1, 0), 0)
    lo = (lo // BLOCK_N) * BLOCK_N  # block-aligned: the sink blocks below never overlap the band

    q_ptrs = (
        Q + b * stride_qb + head[:, None] * stride_qh + row[:, None] * stride_qt + offs_d[None, :] * stride_qd
    )
    q = tl.load(q_ptrs, mask=head_ok[:, None] & d_ok[None, :], other=0.0)  # [BM, BD]
    if IEEE:
        q = q.to(tl.float32)
    k_ptrs = K + b * stride_kb + kvh * stride_kh + offs_d[:, None] * stride_kd  # + key offsets per block
    v_ptrs = V + b * stride_vb + kvh * stride_vh + offs_d[None, :] * stride_vd

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, tl.minimum(sinks, lo), BLOCK_N):  # sink blocks (local only)
        acc, m_i, l_i = _softmax_key_block(
            acc,
            m_i,
            l_i,
            q,
            k_ptrs,
            v_ptrs,
            start,
            qpos,
            win,
            sinks,
            tk,
            scale,
            offs_n,
            d_ok,
            stride_kt,
            stride_vt,
            IEEE,
        )
    for start in range(lo, p_last + 1, BLOCK_N):  # the band the block's rows see
        acc, m_i, l_i = _softmax_key_block(
            acc,
            m_i,
            l_i,
            q,
            k_ptrs,
            v_ptrs,
            start,
            qpos,
            win,
            sinks,
            tk,
            scale,
            offs_n,
            d_ok,
            stride_kt,
            stride_vt,
            IEEE,
        )
    o = acc / l_i[:, None]
    o_ptrs = Out + b * stride_ob + head[:, None] * stride_oh + task[:, None] * stride_ot + offs_d[None, :]
    tl.store(o_ptrs, o, mask=head_ok[:, None] & d_ok[None, :])
