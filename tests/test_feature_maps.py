"""The linear expert's learned feature maps (kernels/feature_maps.py) in every backend, and
their distillation (metaattn_viz.training.feature_maps).

Every fast path with a learned map is checked against the reference twin (float32, 1e-4);
the reference itself against a direct computation from the features; feature_map=None must
give bit-identical results to a call without the argument (elu + 1, today's behaviour).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import (
    HKV,
    HQ,
    MIXES,
    SIZES,
    TOL,
    CharTokenizer,
    D,
    make_qkv,
    make_weights,
    max_err,
    random_map,
    tiny_corpus,
    tiny_model,
)

from metaattn_kernels import reference as ref
from metaattn_kernels.cpu import routed_attention_cpu
from metaattn_kernels.decode import decode_step, linear_state_upto
from metaattn_kernels.dispatch import routed_attention
from metaattn_kernels.feature_maps import FeatureMap, elu_plus_one, hedgehog, input_scale


def direct_linear(q, k, v, fm):
    """The spec from the features alone: o_i = sum_{j<=p_i} a_ij v_j / sum_{j<=p_i} a_ij,
    a_ij = phi_q(q_i) . phi_k(k_j)."""
    tq, tk = q.shape[2], k.shape[2]
    g = q.shape[1] // k.shape[1]
    pq = fm.query(q.double())
    pk = fm.key(k.double()).repeat_interleave(g, dim=1)
    a = pq @ pk.transpose(-1, -2)
    allowed = torch.arange(tk)[None, :] <= torch.arange(tk - tq, tk)[:, None]
    a = a.masked_fill(~allowed, 0.0)
    return (a @ v.double().repeat_interleave(g, dim=1)) / a.sum(-1, keepdim=True)


def test_map_is_per_head_softmax_pair():
    fm = random_map()
    x = torch.randn(2, HQ, 5, D)
    got = fm.query(x)
    for h in range(HQ):
        z = (x[:, h] * D**-0.25) @ fm.q_weight[h] + fm.q_bias[h]
        want = torch.cat([torch.softmax(z, -1), torch.softmax(-z, -1)], -1)
        assert max_err(got[:, h], want) <= 1e-6
    assert got.shape == x.shape and bool((got > 0).all())
    assert max_err(got.sum(-1), torch.full(got.shape[:-1], 2.0)) <= 1e-5  # two softmaxes of mass 1


def test_bad_feature_map_is_refused():
    q, k, v = make_qkv(b=1, hq=HQ, hkv=HKV, tq=5, d=D)
    w = make_weights("linear", 1, 5)
    with pytest.raises(ValueError, match="feature_map"):
        routed_attention(q, k, v, w, window=4, n_sink=0, feature_map=random_map(hq=6, hkv=2))
    with pytest.raises(ValueError, match="feature_map"):
        routed_attention(q, k, v, w, window=4, n_sink=0, feature_map="hedgehog")
    with pytest.raises(ValueError, match="k_weight"):
        FeatureMap(
            torch.zeros(HQ, D, D // 2),
            torch.zeros(HQ, D // 2),
            torch.zeros(HKV, D, 3),
            torch.zeros(HKV, D // 2),
        )


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("tq,tk", [(17, 17), (130, 130), (1, 40), (17, 130)])
def test_none_is_elu_bit_identical(backend, tq, tk):
    q, k, v = make_qkv(b=2, hq=HQ, hkv=HKV, tq=tq, tk=tk, d=D)
    w = make_weights("hedged", 2, tq)
    kw = dict(window=8, n_sink=4, backend=backend)
    y0, (s0, z0) = routed_attention(q, k, v, w, **kw)
    y1, (s1, z1) = routed_attention(q, k, v, w, feature_map=None, **kw)
    assert torch.equal(y0, y1) and torch.equal(s0, s1) and torch.equal(z0, z1)
    assert torch.equal(ref.feature_map(q), torch.nn.functional.elu(q) + 1.0)


def test_reference_forms_match_the_direct_spec():
    fm = random_map()
    q, k, v = make_qkv(b=2, hq=HQ, hkv=HKV, tq=23, tk=40, d=D)
    want = direct_linear(q, k, v, fm)
    par, (s, z) = ref.linear_attention(q, k, v, feature_map=fm, eps=0.0)
    rec, (s2, z2) = ref.linear_attention_recurrent(q, k, v, feature_map=fm, eps=0.0)
    assert max_err(par, want) <= TOL and max_err(rec, want) <= TOL
    assert max_err(s, s2) <= TOL and max_err(z, z2) <= TOL
    # the learned map gives another answer than elu + 1 (the argument is not ignored)
    assert max_err(ref.linear_attention(q, k, v, eps=0.0)[0], want) > 1e-2
    # a state carried over a split equals one pass
    st = ref.linear_state(k[:, :, :17], v[:, :, :17], fm)
    part, _ = ref.linear_attention(q, k, v, state=st, feature_map=fm, eps=0.0)
    assert max_err(part, want) <= TOL


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("tq,tk", SIZES)
@pytest.mark.parametrize("with_state", [False, True])
def test_cpu_matches_reference_with_learned_map(mix, tq, tk, with_state):
    fm = random_map()
    q, k, v = make_qkv(b=2, hq=HQ, hkv=HKV, tq=tq, tk=tk, d=D)
    w = make_weights(mix, 2, tq)
    state = ref.linear_state(k[:, :, : tk - tq], v[:, :, : tk - tq], fm) if with_state else None
    kw = dict(window=8, n_sink=4, linear_state=state, feature_map=fm)
    want, (sw, zw) = routed_attention(q, k, v, w, backend="reference", **kw)
    got, (sg, zg) = routed_attention(q, k, v, w, backend="cpu", **kw)
    assert max_err(got, want) <= TOL
    assert max_err(sg, sw) <= TOL and max_err(zg, zw) <= TOL


@pytest.mark.parametrize("with_state", [False, True])
def test_given_features_are_the_ones_the_map_gives(with_state):
    """features=(fm.query(q), fm.key(k from Tk - Tq)): the cpu backend's result is bit for bit
    the one it computes mapping q and k itself; other backends accept and ignore them."""
    fm = random_map()
    tq, tk = 40, 56 if with_state else 40
    q, k, v = make_qkv(b=1, hq=HQ, hkv=HKV, tq=tq, tk=tk, d=D)
    w = make_weights("mix", 1, tq)
    state = ref.linear_state(k[:, :, : tk - tq], v[:, :, : tk - tq], fm) if with_state else None
    kw = dict(window=8, n_sink=4, linear_state=state, feature_map=fm)
    features = (fm.query(q), fm.key(k[:, :, tk - tq :]))
    own = routed_attention(q, k, v, w, backend="cpu", **kw)
    given = routed_attention(q, k, v, w, backend="cpu", features=features, **kw)
    assert torch.equal(own[0], given[0]) and all(
        torch.equal(a, b) for a, b in zip(own[1], given[1], strict=True)
    )
    # features that are not the map's change the linear rows: the backend really reads them
    wrong = routed_attention(q, k, v, w, backend="cpu", features=(features[0] * 0.5, features[1]), **kw)
    assert not torch.equal(own[0], wrong[0])
    ref_out = routed_attention(q, k, v, w, backend="reference", features=features, **kw)
    assert max_err(ref_out[0], own[0]) <= TOL


def test_bad_features_are_refused():
    fm = random_map()
    q, k, v = make_qkv(b=1, hq=HQ, hkv=HKV, tq=8, tk=8, d=D)
    w = make_weights("mix", 1, 8)
    good = (fm.query(q), fm.key(k))
    with pytest.raises(ValueError, match="feature_map"):
        routed_attention(q, k, v, w, window=4, n_sink=1, features=good)
    with pytest.raises(
        ValueError, match=r"features phi\(k\) must be a float tensor of shape \[1, 3, 8, 16\]"
    ):
        routed_attention(
            q, k, v, w, window=4, n_sink=1, feature_map=fm, features=(good[0], good[1][:, :, :4])
        )
    with pytest.raises(ValueError, match="must be None or a pair"):
        routed_attention(q, k, v, w, window=4, n_sink=1, feature_map=fm, features=good[0])


def test_cpu_learned_map_keeps_gradients():
    fm = random_map()
    q, k, v = (x.requires_grad_() for x in make_qkv(b=1, hq=HQ, hkv=HKV, tq=70, d=D))
    w = make_weights("random", 1, 70)
    y, _ = routed_attention(q, k, v, w, window=8, n_sink=4, backend="cpu", feature_map=fm)
    y.square().sum().backward()
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    y2, _ = ref.routed_attention_reference(q2, k2, v2, w, window=8, n_sink=4, feature_map=fm)
    y2.square().sum().backward()
    for a, b in ((q, q2), (k, k2), (v, v2)):
        assert max_err(a.grad, b.grad) <= 1e-3


@pytest.mark.parametrize("w", [(0.0, 1.0, 0.0), (0.5, 0.2, 0.3), (1.0, 0.0, 0.0)])
@pytest.mark.parametrize("tk", [1, 17, 130])
def test_decode_step_matches_reference_with_learned_map(w, tk):
    fm = random_map()
    q, k, v = make_qkv(b=2, hq=HQ, hkv=HKV, tq=1, tk=tk, d=D)
    want, (sw, zw) = ref.routed_attention_reference(
        q, k, v, torch.tensor(w).expand(2, 1, 3), window=8, n_sink=4, feature_map=fm
    )
    got, state = decode_step(q, k, v, list(w), window=8, n_sink=4, feature_map=fm)
    assert max_err(got, want) <= TOL
    if w[1] > 0:
        assert max_err(state[0], sw) <= TOL and max_err(state[1], zw) <= TOL


def test_decode_state_steps_match_one_pass():
    """Token by token, the recurrent state (caught up lazily) gives the parallel form's outputs."""
    fm = random_map()
    q, k, v = make_qkv(b=1, hq=HQ, hkv=HKV, tq=30, d=D)
    want, (sw, zw) = ref.linear_attention(q, k, v, feature_map=fm)
    state = None
    for t in range(30):
        w = [0.0, 1.0, 0.0] if t % 3 == 0 or t == 29 else [1.0, 0.0, 0.0]  # skipped steps leave it behind
        y, state = decode_step(
            q[:, :, t : t + 1],
            k[:, :, : t + 1],
            v[:, :, : t + 1],
            w,
            window=4,
            n_sink=0,
            state=state,
            feature_map=fm,
        )
        if w[1] > 0:
            assert max_err(y, want[:, :, t : t + 1]) <= TOL
    assert max_err(state[0], sw) <= TOL and max_err(state[1], zw) <= TOL
    s, z, n = linear_state_upto(None, k, v, 30, fm)
    assert n == 30 and max_err(s, sw) <= TOL and max_err(z, zw) <= TOL


