"""The record of routing decisions a session keeps: what every layer decided for every
token, as numpy arrays [L, B, T, ...] under the keys of ``RECORD_KEYS``.

A prefill (or a batched pass) records one dict of arrays per layer and forward; a decode
step records a plain tuple (``OneRecord``), because building six small arrays per layer
per token would cost more than the decision; a decode step decided on the device records a
``DeviceRecord`` (its fields stay tensors on the device: reading them would make the host
wait for the GPU at every layer). ``collect`` turns a session's per-layer lists of any
kind into one dict of arrays, converting each field once (device records: one copy to the
host for all of them).

Never: decide anything, or touch the model (this is bookkeeping).
"""

from __future__ import annotations

from typing import Any, TypeAlias

import numpy as np
import torch

from metaattn_viz.core.experts import K
from metaattn_viz.routing.budget import Decisions

RECORD_KEYS = ("beta", "routes", "hedged", "weights", "cost", "lam")
_DTYPES = (np.float32, np.int64, np.bool_, np.float32, np.float32, np.float32)

# (beta: K floats, route, hedged, weights: K floats, cost, lam): one decode decision
OneRecord: TypeAlias = tuple[list[float], int, bool, list[float], float, float]
Record: TypeAlias = dict[str, np.ndarray]


class DeviceRecord:
    """One decode decision as tensors on the device: beta [K], route [], hedged [],
    weights [K], cost [], lam [] (any float or integer dtypes)."""

    __slots__ = ("fields",)

    def __init__(self, beta, route, hedged, weights, cost, lam):
        self.fields = (beta, route, hedged, weights, cost, lam)

    def packed(self) -> torch.Tensor:
        """The fields as one float32 row [2K + 4] (route and hedged are exact in float32)."""
        return torch.cat([f.reshape(-1).to(torch.float32) for f in self.fields])

    def to_dict(self) -> Record:
        """The record arrays [B=1, T=1, ...] (a host copy)."""
        return {key: arr[0] for key, arr in _unpack(self.packed()[None].cpu().numpy(), 1, 1).items()}


def _unpack(rows: np.ndarray, n_layers: int, n_tokens: int) -> Record:
    """Packed DeviceRecord rows [L * T, 2K + 4] (layer-major) -> the record arrays [L, 1, T, ...]."""
    out, col = {}, 0
    for key, dtype in zip(RECORD_KEYS, _DTYPES, strict=True):
        width = K if key in ("beta", "weights") else 1
        arr: np.ndarray = rows[:, col : col + width].astype(dtype).reshape(n_layers, 1, n_tokens, width)
        out[key] = arr[..., 0] if width == 1 else arr
        col += width
    return out


def record(beta: torch.Tensor, dec: Decisions, lam: float) -> Record:
    """The record of N = B * T decisions of one layer; beta [B, T, K] gives the shape."""
    b, t, _ = beta.shape
    return {
        "beta": beta.float().cpu().numpy(),
        "routes": dec.routes.view(b, t).cpu().numpy(),
        "hedged": dec.hedged.view(b, t).cpu().numpy(),
        "weights": dec.weights.view(b, t, K).float().cpu().numpy(),
        "cost": dec.cost.view(b, t).float().cpu().numpy(),
        "lam": np.full((b, t), float(lam), np.float32),
    }


def one_record(beta, route, hedged, weights, cost, lam) -> Record:
    """A decode decision (a ``OneRecord``) as the record arrays [B=1, T=1, ...]."""
    return {
        key: np.asarray(value, dtype).reshape(1, 1, -1)
        if key in ("beta", "weights")
        else np.asarray([[value]], dtype)
        for key, value, dtype in zip(
            RECORD_KEYS, (beta, route, hedged, weights, cost, lam), _DTYPES, strict=True
        )
    }


def as_dict(rec: Record | OneRecord | DeviceRecord) -> Record:
    """Any record as the record arrays."""
    if type(rec) is tuple:
        return one_record(*rec)
    if type(rec) is DeviceRecord:
        return rec.to_dict()
    return rec  # type: ignore[return-value]


def _stack_one_records(recs: list[list[Any]]) -> Record:
    """[L][T] decode tuples -> the record arrays [L, 1, T, ...], one conversion per field."""
    n_layers, n_tokens = len(recs), len(recs[0])
    cols = list(zip(*(r for layer in recs for r in layer), strict=True))
    out = {}
    for key, col, dtype in zip(RECORD_KEYS, cols, _DTYPES, strict=True):
        arr: np.ndarray = np.asarray(col, dtype)
        out[key] = arr.reshape(n_layers, 1, n_tokens, *arr.shape[1:])
    return out


def collect(recs: list[list[Any]]) -> Record:
    """Per-layer lists of records (dicts or ``OneRecord`` tuples, in order) -> the arrays
    [L, B, T, ...], the forwards concatenated along T."""
    if all(type(r) is tuple for layer in recs for r in layer):  # decode steps only
        return _stack_one_records(recs)
    if all(type(r) is DeviceRecord for layer in recs for r in layer):  # device decode steps
        rows = torch.stack([r.packed() for layer in recs for r in layer])  # one copy to the host
        return _unpack(rows.cpu().numpy(), len(recs), len(recs[0]))
    dicts = [[as_dict(r) for r in layer] for layer in recs]
    out = {}
    for key in dicts[0][0]:
        per_layer = [np.concatenate([r[key] for r in layer], axis=1) for layer in dicts]
        out[key] = np.stack(per_layer)
    return out
