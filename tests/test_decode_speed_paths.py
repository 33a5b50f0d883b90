"""The CPU decode hot path in numpy (issue 12): kernels.cpu_decode.decode_step_numpy against
kernels.decode.decode_step, the controller's one-token attention features (signals_one)
against attention_signals, and the refresh of the controller's numpy weight copies."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from helpers import random_feature_map

from metaattn_kernels.cpu_decode import decode_step_numpy, phi_numpy
from metaattn_kernels.decode import decode_step
from metaattn_kernels.feature_maps import phi_key, phi_query
from metaattn_viz.routing import signals as sig
from metaattn_viz.routing.controller import ControllerConfig, ControllerStack
from metaattn_viz.routing.signals import AttentionView, SignalState

HQ, HKV, D = 6, 2, 16
ROUTES = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.25, 0.5, 0.25), (0.0, 0.0, 0.0)]


def _step(tk, seed=0):
    """q [1, Hq, 1, D] (a transposed view, as the model hands it over) and k, v [1, Hkv, Tk, D]
    (views of a larger buffer, as GrowableCache hands them over)."""
    g = torch.Generator().manual_seed(seed)
    kb, vb = torch.randn(1, HKV, tk + 7, D, generator=g), torch.randn(1, HKV, tk + 7, D, generator=g)
    q = torch.randn(1, 1, HQ, D, generator=g).transpose(1, 2)
    return q, kb[:, :, :tk], vb[:, :, :tk]


@pytest.mark.parametrize("learned", [False, True])
@pytest.mark.parametrize("tk", [3, 9, 30])
def test_decode_step_numpy_matches_decode_step(learned, tk):
    fm = random_feature_map(HQ, HKV, D) if learned else None
    q, k, v = _step(tk)
    for weights, start in itertools.product(ROUTES, [None, tk // 2, tk - 1]):
        state = None
        if start is not None:
            _, state = decode_step(
                q, k[:, :, :start], v[:, :, :start], (0.0, 1.0, 0.0), window=8, n_sink=2, feature_map=fm
            )
        with torch.no_grad():
            want, want_state = decode_step(
                q, k, v, weights, window=8, n_sink=2, scale=0.3, state=state, feature_map=fm
            )
            got, got_state = decode_step_numpy(
                q, k, v, weights, window=8, n_sink=2, scale=0.3, state=state, feature_map=fm
            )
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        if want_state is None or want_state is state:
            assert got_state is state
        else:
            assert got_state[2] == want_state[2] == tk
            torch.testing.assert_close(got_state[0], want_state[0].float(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_state[1], want_state[1].float(), atol=1e-5, rtol=1e-5)
    full, _ = decode_step(q, k, v, ROUTES[0], window=8, n_sink=2)  # full alone: SDPA's bits
    with torch.no_grad():
        assert torch.equal(decode_step_numpy(q, k, v, ROUTES[0], window=8, n_sink=2)[0], full)


@pytest.mark.parametrize("learned", [False, True])
def test_given_features_of_q_and_the_new_key_give_the_same_step(learned):
    fm = random_feature_map(HQ, HKV, D, 1) if learned else None
    q, k, v = _step(20, seed=1)
    _, state = decode_step(q, k[:, :, :19], v[:, :, :19], (0.0, 1.0, 0.0), window=8, n_sink=2, feature_map=fm)
    pq = phi_query(fm, q)[0, :, 0].numpy()
    pk = phi_key(fm, k[:, :, 19:])[0, :, 0].numpy()
    with torch.no_grad():
        want, ws = decode_step_numpy(
            q, k, v, (0.0, 1.0, 0.0), window=8, n_sink=2, state=state, feature_map=fm
        )
        got, gs = decode_step_numpy(
            q, k, v, (0.0, 1.0, 0.0), window=8, n_sink=2, state=state, feature_map=fm, phi=(pq, pk)
        )
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gs[0], ws[0], atol=1e-6, rtol=1e-5)


def test_phi_numpy_is_the_feature_map():
    fm = random_feature_map(HQ, HKV, D, 2)
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, HQ, 3, D, generator=g), torch.randn(1, HKV, 3, D, generator=g)
    for m in (None, fm):
        torch.testing.assert_close(
            torch.from_numpy(phi_numpy(q[0].numpy(), m, slice(0, HQ))),
            phi_query(m, q)[0],
            atol=1e-6,
            rtol=1e-5,
        )
        torch.testing.assert_close(
            torch.from_numpy(phi_numpy(k[0].numpy(), m, slice(HQ, None))),
            phi_key(m, k)[0],
            atol=1e-6,
            rtol=1e-5,
        )


def test_decode_step_numpy_hands_over_what_it_does_not_cover():
    """A batch, or autograd: kernels.decode.decode_step's own result."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (
        torch.randn(2, HQ, 1, D, generator=g),
        torch.randn(2, HKV, 12, D, generator=g),
        torch.randn(2, HKV, 12, D, generator=g),
    )
    for weights in ROUTES:
        want, _ = decode_step(q, k, v, weights, window=4, n_sink=1)
        assert torch.equal(decode_step_numpy(q, k, v, weights, window=4, n_sink=1)[0], want)
    q1 = q[:1].clone().requires_grad_(True)
    y, _ = decode_step_numpy(q1, k[:1], v[:1], ROUTES[3], window=4, n_sink=1)
    assert y.requires_grad