def test_cpu_decode_with_state_matches_reference():
    fm = random_map()
    q, k, v = make_qkv(b=2, hq=HQ, hkv=HKV, tq=1, tk=50, d=D)
    state = ref.linear_state(k[:, :, :49], v[:, :, :49], fm)
    w = make_weights("linear", 2, 1)
    kw = dict(window=8, n_sink=4, linear_state=state, feature_map=fm)
    want, _ = ref.routed_attention_reference(q, k, v, w, **kw)
    got, _ = routed_attention_cpu(q, k, v, w, **kw)
    assert max_err(got, want) <= TOL


# -- Triton: run in the interpreter in a fresh process (TRITON_INTERPRET must be set before
# triton is first imported), or directly on CUDA

TRITON_CASES = [
    ("linear", 17, 17, False),
    ("hedged", 17, 40, True),
    ("random", 70, 70, False),
    ("linear", 1, 40, True),
    ("linear", 1, 40, False),
    ("hedged", 5, 5, False),
]


def _triton_cases(dev: str) -> None:
    for mix, tq, tk, with_state in TRITON_CASES:
        fm = random_map()
        q, k, v = make_qkv(b=2, hq=HQ, hkv=HKV, tq=tq, tk=tk, d=D)
        w = make_weights(mix, 2, tq)
        state = ref.linear_state(k[:, :, : tk - tq], v[:, :, : tk - tq], fm) if with_state else None
        want, (sw, zw) = ref.routed_attention_reference(
            q, k, v, w, window=8, n_sink=4, linear_state=state, feature_map=fm
        )
        st = None if state is None else tuple(x.to(dev) for x in state)
        got, (sg, zg) = routed_attention(
            *(x.to(dev) for x in (q, k, v, w)),
            window=8,
            n_sink=4,
            linear_state=st,
            backend="triton",
            feature_map=fm,
        )
        case = (mix, tq, tk, with_state)
        assert max_err(got.cpu(), want) <= TOL, case
        assert max_err(sg.cpu(), sw) <= TOL and max_err(zg.cpu(), zw) <= TOL, case
        if with_state or tq == tk:  # the features the caller may hand over: the same result
            feats = (fm.query(q.to(dev)), fm.key(k[:, :, tk - tq :].to(dev)))
            given, _ = routed_attention(
                *(x.to(dev) for x in (q, k, v, w)),
                window=8,
                n_sink=4,
                linear_state=st,
                backend="triton",
                feature_map=fm,
                features=feats,
            )
            assert torch.equal(given, got), case
        none, _ = routed_attention(*(x.to(dev) for x in (q, k, v, w)), window=8, n_sink=4, backend="triton")
        want0, _ = ref.routed_attention_reference(q, k, v, w, window=8, n_sink=4)
        assert max_err(none.cpu(), want0) <= TOL, case


