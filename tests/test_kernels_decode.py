"""kernels.decode (the decode hot path with Python-side routes and a lazy linear state)
against the reference twins."""

from __future__ import annotations

import pytest
import torch

from metaattn_kernels import reference as ref
from metaattn_kernels.decode import decode_step, linear_state_upto

WEIGHTS = [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0), (0.5, 0.2, 0.3), (0.0, 0.6, 0.4)]


def _qkv(tk, b=1, hq=9, hkv=3, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, 1, d, generator=g)
    k = torch.randn(b, hkv, tk, d, generator=g)
    v = torch.randn(b, hkv, tk, d, generator=g)
    return q, k, v


@pytest.mark.parametrize("w", WEIGHTS)
@pytest.mark.parametrize(
    "tk,window,n_sink", [(1, 4, 0), (17, 4, 4), (130, 64, 4), (130, 200, 4), (70, 64, 0)]
)
def test_decode_step_matches_reference(w, tk, window, n_sink):
    q, k, v = _qkv(tk, b=2)
    want, (s_want, z_want) = ref.routed_attention_reference(
        q, k, v, torch.tensor(w).expand(2, 1, 3), window=window, n_sink=n_sink
    )
    got, state = decode_step(q, k, v, list(w), window=window, n_sink=n_sink)
    assert (got - want).abs().max() <= 1e-4
    if w[1] > 0:  # the step used the linear expert: its state is caught up to Tk
        assert state[2] == tk
        assert (state[0] - s_want).abs().max() <= 1e-4 and (state[1] - z_want).abs().max() <= 1e-4
    else:
        assert state is None  # never touched


def test_lazy_linear_state_catches_up_over_skipped_steps():
    """Steps routed to full/local leave the state behind; the next linear step adds every
    key since, so it equals the reference over the whole cache."""
    q, k, v = _qkv(40, seed=3)
    state = linear_state_upto(None, k, v, 10)
    for tk in range(11, 40):  # skipped steps: the state stays at 10 keys
        _, state = decode_step(
            q, k[:, :, :tk], v[:, :, :tk], [0.0, 0.0, 1.0], window=8, n_sink=2, state=state
        )
        assert state[2] == 10
    got, state = decode_step(q, k, v, [0.0, 1.0, 0.0], window=8, n_sink=2, state=state)
    want, _ = ref.linear_attention(q, k, v)
    assert state[2] == 40 and (got - want).abs().max() <= 1e-4
    with pytest.raises(ValueError, match="more than"):
        linear_state_upto(state, k, v, 39)
