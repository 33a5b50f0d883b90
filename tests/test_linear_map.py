"""The routing setting linear_map (issue 14): the routed model's linear expert with the
learned feature maps shipped for its model (routing/linear_maps.py) or elu + 1.

A tiny model gets random maps of its own shape. "learned" must run the same through the
CPU and reference backends (prefill and decode, on the CPU fast path and the device decode
path), change what an all-linear model computes, and fail plainly where the model has no
maps; "elu" must stay bit-identical to a model without maps. The setting is validated,
logged and replayed, and the attention view draws the map the run used.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import CharTokenizer, random_maps, routed_tiny, routed_with_maps, synthetic_trace, tiny_model

from metaattn_kernels.reference import routed_attention_reference
from metaattn_viz.core.settings import LINEAR, LINEAR_MAPS, RoutingSettings
from metaattn_viz.routing import linear_maps, loading
from metaattn_viz.routing.model import RoutedModel

TOL = 1e-4


def ids_of(n=40, seed=7):
    return torch.randint(0, 250, (1, n), generator=torch.Generator().manual_seed(seed))


def prefill_and_decode(r, ids, s, steps=8):
    """Prefill, then `steps` greedy decode steps: (logits [T + steps, V], decode records,
    the decode session's linear states)."""
    res = r.prefill(ids, s, cache_capacity=ids.shape[1] + steps)
    logits = [res.logits[0]]
    with torch.no_grad(), r.session(s, lam=res.lam) as sess:
        sess.lin_state = list(res.session.lin_state)
        nxt = res.logits[0, -1].argmax().view(1, 1)
        for _ in range(steps):
            out = r.model(input_ids=nxt, past_key_values=res.cache).logits[0]
            logits.append(out)
            nxt = out[-1].argmax().view(1, 1)
        rec = sess.pop_records()
    return torch.cat(logits), res.records, rec, sess.lin_state


SETTINGS = RoutingSettings(budget=0.5, scope="layer", window=8, n_sink=2, linear_map="learned")


# -- the setting -----------------------------------------------------------------------------
def test_the_setting_is_validated_and_defaults_to_auto():
    assert LINEAR_MAPS == ("auto", "elu", "learned")
    assert RoutingSettings().linear_map == "auto"
    for bad in ("relu", "", None, "Learned"):
        with pytest.raises(ValueError, match=r"linear_map must be one of auto, elu, learned"):
            RoutingSettings(linear_map=bad)
    assert RoutingSettings.from_dict(SETTINGS.to_dict()) == SETTINGS


def test_auto_is_learned_where_the_model_has_maps_else_elu_and_traces_say_which():
    """ "auto" computes exactly what the map it stands for computes; a trace, the runtime
    report and the eval rows name that map, never "auto"."""
    auto = SETTINGS.with_(linear_map="auto")
    ids = ids_of(16)
    with_maps = routed_with_maps(random_maps())
    a = with_maps.prefill(ids, auto).logits
    assert torch.equal(a, with_maps.prefill(ids, SETTINGS).logits)
    assert with_maps.new_trace("bayes", auto).settings.linear_map == "learned"
    assert with_maps.runtime(auto)["linear_map"] == "learned"
    plain = routed_tiny()
    b = plain.prefill(ids, auto).logits
    assert torch.equal(b, plain.prefill(ids, SETTINGS.with_(linear_map="elu")).logits)
    assert plain.new_trace("bayes", auto).settings.linear_map == "elu"
    assert plain.runtime(auto)["linear_map"] == "elu"


def test_learned_without_maps_names_the_setting_and_the_model():
    r = routed_tiny()  # no maps handed over
    with pytest.raises(
        ValueError, match=r"linear_map='learned': no learned feature maps exist for tiny-llama"
    ):
        r.prefill(ids_of(12), SETTINGS)
    with pytest.raises(ValueError, match=r"python -m metaattn_viz\.training\.feature_maps"):
        r.route("some text", SETTINGS.with_(scope="global"))
    r.prefill(ids_of(12), SETTINGS.with_(linear_map="elu"))  # elu needs no maps


# -- backends and decoding -------------------------------------------------------------------
@pytest.mark.parametrize("decode_path", ["host", "device"])
def test_learned_prefill_and_decode_agree_across_cpu_and_reference(decode_path, monkeypatch):
    """Prefill + 8 decode steps with the learned maps: the CPU backend (its fast decode step
    on the host path) and the reference backend agree within 1e-4, decision for decision."""
    import metaattn_viz.routing.session as session_mod

    if decode_path == "device":  # the path a GPU or a bfloat16 model takes, here on the CPU
        monkeypatch.setattr(session_mod, "host_decode", lambda device, dtype: False)
    r = routed_with_maps(random_maps())
    ids = ids_of()
    want = prefill_and_decode(r, ids, SETTINGS.with_(backend="reference"))
    got = prefill_and_decode(r, ids, SETTINGS.with_(backend="cpu"))
    assert (got[0] - want[0]).abs().max() <= TOL
    for a, b in zip(got[1:3], want[1:3], strict=True):
        assert np.array_equal(a["routes"], b["routes"])
    routes = np.concatenate([want[1]["routes"], want[2]["routes"]], axis=2)
    assert (routes == LINEAR).mean() > 0.1  # the linear expert really ran, in prefill and decode
    assert (want[2]["routes"] == LINEAR).any()


def test_all_linear_with_learned_maps_differs_from_elu():
    r = routed_with_maps(random_maps())
    ids = ids_of(24)
    linear = torch.nn.functional.one_hot(torch.full((1, 24), LINEAR), 3).float()
    forced = [linear] * r.n_layers
    elu = r.prefill(ids, SETTINGS.with_(linear_map="elu"), forced_weights=forced).logits
    learned = r.prefill(ids, SETTINGS, forced_weights=forced).logits
    assert (learned - elu).abs().max() > 1e-2


def test_elu_is_bit_identical_to_a_model_without_maps():
    """A model that has learned maps, routed with linear_map="elu", computes exactly what a
    model without maps computes under settings that never name the field."""
    plain, with_maps = routed_tiny(seed=1, spread=30.0), routed_with_maps(random_maps())
    ids = ids_of()
    s = RoutingSettings(budget=0.5, scope="layer", window=8, n_sink=2)
    a = prefill_and_decode(plain, ids, s)
    b = prefill_and_decode(with_maps, ids, s.with_(linear_map="elu"))
    assert torch.equal(a[0], b[0])
    assert np.array_equal(a[2]["weights"], b[2]["weights"])
    assert (a[2]["routes"] == LINEAR).any()


def test_a_decode_state_keeps_the_map_it_was_built_with():
    maps = random_maps()
    r = routed_with_maps(maps)
    ids = ids_of()
    logits, _, rec, states = prefill_and_decode(r, ids, SETTINGS)
    assert all(st is None or st[3] is r.feature_maps[layer] for layer, st in enumerate(states))
    assert any(st is not None for st in states)
    # a later session that carries the states over reads them with their own map
    res = r.prefill(ids, SETTINGS, cache_capacity=ids.shape[1] + 1)
    nxt = res.logits[0, -1].argmax().view(1, 1)
    outs = []
    for s in (SETTINGS, SETTINGS.with_(linear_map="elu")):
        cache = res.cache if not outs else r.prefill(ids, SETTINGS, cache_capacity=ids.shape[1] + 1).cache
        with torch.no_grad(), r.session(s, lam=res.lam) as sess:
            sess.lin_state = list(res.session.lin_state)
            outs.append(r.model(input_ids=nxt, past_key_values=cache).logits)
            rec = sess.pop_records()
    assert (rec["weights"][..., LINEAR] > 0).any()
    assert torch.equal(outs[0], outs[1])


# -- loading -----------------------------------------------------------------------------------
def test_maps_with_a_non_finite_meta_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ValueError, match="Out of range float"):
        linear_maps.save(random_maps(), tmp_path / "maps", {"val_loss": float("nan")})
    assert not (tmp_path / "maps").exists()


