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


def test_prior_costs_price_the_prior_and_only_a_set_value_enters_the_hash():
    """--prior-costs: alpha0_k = s c_k^-gamma / sum_j c_j^-gamma with the given costs
    (computed here by hand), the start of training sits at that prior, the default config
    hashes as before the field existed, and bad costs are refused."""
    import math

    from metaattn_viz.routing.controller import ControllerConfig, ControllerStack, _hashed_config

    costs, s, gamma = (1.0, 0.6, 0.3), 3.0, 1.5
    stack = ControllerStack(ControllerConfig(d_model=16, n_layers=1, prior_costs=costs, prior_gamma=gamma))
    w = [c**-gamma for c in costs]
    want = torch.tensor([s * v / sum(w) for v in w])
    assert torch.allclose(stack.alpha0, want, rtol=1e-6)
    # the untrained controller starts at its prior: softplus(b) + beta_min = alpha0
    beta0 = torch.nn.functional.softplus(stack.layers[0].fc2.bias) + stack.config.beta_min
    assert torch.allclose(beta0, want, rtol=1e-4)
    assert not math.isclose(float(stack.alpha0[1]), float(ControllerStack(ControllerConfig()).alpha0[1]))

    assert "prior_costs" not in _hashed_config(ControllerConfig())
    assert _hashed_config(ControllerConfig(prior_costs=costs))["prior_costs"] == list(costs)
    for bad in ((1.0, 0.0, 0.3), (1.0, 0.3), (1.0, float("nan"), 0.3), ("a", 1, 1)):
        with pytest.raises(ValueError, match="prior costs must be"):
            ControllerConfig(prior_costs=bad)


def test_a_prior_below_the_least_concentration_is_refused_before_any_training():
    """With prior_strength 0.3 the prior's linear concentration is 0.027, below beta_min =
    0.05: an untrained controller started at (0.051, 0.182, 0.091) instead of the prior, and
    its KL to the prior could never reach 0. Such a strength is refused, naming the least
    one that works (0.55 under the notional costs); the prior-free controller has no prior."""
    from metaattn_viz.routing.controller import ControllerConfig, ControllerStack
    from metaattn_viz.training.calibrate import CalibrationConfig

    refused = r"prior_strength 0.3 .* beta_min = 0.05; raise prior_strength above 0.55 or lower prior_gamma"
    with pytest.raises(ValueError, match=refused):
        ControllerConfig(prior_strength=0.3).check_prior()
    with pytest.raises(ValueError, match="prior_strength above 0.55"):
        CalibrationConfig(prior_strength=0.3)
    with pytest.raises(ValueError, match=r"lower prior_gamma \(--prior-gamma, now 5\)"):
        CalibrationConfig(prior_gamma=5.0)  # the full expert's share: 3 / 13,581
    CalibrationConfig(controller="priorfree", prior_strength=0.3)  # no prior to start at
    ControllerConfig(kind="priorfree", prior_strength=0.3).check_prior()
    stack = ControllerStack(ControllerConfig(d_model=16, n_layers=1, prior_strength=0.6))
    beta0 = torch.nn.functional.softplus(stack.layers[0].fc2.bias) + stack.config.beta_min
    assert torch.allclose(beta0, stack.alpha0, rtol=1e-3)  # just above the limit: at the prior


def test_controllers_saved_with_a_weak_prior_still_load(tmp_path):
    """The prior check is for training: controllers saved with such a prior (before it
    existed) loaded as untrained once it ran on every ControllerConfig (review 66)."""
    from metaattn_viz.routing.controller import ControllerConfig, ControllerStack

    stack = ControllerStack(ControllerConfig(d_model=16, n_layers=1, prior_strength=0.5))
    stack.save(tmp_path / "bayes")
    back = ControllerStack.load(tmp_path / "bayes")
    assert back.config.prior_strength == 0.5
    saved, loaded = stack.state_dict(), back.state_dict()
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
