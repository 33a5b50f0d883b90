"""The meta-controllers: one small network per layer reading a token's causal features
(docs/method.md, "Controller").

- Bayesian: u_t -> Linear(D+2, H) -> GELU -> Linear(H, K) -> softplus + beta_min = beta_t,
  the concentrations of the Dirichlet posterior q(alpha_t | x) = Dir(beta_t).
- Prior-free baseline (the paper's ablation): the same network ending in a softmax, a point
  estimate of the routing weights.

Features (all causal, so prefill and token-by-token decoding route identically): the
normalised attention input h_t, the residual-stream salience ||x_t|| / sqrt(D), and the
position feature log(1+t) / log(1+T_ref) (never normalised by the current length).

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

log = logging.getLogger(__name__)

# The controller registry: the kinds a routed model carries (one stack each), which the CLI,
# the app and calibration offer. Named in core.settings (importable without torch).
KINDS = CONTROLLER_KINDS
WEIGHTS_FILE = "controller.safetensors"
META_FILE = "meta.json"


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

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"controller must be one of {KINDS}, got {self.kind!r}")


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
            LayerController(config.d_model + 2, config.hidden, config.n_experts)
            for _ in range(config.n_layers)
        ]
        self.layers = nn.ModuleList(layers)
        alpha0 = prior_concentration(COSTS[: config.n_experts], config.prior_strength, config.prior_gamma)
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
        self._hash: str | None = None
        self._np_cache: dict = {}  # layer -> (weights' identity, numpy copies) for concentration_one

    @property
    def kind(self) -> str:
        return self.config.kind

    @property
    def point_estimate(self) -> bool:
        return self.config.kind == "priorfree"

    def features(self, h: torch.Tensor, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """u_t = [h_t, ||x_t||/sqrt(D), log(1+t)/log(1+T_ref)]   h, x: [B, T, D]; positions [T]."""
        d = x.shape[-1]
        salience = x.float().norm(dim=-1, keepdim=True) / math.sqrt(d)  # [B, T, 1]
        pos = torch.log1p(positions.float()) / math.log1p(self.config.t_ref)  # [T]
        pos = pos.view(1, -1, 1).expand(x.shape[0], -1, 1)  # [B, T, 1]
        return torch.cat([h.float(), salience, pos], dim=-1)  # [B, T, D+2]

    def concentration(self, layer: int, h, x, positions) -> torch.Tensor:
        """Bayesian: beta [B, T, K] (> beta_min). Prior-free: its probability vector [B, T, K]."""
        scores = self.layers[layer](self.features(h, x, positions))
        if self.config.kind == "bayes":
            return F.softplus(scores) + self.config.beta_min
        return torch.softmax(scores, dim=-1)

    def concentration_one(self, layer: int, h: torch.Tensor, x: torch.Tensor, position: int) -> list[float]:
        """`concentration` of one token (h, x [1, 1, D] at `position`) as K floats: the decode
        hot path. On CPU in numpy, on float32 copies of the layer's weights (refreshed when
        the weights change), since a dozen tiny torch ops in the middle of a forward pass
        cost more than the arithmetic. Same maths (exact GELU via erf); the copies are
        pre-scaled so that GELU takes three numpy calls: with p = fc1(u) / sqrt(2),
        fc2(gelu(fc1(u))) = (fc2.weight / sqrt(2)) @ (p * (1 + erf(p))) + fc2.bias."""
        if h.device.type != "cpu" or h.dtype != torch.float32 or torch.is_grad_enabled():
            return (
                self.concentration(layer, h, x, torch.tensor([position], device=x.device))
                .reshape(-1)
                .tolist()
            )
        w1, w2, b2 = self._numpy_weights(layer)
        xv = x.detach().numpy().reshape(-1)
        d = xv.shape[0]
        u = np.empty(d + 3, np.float32)  # the features, as in `features`, then 1 for the bias
        u[:d] = h.detach().numpy().reshape(-1)
        u[d] = math.sqrt(xv.dot(xv)) / math.sqrt(d)
        u[d + 1] = math.log1p(position) / math.log1p(self.config.t_ref)
        u[d + 2] = 1.0
        p = w1 @ u
        g = _erf(p)
        g += 1.0
        g *= p
        scores = [s + b for s, b in zip((w2 @ g).tolist(), b2, strict=True)]  # K = 3: plain Python from here
        if self.config.kind == "bayes":  # softplus as torch computes it (threshold 20)
            bmin = self.config.beta_min
            return [(s if s > 20.0 else math.log1p(math.exp(s))) + bmin for s in scores]
        top = max(scores)
        e = [math.exp(s - top) for s in scores]
        total = sum(e)
        return [v / total for v in e]

    def _numpy_weights(self, layer: int) -> tuple[np.ndarray, np.ndarray, list[float]]:
        """([fc1.weight | fc1.bias] / sqrt(2) [H, D + 3], fc2.weight / sqrt(2) [K, H]) in
        float32 and fc2.bias as K floats, for concentration_one; rebuilt when a parameter is replaced
        or changed in place (its _version moves). Read-only: safe across threads."""
        lay: LayerController = self.layers[layer]  # type: ignore[assignment]  # ModuleList[LayerController]
        cached = self._np_cache.get(layer)
        if cached is not None:
            params, versions = cached[0], cached[1]
            if all(p._version == v for p, v in zip(params, versions, strict=True)) and (
                params[0] is lay.fc1.weight
            ):
                return cached[2]
        params = (lay.fc1.weight, lay.fc1.bias, lay.fc2.weight, lay.fc2.bias)
        w1, b1, w2, b2 = (p.detach().cpu().double().numpy() for p in params)
        r = math.sqrt(0.5)
        arrays = (
            np.ascontiguousarray(np.concatenate([w1, b1[:, None]], axis=1) * r, np.float32),
            np.ascontiguousarray(w2 * r, np.float32),
            b2.astype(np.float32).tolist(),
        )
        self._np_cache[layer] = (params, tuple(p._version for p in params), arrays)
        return arrays

    # -- identity ---------------------------------------------------------------------------
    def content_hash(self) -> str:
        if self._hash is None:
            h = hashlib.sha256(json.dumps(asdict(self.config), sort_keys=True).encode())
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
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (WEIGHTS_FILE + ".tmp")
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()}, str(tmp))
        tmp.replace(folder / WEIGHTS_FILE)
        self.invalidate_hash()
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
        stack.eval()
        return stack


@dataclass
class ControllerChoice:
    stack: ControllerStack
    source: str  # folder it came from, or "untrained"
    notes: list[str] = field(default_factory=list)


def default_folder(model_slug: str, kind: str) -> Path:
    return paths.CONTROLLERS_DIR / model_slug / kind


def config_for_model(model_config, kind: str) -> ControllerConfig:
    return ControllerConfig(
        kind=kind, d_model=model_config.hidden_size, n_layers=model_config.num_hidden_layers
    )


def load_for_model(
    model_config, model_slug: str, kind: str = "bayes", folder: Path | None = None
) -> ControllerChoice:
    """The shipped controllers for this model, or untrained ones (said plainly) if none fit."""
    if kind not in KINDS:
        raise ValueError(f"controller must be one of {KINDS}, got {kind!r}")
    folder = Path(folder) if folder else default_folder(model_slug, kind)
    expected = config_for_model(model_config, kind)
    notes = []
    if (folder / WEIGHTS_FILE).is_file():
        try:
            stack = ControllerStack.load(folder)
            c = stack.config
            if (c.kind, c.d_model, c.n_layers) == (kind, expected.d_model, expected.n_layers):
                return ControllerChoice(stack, str(folder))
            notes.append(f"{folder}: made for another model shape ({c.kind}, D={c.d_model}, L={c.n_layers})")
        except Exception as exc:  # corrupt file: fall back, and say so
            notes.append(f"{folder}: unreadable ({type(exc).__name__}: {exc})")
    else:
        notes.append(f"no trained {kind} controllers at {folder}")
    for n in notes:
        log.warning("%s; using UNTRAINED controllers (run `metaattn-viz calibrate`)", n)
    stack = ControllerStack(expected)
    stack.eval()
    return ControllerChoice(stack, "untrained", notes)
