"""The controller's decode hot path against its batched forward."""

import pytest
import torch


@pytest.mark.parametrize("kind", ["bayes", "priorfree"])
def test_concentration_one_matches_the_batched_path(kind):
    """The decode hot path (numpy) gives the batched controller's numbers."""
    from metaattn_viz.routing.controller import ControllerConfig, ControllerStack

    stack = ControllerStack(ControllerConfig(kind=kind, d_model=48, n_layers=2), seed=1)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for layer in stack.layers:
            layer.fc2.weight.normal_(0, 1, generator=g)  # away from the prior
        for position in (1, 7, 300, 5000):
            h, x = torch.randn(1, 1, 48, generator=g), 3 * torch.randn(1, 1, 48, generator=g)
            want = stack.concentration(1, h, x, torch.tensor([position])).reshape(-1)
            got = torch.tensor(stack.concentration_one(1, h, x, position))
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)
