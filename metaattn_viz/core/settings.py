"""Routing settings: every knob a user can turn, and the valid choices for each.

One frozen dataclass, validated on construction, so a bad value is refused with a message
that names the setting and its valid range before any model work starts. The CLI and the
app take their choices and defaults from here. Never imports torch or the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from metaattn_kernels.experts import BACKENDS

# The experts and their costs are defined in core.experts; re-exported because much of the
# package imports them from here.
from metaattn_viz.core.experts import COSTS, EXPERTS, FULL, LINEAR, LOCAL, MIN_COST

SCOPES = ("global", "layer")
HEDGE_POLICIES = ("off", "soft", "full")
# What a hedge reads (docs/method.md, "Hedging"): the total uncertainty (entropy of the
# posterior mean) or the epistemic part alone (the mutual information), both as fractions
# of log K. A point estimate (the prior-free controller) has no epistemic part.
HEDGE_MEASURES = ("total", "epistemic")
# The controller registry's names (routing.controller.KINDS is this tuple): the Bayesian
# meta-controller and the prior-free baseline. The first is the default everywhere.
CONTROLLER_KINDS = ("bayes", "priorfree")
DEFAULT_CONTROLLER = CONTROLLER_KINDS[0]
UNCERTAINTY_MEASURES = ("total", "aleatoric", "epistemic", "vacuity")
# The linear expert's feature map (docs/method.md, Experts): "elu" is phi = elu + 1, fixed;
# "learned" is the per-layer Hedgehog map shipped for the model (routing/linear_maps.py);
# "auto" is "learned" where the model has learned maps, else "elu".
LINEAR_MAPS = ("auto", "elu", "learned")
# What a decision costs against the budget (docs/method.md, "Budget"; routing/costs.py):
# "notional", the paper's cost of each expert (core.experts.COSTS), the same at every
# position; "flops", the real attention FLOPs of the expert at the decision's position
# relative to dense attention (metaattn_kernels.flops), so that a budget is a share of
# dense attention FLOPs. The first is the default.
COST_MODELS = ("notional", "flops")


def finite_number(
    name: str, value, lo: float | None = None, hi: float | None = None, what: str | None = None
) -> float:
    """`value` as a finite float in [lo, hi] (`what` says the range where it is not that),
    or ValueError naming `name`: the one number check of settings (and of core's callers)."""
    if isinstance(value, (bool, str, bytes)):  # True is not 1.0, nor "0.3" a number: say so
        raise ValueError(f"{name} must be a number{_range(lo, hi, what)}, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number{_range(lo, hi, what)}, got {value!r}") from None
    if not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
        raise ValueError(f"{name} must be a finite number{_range(lo, hi, what)}, got {value!r}")
    return v


def _range(lo, hi, what) -> str:
    if what:
        return f" {what}"
    if lo is not None and hi is not None:
        return f" in [{lo:g}, {hi:g}]"
    if lo is not None:
        return f" >= {lo:g}"
    return ""


def _int(name: str, value, lo: int, hi: int) -> int:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or (isinstance(value, float) and (not math.isfinite(value) or value != int(value)))
    ):
        raise ValueError(f"{name} must be a whole number in [{lo}, {hi}], got {value!r}")
    v = int(value)
    if not lo <= v <= hi:
        raise ValueError(f"{name} must be a whole number in [{lo}, {hi}], got {value!r}")
    return v


