"""Routed attention in plain PyTorch: the fast path on CPU (and the autograd path anywhere).

Each expert runs only on the rows routed to it (weight > 0), batched, with no
per-token Python loop:

- full: the routed rows in position order, in blocks of FULL_BLOCK rows; a block runs
  SDPA against keys [0, its last position] with its staircase mask (later keys are
  never read). All rows full in a prefill: one causal SDPA call (flash kernel).
- local: rows grouped by tiles of LOCAL_TILE positions; a tile reads one band of
  LOCAL_TILE + window - 1 keys plus the sinks before it, and the tiles are the batch
  of one masked SDPA call. A sparse tile never widens the band.
- linear: chunks of LINEAR_CHUNK positions; per-chunk states phi(k)^T [v, 1] and a
  cumulative sum give the state before each chunk, the chunk itself is quadratic
  (only for the chunks holding linear rows). The state is updated with every key,
  whatever its route.
- decode (Tq = 1): a few ops; full reads the cache, local slices its window and
  sinks, linear reads the state and the new key.

K/V heads are never repeated in memory: SDPA takes grouped-query inputs, and the linear
expert lays the G query heads of a kv head side by side ([B, Hkv, ..., G * rows, D]).
Differentiable end to end (in-place ops only on fresh tensors autograd does not keep).

Never: validate arguments (kernels.checks does), import metaattn_viz, or know how the
weights were chosen.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernels.experts import FULL, LINEAR, LOCAL
from kernels.reference import compute_dtype
from kernels.rows import sorted_rows, tiled_rows

FULL_BLOCK = 128   # query rows per step of the gathered full expert
LOCAL_TILE = 64    # positions per tile of the local expert
LINEAR_CHUNK = 64   # positions per chunk of the linear expert


def _gather_rows(q: torch.Tensor, rows: torch.Tensor, hkv: int) -> torch.Tensor:
    """q [B, Hq, Tq, D], rows [B, nA, M] -> [B, Hkv, nA, G, M, D]: each kv head's G query heads, in one copy."""
    b, hq = q.shape[:2]
    g = hq // hkv
    bi = torch.arange(b, device=q.device).view(b, 1, 1, 1, 1)
    hi = (torch.arange(hkv, device=q.device)[:, None] * g + torch.arange(g, device=q.device)).view(1, hkv, 1, g, 1)
    return q[bi, hi, rows[:, None, :, None, :]]


def _rows_to_heads(q: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, Tq, D], rows [B, *R] -> the gathered rows [B, *R[:-1], Hq, R[-1], D], in one copy."""
    b, hq = q.shape[:2]
    nr = rows.dim() - 1
    bi = torch.arange(b, device=q.device).view(b, *([1] * (nr + 1)))
    hi = torch.arange(hq, device=q.device).view(hq, 1)
    return q[bi, hi, rows.unsqueeze(-2)]


def _full_rows(q, k, v, active, scale, p0):
    """Full expert on the active rows. Returns (o [B * N, Hq, D], rows [B, N], valid [B, N]).

    Rows go in blocks of FULL_BLOCK in position order; a block reads keys [0, its last
    position] only, through SDPA with the block's staircase mask.
    """
    sr = sorted_rows(active)
    outs = []
    for start in range(0, sr.rows.shape[1], FULL_BLOCK):
        rows = sr.rows[:, start:start + FULL_BLOCK]  # [B, m]
        end = int(rows.max()) + p0 + 1  # keys past the block's last row are never read
        allowed = torch.arange(end, device=k.device) <= (rows + p0)[:, None, :, None]  # [B, 1, m, end]
        outs.append(F.scaled_dot_product_attention(
            _rows_to_heads(q, rows), k[:, :, :end], v[:, :, :end], attn_mask=allowed, scale=scale,
            enable_gqa=k.shape[1] != q.shape[1]))  # [B, Hq, m, D]
    o = torch.cat(outs, dim=2).transpose(1, 2)  # [B, N, Hq, D]
    return o.reshape(-1, *o.shape[2:]), sr.rows, sr.valid


def _local_rows(q, k, v, active, scale, p0, window, n_sink):
    """Local expert (window + sinks) on the active rows, by position tiles.

    A tile of LOCAL_TILE positions reads one band of keys, [tile start - window + 1,
    tile end], plus the sink keys that lie before the band; tiles are SDPA's batch.
    Returns (o [B * nA * M, Hq, D], rows [B, nA, M], valid [B, nA, M]).
    """
    b, hkv, tk, d = k.shape
    hq, tq = q.shape[1:3]
    tile = min(LOCAL_TILE, tq)
    tr = tiled_rows(active, tile)
    n_a, m = tr.rows.shape[1:]
    band = min(tile + window - 1, tk)
    lo = (p0 + tr.tiles * tile - window + 1).clamp(min=0)  # [nA] first key of each tile's band
    n_s = min(n_sink, tk)
    kpos = torch.cat([torch.arange(n_s, device=k.device).expand(n_a, n_s),
                      lo[:, None] + torch.arange(band, device=k.device)], dim=1)  # [nA, L]
    kidx = kpos.clamp(max=tk - 1)
    in_band = torch.arange(kpos.shape[1], device=k.device) >= n_s  # [L]
    kpos = kpos[None, :, None, :]  # [1, nA, 1, L]
    qpos = (tr.rows + p0)[..., None]  # [B, nA, M, 1]
    # a sink already inside the window is counted by the band, not twice
    allowed = (kpos <= qpos) & torch.where(in_band, kpos > qpos - window, kpos <= qpos - window)  # [B, nA, M, L]
    qg = _rows_to_heads(q, tr.rows).view(b * n_a, hq, m, d)  # [B * nA, Hq, M, D]
    kg = k[:, :, kidx].transpose(1, 2).reshape(b * n_a, hkv, -1, d)  # [B * nA, Hkv, L, D]
    vg = v[:, :, kidx].transpose(1, 2).reshape(b * n_a, hkv, -1, d)
    o = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=allowed.reshape(b * n_a, 1, m, -1), scale=scale,
                                       enable_gqa=hkv != hq)  # [B * nA, Hq, M, D]
    o = o.view(b, n_a, hq, m, d).transpose(2, 3)  # [B, nA, M, Hq, D]
    return o.reshape(-1, hq, d), tr.rows, tr.valid


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 in one pass less than the reference (elu's backward keeps its input, not its output)."""
    return F.elu(x).add_(1.0)