def test_maps_are_loaded_for_the_model_and_refused_for_another_shape(tmp_path, caplog):
    maps = random_maps()
    linear_maps.save(maps, tmp_path / "ok", {"kind": "hedgehog"})
    linear_maps.save(random_maps(n_layers=2), tmp_path / "short", {"kind": "hedgehog"})
    loaded = loading.LoadedModel(
        tiny_model(seed=1), CharTokenizer(), loading.ModelSource("config", "-", "tiny llama"), 0.0, "config"
    )
    r = RoutedModel.from_loaded(loaded, feature_maps_dir=tmp_path / "ok")
    assert r.feature_maps_source == str(tmp_path / "ok")
    assert all(torch.equal(a.q_weight, b.q_weight) for a, b in zip(r.feature_maps, maps, strict=True))
    r.prefill(ids_of(12), SETTINGS)
    r.detach()  # a model is routed by one RoutedModel at a time

    r = RoutedModel.from_loaded(loaded, feature_maps_dir=tmp_path / "short")
    assert r.feature_maps is None and "another model shape" in caplog.text
    with pytest.raises(
        ValueError, match=r"no learned feature maps exist for tiny-llama .*another model shape"
    ):
        r.prefill(ids_of(12), SETTINGS)
    r.detach()
    assert RoutedModel.from_loaded(loaded, feature_maps_dir=tmp_path / "none").feature_maps is None


