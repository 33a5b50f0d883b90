"""Routed attention: the reference twins against independent formulas, and the fast CPU
path against the reference at awkward sizes (T = 1, 17, 130; windows shorter and longer
than T; 0 and 4 sinks; grouped-query 9/3; hard, mixed and hedged routes; decode steps
that carry the linear state), plus the dispatch API's argument checks.

The case builders (make_qkv, make_weights, the size and window grids) live in
tests/helpers.py, shared with tests/test_kernels_triton.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import MIXES, SIZES, TOL, WINDOWS, make_qkv, make_weights, max_err

import metaattn_kernels.dispatch as kernels
from metaattn_kernels import reference as ref
from metaattn_kernels.dispatch import LINEAR, attention_flops, routed_attention, routes_to_weights


def test_reference_full_equals_sdpa_causal():
    q, k, v = make_qkv(tq=130)
    want = F.scaled_dot_product_attention(
        q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), is_causal=True
    )
    assert max_err(ref.full_attention(q, k, v), want) <= TOL


def test_reference_local_with_long_window_equals_full():
    q, k, v = make_qkv(tq=17, tk=40)
    assert max_err(ref.local_attention(q, k, v, window=40, n_sink=0), ref.full_attention(q, k, v)) <= 1e-6
    assert max_err(ref.local_attention(q, k, v, window=64, n_sink=4), ref.full_attention(q, k, v)) <= 1e-6


def test_reference_local_window_one_without_sinks_returns_own_value():
    q, k, v = make_qkv(tq=17)
    assert max_err(ref.local_attention(q, k, v, window=1, n_sink=0), v.repeat_interleave(3, 1)) <= 1e-6


def test_reference_linear_parallel_equals_recurrent():
    q, k, v = make_qkv(tq=33, tk=50, dtype=torch.float64)
    o_par, (s_par, z_par) = ref.linear_attention(q, k, v)
    o_rec, (s_rec, z_rec) = ref.linear_attention_recurrent(q, k, v)
    assert max_err(o_par, o_rec) <= 1e-10
    assert max_err(s_par, s_rec) <= 1e-4 and max_err(z_par, z_rec) <= 1e-4
    s_all, z_all = ref.linear_state(k, v)
    assert max_err(s_par, s_all) <= 1e-4 and max_err(z_par, z_all) <= 1e-4


def test_reference_linear_one_key_is_that_value():
    q, k, v = make_qkv(tq=1)
    o, _ = ref.linear_attention(q, k, v, eps=0.0)
    assert max_err(o, v.repeat_interleave(3, 1)) <= 1e-5


# -- the CPU path against the reference ------------------------------------------------------


@pytest.mark.parametrize("mix", MIXES)
@pytest.mark.parametrize("tq,tk", SIZES)
@pytest.mark.parametrize("window,n_sink", WINDOWS)
def test_cpu_matches_reference(mix, tq, tk, window, n_sink):
    q, k, v = make_qkv(tq=tq, tk=tk)
    w = make_weights(mix, 2, tq)
    y_ref, (s_ref, z_ref) = routed_attention(q, k, v, w, window=window, n_sink=n_sink, backend="reference")
    y, (s, z) = routed_attention(q, k, v, w, window=window, n_sink=n_sink, backend="cpu")
    assert y.shape == q.shape and y.dtype == q.dtype
    assert max_err(y, y_ref) <= TOL
    assert s.dtype == torch.float32 and z.dtype == torch.float32
    assert max_err(s, s_ref) <= 1e-3 and max_err(z, z_ref) <= 1e-3


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_full_route_equals_sdpa_causal(backend):
    q, k, v = make_qkv(tq=130)
    y, _ = routed_attention(q, k, v, make_weights("full", 2, 130), window=8, n_sink=4, backend=backend)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert max_err(y, want) <= TOL


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_local_route_with_window_covering_t_equals_full(backend):
    q, k, v = make_qkv(tq=17, tk=130)
    w_local, w_full = make_weights("local", 2, 17), make_weights("full", 2, 17)
    y_local, _ = routed_attention(q, k, v, w_local, window=130, n_sink=4, backend=backend)
    y_full, _ = routed_attention(q, k, v, w_full, window=130, n_sink=4, backend=backend)
    assert max_err(y_local, y_full) <= TOL


def test_cpu_wide_rows_uneven_batch_and_sparse_routes():
    """Batch rows with different numbers of routed tokens, some with none of an expert."""
    q, k, v = make_qkv(b=3, tq=130, d=32)
    w = make_weights("random", 3, 130)
    w[0, :, :] = torch.tensor([1.0, 0.0, 0.0])  # row 0: all full
    w[1, 5:] = torch.tensor([0.0, 0.0, 1.0])  # row 1: nearly all local
    w[2, ::37] = torch.tensor([0.0, 1.0, 0.0])  # row 2: a few linear
    w[2, w[2, :, LINEAR] == 0] = torch.tensor([0.0, 0.0, 1.0])
    y_ref, _ = routed_attention(q, k, v, w, window=16, n_sink=4, backend="reference")
    y, _ = routed_attention(q, k, v, w, window=16, n_sink=4, backend="cpu")
    assert max_err(y, y_ref) <= TOL


def test_cpu_zero_weight_rows_give_zero():
    q, k, v = make_qkv(tq=17)
    w = make_weights("random", 2, 17)
    w[:, 3] = 0.0
    y, _ = routed_attention(q, k, v, w, window=8, n_sink=4, backend="cpu")
    assert y[:, :, 3].abs().max().item() == 0.0


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("mix", ["random", "hedged", "linear"])
def test_decode_steps_with_linear_state_equal_prefill(backend, mix):
    """Prefill 20 tokens, then decode one token at a time carrying the linear state."""
    t, t0 = 40, 20
    q, k, v = make_qkv(tq=t, d=16)
    w = make_weights(mix, 2, t)
    kw = dict(window=8, n_sink=4, backend=backend)
    y_all, state_all = routed_attention(q, k, v, w, **kw)
    y0, state = routed_attention(q[:, :, :t0], k[:, :, :t0], v[:, :, :t0], w[:, :t0], **kw)
    ys = [y0]
    for i in range(t0, t):
        yi, state = routed_attention(
            q[:, :, i : i + 1], k[:, :, : i + 1], v[:, :, : i + 1], w[:, i : i + 1], linear_state=state, **kw
        )
        ys.append(yi)
    assert max_err(torch.cat(ys, dim=2), y_all) <= 1e-5
    assert max_err(state[0], state_all[0]) <= 1e-4 and max_err(state[1], state_all[1]) <= 1e-4


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_linear_state_replaces_the_cache_prefix(backend):
    """With a state given, keys before the queries are read from the state only."""
    q, k, v = make_qkv(tq=17, tk=60)
    w = make_weights("linear", 2, 17)
    y_none, st_none = routed_attention(q, k, v, w, window=8, n_sink=0, backend=backend)
    state = ref.linear_state(k[:, :, :43], v[:, :, :43])
    k_junk = k.clone()
    k_junk[:, :, :43] = 1e3  # must not be read
    y_state, st = routed_attention(q, k_junk, v, w, window=8, n_sink=0, linear_state=state, backend=backend)
    assert max_err(y_state, y_none) <= 1e-5
    assert max_err(st[0], st_none[0]) <= 1e-3


def test_cpu_non_contiguous_inputs():
    q, k, v = make_qkv(tq=17)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, other strides
    kt, vt = k[..., ::1].transpose(2, 3).contiguous().transpose(2, 3), v.flip(0).flip(0)
    w = make_weights("hedged", 2, 17)
    wt = w.transpose(0, 1).contiguous().transpose(0, 1)
    assert not qt.is_contiguous() and not kt.is_contiguous() and not wt.is_contiguous()
    y_ref, _ = routed_attention(q, k, v, w, window=8, n_sink=4, backend="reference")
    y, _ = routed_attention(qt, kt, vt, wt, window=8, n_sink=4, backend="cpu")
    assert max_err(y, y_ref) <= TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_cpu_other_dtypes(dtype):
    q, k, v = make_qkv(tq=17, dtype=dtype)
    w = make_weights("hedged", 2, 17)
    y_ref, _ = routed_attention(q, k, v, w, window=8, n_sink=4, backend="reference")
    y, st = routed_attention(q, k, v, w, window=8, n_sink=4, backend="cpu")
    assert y.dtype == dtype and st[0].dtype == torch.float32
    assert max_err(y, y_ref) <= (1e-10 if dtype == torch.float64 else 2e-2)


def test_cpu_gradients_match_reference():
    """The CPU path is differentiable: gradients w.r.t. q, k, v and the weights match."""
    q, k, v = make_qkv(b=1, tq=17, d=8, dtype=torch.float64)
    w = torch.rand(1, 17, 3, dtype=torch.float64)
    grads = {}
    for backend in ("reference", "cpu"):
        leaves = [x.clone().requires_grad_() for x in (q, k, v, w)]
        y, _ = routed_attention(*leaves, window=4, n_sink=2, backend=backend)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads[backend] = [x.grad for x in leaves]
    for a, b in zip(grads["reference"], grads["cpu"], strict=True):
        assert max_err(a, b) <= 1e-10


def test_cpu_gradients_reach_a_linear_state_alone():
    """Only the linear state requires grad (q, k, v and the weights do not): the cpu path
    keeps the graph all the same, and the state's gradients are the reference's."""
    q, k, v = make_qkv(b=1, hq=4, hkv=2, tq=17, tk=25, d=8, dtype=torch.float64)
    w = make_weights("hedged", 1, 17).double()
    state = ref.linear_state(k[:, :, :8], v[:, :, :8])
    grads = {}
    for backend in ("reference", "cpu"):
        leaves = tuple(x.clone().requires_grad_() for x in state)
        y, _ = routed_attention(q, k, v, w, window=4, n_sink=2, linear_state=leaves, backend=backend)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        grads[backend] = [x.grad for x in leaves]
    for a, b in zip(grads["reference"], grads["cpu"], strict=True):
        assert a is not None and b is not None and max_err(a, b) <= 1e-10


def test_auto_backend_is_cpu_for_cpu_tensors():
    q, k, v = make_qkv(tq=5)
    assert kernels.resolve_backend("auto", q, k, v) == "cpu"


# -- argument checks -------------------------------------------------------------------------


def _bad_calls():
    q, k, v = make_qkv(tq=17)
    w = make_weights("random", 2, 17)
    ok = dict(window=8, n_sink=4)
    nan_w = w.clone()
    nan_w[0, 0, 0] = float("nan")
    s_ok = ref.linear_state(k, v)
    return [
        ("k and v", (q, k, v[:, :, :-1], w), ok),
        ("multiple", (q[:, :8], k, v, w), ok),
        ("batch", (q[:1], k, v, w[:1]), ok),
        ("head dim", (q[..., :8], k, v, w), ok),
        ("Tk >= Tq", (q, k[:, :, :5], v[:, :, :5], w), ok),
        ("weights", (q, k, v, w[:, :5]), ok),
        ("weights", (q, k, v, w[..., :2]), ok),
        ("weights must be finite", (q, k, v, nan_w), ok),
        ("q must be finite", (q.index_fill(2, torch.tensor([3]), float("nan")), k, v, w), ok),
        ("k must be finite", (q, k.index_fill(2, torch.tensor([0]), float("inf")), v, w), ok),
        ("v must be finite", (q, k, v.index_fill(2, torch.tensor([16]), -float("inf")), w), ok),
        ("non-negative", (q, k, v, -w), ok),
        ("weights", (q, k, v, w.long()), ok),
        ("one dtype", (q, k.double(), v, w), ok),
        ("float16", (q.long(), k, v, w), ok),
        ("dimensions", (q[0], k, v, w), ok),
        ("window", (q, k, v, w), dict(window=0, n_sink=4)),
        ("window", (q, k, v, w), dict(window=2.5, n_sink=4)),
        ("n_sink", (q, k, v, w), dict(window=8, n_sink=-1)),
        ("scale", (q, k, v, w), dict(window=8, n_sink=4, scale=-1.0)),
        ("backend", (q, k, v, w), dict(window=8, n_sink=4, backend="cuda-magic")),
        ("linear_state S", (q, k, v, w), dict(window=8, n_sink=4, linear_state=(s_ok[0][:, :1], s_ok[1]))),
        ("linear_state z", (q, k, v, w), dict(window=8, n_sink=4, linear_state=(s_ok[0], s_ok[1][..., :3]))),
        ("linear_state", (q, k, v, w), dict(window=8, n_sink=4, linear_state=s_ok[0])),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_raises_value_error_naming_the_argument(case):
    words, args, kw = _bad_calls()[case]
    with pytest.raises(ValueError, match=words):
        routed_attention(*args, **kw)


def test_the_finiteness_check_keeps_float64_range_empty_heads_and_the_cache_out():
    """Review 66: a finite float64 beyond float32's range read as infinite, a q of no heads
    crashed in aminmax, and a decode step scanned its whole cache in every layer: the
    cache's keys before this call's queries were checked when they were new."""
    q, k, v = make_qkv(tq=5, tk=12)
    w = make_weights("random", 2, 5)
    y, _ = routed_attention(q.double(), k.double(), v.double() * 1e39, w.double(), window=8, n_sink=4)
    assert torch.isfinite(y).all()
    with pytest.raises(ValueError, match="at least one batch row, head"):
        routed_attention(q[:, :0], k, v, w, window=8, n_sink=4)
    tk = k.shape[2]
    old = k.clone()
    old[:, :, 0] = float("nan")  # before the queries' positions: a cache entry, not checked again
    assert tk > 5
    routed_attention(q, old, v, w, window=8, n_sink=4, backend="reference")
    new = k.clone()
    new[:, :, tk - 1] = float("nan")
    with pytest.raises(ValueError, match="k must be finite"):
        routed_attention(q, new, v, w, window=8, n_sink=4)


def test_triton_backend_without_cuda_or_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q, k, v = make_qkv(tq=5)
    with pytest.raises(ValueError, match="CUDA"):
        routed_attention(q, k, v, make_weights("random", 2, 5), window=8, n_sink=4, backend="triton")


def test_routes_to_weights_rejects_unknown_expert_ids():
    assert routes_to_weights(torch.tensor([[0, 1, 2]])).tolist() == [[[1, 0, 0], [0, 1, 0], [0, 0, 1]]]
    with pytest.raises(ValueError, match="expert ids"):
        routes_to_weights(torch.tensor([[0, 3]]))
    with pytest.raises(ValueError, match="expert ids"):
        routes_to_weights(torch.tensor([[-1, 0]]))


# -- FLOPs -----------------------------------------------------------------------------------


def test_attention_flops_counts_visible_keys():
    pos = torch.tensor([0, 5, 100])
    w = torch.tensor([[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    got = attention_flops(pos, w, window=8, n_sink=4, head_dim=2).tolist()
    assert got == [4 * 2 * 1, 4 * 2 * 2, 4 * 2 * (8 + 4)]
    hedged = torch.tensor([[0.5, 0, 0.5]])
    assert attention_flops(torch.tensor([9]), hedged, 8, 4, 2).tolist() == [4 * 2 * 10 + 4 * 2 * (8 + 2)]


# -- the attention benchmark (smoke: tiny sizes, the row contract) ---------------------------


def test_bench_attention_rows_follow_the_contract(capsys):
    import json

    from metaattn_viz.bench import attention as bench

    rows = bench.run_bench(seq_lens=[96], json=True, repeats=1, model=False)
    printed = json.loads(capsys.readouterr().out)
    assert printed == rows and [r["mix"] for r in rows] == ["local", "linear", "mix"]
    for r in rows:
        assert {"seq_len", "budget", "backend", "dense_ms", "routed_ms", "ratio", "max_abs_err"} <= set(r)
        assert r["seq_len"] == 96 and r["backend"] == "cpu" and r["max_abs_err"] <= TOL
        assert r["ratio"] == pytest.approx(r["routed_ms"] / r["dense_ms"], rel=1e-2)
    assert [r["budget"] for r in rows] == [0.3, 0.15, pytest.approx(0.25 + 0.25 * 0.15 + 0.5 * 0.3)]


def test_bench_mix_weights_have_the_mix_fractions():
    from metaattn_viz.bench import attention as bench

    w = bench.mix_weights("mix", 400, seed=3)
    assert w.shape == (1, 400, 3) and (w.sum(-1) == 1).all()
    assert w[0].sum(0).tolist() == [100, 100, 200]