def _augment(v: torch.Tensor) -> torch.Tensor:
    """[.., T, D] -> [.., T, D + 1]: a ones column makes the normaliser z ride along with S."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _linear_state_aug(k, v, linear_state, p0, ct):
    """Augmented state [S | z] [B, Hkv, D, D + 1] of all keys before position p0."""
    if linear_state is not None:
        s, z = linear_state
        return torch.cat([s.to(ct), z.to(ct)[..., None]], dim=-1)
    pk = feature_map(k[:, :, :p0])  # [B, Hkv, p0, D]
    return pk.transpose(-1, -2) @ _augment(v[:, :, :p0])  # [B, Hkv, D, D + 1]


def _linear_rows(q, k, v, active, p0, s0, eps):
    """Linear expert on the active rows, chunked; also the state after all keys.

    Returns (o [B * nA * M, Hq, D] or None, rows [B, nA, M], valid [B, nA, M], state_aug [B, Hkv, D, D + 1]).
    """
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    pk = feature_map(k[:, :, p0:])  # [B, Hkv, Tq, D]
    va = _augment(v[:, :, p0:])  # [B, Hkv, Tq, D + 1]
    if not bool(active.any()):
        return None, None, None, s0 + pk.transpose(-1, -2) @ va
    chunk = min(LINEAR_CHUNK, tq)
    n_ch = -(-tq // chunk)
    pad = n_ch * chunk - tq
    pk = F.pad(pk, (0, 0, 0, pad)).view(b, hkv, n_ch, chunk, d)  # zero phi(k): padding adds nothing
    va = F.pad(va, (0, 0, 0, pad)).view(b, hkv, n_ch, chunk, d + 1)
    kv = pk.transpose(-1, -2) @ va  # [B, Hkv, nC, D, D + 1]
    cum = kv.cumsum(dim=2)
    before = s0[:, :, None] + (cum - kv)  # [B, Hkv, nC, D, D + 1]: the state before each chunk
    tr = tiled_rows(active, chunk)
    n_a, m = tr.rows.shape[1:]
    if n_a < n_ch:  # chunks no batch row routes a token of to linear: only their state is needed
        pk, va, before = pk[:, :, tr.tiles], va[:, :, tr.tiles], before[:, :, tr.tiles]
    pq = feature_map(_gather_rows(q, tr.rows, hkv)).view(b, hkv, n_a, g * m, d)  # [B, Hkv, nA, G * M, D]
    qpos = (tr.rows + p0)[:, None, :, None, :].expand(b, 1, n_a, g, m).reshape(b, 1, n_a, g * m, 1)
    kpos = (p0 + tr.tiles[:, None] * chunk + torch.arange(chunk, device=k.device))[:, None, :]  # [nA, 1, C]
    a = (pq @ pk.transpose(-1, -2)).masked_fill(kpos > qpos, 0.0)  # [B, Hkv, nA, G * M, C]
    num = torch.baddbmm((pq @ before).flatten(0, 2), a.flatten(0, 2), va.flatten(0, 2))  # [B Hkv nA, G M, D + 1]
    o = (num[..., :d] / (num[..., d:] + eps)).view(b, hkv, n_a, g, m, d)
    o = o.permute(0, 2, 4, 1, 3, 5).reshape(-1, hq, d)  # [B * nA * M, Hq, D]
    return o, tr.rows, tr.valid, s0 + cum[:, :, -1]


def _decode_step(q, k, v, w, active, window, n_sink, scale, linear_state, eps):
    """One query per sequence (Tq = 1), in a handful of ops: full reads the cache, local its
    window and sinks (slices, no gather), linear the state and the new key only.

    q [B, Hq, 1, D]; k, v [B, Hkv, Tk, D]; w [B, 1, 3]; batch rows not routed to an expert skip it.
    """
    b, hq, _, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    g = hq // hkv
    y = None

    def mix(y, e, o):
        sel = active[:, 0, e]
        contrib = w[:, 0, e, None, None, None] * o if bool(sel.all()) else \
            torch.zeros_like(q).index_add_(0, sel.nonzero()[:, 0], w[sel, 0, e, None, None, None] * o)
        return contrib if y is None else y + contrib

    def rows_of(e, *xs):  # the batch rows routed to expert e (all of them: no copy)
        sel = active[:, 0, e]
        return xs if bool(sel.all()) else tuple(x[sel] for x in xs)

    if bool(active[:, 0, FULL].any()):
        qs, ks, vs = rows_of(FULL, q, k, v)
        y = mix(y, FULL, F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=g > 1))
    if bool(active[:, 0, LOCAL].any()):
        lo = max(tk - window, 0)
        n_s = min(n_sink, lo)  # sinks inside the window are already in it
        kl, vl = k[:, :, lo:], v[:, :, lo:]
        if n_s:
            kl, vl = torch.cat([k[:, :, :n_s], kl], dim=2), torch.cat([v[:, :, :n_s], vl], dim=2)
        qs, ks, vs = rows_of(LOCAL, q, kl, vl)
        y = mix(y, LOCAL, F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=g > 1))
    if linear_state is not None:
        s, z = linear_state[0].to(q.dtype), linear_state[1].to(q.dtype)
    else:
        s_aug = _linear_state_aug(k, v, None, tk - 1, q.dtype)
        s, z = s_aug[..., :d], s_aug[..., d]
    pk = feature_map(k[:, :, -1:])  # [B, Hkv, 1, D]
    s = s + pk.transpose(-1, -2) @ v[:, :, -1:]  # [B, Hkv, D, D]
    z = z + pk[:, :, 0]  # [B, Hkv, D]
    if bool(active[:, 0, LINEAR].any()):
        qs, ss, zs = rows_of(LINEAR, q, s, z)
        pq = feature_map(qs).view(qs.shape[0], hkv, g, d)  # [b, Hkv, G, D]
        o = (pq @ ss) / ((pq * zs[:, :, None]).sum(-1, keepdim=True) + eps)  # [b, Hkv, G, D]
        y = mix(y, LINEAR, o.view(qs.shape))
    if y is None:
        y = torch.zeros_like(q)
    return y, (s.float(), z.float())


def routed_attention_cpu(q, k, v, weights, *, window: int, n_sink: int, scale: float | None = None,
                         linear_state=None, eps: float = 1e-6):
    """Routed attention, each expert on its own rows only. Arguments as kernels.routed_attention."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    p0 = tk - tq
    scale = d ** -0.5 if scale is None else float(scale)
    out_dtype, ct = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    w = weights.to(ct)
    active = weights > 0  # [B, Tq, 3]
    if tq == 1:
        y, new_state = _decode_step(q, k, v, w, active, window, n_sink, scale, linear_state, eps)
        return y.to(out_dtype), new_state
    bidx = torch.arange(b, device=q.device)
    y = q.new_zeros(b * tq, hq, d)  # [B * Tq, Hq, D]
    dense = []  # (expert, o [B, Hq, Tq, D]) for experts every row is routed to

    def add(y, o, rows, valid, e):
        bi = bidx.view(b, *([1] * (rows.dim() - 1)))
        wr = (w[bi, rows, e] * valid).reshape(-1, 1, 1)  # padding rows get weight 0
        # in place: y is our own zeros, so autograd only records the weighted rows added to it
        return y.index_add_(0, (bi * tq + rows).reshape(-1), o * wr)

    act_full = active[..., FULL]
    if bool(act_full.all()) and (tq == tk or tq == 1):
        dense.append((FULL, F.scaled_dot_product_attention(q, k, v, is_causal=tq > 1, scale=scale,
                                                           enable_gqa=hq != hkv)))
    elif bool(act_full.any()):
        y = add(y, *_full_rows(q, k, v, act_full, scale, p0), FULL)

    act_local = active[..., LOCAL]
    if bool(act_local.any()):
        y = add(y, *_local_rows(q, k, v, act_local, scale, p0, window, n_sink), LOCAL)

    act_lin = active[..., LINEAR]
    s0 = _linear_state_aug(k, v, linear_state, p0, ct)
    o, rows, valid, state = _linear_rows(q, k, v, act_lin, p0, s0, eps)
    if o is not None:
        y = add(y, o, rows, valid, LINEAR)

    y = y.view(b, tq, hq, d).transpose(1, 2)  # [B, Hq, Tq, D]
    for e, o in dense:
        y = y + w[:, None, :, e, None] * o
    new_state = (state[..., :d].float(), state[..., d].float())
    return y.to(out_dtype), new_state
