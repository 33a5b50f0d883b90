"""Which query rows each expert runs on: gathering routed rows into dense blocks.

Routing is per token and per batch row, so the rows an expert must compute are a
ragged set. The fast paths (CPU and Triton) gather them into rectangular blocks that
batch well, padding the short ones with a repeat of a real row whose weight is then
zero. Two groupings are used:

- by count (`sorted_rows`): the active rows in position order, cut into blocks of a
  fixed number of rows; the full expert, whose key range [0, p] grows with the row,
  wants this.
- by position tile (`tiled_rows`): rows grouped by the tile of positions they fall in,
  every tile padded to the same number of rows; the local and linear experts, whose
  key range is a fixed band around the tile, want this (a sparse tile never widens
  the band).

Never: look at what the rows are routed by (weights are only tested for > 0 here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SortedRows:
    rows: torch.Tensor  # [B, N] row indices in 0..Tq-1, ascending; padding repeats the last active row
    valid: torch.Tensor  # [B, N] True for real (active) rows


@dataclass(frozen=True)
class TiledRows:
    tiles: torch.Tensor  # [nA] ids of the tiles holding at least one active row (in some batch row)
    rows: torch.Tensor  # [B, nA, M] row indices; padding repeats the tile's last active row
    valid: torch.Tensor  # [B, nA, M] True for real (active) rows
    tile: int  # rows per tile


def sorted_rows(active: torch.Tensor) -> SortedRows:
    """Active rows of each batch row in ascending order, padded to the largest count."""
    b, tq = active.shape
    t = torch.arange(tq, device=active.device)
    counts = active.sum(1)  # [B]
    n = max(int(counts.max()), 1)
    order = torch.argsort(torch.where(active, t, t + tq), dim=1)[:, :n]  # [B, N]
    valid = torch.arange(n, device=active.device)[None, :] < counts[:, None]  # [B, N]
    last = order.gather(1, (counts - 1).clamp(min=0)[:, None])  # [B, 1]
    return SortedRows(torch.where(valid, order, last), valid)


def tiled_rows(active: torch.Tensor, tile: int) -> TiledRows:
    """Active rows grouped by position tile (rows [i*tile, (i+1)*tile)), each tile padded to M rows."""
    b, tq = active.shape
    n_tiles = -(-tq // tile)
    act = torch.nn.functional.pad(active, (0, n_tiles * tile - tq)).view(b, n_tiles, tile)  # [B, nT, C]
    counts = act.sum(2)  # [B, nT]
    tiles = torch.nonzero(counts.sum(0) > 0).flatten()  # [nA]
    act, counts = act[:, tiles], counts[:, tiles]  # [B, nA, C], [B, nA]
    m = max(int(counts.max()) if tiles.numel() else 0, 1)
    off = torch.arange(tile, device=active.device)
    order = torch.argsort(torch.where(act, off, off + tile), dim=2)[..., :m]  # [B, nA, M]
    valid = torch.arange(m, device=active.device) < counts[..., None]  # [B, nA, M]
    last = order.gather(2, (counts - 1).clamp(min=0)[..., None])  # [B, nA, 1]
    rows = tiles[None, :, None] * tile + torch.where(valid, order, last)  # [B, nA, M]
    return TiledRows(tiles, rows, valid, tile)