@dataclass(frozen=True)
class RoutingSettings:
    """How the routed model spends compute. Defaults are the app's defaults.

    budget: mean cost per routed decision under ``cost_model``, in [MIN_COST, 1] = [0.15, 1];
        None = no budget (the posterior's own argmax, lambda = 0: the paper's "projected
        normalised cost" mode; docs/method.md, "Budget").
    scope: "global" (one lambda for all layers, so layers compete for compute: the default,
        because layers differ in how much full attention they need; a prefill settles
        lambda on a pilot pass, or on the controller's calibrated lambda for a text it covers,
        see RoutedModel.prefill) or "layer" (every layer meets the budget; one pass).
    hedge_policy (docs/method.md, "Hedging"): "off"; "soft" (an uncertain cheap decision
        mixes the experts whose posterior weight is >= hedge_min_weight); "full" (escalate
        it to full attention).
    hedge_threshold: the uncertainty (``hedge_measure``, as a fraction of log K) above which
        a decision routed to a cheap expert is hedged.
    window, n_sink: the local expert's sliding window and number of attention sinks.
    lam: a fixed lambda for every decision (overrides the budget; for replays and tests).
    dual_step: decode-time dual-ascent step, lambda += dual_step * (cost_t - budget).
    backend: expert kernels, "auto" (Triton on CUDA, fast PyTorch on CPU), "cpu",
        "triton" or "reference".
    linear_map: the linear expert's feature map, "elu" (elu + 1), "learned" (the maps
        distilled for this model, docs/method.md, Experts) or "auto" (the default: "learned"
        where this model has learned maps, else "elu"; the shipped controllers were
        calibrated with the learned maps). A trace records the map "auto" resolved to.
    hedge_measure: what ``hedge_threshold`` is compared with, "total" (the entropy of the
        posterior mean) or "epistemic" (the mutual information: what the controller does
        not know, as opposed to a token for which two experts are equally good).
    cost_model: what a decision costs against the budget, "notional" (the paper's costs:
        full 1, linear 0.15, local 0.3) or "flops" (the expert's real attention FLOPs at the
        decision's position relative to dense attention: budget 0.3 is 30 % of dense
        attention FLOPs; routing/costs.py).
    """

    budget: float | None = 0.5
    scope: str = "global"
    hedge_policy: str = "off"
    hedge_threshold: float = 0.9
    hedge_min_weight: float = 0.1
    window: int = 64
    n_sink: int = 4
    lam: float | None = None
    dual_step: float = 1.0
    backend: str = "auto"
    linear_map: str = "auto"
    hedge_measure: str = "total"
    cost_model: str = "notional"

    def __post_init__(self):
        if self.budget is not None:
            object.__setattr__(self, "budget", finite_number("budget", self.budget, MIN_COST, 1.0))
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, got {self.scope!r}")
        if self.hedge_policy not in HEDGE_POLICIES:
            raise ValueError(f"hedge_policy must be one of {HEDGE_POLICIES}, got {self.hedge_policy!r}")
        object.__setattr__(
            self, "hedge_threshold", finite_number("hedge_threshold", self.hedge_threshold, 0.0, 1.0)
        )
        object.__setattr__(
            self, "hedge_min_weight", finite_number("hedge_min_weight", self.hedge_min_weight, 0.0, 1.0)
        )
        object.__setattr__(self, "window", _int("window", self.window, 1, 1 << 20))
        object.__setattr__(self, "n_sink", _int("n_sink", self.n_sink, 0, 1024))
        if self.lam is not None:
            object.__setattr__(self, "lam", finite_number("lam", self.lam, -1e4, 1e4))
        object.__setattr__(self, "dual_step", finite_number("dual_step", self.dual_step, 0.0, 100.0))
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.linear_map not in LINEAR_MAPS:
            raise ValueError(f"linear_map must be one of {', '.join(LINEAR_MAPS)}, got {self.linear_map!r}")
        if self.hedge_measure not in HEDGE_MEASURES:
            raise ValueError(
                f"hedge_measure must be one of {', '.join(HEDGE_MEASURES)}, got {self.hedge_measure!r}"
            )
        if self.cost_model not in COST_MODELS:
            raise ValueError(f"cost_model must be one of {', '.join(COST_MODELS)}, got {self.cost_model!r}")

    def with_(self, **changes) -> RoutingSettings:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RoutingSettings:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    @property
    def dense(self) -> bool:
        """Budget 1 with no fixed lambda: every decision is full attention."""
        return self.lam is None and self.budget is not None and self.budget >= 1.0


DEFAULTS = RoutingSettings()  # the defaults, for the CLI's and the app's controls


__all__ = [
    "RoutingSettings",
    "DEFAULTS",
    "SCOPES",
    "HEDGE_POLICIES",
    "HEDGE_MEASURES",
    "COST_MODELS",
    "BACKENDS",
    "LINEAR_MAPS",
    "UNCERTAINTY_MEASURES",
    "COSTS",
    "EXPERTS",
    "FULL",
    "LINEAR",
    "LOCAL",
    "MIN_COST",
]


def check_settings(settings, required: bool = False) -> None:
    """TypeError unless `settings` is a RoutingSettings (or None where not `required`): a
    dict in its place would fail later, deep inside, with an AttributeError."""
    if (settings is None and not required) or isinstance(settings, RoutingSettings):
        return
    raise TypeError(
        "settings must be a RoutingSettings (e.g. RoutingSettings(budget=0.3)), "
        f"got {type(settings).__name__}"
    )
