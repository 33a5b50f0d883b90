"""The whole-model benchmark rows follow the `bench --json` contract (tiny model, quick)."""

from __future__ import annotations

import pytest
import torch
from helpers import routed_tiny

from metaattn_viz.bench.model import model_rows, plain_copy, prefill_speed
from metaattn_viz.core.settings import RoutingSettings


def test_model_rows_follow_the_contract():
    rows = model_rows(routed_tiny(seed=2), budget=0.3, quick=True)
    assert [r["case"] for r in rows] == ["routing-overhead", "decode"]
    for r in rows:
        assert {"seq_len", "budget", "backend", "dense_ms", "routed_ms", "ratio", "max_abs_err"} <= set(r)
        assert r["dense_ms"] > 0 and r["routed_ms"] > 0
        assert r["ratio"] == pytest.approx(r["routed_ms"] / r["dense_ms"])
    assert rows[0]["max_abs_err"] <= 1e-4  # budget 1 is the dense model
    assert torch.is_grad_enabled()  # the benchmark leaves autograd as it found it


def test_the_prefill_row_says_how_many_passes_the_lambda_search_took():
    r = routed_tiny(seed=2)
    row = prefill_speed(r, plain_copy(r), seq_len=48, budget=0.5, repeats=1)
    assert row["case"] == "prefill" and row["speedup"] == pytest.approx(row["dense_ms"] / row["routed_ms"])
    # a text this short is its own pilot (a whole-text pass), then routed at least once more
    assert row["pilot_tokens"] == 48 and 2 <= row["passes"] <= 3
    assert row["scope"] == "global"
    one = prefill_speed(r, plain_copy(r), seq_len=48, budget=0.5, repeats=1, scope="layer")
    assert one["scope"] == "layer" and one["pilot_tokens"] == 0 and one["passes"] == 1  # no pilot


def test_plain_copy_is_the_unrouted_model_without_hooks():
    """The dense baseline stays dense while a routing session is open (the one thing a
    forgotten hook or the routed attention would change), the original still routes, and
    the copy shares no memory with it."""
    r = routed_tiny(seed=4)
    plain = plain_copy(r)
    ids = torch.tensor([r.encode("the same weights, no hooks, whatever the session says")])
    dense = r.dense_logits(ids)
    cheap = RoutingSettings(budget=0.15, window=4, n_sink=0, scope="layer")  # every token linear
    with torch.no_grad(), r.session(cheap) as sess:
        plain_logits = plain(input_ids=ids, use_cache=False).logits
        assert all(x is None for x in sess.x + sess.h)  # no routing hook of the copy fired
        routed_logits = r.model(input_ids=ids, use_cache=False).logits
    assert torch.allclose(plain_logits, dense, atol=1e-5)
    assert (routed_logits - dense).abs().max() > 1e-3  # the original keeps its routing
    own = {t.data_ptr() for t in r.model.state_dict().values()}
    assert not own & {t.data_ptr() for t in plain.state_dict().values()}