@pytest.mark.parametrize("learned", [False, True])
def test_signals_one_continues_the_running_sums(learned):
    """Token by token through the numpy path, then on with the torch path: the features of
    one prefill of everything, and the sums are left where the torch path expects them."""
    fm = random_feature_map(HQ, HKV, D, 4) if learned else None
    g = torch.Generator().manual_seed(4)
    q, k = torch.randn(1, HQ, 40, D, generator=g), torch.randn(1, HKV, 40, D, generator=g)
    whole = sig.attention_signals(AttentionView(q, k, fm, 8, 2, SignalState(1)), 0)[0]
    state = SignalState(1)
    sig.attention_signals(AttentionView(q[:, :, :5], k[:, :, :5], fm, 8, 2, state), 0)
    n = 2 * HQ + HKV
    for t in range(5, 30):
        out = np.full(n, np.nan, np.float32)
        assert sig.signals_one(AttentionView(q[:, :, t : t + 1], k[:, :, : t + 1], fm, 8, 2, state), 0, out)
        torch.testing.assert_close(torch.from_numpy(out), whole[t], atol=1e-5, rtol=1e-5)
        tk, held_fm, pq, pk = state.phi[0]
        assert tk == t + 1 and held_fm is fm
        torch.testing.assert_close(torch.from_numpy(pq), phi_query(fm, q[:, :, t : t + 1])[0, :, 0])
        torch.testing.assert_close(torch.from_numpy(pk), phi_key(fm, k[:, :, t : t + 1])[0, :, 0])
    rest = sig.attention_signals(AttentionView(q[:, :, 30:], k, fm, 8, 2, state), 0)[0]
    torch.testing.assert_close(rest, whole[30:], atol=1e-5, rtol=1e-5)
    # sums that stop elsewhere (or another map): not continued, nothing written
    out = np.full(n, np.nan, np.float32)
    assert not sig.signals_one(AttentionView(q[:, :, 35:36], k[:, :, :36], fm, 8, 2, state), 0, out)
    other = random_feature_map(HQ, HKV, D, 5)
    assert not sig.signals_one(AttentionView(q[:, :, 39:], k, other, 8, 2, state), 0, out)
    assert np.isnan(out).all()


@pytest.mark.parametrize("learned", [False, True])
def test_signals_one_keeps_each_layers_sums_apart(learned):
    """Layers share signals_one's working arrays, never their sums: two layers stepped in
    turn (as decode steps do) each give the features of one prefill of their own q and k;
    the sums the torch path left are copied, not added to, and the torch path continues
    each layer's sums after the numpy steps."""
    fms = [random_feature_map(HQ, HKV, D, seed) if learned else None for seed in (6, 7)]
    g = torch.Generator().manual_seed(8)
    qs = [torch.randn(1, HQ, 30, D, generator=g) for _ in range(2)]
    ks = [torch.randn(1, HKV, 30, D, generator=g) for _ in range(2)]
    wholes = [
        sig.attention_signals(AttentionView(q, k, fm, 8, 2, SignalState(1)), 0)[0]
        for q, k, fm in zip(qs, ks, fms, strict=True)
    ]
    state = SignalState(2)
    for layer in range(2):
        view = AttentionView(qs[layer][:, :, :4], ks[layer][:, :, :4], fms[layer], 8, 2, state)
        sig.attention_signals(view, layer)
    left = [t.clone() for t in state.sums[0][:2]]
    kept = state.sums[0]
    for t in range(4, 25):
        for layer in range(2):
            out = np.full(2 * HQ + HKV, np.nan, np.float32)
            q, k = qs[layer][:, :, t : t + 1], ks[layer][:, :, : t + 1]
            view = AttentionView(q, k, fms[layer], 8, 2, state)
            assert sig.signals_one(view, layer, out)
            torch.testing.assert_close(torch.from_numpy(out), wholes[layer][t], atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(kept[:2], left, strict=True))
    for layer in range(2):
        view = AttentionView(qs[layer][:, :, 25:], ks[layer], fms[layer], 8, 2, state)
        torch.testing.assert_close(
            sig.attention_signals(view, layer)[0], wholes[layer][25:], atol=1e-5, rtol=1e-5
        )


def test_numpy_weight_copies_follow_the_parameters():
    stack = ControllerStack(ControllerConfig(kind="bayes", d_model=24, n_layers=2), seed=0)
    g = torch.Generator().manual_seed(0)
    h, x = torch.randn(1, 1, 24, generator=g), torch.randn(1, 1, 24, generator=g)

    def check():
        with torch.no_grad():
            want = stack.concentration(1, h, x, torch.tensor([9])).reshape(-1)
            got = torch.tensor(stack.concentration_one(1, h, x, 9))
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)

    check()
    with torch.no_grad():
        stack.layers[1].fc2.bias.add_(0.5)  # in place
    check()
    stack.layers[1].fc1.weight = torch.nn.Parameter(torch.randn(96, 26, generator=g))  # replaced
    check()