def test_triton_matches_reference_with_learned_map():
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        _triton_cases("cuda")
        return
    tests = os.path.dirname(os.path.abspath(__file__))
    env = dict(
        os.environ,
        TRITON_INTERPRET="1",
        PYTHONPATH=os.pathsep.join(
            [tests, os.path.dirname(tests)]
            + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        ),
    )
    code = (
        "from metaattn_viz import paths; paths.ensure_kernels_importable(); "
        "import test_feature_maps as t; t._triton_cases('cpu')"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


# -- distillation


def _tiny_qk(seed=0, n=3, t=48):
    """q, k of a tiny random model whose q/k projections are scaled up: a random model's
    attention is nearly uniform, which any map matches; this one has peaked attention."""
    from metaattn_viz.training import feature_maps as fmod

    model = tiny_model(seed=seed)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    ids = torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))
    return model, fmod.capture_qk(model, ids, batch_size=2)


def test_capture_leaves_the_model_as_it_was():
    from metaattn_viz.training import feature_maps as fmod

    model = tiny_model()
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    impl = model.config._attn_implementation
    qk, scaling = fmod.capture_qk(model, ids)
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert model.config._attn_implementation == impl and torch.equal(before, after)
    assert len(qk) == model.config.num_hidden_layers and scaling == pytest.approx(16**-0.5)
    assert qk[0][0].shape == (2, 6, 20, 16) and qk[0][1].shape == (2, 2, 20, 16)


