"""The meta-controllers: one small network per layer reading a token's causal features
(docs/method.md, "Controller").

- Bayesian: u_t -> Linear(D+2, H) -> GELU -> Linear(H, K) -> softplus + beta_min = beta_t,
  the concentrations of the Dirichlet posterior q(alpha_t | x) = Dir(beta_t).
- Prior-free baseline (the paper's ablation): the same network ending in a softmax, a point
  estimate of the routing weights.

Features (all causal, so prefill and token-by-token decoding route identically; the set a
stack reads is named in its config, ``features``, and defined once, in ``features``): the
normalised attention input h_t, the residual-stream salience ||x_t|| / sqrt(D), the
position feature log(1+t) / log(1+T_ref) (never normalised by the current length), and,
optionally, signals read from the layer's own attention inputs: the query and key norms
of the token per head and the linear read-out's estimate of the share of the attention mass
that lies beyond the local window and its sinks, what going local would lose (defined in
routing/signals.py).

Weights are stored as safetensors plus a meta.json; a content hash of the weights names
exactly which controllers ran. This module never imports gradio, kernels or the store.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy.special import erf as _erf

from metaattn_viz import paths
from metaattn_viz.core.dirichlet import prior_concentration
from metaattn_viz.core.settings import CONTROLLER_KINDS, COSTS
from metaattn_viz.routing import lambda_table
from metaattn_viz.routing.lambda_table import LambdaTable
from metaattn_viz.routing.signals import AttentionView, attention_signals, signals_one

log = logging.getLogger(__name__)

# The controller registry: the kinds a routed model carries (one stack each), which the CLI,
# the app and calibration offer. Named in core.settings (importable without torch).
KINDS = CONTROLLER_KINDS
WEIGHTS_FILE = "controller.safetensors"
META_FILE = "meta.json"

# The feature groups a controller may read (ControllerStack.features is their one definition):
# "base": [h_t, ||x_t|| / sqrt(D), position] (every controller; D + 2 values);
# "attention": per query head ln(||q_t|| / sqrt(d)) and the far-mass feature, per kv head
# ln(||k_t|| / sqrt(d)) (2 Hq + Hkv values; needs the layer's q and k, an AttentionView).
FEATURE_GROUPS = ("base", "attention")
BASE_FEATURES = ("base",)  # what a meta.json without the field was trained with


def check_prior_costs(costs, n_experts: int) -> tuple[float, ...]:
    """The prior's costs as a tuple of ``n_experts`` finite positive floats, or ValueError."""
    try:
        values = tuple(float(c) for c in costs)
    except (TypeError, ValueError):
        raise ValueError(f"prior costs must be {n_experts} numbers, got {costs!r}") from None
    if len(values) != n_experts or not all(math.isfinite(c) and c > 0 for c in values):
        raise ValueError(
            f"prior costs must be {n_experts} finite numbers > 0 (full, linear, local), got {costs!r}"
        )
    return values