def test_the_shipped_maps_fit_the_shipped_model():
    import transformers

    config = transformers.AutoConfig.from_pretrained(loading.SMOLLM2_CONFIG.parent)
    choice = linear_maps.load_for_model(config, "smollm2-135m-instruct", None, config.head_dim)
    assert choice.maps is not None, choice.source
    assert len(choice.maps) == config.num_hidden_layers
    assert linear_maps.load_meta(linear_maps.default_folder("smollm2-135m-instruct"))["kind"] == "hedgehog"


# -- what the app and the log see ----------------------------------------------------------------
def test_the_attention_view_draws_the_map_the_run_used():
    """The capture carries each layer's map, and the linear pattern drawn with it, applied to
    v, is the learned linear expert's output (kernels.reference)."""
    from metaattn_viz.app import attention_maps

    maps = random_maps()
    r = routed_with_maps(maps)
    ids = ids_of(14)
    res = r.prefill(ids, SETTINGS, capture_qk=True, use_cache=False)
    assert [entry[3] for entry in res.session.qk] == r.feature_maps

    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 6, 14, 16, generator=g, dtype=torch.float64)
    k = torch.randn(1, 2, 14, 16, generator=g, dtype=torch.float64)
    v = torch.randn(1, 2, 14, 16, generator=g, dtype=torch.float64)
    w = torch.rand(1, 14, 3, generator=g, dtype=torch.float64)
    w = w / w.sum(-1, keepdim=True)
    fm = maps[0]
    y, _ = routed_attention_reference(q, k, v, w, window=4, n_sink=1, scale=0.25, feature_map=fm)
    pat = attention_maps.mixed_pattern(q[0], k[0], 0.25, torch.arange(14), w[0].numpy(), 4, 1, feature_map=fm)
    torch.testing.assert_close(pat @ v[0].repeat_interleave(3, 0), y[0], rtol=1e-5, atol=1e-6)
    elu = attention_maps.mixed_pattern(q[0], k[0], 0.25, torch.arange(14), w[0].numpy(), 4, 1)
    assert (elu - pat).abs().max() > 1e-3

    weights, tokens = np.asarray(res.records["weights"][:, 0]), list("x" * 14)
    view = attention_maps.attention_view(res.session.qk, weights, tokens, 13, 8, 2)
    elu_capture = [entry[:3] for entry in res.session.qk]  # a capture without a map: elu + 1
    plain = attention_maps.attention_view(elu_capture, weights, tokens, 13, 8, 2)
    assert not np.allclose(view.attention, plain.attention)  # the map changed the drawing


def test_the_log_keeps_the_setting_and_a_replay_gives_it_back(tmp_path):
    from metaattn_viz.store import RunLog

    trace = synthetic_trace(n_layers=3, n_tokens=9, seed=4)
    trace.settings = trace.settings.with_(linear_map="learned")
    with RunLog(tmp_path / "routing.duckdb") as log:
        run_id = log.start_run(trace, kind="route")
        log.finish(run_id, trace)
        assert log.get_run(run_id)["linear_map"] == "learned"
        assert log.load_trace(run_id).settings.linear_map == "learned"


# -- the command line ------------------------------------------------------------------------------
def test_the_cli_takes_linear_map_and_hands_feature_maps_to_its_module(monkeypatch, capsys):
    from metaattn_viz import cli
    from metaattn_viz.training import feature_maps

    parser = cli.build_parser()
    args = parser.parse_args(["route", "--prompt", "x", "--linear-map", "learned"])
    assert cli.settings_from_args(args).linear_map == "learned"
    assert cli.settings_from_args(parser.parse_args(["route", "--prompt", "x"])).linear_map == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["route", "--prompt", "x", "--linear-map", "relu"])
    assert "invalid choice: 'relu'" in capsys.readouterr().err

    seen = []
    monkeypatch.setattr(feature_maps, "main", lambda argv=None: seen.append(argv) or 0)
    assert cli.main(["feature-maps", "--data", "corpus/x.raw", "--steps", "3", "--eval-only"]) == 0
    assert seen == [["--data", "corpus/x.raw", "--steps", "3", "--eval-only"]]
    with pytest.raises(SystemExit):  # other commands still refuse what they do not know
        cli.main(["route", "--prompt", "x", "--steps", "3"])
