"""How token-dependent routing is: each layer's majority expert, and the share of decisions
that differ from it (the routing variety; 0 for any static per-layer map).

Used by the evaluation (a column of every policy row) and by the page (the expert map drawn
relative to each layer's usual expert, and the share next to the cost meter).
"""

from __future__ import annotations

import numpy as np

from metaattn_viz.core.experts import K


def layer_majority(routes: np.ndarray) -> np.ndarray:
    """Each layer's most frequent expert (ties: the lower id). routes [L, ...] of expert
    ids, layer first -> [L] ints (0 where a layer has no decisions)."""
    per_layer = np.asarray(routes).reshape(len(routes), -1)
    if per_layer.shape[1] == 0:
        return np.zeros(len(per_layer), dtype=np.int64)
    counts = np.stack([np.bincount(r, minlength=K) for r in per_layer.astype(np.int64)])
    return counts.argmax(1)


def routing_variety(routes: np.ndarray) -> float:
    """Share of decisions that differ from their layer's majority expert. routes [L, ...]:
    the expert id of every decision, layer first."""
    per_layer = np.asarray(routes).reshape(len(routes), -1).astype(np.int64)
    if per_layer.size == 0:
        return 0.0
    majority = layer_majority(per_layer)
    return float((per_layer != majority[:, None]).mean())
