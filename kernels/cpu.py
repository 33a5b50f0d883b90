"""Routed attention in plain PyTorch: the fast path on CPU (and the autograd path anywhere).

Each expert runs only on the rows routed to it (weight > 0), batched, with no
per-token Python loop:

- full: the routed rows in position order, in blocks of FULL_BLOCK rows. Without
  autograd a block's keys split at its first row f: keys [0, f) are seen by every row
  of the block, so they go through one unmasked flash call (the kernel's fastest form;
  the G query heads of a kv head stacked as rows of one head, a longer query); keys
  [f, last row] form a small staircase, run for all blocks at once in STAIR_SPLIT
  masked calls (slices of rows, the first ones reading fewer keys). The two parts are
  merged by their log-sum-exp (the flash kernel returns it, without a gradient). With
  autograd a block runs one masked SDPA over keys [0, its last row]. All rows full in a
  prefill: one causal SDPA call.
- local: rows grouped by position tiles (LOCAL_TILE positions when every row is local,
  LOCAL_TILE_SPARSE otherwise); a tile reads the sinks and one band of tile + window - 1
  keys (one gather), and the tiles are the batch of one SDPA call with an additive mask.
  All rows local: the query tiles are views of q and the output is added in place.
- linear: chunks of LINEAR_CHUNK positions; per-chunk states phi(k)^T [v, 1] and an
  exclusive cumulative sum give the state before each chunk; the chunk itself is
  quadratic (only for chunks holding linear rows), the G query heads of a kv head stacked
  as rows of one matmul. The state is updated with every key, whatever its route.
- feature map: elu + 1 inline (feature_map=None, unchanged), or a learned FeatureMap
  (kernels/feature_maps.py): then q and the keys the call reads are mapped first, in
  full (one small matmul per tensor, cheap next to the attention), and the linear
  expert runs on the features with the identity in place of phi.
- decode (Tq = 1): a few ops; full reads the cache, local slices its window and
  sinks, linear reads the state and the new key.

Gathers copy whole rows (index_select on a flat [rows, D] view). The experts' outputs are
added to one [B, Tq, Hq, D] buffer: index_add for gathered rows, a strided multiply-add for
an expert that holds every row (the first one writes the buffer instead of zeroing it).
Without autograd, temporaries that die within the call (gathers, masks, the linear
expert's matmuls) live in buffers reused from call to call (_scratch, each up to
SCRATCH_MAX_BYTES; one set per process, used by one call at a time, the others allocate
afresh): on CPU, fresh large allocations cost page faults every call.

K/V heads are never repeated in memory: SDPA and the flash kernel take grouped-query
inputs. Differentiable end to end (in-place ops only on fresh tensors autograd does not keep).

Never: validate arguments (kernels.checks does), import metaattn_viz, or know how the
weights were chosen.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from metaattn_kernels.checks import needs_grad
from metaattn_kernels.decode import linear_readout, window_keys
from metaattn_kernels.experts import FULL, LINEAR, LOCAL
from metaattn_kernels.reference import compute_dtype
from metaattn_kernels.rows import sorted_rows, tiled_rows

FULL_BLOCK = 64  # query rows per block of the gathered full expert
STAIR_SPLIT = 2  # a full block's staircase runs in this many slices of rows
LOCAL_TILE = 32  # positions per tile of the local expert when every row is local
LOCAL_TILE_SPARSE = 48  # the same when only some rows are (fewer, fuller tiles)
LINEAR_CHUNK = 64  # positions per chunk of the linear expert

try:  # SDPA's CPU flash kernel, which also returns the log-sum-exp (without a gradient)
    _flash_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
except (AttributeError, RuntimeError):  # not in this torch: the full expert keeps its masked blocks
    _flash_lse = None


SCRATCH_MAX_BYTES = 64 << 20  # larger temporaries are allocated afresh, not kept between calls


class _Scratch(threading.local):
    """Whether this thread's current call may use the shared buffers (set by
    routed_attention_cpu: no autograd, CPU tensors, and the buffers were free)."""

    def __init__(self):
        self.on = False


_SCRATCH = _Scratch()
# One set of buffers for the process, reused across calls for temporaries that die within a
# call: large fresh allocations cost page faults on every call, often more than the copy.
# Each keeps the largest size asked of it, up to SCRATCH_MAX_BYTES. A call that finds them
# taken by another thread allocates afresh instead of waiting, so the memory kept is one
# set (about 130 MB at T = 4096) however many server threads route at once.
_BUFS: dict = {}
_BUFS_LOCK = threading.Lock()


def _scratch(name, shape, like: torch.Tensor) -> torch.Tensor | None:
    """A reused buffer [shape] for `name`, or None where a fresh tensor is wanted (autograd, not CPU,
    buffers taken by another thread, or too large)."""
    n = math.prod(shape)
    if not _SCRATCH.on or n * like.element_size() > SCRATCH_MAX_BYTES:
        return None
    buf = _BUFS.get(name)
    if buf is None or buf.numel() < n or buf.dtype != like.dtype:
        buf = _BUFS[name] = torch.empty(n, dtype=like.dtype)
    return buf[:n].view(shape)


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, H, T, D] -> (its rows as one [B * H * T, D] matrix, the row offset [B, H] of each
    (batch, head))."""
    b, h, t, d = x.shape
    base = (torch.arange(b, device=x.device)[:, None] * h + torch.arange(h, device=x.device)) * t
    return x.contiguous().view(-1, d), base


