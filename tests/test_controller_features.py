"""The controllers' token-level attention features (routing/controller.py, issue 14): the
far-mass share against a brute-force count, their running sums across decode steps, causality
(a text routes the same prefilled at once or token by token), and old meta.json loading."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import CharTokenizer, random_feature_map, random_maps, tiny_model

from metaattn_kernels.feature_maps import phi_key, phi_query
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing import linear_maps
from metaattn_viz.routing.controller import KINDS, ControllerConfig, ControllerStack, config_for_model
from metaattn_viz.routing.model import RoutedModel
from metaattn_viz.routing.signals import FAR_MASS_FLOOR, AttentionView, SignalState, attention_signals

FEATURES = ("base", "attention")


def _qk(b=2, hq=4, hkv=2, t=40, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, hq, t, d, generator=g), torch.randn(b, hkv, t, d, generator=g)


@pytest.mark.parametrize("learned", [False, True])
def test_far_mass_matches_a_brute_force_count(learned):
    """far share of query t = sum over far keys of phi(q_t).phi(k_s) / the same over all s <= t,
    far = [n_sink, t - w] (outside the window [t - w + 1, t] and the sinks)."""
    q, k = _qk()
    fm = random_feature_map(4, 2, 8) if learned else None
    w, ns = 8, 2
    got = attention_signals(AttentionView(q, k, fm, w, ns, SignalState(1)), 0)  # [B, T, 2 Hq + Hkv]
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    assert got.shape == (b, t, 2 * hq + hkv)
    pq, pk = phi_query(fm, q), phi_key(fm, k).repeat_interleave(hq // hkv, 1)
    a = torch.einsum("bhtf,bhsf->bhts", pq, pk)
    pos = torch.arange(t)
    causal = pos[None] <= pos[:, None]
    far = causal & (pos[None] <= pos[:, None] - w) & (pos[None] >= ns)
    share = (a * far).sum(-1) / (a * causal).sum(-1)
    want = torch.log(share + FAR_MASS_FLOOR) / math.log(1 / FAR_MASS_FLOOR)
    torch.testing.assert_close(got[..., hq : 2 * hq], want.transpose(1, 2), atol=1e-5, rtol=1e-5)
    assert torch.all(got[:, : w + ns, hq : 2 * hq] <= -0.999)  # nothing is far yet: share 0
    qn = torch.log(q.norm(dim=-1) / math.sqrt(d)).transpose(1, 2)
    kn = torch.log(k.norm(dim=-1) / math.sqrt(d)).transpose(1, 2)
    torch.testing.assert_close(got[..., :hq], qn)
    torch.testing.assert_close(got[..., 2 * hq :], kn)


@pytest.mark.parametrize("learned", [False, True])
def test_running_sums_give_the_prefill_numbers(learned):
    """A prefill of 13 tokens, then one token at a time, then a chunk of 5, carrying the
    SignalState: the same features as one prefill of everything (and a fresh state, or one
    left at another position, starts over from key 0 with the same result)."""
    q, k = _qk(b=1, t=40)
    fm = random_feature_map(4, 2, 8) if learned else None
    whole = attention_signals(AttentionView(q, k, fm, 8, 2, SignalState(1)), 0)
    state = SignalState(1)
    parts = [attention_signals(AttentionView(q[:, :, :13], k[:, :, :13], fm, 8, 2, state), 0)]
    for t in range(13, 35):
        parts.append(
            attention_signals(AttentionView(q[:, :, t : t + 1], k[:, :, : t + 1], fm, 8, 2, state), 0)
        )
    parts.append(attention_signals(AttentionView(q[:, :, 35:], k, fm, 8, 2, state), 0))
    torch.testing.assert_close(torch.cat(parts, 1), whole, atol=1e-5, rtol=1e-5)
    stale = SignalState(1)
    attention_signals(AttentionView(q[:, :, :7], k[:, :, :7], fm, 8, 2, stale), 0)
    again = attention_signals(AttentionView(q[:, :, 20:], k, fm, 8, 2, stale), 0)  # not at 20: restart
    torch.testing.assert_close(again, whole[:, 20:], atol=1e-5, rtol=1e-5)


def _routed(maps=None, kind_features=FEATURES, spread=30.0, seed=1) -> RoutedModel:
    model = tiny_model(seed=seed)
    ctrl = {k: ControllerStack(config_for_model(model.config, k, kind_features), seed=seed) for k in KINDS}
    with torch.no_grad():
        for stack in ctrl.values():
            for layer in stack.layers:
                layer.fc2.weight.mul_(spread)
                layer.fc1.weight[:, -9:].mul_(30.0)  # lean on the attention features
    choice = linear_maps.MapChoice(maps, "test") if maps is not None else None
    return RoutedModel(model, CharTokenizer(), ctrl, "tiny-llama", feature_maps=choice)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("linear_map", ["elu", "learned"])
@pytest.mark.parametrize("block", [False, True])
def test_prefill_and_token_by_token_decoding_route_identically(kind, linear_map, block):
    """Causality: the concentrations and routes of tokens P..T-1 decoded one at a time (the
    CPU decode path, numpy controller), or as one block after the cache (`block`: the
    batched path with keys before its queries), equal those of one prefill of all T tokens."""
    maps = random_maps() if linear_map == "learned" else None
    r = _routed(maps)
    assert r.controller(kind).uses_attention
    ids = torch.randint(0, 250, (1, 48), generator=torch.Generator().manual_seed(3))
    s = RoutingSettings(lam=0.5, scope="layer", window=8, n_sink=2, linear_map=linear_map)
    whole = r.prefill(ids, s, kind, use_cache=False).records
    p = 20
    res = r.prefill(ids[:, :p], s, kind, cache_capacity=ids.shape[1])
    with torch.no_grad(), r.session(s, kind, lam=res.lam) as sess:
        sess.lin_state = list(res.session.lin_state)
        for t in [p] if block else range(p, ids.shape[1]):
            r.model(input_ids=ids[:, t : None if block else t + 1], past_key_values=res.cache)
        rec = sess.pop_records()
    assert rec is not None
    torch.testing.assert_close(
        torch.as_tensor(rec["beta"]), torch.as_tensor(whole["beta"][:, :, p:]), atol=1e-4, rtol=1e-4
    )
    assert (rec["routes"] == whole["routes"][:, :, p:]).all()
    assert len(set(whole["routes"].reshape(-1).tolist())) > 1  # the test routes, not a constant


def test_concentration_one_reads_the_attention_features_like_the_batched_path():
    cfg = ControllerConfig(kind="bayes", d_model=48, n_layers=2, features=FEATURES, n_heads=4, n_kv_heads=2)
    stack = ControllerStack(cfg, seed=2)
    q, k = _qk(b=1, t=30)
    h, x = torch.randn(1, 30, 48), torch.randn(1, 30, 48)
    batched = stack.concentration(1, h, x, torch.arange(30), AttentionView(q, k, None, 8, 2, SignalState(2)))
    state = SignalState(2)
    stack.concentration(
        1,
        h[:, :29],
        x[:, :29],
        torch.arange(29),
        AttentionView(q[..., :29, :], k[..., :29, :], None, 8, 2, state),
    )
    with torch.no_grad():
        one = stack.concentration_one(
            1, h[:, 29:], x[:, 29:], 29, AttentionView(q[..., 29:, :], k, None, 8, 2, state)
        )
    torch.testing.assert_close(torch.tensor(one), batched[0, 29].detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="AttentionView"):
        stack.concentration(0, h, x, torch.arange(30))


def test_config_validates_its_features():
    with pytest.raises(ValueError, match="features"):
        ControllerConfig(features=("attention",))
    with pytest.raises(ValueError, match="features"):
        ControllerConfig(features=("base", "magic"))
    with pytest.raises(ValueError, match="n_heads"):
        ControllerConfig(features=FEATURES)
    assert ControllerConfig(features=FEATURES, n_heads=9, n_kv_heads=3).n_features == 576 + 2 + 21


def test_an_old_meta_json_without_features_loads_with_the_base_features(tmp_path):
    """meta.json written before the feature groups existed: the base features, and the
    content hash the controllers had then (hash of the config without the new fields)."""
    import hashlib
    from dataclasses import asdict

    stack = ControllerStack(ControllerConfig(d_model=48, n_layers=2), seed=4)
    stack.save(tmp_path)
    meta = json.loads((tmp_path / "meta.json").read_text())
    added = ("features", "n_heads", "n_kv_heads", "prior_costs")  # the fields added since
    old_cfg = {k: v for k, v in meta["config"].items() if k not in added}
    meta["config"] = old_cfg
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    loaded = ControllerStack.load(tmp_path)
    assert loaded.config.features == ("base",) and not loaded.uses_attention
    h = hashlib.sha256(json.dumps(old_cfg, sort_keys=True).encode())
    for name, t in sorted(loaded.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    assert loaded.content_hash() == h.hexdigest()[:16]
    assert set(old_cfg) == set(asdict(loaded.config)) - set(added)


def test_attention_controllers_round_trip_and_refuse_other_head_counts(tmp_path):
    from metaattn_viz.routing.controller import load_for_model

    model = tiny_model()
    stack = ControllerStack(config_for_model(model.config, "bayes", FEATURES), seed=0)
    stack.save(tmp_path / "ok")
    choice = load_for_model(model.config, "tiny", "bayes", tmp_path / "ok")
    assert choice.source == str(tmp_path / "ok") and choice.stack.config.features == FEATURES
    other = tiny_model(num_attention_heads=4, num_key_value_heads=1, head_dim=24)
    refused = load_for_model(other.config, "tiny", "bayes", tmp_path / "ok")
    assert refused.source == "untrained" and "heads" in refused.notes[0]


def test_the_linear_expert_takes_the_features_the_signals_mapped(monkeypatch):
    """Under a learned map, a prefill's linear expert reads phi(q) and phi(k) as the
    controllers' attention signals computed them (signals.take_mapped) instead of mapping
    q and k again: the same logits and routes, bit for bit, as when it maps them itself."""
    from metaattn_viz.routing import session as session_mod
    from metaattn_viz.routing import signals

    r = _routed(random_maps())
    ids = torch.randint(0, 250, (1, 40), generator=torch.Generator().manual_seed(5))
    s = RoutingSettings(lam=0.5, scope="layer", window=8, n_sink=2, linear_map="learned")
    taken: list[bool] = []

    def counted(*args):
        got = signals.take_mapped(*args)
        taken.append(got is not None)
        return got

    monkeypatch.setattr(session_mod, "take_mapped", counted)
    shared = r.prefill(ids, s, "bayes", use_cache=False)
    assert taken == [True] * r.n_layers
    assert 0 < int((shared.records["routes"] == 1).sum()) < shared.records["routes"].size  # linear rows
    monkeypatch.setattr(session_mod, "take_mapped", lambda *args: signals.take_mapped(*args) and None)
    own = r.prefill(ids, s, "bayes", use_cache=False)
    assert torch.equal(shared.logits, own.logits)
    assert (shared.records["routes"] == own.records["routes"]).all()
    assert all(slot is None for slot in shared.session.signals.mapped)  # nothing large kept


def test_take_mapped_refuses_other_tensors_maps_and_gradients():
    from metaattn_viz.routing.signals import take_mapped

    fm = random_maps()[0]
    q, k = torch.randn(1, 6, 5, 16), torch.randn(1, 2, 5, 16)
    state = SignalState(1)
    attention_signals(AttentionView(q, k, fm, 8, 2, state), 0)
    assert take_mapped(state, 0, q, k, random_maps(seed=9)[0]) is None  # another map
    assert state.mapped[0] is None  # emptied either way
    attention_signals(AttentionView(q, k, fm, 8, 2, state), 0)
    assert take_mapped(state, 0, q.clone(), k, fm) is None  # other tensors
    attention_signals(AttentionView(q, k, fm, 8, 2, state), 0)
    pq, pk = take_mapped(state, 0, q, k, fm)
    torch.testing.assert_close(pq, fm.query(q), rtol=0, atol=0)
    torch.testing.assert_close(pk, fm.key(k), rtol=0, atol=0)
    qg = q.clone().requires_grad_()
    attention_signals(AttentionView(qg, k, fm, 8, 2, state), 0)
    assert take_mapped(state, 0, qg, k, fm) is None  # the signals read q detached