@dataclass
class ControllerConfig:
    kind: str = "bayes"
    d_model: int = 576
    n_layers: int = 30
    hidden: int = 96
    n_experts: int = 3
    beta_min: float = 0.05
    t_ref: int = 2048
    prior_strength: float = 3.0
    prior_gamma: float = 1.0
    # the costs the prior prices the experts at (id order); None: the notional costs
    # (core.experts.COSTS), which also price the budget. Only the prior reads these.
    prior_costs: tuple[float, ...] | None = None
    # which feature groups (FEATURE_GROUPS) the controller reads; the attention group needs
    # the model's query and kv head counts (head_dim = d_model / n_heads unless given)
    features: tuple[str, ...] = BASE_FEATURES
    n_heads: int | None = None
    n_kv_heads: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"controller must be one of {KINDS}, got {self.kind!r}")
        self.features = tuple(self.features)
        unknown = [f for f in self.features if f not in FEATURE_GROUPS]
        if unknown or "base" not in self.features or len(set(self.features)) != len(self.features):
            raise ValueError(
                f"controller features must name 'base' and any of {FEATURE_GROUPS} once each, "
                f"got {self.features}"
            )
        if self.uses_attention and not (self.n_heads and self.n_kv_heads):
            raise ValueError("the 'attention' features need n_heads and n_kv_heads")
        if self.prior_costs is not None:
            self.prior_costs = check_prior_costs(self.prior_costs, self.n_experts)

    def check_prior(self) -> None:
        """Before training a Bayesian controller (training/calibrate.py): it starts at the
        prior (softplus(b) + beta_min = alpha0), which it cannot where a prior concentration
        is at or below beta_min: it would start elsewhere, and the KL to the prior would have
        a floor above 0. Not checked on load: controllers saved with such a prior still load."""
        if self.kind != "bayes":
            return
        alpha0 = prior_concentration(self.prior_cost_values, self.prior_strength, self.prior_gamma)
        least = float(alpha0.min())
        if least <= self.beta_min:
            share = least / self.prior_strength  # alpha0 is the strength times fixed shares
            raise ValueError(
                f"prior_strength {self.prior_strength:g} gives the prior a concentration of "
                f"{least:.3g}, at or below the controller's least concentration beta_min = "
                f"{self.beta_min:g}; raise prior_strength above {self.beta_min / share:.3g} or "
                f"lower prior_gamma (--prior-gamma, now {self.prior_gamma:g})"
            )

    @property
    def prior_cost_values(self) -> tuple[float, ...]:
        """What the prior prices each expert at: ``prior_costs``, else the notional costs."""
        return self.prior_costs if self.prior_costs is not None else COSTS[: self.n_experts]

    @property
    def uses_attention(self) -> bool:
        return "attention" in self.features

    @property
    def n_features(self) -> int:
        """Length of u_t."""
        n = self.d_model + 2
        if self.uses_attention:
            assert self.n_heads and self.n_kv_heads
            n += 2 * self.n_heads + self.n_kv_heads
        return n


class LayerController(nn.Module):
    """The per-layer network: features u_t [.., D+2] -> raw scores [.., K]."""

    def __init__(self, d_in: int, hidden: int, n_experts: int):
        super().__init__()
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, n_experts)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(u)))