def _select(xf: torch.Tensor, idx: torch.Tensor, name: str | None) -> torch.Tensor:
    """xf.index_select(0, idx.flatten()), into the scratch buffer `name` when there is one."""
    idx = idx.flatten()
    out = _scratch(name, (idx.numel(), xf.shape[1]), xf) if name else None
    return xf.index_select(0, idx) if out is None else torch.index_select(xf, 0, idx, out=out)


def _take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, D], rows [B, N] -> the rows [B, H, N, D].

    All gathers here copy whole rows with index_select on the flat [B * H * T, D] view:
    several times faster than advanced indexing on dim 2."""
    xf, base = _flat(x)
    return _select(xf, base[:, :, None] + rows[:, None, :], None).view(*base.shape, -1, x.shape[3])


def _take_tiles(x: torch.Tensor, rows: torch.Tensor, name: str | None = None) -> torch.Tensor:
    """x [B, H, T, D], rows [B or 1, nA, R] -> [B * nA, H, R, D]: tile a of batch row b holds rows[b, a]."""
    xf, base = _flat(x)
    idx = base[:, None, :, None] + rows[:, :, None, :]  # [B, nA, H, R]
    return _select(xf, idx, name).view(-1, x.shape[1], rows.shape[2], x.shape[3])


def _take_groups(q: torch.Tensor, rows: torch.Tensor, hkv: int) -> torch.Tensor:
    """q [B, Hq, Tq, D], rows [B, nA, M] -> [B, Hkv, nA, G, M, D]: each kv head's G query heads
    side by side."""
    b, hq, _, d = q.shape
    qf, base = _flat(q)
    idx = base.view(b, hkv, 1, hq // hkv, 1) + rows[:, None, :, None, :]  # [B, Hkv, nA, G, M]
    return _select(qf, idx, "linear q").view(*idx.shape, d)


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype, name: str | None = None) -> torch.Tensor:
    """Boolean mask -> 0 / -inf in the compute dtype (what SDPA would build from it, built once)."""
    out = _scratch(name, allowed.shape, torch.empty(0, dtype=dtype)) if name else None
    out = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device) if out is None else out.zero_()
    return out.masked_fill_(~allowed, float("-inf"))


def _tiles_of(x: torch.Tensor, tile: int) -> torch.Tensor:
    """x [B, H, T, D] -> [B, H, nT, tile, D], zero-padded at the end (a view when T % tile == 0)."""
    pad = -x.shape[2] % tile
    if pad:
        x = F.pad(x, (0, 0, 0, pad))
    return x.view(x.shape[0], x.shape[1], -1, tile, x.shape[3])


def _full_rows(q, k, v, active, scale, p0, grad):
    """Full expert on the active rows. Returns (o [B * N, Hq, D], rows [B, N], valid [B, N]).

    Rows go in blocks of FULL_BLOCK in position order. Without autograd a block splits its
    keys at its first row f: keys [0, f) are visible to every row of the block (one unmasked
    flash call, the causal kernel's speed per score), keys [f, last row] form a small
    staircase (STAIR_SPLIT masked calls for all blocks, by slices of rows, the first slice
    reading fewer keys); the two parts are merged by their log-sum-exp.
    With autograd (the flash call's log-sum-exp has no gradient), or off CPU, a block runs one
    masked SDPA over keys [0, its last row].
    """
    sr = sorted_rows(active)
    b, n = sr.rows.shape
    hq, d = q.shape[1], q.shape[3]
    gqa = k.shape[1] != hq
    if grad or _flash_lse is None or q.device.type != "cpu":
        outs = []
        for start in range(0, n, FULL_BLOCK):
            rows = sr.rows[:, start : start + FULL_BLOCK]  # [B, m]
            end = int(rows.max()) + p0 + 1  # keys past the block's last row are never read
            allowed = torch.arange(end, device=k.device) <= (rows + p0)[:, None, :, None]  # [B, 1, m, end]
            outs.append(
                F.scaled_dot_product_attention(
                    _take_rows(q, rows),
                    k[:, :, :end],
                    v[:, :, :end],
                    attn_mask=allowed,
                    scale=scale,
                    enable_gqa=gqa,
                )
            )  # [B, Hq, m, D]
        o = torch.cat(outs, dim=2).transpose(1, 2)  # [B, N, Hq, D]
        return o.reshape(-1, hq, d), sr.rows, sr.valid
    if k.stride(-1) != 1 or v.stride(-1) != 1:  # the flash kernel called directly reads rows as contiguous
        k, v = k.contiguous(), v.contiguous()
    blk = min(FULL_BLOCK, n)
    n_b = -(-n // blk)
    rows, valid = sr.rows, sr.valid
    if n_b * blk > n:  # pad the last block with repeats of the last row
        rows = torch.cat([rows, rows[:, -1:].expand(b, n_b * blk - n)], dim=1)
        valid = F.pad(valid, (0, n_b * blk - n))
    rb = rows.view(b, n_b, blk) + p0  # positions
    qg = _take_tiles(q, rb - p0, "full q").view(b, n_b, hq, blk, d)
    first = rb[:, :, 0].amin(0)  # [nB] keys before a block's first row are seen by all its rows
    span = int((rb[:, :, -1].amax(0) - first).max()) + 1
    kpos = first[:, None] + torch.arange(span, device=k.device)  # [nB, S] staircase keys
    kidx = kpos.clamp(max=k.shape[2] - 1)[None]  # keys past the end are masked below
    ks, vs = _take_tiles(k, kidx, "full k"), _take_tiles(v, kidx, "full v")  # [B * nB, Hkv, S, D]
    pre_o = _scratch("full pre o", (b, n_b, hq, blk, d), q)
    pre_l = _scratch("full pre lse", (b, n_b, hq, blk), q)
    pre_o = q.new_zeros(b, n_b, hq, blk, d) if pre_o is None else pre_o.zero_()
    pre_l = q.new_full((b, n_b, hq, blk), float("-inf")) if pre_l is None else pre_l.fill_(float("-inf"))
    hkv = k.shape[1]
    for i, f in enumerate(first.tolist()):
        if f > 0:  # the prefix, unmasked; a kv head's G query heads stacked as rows (longer q: faster kernel)
            o, lse = _flash_lse(qg[:, i].view(b, hkv, -1, d), k[:, :, :f], v[:, :, :f], scale=scale)
            pre_o[:, i], pre_l[:, i] = o.view(b, hq, blk, d), lse.reshape(b, hq, blk)
    out = _scratch("full o", (b, n_b, blk, hq, d), q)  # rows-major, as y wants
    out = q.new_empty(b, n_b, blk, hq, d) if out is None else out
    sub = -(-blk // STAIR_SPLIT)
    for r0 in range(0, blk, sub):  # the staircase in slices of rows: the first ones need fewer keys
        r1 = min(r0 + sub, blk)
        rs = rb[:, :, r0:r1]  # [B, nB, m]
        sp = int((rs[:, :, -1].amax(0) - first).max()) + 1
        # [B, nB, m, sp]
        bias = _additive_mask(kpos[None, :, None, :sp] <= rs[..., None], q.dtype, "full mask")
        # each row sees `first`
        o, lse = _flash_lse(
            qg[:, :, :, r0:r1].reshape(b * n_b, hq, r1 - r0, d),
            ks[:, :, :sp],
            vs[:, :, :sp],
            attn_mask=bias.view(b * n_b, 1, r1 - r0, sp),
            scale=scale,
        )
        # the prefix's share of the mass
        share = torch.sigmoid(pre_l[..., r0:r1] - lse.view(b, n_b, hq, r1 - r0)).unsqueeze(-1)
        torch.lerp(
            o.view(b, n_b, hq, r1 - r0, d), pre_o[:, :, :, r0:r1], share, out=out[:, :, r0:r1].transpose(2, 3)
        )
    return out.view(-1, hq, d), rows, valid


def _local_rows(q, k, v, active, scale, p0, window, n_sink):
    """Local expert (window + sinks) on the active rows, by position tiles.

    A tile of LOCAL_TILE positions reads the sinks and one band of keys, [tile start -
    window + 1, tile end] (gathered: one copy); tiles are SDPA's batch, with one additive
    mask. When every row is routed here the query tiles are views of q and the output comes
    back as a view ('dense'); else the rows of each tile are gathered. Returns
    ('dense', o [B, nT, C, Hq, D]) or ('rows', o [B * nA * M, Hq, D], rows [B, nA, M], valid [B, nA, M]).
    """
    b, hkv, tk, d = k.shape
    hq, tq = q.shape[1:3]
    w = min(window, tk)  # a window past the first key is the causal range
    dense = bool(active.all())
    tile = min(LOCAL_TILE if dense else LOCAL_TILE_SPARSE, tq)
    n_t = -(-tq // tile)
    n_s = min(n_sink, tk)
    dev = k.device
    if dense:
        t_ids = torch.arange(n_t, device=dev)
        qpos = p0 + torch.arange(n_t * tile, device=dev).view(1, n_t, tile)
        qg = _tiles_of(q, tile).transpose(1, 2).reshape(b * n_t, hq, tile, d)  # a view when B = 1
        n_a, m = n_t, tile
    else:
        tr = tiled_rows(active, tile)
        n_a, m = tr.rows.shape[1:]
        t_ids, qpos = tr.tiles, tr.rows + p0
        qg = _take_tiles(q, tr.rows, "local q")  # [B * nA, Hq, M, D]
    band = tile + w - 1
    kpos = torch.cat(
        [
            torch.arange(n_s, device=dev).expand(n_a, n_s),
            (p0 + t_ids * tile - w + 1)[:, None] + torch.arange(band, device=dev),
        ],
        dim=1,
    )  # [nA, L]
    kidx = kpos.clamp(0, tk - 1)[None]  # keys outside [0, Tk) are masked below
    kb, vb = _take_tiles(k, kidx, "local k"), _take_tiles(v, kidx, "local v")  # [B * nA, Hkv, L, D]
    L = kpos.shape[1]
    in_band = torch.arange(L, device=dev) >= n_s  # [L]
    kpos, qp = kpos[None, :, None, :], qpos[..., None]  # [1, nA, 1, L], [B', nA, M, 1]
    # a sink inside the window is counted by the band, not twice; a band key before 0 is padding
    allowed = (kpos <= qp) & torch.where(in_band, (kpos > qp - w) & (kpos >= 0), kpos <= qp - w)
    bias = _additive_mask(allowed, q.dtype, "local mask")  # [B', nA, M, L]
    o = F.scaled_dot_product_attention(
        qg,
        kb,
        vb,
        attn_mask=bias.expand(b, -1, -1, -1).reshape(b * n_a, 1, m, L),
        scale=scale,
        enable_gqa=hkv != hq,
    )  # [B * nA, Hq, M, D]
    o = o.view(b, n_a, hq, m, d).transpose(2, 3)  # [B, nA, M, Hq, D]
    if dense:
        return "dense", o
    out = _scratch("local o", o.shape, q)
    return "rows", (o.reshape(-1, hq, d) if out is None else out.copy_(o).view(-1, hq, d)), tr.rows, tr.valid


def feature_map(x: torch.Tensor) -> torch.Tensor:
    """phi(x) = elu(x) + 1 in one pass less than the reference (elu's backward keeps its input,
    not its output)."""
    return F.elu(x).add_(1.0)


def _augment(v: torch.Tensor) -> torch.Tensor:
    """[.., T, D] -> [.., T, D + 1]: a ones column makes the normaliser z ride along with S."""
    return torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)


def _identity(x: torch.Tensor) -> torch.Tensor:
    """phi for inputs that are already features (a learned map was applied beforehand)."""
    return x


def _linear_state_aug(k, v, linear_state, p0, ct, phi=feature_map):
    """Augmented state [S | z] [B, Hkv, D, D + 1] of all keys before position p0."""
    if linear_state is not None:
        s, z = linear_state
        return torch.cat([s.to(ct), z.to(ct)[..., None]], dim=-1)
    pk = phi(k[:, :, :p0])  # [B, Hkv, p0, D]
    return pk.transpose(-1, -2) @ _augment(v[:, :, :p0])  # [B, Hkv, D, D + 1]


def _mm(a: torch.Tensor, b: torch.Tensor, name: str) -> torch.Tensor:
    """a @ b (same batch dims), into the scratch buffer `name` when there is one."""
    out = _scratch(name, (*a.shape[:-1], b.shape[-1]), a)
    return a @ b if out is None else torch.matmul(a, b, out=out)


def _phi_own(x: torch.Tensor) -> torch.Tensor:
    """phi(x) for x a scratch buffer of ours (no autograd then: in place) or a fresh tensor."""
    return F.elu_(x).add_(1.0) if _SCRATCH.on else feature_map(x)


def _linear_rows(q, k, v, active, p0, s0, eps, mapped=False):
    """Linear expert on the active rows, chunked; also the state after all keys.

    mapped: q and k are already features (a learned map): phi is then the identity.

    Chunks of LINEAR_CHUNK positions: per-chunk states phi(k)^T [v, 1], an exclusive
    cumulative sum gives the state before each chunk, the chunk itself is quadratic (only
    for chunks holding linear rows). The G query heads of a kv head are stacked as rows of
    one matmul. When every row is routed here the query chunks are taken whole ('dense').
    Returns (None or ('dense', o [B, nC, C, Hkv, G, D]) or ('rows', o [B * nA * M, Hq, D], rows, valid),
    state_aug [B, Hkv, D, D + 1]).
    """
    b, hq, tq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    dev = k.device
    phi, phi_own = (_identity, _identity) if mapped else (feature_map, _phi_own)
    kn, vn = k[:, :, p0:], v[:, :, p0:]
    if not bool(active.any()):  # only the state: [phi(k)^T v | sum phi(k)]
        pk = phi(kn)  # [B, Hkv, Tq, D]
        return None, s0 + torch.cat([pk.transpose(-1, -2) @ vn, pk.sum(2).unsqueeze(-1)], dim=-1)
    chunk = min(LINEAR_CHUNK, tq)
    n_ch = -(-tq // chunk)
    tpad = n_ch * chunk
    # phi(k) and [v, 1] in whole chunks; phi(k) = 0 in the padding: it adds nothing
    pk, va = _scratch("linear pk", (b, hkv, tpad, d), q), _scratch("linear va", (b, hkv, tpad, d + 1), q)
    if pk is None:
        pk, va = _tiles_of(phi(kn), chunk), _tiles_of(_augment(vn), chunk)
    else:
        phi_own(pk[:, :, :tq].copy_(kn))
        va[:, :, :tq, :d] = vn
        va[:, :, :tq, d] = 1.0
        pk[:, :, tq:], va[:, :, tq:] = 0.0, 0.0
        pk, va = pk.view(b, hkv, n_ch, chunk, d), va.view(b, hkv, n_ch, chunk, d + 1)
    kv = _mm(pk.transpose(-1, -2), va, "linear kv")  # [B, Hkv, nC, D, D + 1]
    before = _scratch("linear before", kv.shape, q)  # [B, Hkv, nC, D, D + 1]: the state before each chunk
    if before is None:
        cum = kv.cumsum(dim=2)
        state = s0 + cum[:, :, -1]
        before = torch.cat([s0[:, :, None], cum[:, :, :-1]], dim=2)
        if n_ch > 1:
            before[:, :, 1:] += s0[:, :, None]
    else:
        before[:, :, 0] = s0
        if n_ch > 1:
            torch.cumsum(kv[:, :, :-1], dim=2, out=before[:, :, 1:])
            if bool(s0.any()):
                before[:, :, 1:] += s0[:, :, None]
        state = before[:, :, -1] + kv[:, :, -1]
    if bool(active.all()):
        n_a, m = n_ch, chunk
        # [B, Hkv, nC, G, C, D] (a view)
        qg = _tiles_of(q, chunk).view(b, hkv, g, n_ch, chunk, d).transpose(2, 3)
        pq = _scratch("linear q", (b, hkv, n_ch, g * chunk, d), q)  # [B, Hkv, nC, G * C, D]
        if pq is None:
            pq = phi(qg.reshape(b, hkv, n_ch, g * chunk, d))
        else:
            phi_own(pq.view(qg.shape).copy_(qg))
        causal = torch.ones(chunk, chunk, dtype=torch.bool, device=dev).triu_(1)  # [C, C] key after query
        a = _mm(pq, pk.transpose(-1, -2), "linear a").view(b, hkv, n_ch, g, chunk, chunk)
        a = a.masked_fill_(causal, 0.0)
        tr = None
    else:
        tr = tiled_rows(active, chunk)
        n_a, m = tr.rows.shape[1:]
        if n_a < n_ch:  # chunks no batch row routes a token of to linear: only their state is needed
            pk, va, before = pk[:, :, tr.tiles], va[:, :, tr.tiles], before[:, :, tr.tiles]
        pq = phi_own(_take_groups(q, tr.rows, hkv)).view(b, hkv, n_a, g * m, d)  # [B, Hkv, nA, G * M, D]
        qpos = tr.rows[:, None, :, None, :, None]  # [B, 1, nA, 1, M, 1]
        # [nA, 1, 1, C]
        kpos = (tr.tiles[:, None] * chunk + torch.arange(chunk, device=dev))[:, None, None, :]
        a = _mm(pq, pk.transpose(-1, -2), "linear a").view(b, hkv, n_a, g, m, chunk)
        a = a.masked_fill_(kpos > qpos, 0.0)
    a = a.view(b * hkv * n_a, g * m, chunk)
    num = _mm(pq, before, "linear num").view(-1, g * m, d + 1)  # [B Hkv nA, G M, D + 1]
    num.add_(_mm(a, va.reshape(-1, chunk, d + 1), "linear av"))
    den = num[..., d:] + eps
    o = num[..., :d].div_(den) if _SCRATCH.on else num[..., :d] / den
    o = o.view(b, hkv, n_a, g, m, d).permute(0, 2, 4, 1, 3, 5)  # [B, nA, M, Hkv, G, D] (view)
    if tr is None:
        return ("dense", o), state
    out = _scratch("linear o", o.shape, q)
    o = o.reshape(-1, hq, d) if out is None else out.copy_(o).view(-1, hq, d)
    return ("rows", o, tr.rows, tr.valid), state


def _decode_step(q, k, v, w, active, window, n_sink, scale, linear_state, eps, fm=None):
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
        contrib = (
            w[:, 0, e, None, None, None] * o
            if bool(sel.all())
            else torch.zeros_like(q).index_add_(0, sel.nonzero()[:, 0], w[sel, 0, e, None, None, None] * o)
        )
        return contrib if y is None else y + contrib

    def rows_of(e, *xs):  # the batch rows routed to expert e (all of them: no copy)
        sel = active[:, 0, e]
        return xs if bool(sel.all()) else tuple(x[sel] for x in xs)

    if bool(active[:, 0, FULL].any()):
        qs, ks, vs = rows_of(FULL, q, k, v)
        y = mix(y, FULL, F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=g > 1))
    if bool(active[:, 0, LOCAL].any()):
        kl, vl = window_keys(k, v, window, n_sink)
        qs, ks, vs = rows_of(LOCAL, q, kl, vl)
        y = mix(y, LOCAL, F.scaled_dot_product_attention(qs, ks, vs, scale=scale, enable_gqa=g > 1))
    if linear_state is not None:
        s, z = linear_state[0].to(q.dtype), linear_state[1].to(q.dtype)
    else:
        s_aug = _linear_state_aug(k, v, None, tk - 1, q.dtype, feature_map if fm is None else fm.key)
        s, z = s_aug[..., :d], s_aug[..., d]
    pk = feature_map(k[:, :, -1:]) if fm is None else fm.key(k[:, :, -1:])  # [B, Hkv, 1, D]
    s = s + pk.transpose(-1, -2) @ v[:, :, -1:]  # [B, Hkv, D, D]
    z = z + pk[:, :, 0]  # [B, Hkv, D]
    if bool(active[:, 0, LINEAR].any()):
        qs, ss, zs = rows_of(LINEAR, q, s, z)
        y = mix(y, LINEAR, linear_readout(qs, ss, zs, hkv, eps, fm))
    if y is None:
        y = torch.zeros_like(q)
    return y, (s.float(), z.float())


def routed_attention_cpu(
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
    """Routed attention, each expert on its own rows only. Arguments as kernels.routed_attention."""
    b, hq, tq, d = q.shape
    hkv, tk = k.shape[1], k.shape[2]
    p0 = tk - tq
    scale = d**-0.5 if scale is None else float(scale)
    out_dtype, ct = q.dtype, compute_dtype(q.dtype)
    q, k, v = q.to(ct), k.to(ct), v.to(ct)
    w = weights.to(ct)
    active = weights > 0  # [B, Tq, 3]
    if tq == 1:
        y, new_state = _decode_step(q, k, v, w, active, window, n_sink, scale, linear_state, eps, feature_map)
        return y.to(out_dtype), new_state
    # a linear_state or features that require grad need the graph too (no reused buffers)
    grad = needs_grad(q, k, v, w, *(linear_state or ()), *(features or ()))
    shared = not grad and q.device.type == "cpu" and _BUFS_LOCK.acquire(blocking=False)
    _SCRATCH.on = shared
    try:
        y, new_state = _prefill(
            q,
            k,
            v,
            w,
            active,
            window,
            n_sink,
            scale,
            linear_state,
            eps,
            grad,
            ct,
            (b, hq, hkv, tq, tk, d, p0),
            feature_map,
            features,
        )
    finally:
        _SCRATCH.on = False
        if shared:
            _BUFS_LOCK.release()
    return y.to(out_dtype), new_state


def _prefill(
    q, k, v, w, active, window, n_sink, scale, linear_state, eps, grad, ct, sizes, fm=None, mapped=None
):
    """routed_attention_cpu for Tq > 1: (y [B, Hq, Tq, D] in the compute dtype, (S, z)).
    `mapped`: (fm.query(q), fm.key(k[:, :, p0:])) where the caller has them."""
    b, hq, hkv, tq, tk, d, p0 = sizes
    # y [B, Tp, Hq, D], Tp = Tq rounded up so that the local tiles and linear chunks divide it;
    # rows past Tq may hold anything (never returned)
    step = math.lcm(min(LOCAL_TILE, tq), min(LINEAR_CHUNK, tq))
    tp = -(-tq // step) * step
    ys = []  # [y] once allocated
    bidx = torch.arange(b, device=q.device)

    def add(part, e):
        if part[0] == "dense":  # o [B, nT, C, ..., D]: rows 0 .. nT * C - 1 (Tq <= nT * C <= Tp) in order
            o = part[1]
            n = o.shape[1] * o.shape[2]
            wr = w[:, :n, e] if n <= tq else F.pad(w[:, :, e], (0, n - tq))
            wr = wr.view(*o.shape[:3], *([1] * (o.dim() - 3)))
            if not ys and not grad:  # the first part writes y (every returned row) without zeroing it first
                ys.append(q.new_empty(b, tp, hq, d))
                torch.mul(o, wr, out=ys[0][:, :n].view(*o.shape))
                return
            if not ys:
                ys.append(q.new_zeros(b, tp, hq, d))
            # in place: y is our own tensor, so autograd only records the weighted rows added to it
            ys[0][:, :n].view(*o.shape).addcmul_(wr, o)
            return
        o, rows, valid = part[1:]
        if not ys:
            ys.append(q.new_zeros(b, tp, hq, d))
        bi = bidx.view(b, *([1] * (rows.dim() - 1)))
        wr = (w[bi, rows, e] * valid).reshape(-1, 1, 1)  # padding rows get weight 0
        ys[0].view(b * tp, hq, d).index_add_(0, (bi * tp + rows).reshape(-1), o * wr if grad else o.mul_(wr))

    act_full = active[..., FULL]
    if bool(act_full.all()) and tq == tk:
        o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=hq != hkv)
        add(("dense", o.transpose(1, 2).unsqueeze(1)), FULL)
    elif bool(act_full.any()):
        add(("rows", *_full_rows(q, k, v, act_full, scale, p0, grad)), FULL)

    act_local = active[..., LOCAL]
    if bool(act_local.any()):
        add(_local_rows(q, k, v, act_local, scale, p0, window, n_sink), LOCAL)

    if fm is None:
        s0 = _linear_state_aug(k, v, linear_state, p0, ct)
        part, state = _linear_rows(q, k, v, active[..., LINEAR], p0, s0, eps)
    else:  # q and the keys from p0 mapped once (or as given); the prefix only without a state
        s0 = _linear_state_aug(k, v, linear_state, p0, ct, fm.key)
        pq, pk = (fm.query(q), fm.key(k[:, :, p0:])) if mapped is None else (m.to(ct) for m in mapped)
        part, state = _linear_rows(pq, pk, v[:, :, p0:], active[..., LINEAR], 0, s0, eps, mapped=True)
    if part is not None:
        add(part, LINEAR)

    y = ys[0] if ys else q.new_zeros(b, tp, hq, d)
    return y[:, :tq].transpose(1, 2), (state[..., :d].float(), state[..., d].float())
