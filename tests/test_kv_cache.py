"""kv_cache.GrowableCache against transformers' DynamicCache: the same keys, values and
logits step by step, through regrowth, crops and batch reorderings."""

import torch
from helpers import routed_tiny
from transformers import DynamicCache

from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing.kv_cache import GrowableCache, GrowableLayer


def _decode(r, cache, ids, steps):
    logits = []
    with torch.no_grad(), r.session(RoutingSettings(budget=1.0), mode="dense"):
        out = r.model(input_ids=ids, past_key_values=cache, use_cache=True)
        for _ in range(steps):
            nxt = out.logits[:, -1:].argmax(-1)
            out = r.model(input_ids=nxt, past_key_values=cache, use_cache=True)
            logits.append(out.logits)
    return torch.cat(logits, dim=1)


def test_growable_cache_decodes_like_dynamic_cache():
    r = routed_tiny(seed=3)
    ids = torch.tensor([r.encode("growing a cache in place " * 12)])
    want = _decode(r, DynamicCache(), ids, 40)
    for capacity in (0, ids.shape[1] + 40, 5):  # default, exact, and regrown many times
        cache = GrowableCache(capacity)
        got = _decode(r, cache, ids, 40)
        assert torch.allclose(got, want, atol=1e-5, rtol=0)
        assert cache.get_seq_length() == ids.shape[1] + 40


def test_growable_layer_appends_crops_and_survives_reordering():
    lay = GrowableLayer(capacity=4)
    ref = GrowableLayer.__mro__[1]()  # DynamicLayer
    g = torch.Generator().manual_seed(0)
    for n in (3, 1, 1, 6, 1):
        k = torch.randn(2, 3, n, 8, generator=g)
        v = torch.randn(2, 3, n, 8, generator=g)
        got, want = lay.update(k, v), ref.update(k, v)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    lay.crop(-2), ref.crop(-2)
    assert lay.get_seq_length() == ref.get_seq_length() == 10
    lay.batch_select_indices(torch.tensor([1])), ref.batch_select_indices(torch.tensor([1]))
    k, v = torch.randn(1, 3, 2, 8, generator=g), torch.randn(1, 3, 2, 8, generator=g)
    got, want = lay.update(k, v), ref.update(k, v)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert lay.keys.shape == (1, 3, 12, 8)


def test_a_query_block_after_the_cache_at_budget_one_is_the_dense_model():
    """Budget 1 runs plain SDPA; a block of several new tokens after a cache must see every
    cached key (causal from its own positions, not from the first key)."""
    r = routed_tiny(seed=5)
    ids = torch.tensor([r.encode("a block of tokens after a cache, " * 3)])
    want = r.dense_logits(ids)
    cache = GrowableCache(0)
    with torch.no_grad(), r.session(RoutingSettings(budget=1.0)):
        first = r.model(input_ids=ids[:, :40], past_key_values=cache, use_cache=True).logits
        rest = r.model(input_ids=ids[:, 40:], past_key_values=cache, use_cache=True).logits
    assert torch.allclose(torch.cat([first, rest], dim=1), want, atol=1e-5, rtol=0)
