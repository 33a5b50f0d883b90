"""The whole-model benchmark rows follow the `bench --json` contract (tiny model, quick)."""

from __future__ import annotations

import pytest
import torch

from helpers import routed_tiny
from metaattn_viz.bench.model import model_rows


def test_model_rows_follow_the_contract():
    rows = model_rows(routed_tiny(seed=2), budget=0.3, quick=True)
    assert [r["case"] for r in rows] == ["routing-overhead", "decode"]
    for r in rows:
        assert {"seq_len", "budget", "backend", "dense_ms", "routed_ms", "ratio",
                "max_abs_err"} <= set(r)
        assert r["dense_ms"] > 0 and r["routed_ms"] > 0
        assert r["ratio"] == pytest.approx(r["routed_ms"] / r["dense_ms"])
    assert rows[0]["max_abs_err"] <= 1e-4  # budget 1 is the dense model
    assert torch.is_grad_enabled()  # the benchmark leaves autograd as it found it


def test_plain_copy_is_the_unrouted_model_without_hooks():
    from metaattn_viz.bench.model import plain_copy

    r = routed_tiny(seed=4)
    plain = plain_copy(r)
    assert plain is not r.model
    assert not any(m._forward_pre_hooks or m._forward_pre_hooks_with_kwargs for m in plain.modules())
    assert any(m._forward_pre_hooks_with_kwargs for m in r.model.modules())  # the original keeps them
    ids = torch.tensor([r.encode("the same weights, no hooks")])
    with torch.no_grad():
        assert torch.allclose(plain(input_ids=ids).logits, r.dense_logits(ids), atol=1e-5)