class ControllerStack(nn.Module):
    """All layers' controllers plus what they need to turn scores into routing weights."""

    def __init__(self, config: ControllerConfig, seed: int = 0):
        super().__init__()
        self.config = config
        gen = torch.Generator().manual_seed(seed)
        layers = [
            LayerController(config.n_features, config.hidden, config.n_experts)
            for _ in range(config.n_layers)
        ]
        self.layers = nn.ModuleList(layers)
        alpha0 = prior_concentration(config.prior_cost_values, config.prior_strength, config.prior_gamma)
        self.register_buffer("alpha0", alpha0, persistent=False)
        with torch.no_grad():
            for layer in layers:
                for lin in (layer.fc1, layer.fc2):
                    bound = 1.0 / math.sqrt(lin.in_features)
                    lin.weight.uniform_(-bound, bound, generator=gen)
                    lin.bias.zero_()
                layer.fc2.weight.mul_(0.1)
                if config.kind == "bayes":  # start at the prior: softplus(b) + beta_min = alpha0
                    target = (alpha0 - config.beta_min).clamp_min(1e-3)
                    layer.fc2.bias.copy_(target + torch.log(-torch.expm1(-target)))
        self.trained = False
        self.meta: dict = {}
        # the global scope's calibrated lambda by text length, stored beside the weights
        # (routing/lambda_table.py); None: texts take the pilot pass
        self.lambda_table: LambdaTable | None = None
        self._hash: str | None = None
        self._np_cache: dict = {}  # layer -> (weights' identity, numpy copies) for concentration_one
        # concentration_one's divisors of the salience and the position feature, computed once
        self._one_consts = (math.sqrt(config.d_model), math.log1p(config.t_ref))

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def point_estimate(self) -> bool:
        return self.config.kind == "priorfree"

    @property
    def uses_attention(self) -> bool:
        """Whether the features need the layer's attention inputs (pass an AttentionView)."""
        return self.config.uses_attention

    def features(
        self,
        h: torch.Tensor,
        x: torch.Tensor,
        positions: torch.Tensor,
        view: AttentionView | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """u_t = [h_t, ||x_t||/sqrt(D), log(1+t)/log(1+T_ref) (, attention_signals)]
        h, x: [B, T, D]; positions [T]; ``view`` (with the layer) for the attention group."""
        d = x.shape[-1]
        salience = x.float().norm(dim=-1, keepdim=True) / math.sqrt(d)  # [B, T, 1]
        pos = torch.log1p(positions.float()) / math.log1p(self.config.t_ref)  # [T]
        pos = pos.view(1, -1, 1).expand(x.shape[0], -1, 1)  # [B, T, 1]
        parts = [h.float(), salience, pos]
        if self.config.uses_attention:
            if view is None:
                raise ValueError("these controllers read attention features: pass an AttentionView")
            parts.append(attention_signals(view, layer).to(h.device))
        return torch.cat(parts, dim=-1)  # [B, T, n_features]

    def concentration(self, layer: int, h, x, positions, view: AttentionView | None = None) -> torch.Tensor:
        """Bayesian: beta [B, T, K] (> beta_min). Prior-free: its probability vector [B, T, K]."""
        scores = self.layers[layer](self.features(h, x, positions, view, layer))
        if self.config.kind == "bayes":
            return F.softplus(scores) + self.config.beta_min
        return torch.softmax(scores, dim=-1)

    def concentration_one(
        self, layer: int, h: torch.Tensor, x: torch.Tensor, position: int, view: AttentionView | None = None
    ) -> list[float]:
        """`concentration` of one token (h, x [1, 1, D] at `position`) as K floats: the decode
        hot path. On CPU in numpy, on float32 copies of the layer's weights (refreshed when
        the weights change), since a dozen tiny torch ops in the middle of a forward pass
        cost more than the arithmetic. Same maths (exact GELU via erf); the copies are
        pre-scaled so that GELU takes three numpy calls: with p = fc1(u) / sqrt(2),
        fc2(gelu(fc1(u))) = (fc2.weight / sqrt(2)) @ (p * (1 + erf(p))) + fc2.bias."""
        if h.device.type != "cpu" or h.dtype != torch.float32 or torch.is_grad_enabled():
            return (
                self.concentration(layer, h, x, torch.tensor([position], device=x.device), view)
                .reshape(-1)
                .tolist()
            )
        w1, w2, b2 = self._numpy_weights(layer)
        xv = (x.detach() if x.requires_grad else x).numpy().reshape(-1)
        d = xv.shape[0]
        n = w1.shape[1] - 1  # n_features
        u = np.empty(n + 1, np.float32)  # the features, as in `features`, then 1 for the bias
        u[:d] = (h.detach() if h.requires_grad else h).numpy().reshape(-1)
        sqrt_d, log_ref = self._one_consts
        u[d] = math.sqrt(xv.dot(xv)) / sqrt_d
        u[d + 1] = math.log1p(position) / log_ref
        if n > d + 2:  # the attention group
            if view is None:
                raise ValueError("these controllers read attention features: pass an AttentionView")
            if not signals_one(view, layer, u[d + 2 : n]):
                u[d + 2 : n] = attention_signals(view, layer).reshape(-1).numpy()
        u[n] = 1.0
        p = w1 @ u
        g = _erf(p)
        g += 1.0
        g *= p
        scores = [s + b for s, b in zip((w2 @ g).tolist(), b2, strict=True)]  # K floats: plain Python
        if self.config.kind == "bayes":  # softplus as torch computes it (threshold 20)
            bmin = self.config.beta_min
            return [(s if s > 20.0 else math.log1p(math.exp(s))) + bmin for s in scores]
        top = max(scores)
        e = [math.exp(s - top) for s in scores]
        total = sum(e)
        return [v / total for v in e]

    def _numpy_weights(self, layer: int) -> tuple[np.ndarray, np.ndarray, list[float]]:
        """([fc1.weight | fc1.bias] / sqrt(2) [H, n_features + 1], fc2.weight / sqrt(2) [K, H]) in
        float32 and fc2.bias as K floats, for concentration_one; rebuilt when fc1.weight is
        replaced or a parameter changed in place (its _version moves). Read-only: safe across
        threads. The check is per layer and token: dictionary lookups, not module attributes."""
        cached = self._np_cache.get(layer)
        if cached is not None:
            params, versions, arrays, key = cached
            p0, p1, p2, p3 = params
            if (
                versions == (p0._version, p1._version, p2._version, p3._version)
                # Plain dictionary lookups (module attributes go through __getattr__); every
                # entry exists: the cache key was read from this same structure.
                and self._modules["layers"]._modules[key]._modules["fc1"]._parameters["weight"]  # type: ignore[union-attr]
                is p0
            ):
                return arrays
        lay: LayerController = self.layers[layer]  # type: ignore[assignment]  # ModuleList[LayerController]
        params = (lay.fc1.weight, lay.fc1.bias, lay.fc2.weight, lay.fc2.bias)
        w1, b1, w2, b2 = (p.detach().cpu().double().numpy() for p in params)
        r = math.sqrt(0.5)
        arrays = (
            np.ascontiguousarray(np.concatenate([w1, b1[:, None]], axis=1) * r, np.float32),
            np.ascontiguousarray(w2 * r, np.float32),
            b2.astype(np.float32).tolist(),
        )
        key = str(layer % len(self.layers))  # the ModuleList's key of this layer
        self._np_cache[layer] = (params, tuple(p._version for p in params), arrays, key)
        return arrays

    # -- identity ---------------------------------------------------------------------------
    def content_hash(self) -> str:
        if self._hash is None:
            h = hashlib.sha256(json.dumps(_hashed_config(self.config), sort_keys=True).encode())
            for name, t in sorted(self.state_dict().items()):
                h.update(name.encode())
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
            self._hash = h.hexdigest()[:16]
        return self._hash

    def invalidate_hash(self) -> None:
        self._hash = None

    @property
    def controller_id(self) -> str:
        state = "trained" if self.trained else "untrained"
        return f"{self.kind}-{state}-{self.content_hash()}"

    # -- persistence ------------------------------------------------------------------------
    def save(self, folder: Path, meta: dict | None = None) -> Path:
        """Write the weights (safetensors, renamed into place) and meta.json into `folder`,
        both with the mode a new file gets (0666 less the umask)."""
        from metaattn_viz.routing.tensor_files import save_tensors

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_tensors(
            {k: v.detach().contiguous() for k, v in self.state_dict().items()}, folder / WEIGHTS_FILE
        )
        self.invalidate_hash()
        self.lambda_table = None  # made for the weights before these (a table there is stale)
        full_meta = {"config": asdict(self.config), "content_hash": self.content_hash(), **(meta or {})}
        (folder / META_FILE).write_text(json.dumps(full_meta, indent=2, sort_keys=True) + "\n")
        self.meta = full_meta
        return folder

    @classmethod
    def load(cls, folder: Path) -> ControllerStack:
        from safetensors.torch import load_file

        folder = Path(folder)
        meta = json.loads((folder / META_FILE).read_text())
        stack = cls(ControllerConfig(**meta["config"]))
        stack.load_state_dict(load_file(str(folder / WEIGHTS_FILE)))
        stack.trained = True
        stack.meta = meta
        stack.lambda_table = lambda_table.load(folder, stack.content_hash())
        stack.eval()
        return stack


def _hashed_config(config: ControllerConfig) -> dict:
    """The config as the content hash reads it: the fields added with the attention features
    are left out while they hold their defaults, so base controllers keep their old hashes."""
    d = asdict(config)
    if config.prior_costs is None:
        d.pop("prior_costs")
    else:
        d["prior_costs"] = list(config.prior_costs)
    if not config.uses_attention:
        for name in ("features", "n_heads", "n_kv_heads"):
            d.pop(name)
    else:
        d["features"] = list(config.features)
    return d


@dataclass
class ControllerChoice:
    stack: ControllerStack
    source: str  # folder it came from, or "untrained"
    notes: list[str] = field(default_factory=list)


def default_folder(model_slug: str, kind: str) -> Path:
    return paths.CONTROLLERS_DIR / model_slug / kind


def config_for_model(model_config, kind: str, features: tuple[str, ...] = BASE_FEATURES) -> ControllerConfig:
    """The controllers' config for a model; the head counts are recorded when the features
    read the attention inputs (they size those features)."""
    attention = "attention" in features
    heads = model_config.num_attention_heads if attention else None
    return ControllerConfig(
        kind=kind,
        d_model=model_config.hidden_size,
        n_layers=model_config.num_hidden_layers,
        features=tuple(features),
        n_heads=heads if attention else None,
        n_kv_heads=(getattr(model_config, "num_key_value_heads", None) or heads) if attention else None,
    )


def shape_problem(config: ControllerConfig, model_config, kind: str | None = None) -> str | None:
    """What in a controller stack's config does not fit a model of ``model_config``, in
    words, or None where it fits: its layers, d_model and, for a stack reading the attention
    features, its query and kv head counts (as ``config_for_model`` makes them), and its kind
    where ``kind`` names the one it is to route as. The one definition of which stacks route
    a model: ``load_for_model`` falls back to untrained controllers on it, ``check_fits``
    (a stack handed over or installed by hand) refuses with it."""
    want = config_for_model(model_config, config.kind, config.features)
    problems = []
    if kind is not None and config.kind != kind:
        problems.append(f"it is a {config.kind} stack, not {kind}")
    if config.n_layers != want.n_layers:
        problems.append(f"{config.n_layers} layers where the model has {want.n_layers}")
    if config.d_model != want.d_model:
        problems.append(f"d_model {config.d_model} where the model's hidden size is {want.d_model}")
    if config.uses_attention and (config.n_heads, config.n_kv_heads) != (want.n_heads, want.n_kv_heads):
        problems.append(
            f"{config.n_heads} query / {config.n_kv_heads} kv heads where the model has "
            f"{want.n_heads} / {want.n_kv_heads}"
        )
    return "; ".join(problems) or None


def check_fits(stack, model_config, kind: str | None = None, name: str = "the controller stack") -> None:
    """Refuse a stack (``name`` says which, e.g. ``routed.controllers['bayes']``) that is not a
    ControllerStack or does not fit the model (``shape_problem``), where routing would fail
    deep inside torch (an IndexError for a missing layer, a matmul's shapes for another
    hidden size)."""
    if not isinstance(stack, ControllerStack):
        raise TypeError(f"{name} must be a ControllerStack, got {type(stack).__name__}")
    problem = shape_problem(stack.config, model_config, kind)
    if problem is not None:
        raise ValueError(
            f"{name} does not fit this model: {problem}. Install controllers made for this model "
            "(mav.calibrate trains them; mav.load(..., controllers=folder) loads saved ones)"
        )


def load_for_model(
    model_config, model_slug: str, kind: str = "bayes", folder: Path | None = None
) -> ControllerChoice:
    """The shipped controllers for this model, or untrained ones (said plainly) if none fit
    (``shape_problem``)."""
    if kind not in KINDS:
        raise ValueError(f"controller must be one of {KINDS}, got {kind!r}")
    folder = Path(folder) if folder else default_folder(model_slug, kind)
    notes = []
    if (folder / WEIGHTS_FILE).is_file():
        try:
            stack = ControllerStack.load(folder)
            problem = shape_problem(stack.config, model_config, kind)
            if problem is None:
                return ControllerChoice(stack, str(folder))
            notes.append(f"{folder}: made for another model shape ({problem})")
        except Exception as exc:  # corrupt file: fall back, and say so
            notes.append(f"{folder}: unreadable ({type(exc).__name__}: {exc})")
    else:
        notes.append(f"no trained {kind} controllers at {folder}")
    for n in notes:
        log.warning("%s; using UNTRAINED controllers (run `metaattn-viz calibrate`)", n)
    stack = ControllerStack(config_for_model(model_config, kind))
    stack.eval()
    return ControllerChoice(stack, "untrained", notes)