def test_distillation_lowers_the_hedgehog_loss_on_a_tiny_model():
    from metaattn_viz.training import feature_maps as fmod

    torch.manual_seed(0)
    _, (qk, scaling) = _tiny_qk()
    q, k = qk[1]
    cfg = fmod.FeatureMapConfig(steps=60, batch_size=2, lr=3e-2)
    untrained = fmod.LayerMaps(q.shape[1], k.shape[1], q.shape[3], torch.Generator().manual_seed(1))
    maps, curve = fmod.train_layer(q, k, scaling, cfg, seed=1)
    start, end = fmod.eval_loss(untrained, q, k, scaling), fmod.eval_loss(maps, q, k, scaling)
    floor = fmod.teacher_entropy(q, k, scaling)  # the loss of a perfect student
    assert end >= floor - 1e-4
    assert end - floor < 0.8 * (start - floor), (floor, start, end, curve)  # a fifth of the gap closed
    assert end < fmod.eval_loss(None, q, k, scaling)  # and better than elu + 1
    # the trained layer runs in the kernels: the linear expert's weights follow the teacher better
    assert isinstance(maps.frozen(), FeatureMap)


def test_hedgehog_loss_is_the_cross_entropy_of_the_weights():
    from metaattn_viz.training import feature_maps as fmod

    q, k, _ = make_qkv(b=1, hq=4, hkv=2, tq=6, d=8)
    fm = random_map(hq=4, hkv=2, d=8)
    loss = fmod.hedgehog_loss(fm.query(q), fm.key(k), q, k, 0.3)
    total = 0.0
    for h in range(4):
        kh = k[0, h // 2]
        for i in range(6):
            p = torch.softmax((q[0, h, i] @ kh[: i + 1].T) * 0.3, -1)
            a = fm.query(q)[0, h, i] @ fm.key(k)[0, h // 2, : i + 1].T
            total -= float((p * torch.log(a / a.sum())).sum())
    assert float(loss) == pytest.approx(total / 24, rel=1e-5)


def test_a_config_with_numpy_numbers_makes_a_checkpoint_that_loads(tmp_path):
    """A notebook's FeatureMapConfig(lr=np.float64(...)) kept the numpy float: its
    checkpoint's config did not load as plain data (checkpoints.read, weights_only), and
    the run failed at its end, marking the checkpoint finished."""
    from dataclasses import asdict

    import numpy as np

    from metaattn_viz.training import checkpoints
    from metaattn_viz.training import feature_maps as fmod

    cfg = fmod.FeatureMapConfig(lr=np.float64(0.02), weight_decay=np.float32(0.0))
    assert type(cfg.lr) is float and type(cfg.weight_decay) is float and cfg.lr == 0.02
    path = tmp_path / "checkpoint.pt"
    checkpoints.write(path, {"config": asdict(cfg), "layers": []})
    assert checkpoints.read(path)["config"]["lr"] == 0.02


def test_train_saves_loads_and_resumes(tmp_path):
    from metaattn_viz.training import feature_maps as fmod

    model = tiny_model()
    data = tiny_corpus(tmp_path)
    cfg = fmod.FeatureMapConfig(steps=12, batch_size=2, seq_len=32, train_windows=4, val_windows=2)
    out = tmp_path / "maps"
    meta = fmod.train(
        model, CharTokenizer(), data, cfg, out, model_slug="tiny", model_name="tiny-llama", progress=False
    )
    on_disk = json.loads((out / fmod.META_FILE).read_text())
    assert on_disk == json.loads(json.dumps(meta))
    for field in (
        "hyperparameters",
        "data",
        "project_commit",
        "model_slug",
        "per_layer",
        "layers",
        "mean_val_loss_elu",
        "mean_val_loss_learned",
    ):
        assert field in on_disk, field
    assert on_disk["hyperparameters"]["steps"] == 12 and on_disk["model_slug"] == "tiny"
    assert len(on_disk["data"]["sha256"]) == 64 and len(on_disk["per_layer"]) == 3
    assert all("val_loss_learned" in r and "val_loss_elu" in r for r in on_disk["per_layer"])
    maps = fmod.load(out)
    assert len(maps) == 3 and all(isinstance(m, FeatureMap) for m in maps)
    ckpt = torch.load(out / fmod.CHECKPOINT, weights_only=False)
    for m, state in zip(maps, ckpt["states"], strict=True):
        assert torch.equal(m.q_weight, state["q_weight"]) and torch.equal(m.k_bias, state["k_bias"])
    # deterministic: resuming from a checkpoint after layer 1 gives the same maps as one run
    ckpt["layers"], ckpt["states"] = ckpt["layers"][:1], ckpt["states"][:1]
    torch.save(ckpt, out / fmod.CHECKPOINT)
    fmod.train(model, CharTokenizer(), data, cfg, out, model_slug="tiny", resume=True, progress=False)
    for a, b in zip(maps, fmod.load(out), strict=True):
        assert torch.equal(a.q_weight, b.q_weight) and torch.equal(a.k_weight, b.k_weight)
    with pytest.raises(ValueError, match="resume"):
        fmod.train(
            model,
            CharTokenizer(),
            data,
            fmod.FeatureMapConfig(steps=13, seq_len=32, train_windows=4),
            out,
            model_slug="tiny",
            resume=True,
            progress=False,
        )
    # all-linear perplexity runs with either map, and dense is unaffected by it
    ppl0 = fmod.all_linear_perplexity(model, CharTokenizer(), data, None, windows=2, seq_len=32)
    ppl1 = fmod.all_linear_perplexity(model, CharTokenizer(), data, maps, windows=2, seq_len=32)
    assert ppl0["dense"] == ppl1["dense"] and ppl0["all_linear"] != ppl1["all_linear"]


def test_a_diverged_layer_is_saved_as_strict_json(tmp_path, monkeypatch):
    """A NaN validation loss (a layer whose maps diverged) is null in meta.json, which stays
    strict JSON (Python's json writes NaN, which no other reader accepts)."""
    from metaattn_viz.training import feature_maps as fmod

    monkeypatch.setattr(fmod, "eval_loss", lambda maps, q, k, scaling: float("nan"))
    cfg = fmod.FeatureMapConfig(steps=2, batch_size=2, seq_len=32, train_windows=4, val_windows=2)
    out = tmp_path / "maps"
    fmod.train(
        tiny_model(), CharTokenizer(), tiny_corpus(tmp_path), cfg, out, model_slug="tiny", progress=False
    )
    text = (out / fmod.META_FILE).read_text()
    on_disk = json.loads(text, parse_constant=lambda c: pytest.fail(f"meta.json holds {c}"))
    assert on_disk["mean_val_loss_learned"] is None
    assert all(row["val_loss_learned"] is None for row in on_disk["per_layer"])
    assert len(fmod.load(out)) == 3


def test_load_of_an_empty_folder_says_how_to_train(tmp_path):
    from metaattn_viz.training import feature_maps as fmod

    with pytest.raises(ValueError, match="python -m metaattn_viz.training.feature_maps"):
        fmod.load(tmp_path)


def test_hedgehog_function_is_what_the_map_applies():
    fm = random_map()
    x = torch.randn(1, HKV, 4, D)
    assert torch.equal(fm.key(x), hedgehog(x, fm.k_weight, fm.k_bias, input_scale(D)))
    assert torch.equal(elu_plus_one(x), torch.nn.functional.elu(x) + 1.0)
