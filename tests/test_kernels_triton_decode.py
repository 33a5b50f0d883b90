"""kernels.triton_decode (the decode step a GPU takes, route on the device) against the
reference twins (kernels.reference: the specification) and the CPU decode step.

Without a GPU the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set before
triton is first imported) on CPU tensors; with CUDA the same tests run on the GPU. Sizes
stay small, but cover grouped-query heads, sinks, a context shorter than the window, several
key splits, hedged mixtures, the learned feature map and a stale linear state.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

DEV = "cuda" if torch.cuda.is_available() else "cpu"
_LATE = DEV == "cpu" and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if DEV == "cpu" and not _LATE:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from helpers import RefusingGPU, pytest_in_fresh_interpreter, random_map, stand_in_gpu  # noqa: E402

in_this_process = pytest.mark.skipif(_LATE, reason="triton was imported before TRITON_INTERPRET was set")

# (Tk, Hq, Hkv, D, window, n_sink, weights): every expert alone, and mixtures
CASES = [
    (5, 2, 1, 16, 8, 2, (0.0, 0.0, 1.0)),  # context shorter than the window
    (37, 4, 2, 16, 8, 2, (0.0, 0.0, 1.0)),  # local: sinks + window
    (37, 4, 2, 16, 8, 0, (0.0, 0.0, 1.0)),  # local without sinks
    (300, 6, 2, 16, 16, 4, (1.0, 0.0, 0.0)),  # full over two splits, groups of 3
    (700, 3, 3, 32, 32, 4, (0.5, 0.2, 0.3)),  # hedged: all three experts
    (90, 4, 4, 16, 8, 2, (0.0, 1.0, 0.0)),  # linear alone
    (130, 9, 3, 64, 64, 4, (0.7, 0.0, 0.3)),  # SmolLM2's heads
]


@pytest.mark.skipif(not _LATE, reason="the interpreter runs in this process")
def test_in_a_fresh_interpreter():
    pytest_in_fresh_interpreter(__file__, timeout=600)


def _qkv(tk, hq, hkv, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, h, t, d, generator=g) for h, t in ((hq, 1), (hkv, tk), (hkv, tk)))
    return [x.to(DEV, dtype) for x in (q, k, v)]


def _reference(q, k, v, w, window, n_sink, fm=None):
    from metaattn_kernels.reference import routed_attention_reference

    wt = torch.tensor(w, dtype=torch.float64).view(1, 1, 3)
    kw = {} if fm is None else {"feature_map": fm}
    y, _ = routed_attention_reference(
        q.double().cpu(), k.double().cpu(), v.double().cpu(), wt, window=window, n_sink=n_sink, **kw
    )
    return y


@in_this_process
@pytest.mark.parametrize("case", CASES, ids=[f"tk{c[0]}-hq{c[1]}-hkv{c[2]}-w{c[6]}" for c in CASES])
def test_decode_step_device_matches_the_reference(case):
    from metaattn_kernels.triton_decode import decode_step_device

    tk, hq, hkv, d, window, n_sink, w = case
    q, k, v = _qkv(tk, hq, hkv, d, seed=tk)
    weights = torch.tensor(w, device=DEV).view(1, 1, 3)
    y, state = decode_step_device(q, k, v, weights, window=window, n_sink=n_sink)
    assert y.shape == q.shape and y.dtype == q.dtype
    assert (y.double().cpu() - _reference(q, k, v, w, window, n_sink)).abs().max() <= 1e-5
    assert state[2] == tk  # the linear state is caught up to the whole cache


@in_this_process
def test_learned_map_and_a_stale_state_match_the_cpu_decode_step():
    """With a learned feature map, and a linear state that summarises only a prefix (decode
    steps that went elsewhere since), the device step equals kernels.decode.decode_step."""
    from metaattn_kernels.decode import decode_step, linear_state_upto
    from metaattn_kernels.triton_decode import decode_step_device

    tk, hq, hkv, d = 70, 9, 3, 16
    fm = random_map(hq, hkv, d).to(DEV)
    q, k, v = _qkv(tk, hq, hkv, d, seed=5)
    w = (0.0, 0.6, 0.4)
    prefix = linear_state_upto(None, k, v, 41, fm)
    want, want_state = decode_step(q, k, v, w, window=8, n_sink=2, state=prefix, feature_map=fm)
    got, got_state = decode_step_device(
        q, k, v, torch.tensor(w, device=DEV).view(1, 1, 3), window=8, n_sink=2, state=prefix, feature_map=fm
    )
    assert (got - want).abs().max() <= 1e-5
    assert got_state[2] == want_state[2] == tk
    assert (got_state[0] - want_state[0]).abs().max() <= 1e-4
    assert (got.double().cpu() - _reference(q, k, v, w, 8, 2, fm)).abs().max() <= 1e-5


@in_this_process
def test_bfloat16_inputs():
    from metaattn_kernels.triton_decode import decode_step_device

    q, k, v = _qkv(150, 6, 2, 32, seed=9, dtype=torch.bfloat16)
    w = (0.5, 0.0, 0.5)
    y, _ = decode_step_device(q, k, v, torch.tensor(w, device=DEV).view(1, 1, 3), window=16, n_sink=4)
    assert y.dtype == torch.bfloat16
    assert (y.double().cpu() - _reference(q, k, v, w, 16, 4)).abs().max() <= 2e-2


@in_this_process
def test_fewer_keys_per_step_where_the_gpu_refuses_more(monkeypatch):
    """Head dim 128 in float32 on a GPU that refuses the decode kernel's 64-key tiles (a T4):
    32 keys per step over the same splits, the reference's output."""
    import metaattn_kernels.triton_decode as decoding

    refusing = RefusingGPU(decoding.decode_softmax_kernel, lambda c: c["BLOCK_N"] == 64)
    monkeypatch.setattr(decoding, "decode_softmax_kernel", refusing)
    stand_in_gpu(monkeypatch)
    q, k, v = _qkv(300, 4, 2, 128, seed=11)
    w = (0.6, 0.4, 0.0)
    y, _ = decoding.decode_step_device(
        q, k, v, torch.tensor(w, device=DEV).view(1, 1, 3), window=16, n_sink=4
    )
    assert (y.double().cpu() - _reference(q, k, v, w, 16, 4)).abs().max() <= 1e-5
    assert [(c["BLOCK_N"], st) for _, c, st in refusing.launches][-1] == (32, 3)


