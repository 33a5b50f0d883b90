"""Triton kernels of the linear expert (phi = elu + 1, or pre-mapped features), in chunked form.

MAPPED (constexpr): Q and K already hold features (a learned FeatureMap, applied in
PyTorch by kernels.triton_routed before the launch: per-head matmuls and softmaxes that
cuBLAS does well and that would only complicate these kernels); phi is then the identity.
Without it, elu + 1 is applied here, as before.

- `linear_chunk_state_kernel`: the state contribution of each chunk of keys,
  phi(K_c)^T V_c [D, D] and sum phi(K_c) [D], all chunks in parallel. A cumulative sum
  over chunks (kernels.triton_routed) then gives the state before every chunk and the
  final state a decoder carries; every key updates it, whatever its route.
- `routed_linear_kernel`: the routed linear rows, in position order, in blocks. A block
  starts from the state before the chunk of its first row and adds its band of keys
  [chunk start, last position] quadratically (intra-chunk part); nothing else is read.
  A decode step thus reads the state and the one new key.

Heads are handled as in kernels.triton_softmax (HG query heads of one kv head per
program; packed for decode). Float32 accumulation; outputs float32, unweighted.
Runs under TRITON_INTERPRET=1 on CPU tensors.
Never: know about routing policy.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _phi(x):
    """elu(x) + 1."""
    return tl.where(x > 0, x + 1.0, tl.exp(tl.minimum(x, 0.0)))


@triton.jit
def _features(x, MAPPED: tl.constexpr):
    """phi(x): the identity for pre-mapped features, else elu + 1."""
    if MAPPED:
        return x
    else:
        return _phi(x)


@triton.jit
def linear_chunk_state_kernel(
    K,
    V,
    KV,
    KZ,
    stride_kb,
    stride_kh,
    stride_kt,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vt,
    stride_vd,
    start0,
    end0,
    chunk,
    hkv,
    head_dim,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IEEE: tl.constexpr,
    MAPPED: tl.constexpr,
):
    """KV[b, h, c] = sum over keys j in chunk c of [start0, end0) of phi(k_j) v_j^T; KZ of phi(k_j)."""
    pid_c = tl.program_id(0)
    pid_bh = tl.program_id(1)
    n_chunks = tl.num_programs(0)
    b = pid_bh // hkv
    h = pid_bh % hkv
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    lo = start0 + pid_c * chunk
    hi = tl.minimum(lo + chunk, end0)
    s = tl.zeros([BLOCK_D, BLOCK_D], dtype=tl.float32)
    z = tl.zeros([BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        n = start + offs_n
        n_ok = n < hi
        kt = tl.load(
            K + b * stride_kb + h * stride_kh + n[None, :] * stride_kt + offs_d[:, None] * stride_kd,
            mask=d_ok[:, None] & n_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # [BD, BN]
        pkt = tl.where(d_ok[:, None] & n_ok[None, :], _features(kt, MAPPED), 0.0)  # padding keys add nothing
        v = tl.load(
            V + b * stride_vb + h * stride_vh + n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
            mask=n_ok[:, None] & d_ok[None, :],
            other=0.0,
        ).to(tl.float32)  # [BN, BD]
        if IEEE:
            s += tl.dot(pkt, v, input_precision="ieee")
        else:
            s += tl.dot(pkt, v)
        z += tl.sum(pkt, 1)
    base = pid_bh * n_chunks + pid_c
    tl.store(
        KV + base * head_dim * head_dim + offs_d[:, None] * head_dim + offs_d[None, :],
        s,
        mask=d_ok[:, None] & d_ok[None, :],
    )
    tl.store(KZ + base * head_dim + offs_d, z, mask=d_ok)


@triton.jit
def routed_linear_kernel(
    Q,
    K,
    V,
    Out,
    ROWS,
    SB,
    ZB,
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
    n_chunks,
    p0,
    tk,
    chunk,
    eps,
    hkv,
    groups,
    head_dim,
    HG: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    IEEE: tl.constexpr,
    MAPPED: tl.constexpr,
):
    """Out[b, h, task] = linear attention of the task's row. SB/ZB [B, Hkv, nC, D(, D)]: the state
    before chunk c. Each program writes BLOCK_DV of the output's columns (the third grid axis
    picks which): BLOCK_D where the state's [BLOCK_D, BLOCK_D] tile fits the GPU's shared
    memory, else a fraction (the features and the normaliser are then computed once per
    column block)."""
    BR: tl.constexpr = BLOCK_M // HG
    pid_blk = tl.program_id(0)
    pid_bh = tl.program_id(1)
    offs_v = tl.program_id(2) * BLOCK_DV + tl.arange(0, BLOCK_DV)
    v_ok = offs_v < head_dim
    n_hg = (groups + HG - 1) // HG
    b = pid_bh // (hkv * n_hg)
    kvh = (pid_bh // n_hg) % hkv
    hg = pid_bh % n_hg

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    gh = hg * HG + offs_m % HG
    head_ok = gh < groups
    head = kvh * groups + gh
    task = pid_blk * BR + offs_m // HG
    row = tl.load(ROWS + b * n_tasks + task)
    qpos = p0 + row
    c = tl.min(row, 0) // chunk  # chunk of the block's first row
    lo = p0 + c * chunk
    p_last = tl.max(qpos, 0)

    q = tl.load(
        Q
        + b * stride_qb
        + head[:, None] * stride_qh
        + row[:, None] * stride_qt
        + offs_d[None, :] * stride_qd,
        mask=head_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    pq = tl.where(d_ok[None, :], _features(q.to(tl.float32), MAPPED), 0.0)  # [BM, BD]
    st = (b * hkv + kvh) * n_chunks + c
    s = tl.load(
        SB + st * head_dim * head_dim + offs_d[:, None] * head_dim + offs_v[None, :],
        mask=d_ok[:, None] & v_ok[None, :],
        other=0.0,
    )  # [BD, BDV]
    z = tl.load(ZB + st * head_dim + offs_d, mask=d_ok, other=0.0)  # [BD]
    if IEEE:
        num = tl.dot(pq, s, input_precision="ieee")  # [BM, BDV]
    else:
        num = tl.dot(pq, s)
    den = tl.sum(pq * z[None, :], 1)  # [BM]
    for start in range(lo, p_last + 1, BLOCK_N):  # intra-chunk part: keys [chunk start, last row]
        n = start + offs_n
        n_ok = n < tk
        k_ptrs = K + b * stride_kb + kvh * stride_kh + n[None, :] * stride_kt + offs_d[:, None] * stride_kd
        kt = tl.load(k_ptrs, mask=d_ok[:, None] & n_ok[None, :], other=0.0).to(tl.float32)  # [BD, BN]
        pkt = tl.where(d_ok[:, None], _features(kt, MAPPED), 0.0)
        v_ptrs = V + b * stride_vb + kvh * stride_vh + n[:, None] * stride_vt + offs_v[None, :] * stride_vd
        v = tl.load(v_ptrs, mask=n_ok[:, None] & v_ok[None, :], other=0.0).to(tl.float32)  # [BN, BDV]
        if IEEE:
            a = tl.dot(pq, pkt, input_precision="ieee")  # [BM, BN]
        else:
            a = tl.dot(pq, pkt)
        a = tl.where((n[None, :] <= qpos[:, None]) & n_ok[None, :], a, 0.0)
        if IEEE:
            num += tl.dot(a, v, input_precision="ieee")
        else:
            num += tl.dot(a, v)
        den += tl.sum(a, 1)
    o = num / (den[:, None] + eps)
    tl.store(
        Out + b * stride_ob + head[:, None] * stride_oh + task[:, None] * stride_ot + offs_v[None, :],
        o,
        mask=head_ok[:, None] & v_ok[None, :],
    )
