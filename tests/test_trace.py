"""RoutingTrace.extend: amortised growth that never disturbs views handed out earlier."""

import itertools

import numpy as np
from helpers import empty_like, grow, synthetic_trace


def _fields(t):
    return (t.concentration, t.routes, t.hedged, t.weights, t.cost, t.lam)


def test_grown_trace_equals_the_whole_and_old_views_stay_put():
    full = synthetic_trace(n_layers=3, n_tokens=70, seed=4)
    views = []
    for trace in grow(full, itertools.cycle([1, 2, 5, 1, 30, 1, 3])):
        views.append((trace.n_tokens, [a.copy() for a in _fields(trace)], _fields(trace)))
    assert trace.n_tokens == full.n_tokens and trace.token_ids == full.token_ids
    for got, want in zip(_fields(trace), _fields(full), strict=True):
        assert got.dtype == want.dtype and np.array_equal(got, want)
    for n, copies, held in views:  # what a plot or the store's writer kept meanwhile
        for c, v in zip(copies, held, strict=True):
            assert v.shape[1] == n and np.array_equal(c, v)


def test_extend_after_fields_were_replaced():
    full = synthetic_trace(n_layers=2, n_tokens=10, seed=1)
    trace = empty_like(full)
    args = (
        lambda a, b: (
            full.token_ids[a:b],
            full.tokens[a:b],  # noqa: E731
            *(x[:, a:b] for x in _fields(full)),
        )
    )
    trace.extend(*args(0, 4))
    trace.routes = trace.routes.copy()  # e.g. edited in place by a caller: no longer our buffer
    trace.extend(*args(4, 10))
    for got, want in zip(_fields(trace), _fields(full), strict=True):
        assert np.array_equal(got, want)