def test_plan_splits_covers_every_key_once():
    from metaattn_kernels.triton_decode import BLOCK_N, MIN_SPLIT_KEYS, TARGET_PROGRAMS, plan_splits

    for n_keys in (1, 63, 64, 257, 4096, 32768, 100_000):
        for programs in (1, 3, 9, 64):
            split, n = plan_splits(n_keys, programs)
            assert split % BLOCK_N == 0 and split >= MIN_SPLIT_KEYS
            assert (n - 1) * split < n_keys <= n * split  # no empty split, every key in one
            if n > 1:
                assert n * programs <= 2 * TARGET_PROGRAMS


def test_merge_splits_is_softmax_attention():
    """The log-sum-exp merge of per-split partial softmaxes equals one softmax over all keys
    (torch.softmax as the reference); an all-empty row merges to 0."""
    from metaattn_kernels.triton_decode import merge_splits

    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 96, generator=g) * 4  # scores [B, Hq, keys]
    v = torch.randn(96, 8, generator=g)
    want = torch.softmax(s, -1) @ v
    parts = s.view(2, 3, 4, 24)  # 4 splits of 24 keys
    m = parts.amax(-1)
    p = torch.exp(parts - m[..., None])
    acc = torch.einsum("bhsn,snd->bhsd", p, v.view(4, 24, 8))  # [2, 3, 4, 8]
    got = merge_splits(acc, m, p.sum(-1))
    assert torch.allclose(got, want, atol=1e-5)
    empty = merge_splits(torch.zeros(1, 1, 2, 8), torch.full((1, 1, 2), float("-inf")), torch.zeros(1, 1, 2))
    assert torch.equal(empty, torch.zeros(1, 1, 8))
