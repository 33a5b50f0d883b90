"""Calibration: train the controllers of a frozen model (docs/method.md, ELBO).

Bayesian (docs/method.md, Controller and Prior): loss = E_{alpha~q}[task]
+ beta_kl * mean_{l,t} KL(Dir(beta) || Dir(alpha0)), with task = self-distillation
KL(p_dense || p_routed) on real text and alpha drawn by the reparameterised Dirichlet
sampler. Prior-free: the same network ending in a softmax, the same task loss plus
cost_weight * E[cost], no KL.

Soft to hard (docs/method.md, Choices this project made): the first ``soft_fraction`` of
the steps route softly with the sampled weights; the rest use straight-through hard routing
(the forward pass takes the one-hot argmax of the sample, the gradient flows through the
soft sample), so the controllers end trained for the hard routing they meet at inference.

Only controller parameters train. Seeded; checkpoints every ``checkpoint_every`` steps and
``--resume``; final ELBO terms are measured on fixed validation windows with a fixed seed,
which is what makes a rerun comparable. Never imports gradio or the store, and never
changes the frozen model's weights.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from numbers import Integral, Real
from pathlib import Path

import torch

from metaattn_viz.core.dirichlet import kl_dirichlet, prior_concentration
from metaattn_viz.core.experts import FULL, LINEAR, LOCAL
from metaattn_viz.core.settings import (
    CONTROLLER_KINDS,
    COSTS,
    DEFAULT_CONTROLLER,
    LINEAR_MAPS,
    RoutingSettings,
)
from metaattn_viz.routing import linear_maps
from metaattn_viz.routing.controller import (
    BASE_FEATURES,
    FEATURE_GROUPS,
    ControllerConfig,
    ControllerStack,
    check_prior_costs,
    config_for_model,
    default_folder,
)
from metaattn_viz.routing.fingerprint import FINGERPRINT_KIND, architecture, weights_fingerprint
from metaattn_viz.routing.generation import MAX_SEED
from metaattn_viz.routing.model import RoutedModel, TrainRouting, kl_per_token
from metaattn_viz.training import checkpoints, oracle
from metaattn_viz.training import data as data_mod
from metaattn_viz.training.checkpoints import CHECKPOINT
from metaattn_viz.training.checkpoints import check_resumable as _check_resumable  # tests import it here
from metaattn_viz.training.evaluate import MIN_SEQ_LEN
from metaattn_viz.training.provenance import git_commit

log = logging.getLogger(__name__)
AUX_SCOPES = ("global", "layer", "both")
RESUMED = ("config", "stack", "opt", "sched", "rng", "step", "history")  # what a resume reads


@dataclass
class CalibrationConfig:
    controller: str = DEFAULT_CONTROLLER
    steps: int = 64
    batch_size: int = 1
    seq_len: int = 256
    lr: float = 1e-2
    weight_decay: float = 0.0
    beta_kl: float = 0.1  # weight of the Dirichlet KL to the compute-aware prior (Bayes)
    cost_weight: float = 0.1  # weight of E[cost] (prior-free baseline)
    soft_fraction: float = 0.6  # share of steps with soft routing before straight-through
    window: int = 64
    n_sink: int = 4
    linear_map: str = "elu"  # the linear expert's feature map while training: "elu" or "learned"
    # the controller's shape and prior: ControllerConfig's defaults, overridable here
    hidden: int = ControllerConfig.hidden
    features: tuple[str, ...] = BASE_FEATURES  # the controllers' feature groups (routing/controller.py)
    prior_strength: float = ControllerConfig.prior_strength
    prior_gamma: float = ControllerConfig.prior_gamma
    # the costs the prior prices the experts at (full, linear, local); None: the notional ones
    prior_costs: tuple[float, ...] | None = None
    # auxiliary target (0: off): how well the controller's ranking scores predict the
    # per-decision output error of the cheap experts on the dense pass (training/oracle.py)
    aux_weight: float = 0.0
    # over which decisions the target's correlations are taken: "global" (all layers and
    # tokens of a window together), "layer" (each layer's tokens, averaged over layers:
    # the ranking within a layer, leaving how layers share the budget to the task loss) or
    # "both" (the mean of the two)
    aux_scope: str = "global"
    # budgets sampled (one per step, seeded) for the hard steps' routes, as inference routes
    # under a budget (TrainRouting.budget); empty: the hard steps take the argmax
    train_budgets: tuple[float, ...] = ()
    seed: int = 0
    val_windows: int = 8
    checkpoint_every: int = 16

    def __post_init__(self):
        """Every setting checked before any work, each refusal a ValueError naming the
        setting and its allowed range (the CLI reports it as a usage error, exit 2)."""
        if self.controller not in CONTROLLER_KINDS:
            raise ValueError(f"controller (--controller) must be bayes or priorfree, got {self.controller!r}")
        for name in ("steps", "batch_size", "seq_len", "val_windows"):
            least = MIN_SEQ_LEN if name == "seq_len" else 1
            setattr(self, name, _whole(f"{name} (--{name.replace('_', '-')})", getattr(self, name), least))
        # no CLI flag: the recipe's fixed choices, settable from the notebook
        self.hidden = _whole("hidden (the controllers' hidden width)", self.hidden, 1)
        self.checkpoint_every = _whole("checkpoint_every", self.checkpoint_every, 1)
        seed = self.seed
        if isinstance(seed, bool) or not isinstance(seed, Integral) or not 0 <= seed <= MAX_SEED:
            raise ValueError(f"seed (--seed) must be a whole number in [0, {MAX_SEED}], got {self.seed!r}")
        self.seed = int(self.seed)
        # the local expert's window and sinks: the routing settings' ranges (core/settings.py),
        # checked here rather than by the first training step's settings
        try:
            local = RoutingSettings(budget=None, window=self.window, n_sink=self.n_sink)
        except ValueError as exc:
            raise ValueError(f"{exc} (the local expert while training)") from None
        self.window, self.n_sink = local.window, local.n_sink
        for name, least, above in (
            ("lr", 0.0, True),
            ("weight_decay", 0.0, False),
            ("beta_kl", 0.0, False),
            ("cost_weight", 0.0, False),
            ("soft_fraction", 0.0, False),
            ("prior_strength", 0.0, True),
            ("prior_gamma", 0.0, False),
            ("aux_weight", 0.0, False),
        ):
            setattr(self, name, _number(name, getattr(self, name), least, above))
        if self.linear_map not in LINEAR_MAPS:
            raise ValueError(
                f"linear_map (--linear-map) must be one of {', '.join(LINEAR_MAPS)}, got {self.linear_map!r}"
            )
        if self.aux_scope not in AUX_SCOPES:
            raise ValueError(
                f"aux_scope (--aux-scope) must be one of {', '.join(AUX_SCOPES)}, got {self.aux_scope!r}"
            )
        if isinstance(self.features, str):  # one name, not its letters
            self.features = (self.features,)
        self.features = tuple(self.features)
        if "base" not in self.features or any(f not in FEATURE_GROUPS for f in self.features):
            raise ValueError(
                f"features (--features) must name base and any of {', '.join(FEATURE_GROUPS)}, "
                f"got {self.features}"
            )
        budgets = (self.train_budgets,) if isinstance(self.train_budgets, (str, Real)) else self.train_budgets
        try:
            budgets = tuple(budgets)
        except TypeError:
            budgets = (budgets,)
        if not all(isinstance(b, Real) and not isinstance(b, bool) for b in budgets):
            raise ValueError(
                f"train_budgets (--train-budgets) must be numbers in [{min(COSTS)}, 1], "
                f"got {self.train_budgets!r}"
            )
        self.train_budgets = tuple(float(b) for b in budgets)
        if any(not (math.isfinite(b) and min(COSTS) <= b <= 1.0) for b in self.train_budgets):
            raise ValueError(f"train_budgets must lie in [{min(COSTS)}, 1], got {self.train_budgets}")
        if self.prior_costs is not None:
            self.prior_costs = check_prior_costs(self.prior_costs, len(COSTS))
        if not 0 <= self.soft_fraction <= 1:
            raise ValueError(f"soft_fraction must be in [0, 1], got {self.soft_fraction}")
        # the prior the controllers start at (Bayesian) or record (prior-free): finite numbers,
        # which a large prior_gamma or prior_strength, or a tiny prior cost, overflows
        prior = ControllerConfig(
            kind=self.controller,
            prior_strength=self.prior_strength,
            prior_gamma=self.prior_gamma,
            prior_costs=self.prior_costs,
        )
        alpha0 = prior_concentration(prior.prior_cost_values, self.prior_strength, self.prior_gamma)
        if not bool(torch.isfinite(alpha0).all()) or not bool((alpha0 > 0).all()):
            costs = ", ".join(f"{c:g}" for c in prior.prior_cost_values)
            raise ValueError(
                f"prior_strength {self.prior_strength:g}, prior_gamma (--prior-gamma) {self.prior_gamma:g} "
                f"and the prior costs ({costs}) give the prior concentrations "
                f"{[round(float(a), 4) for a in alpha0]}, each of which must be a finite number > 0 "
                "(strength * cost^-gamma, normalised): lower prior_gamma or prior_strength, or "
                "bring the prior costs (--prior-costs) closer together"
            )
        prior.check_prior()  # Bayesian: the prior must lie above the controller's least concentration


def _whole(label: str, value, least: int) -> int:
    """A whole number >= ``least`` (a bool is not one), or ValueError naming ``label``."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < least:
        raise ValueError(f"{label} must be a whole number >= {least}, got {value!r}")
    return int(value)


def _number(name: str, value, least: float, above: bool) -> float:
    """A finite number >= ``least`` (> it when ``above``; a bool or a string is not one) as
    a float, or ValueError naming ``name`` and the range."""
    rule = f"a finite number {'>' if above else '>='} {least:g}"
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ValueError(f"{name} must be {rule}, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < least or (above and v == least):
        raise ValueError(f"{name} must be {rule}, got {v!r}")
    return v


def elbo_terms(
    routed: RoutedModel,
    stack: ControllerStack,
    input_ids: torch.Tensor,
    dense_logits: torch.Tensor,
    cfg: CalibrationConfig,
    hard: bool,
    errors: tuple[torch.Tensor, torch.Tensor] | None = None,
    budget: float | None = None,
) -> dict:
    """One forward of the routed model with sampled routing; returns the loss and its terms
    (tensors with graph: task, kl, cost, aux, loss). ``errors``: the local and linear
    experts' errors on the dense pass [L, B, T] (the auxiliary target; None: no aux term);
    ``budget``: the budget the hard routes are taken under (None: argmax)."""
    settings = RoutingSettings(
        budget=None, window=cfg.window, n_sink=cfg.n_sink, backend="reference", linear_map=cfg.linear_map
    )
    train = TrainRouting(hard=hard, budget=budget if hard else None)
    with routed.session(settings, stack, mode="train", train=train) as sess:
        out = routed.model(input_ids=input_ids, use_cache=False)
    task = kl_per_token(
        dense_logits.reshape(-1, dense_logits.shape[-1]), out.logits.reshape(-1, out.logits.shape[-1])
    ).mean()
    betas = torch.stack([b for _, b in sorted(sess.beta_graph, key=lambda lb: lb[0])])  # [L,B,T,K]
    mean_w = betas / betas.sum(-1, keepdim=True)
    cost = (mean_w * torch.tensor(COSTS, device=betas.device)).sum(-1).mean()
    if stack.kind == "bayes":
        kl = kl_dirichlet(betas, stack.alpha0.to(betas.device)).mean()
        loss = task + cfg.beta_kl * kl
    else:
        kl = torch.zeros((), device=betas.device)
        loss = task + cfg.cost_weight * cost
    aux = torch.zeros((), device=betas.device)
    if errors is not None:
        aux = ranking_aux(mean_w, errors[0].to(betas.device), errors[1].to(betas.device), cfg.aux_scope)
        loss = loss + cfg.aux_weight * aux
    return {"loss": loss, "task": task, "kl": kl, "cost": cost, "aux": aux}


def ranking_aux(
    m: torch.Tensor, local_err: torch.Tensor, linear_err: torch.Tensor, scope: str = "global"
) -> torch.Tensor:
    """The auxiliary target: 2 - corr(d_full, ln(e_local + 1e-3)) - corr(d_local, e_linear - e_local).

    m [L, B, T, K]: routing weights (posterior means, or the prior-free probabilities);
    e [L, B, T]: the cheap experts' relative output errors on the dense pass. Under a budget
    a decision goes full before local when d_full = ln m_full - ln m_local is larger, and
    local before linear when d_local = ln m_local - ln m_linear is larger (budget.decide:
    argmax_k ln m_k - lambda c_k), so these scores should rank the decisions like the errors
    that going cheaper would cause, which is what the oracle router spends its budget on.
    Pearson correlations, scale-free, so they constrain the ranking and leave the posterior's
    scale to the task and the prior; ``scope`` "global" takes them over every decision
    given, "layer" within each layer (then averaged), "both" the mean of the two. In
    [0, 4]; 0 for perfect rankings."""
    logm = m.float().clamp_min(1e-30).log()
    d_full = logm[..., FULL] - logm[..., LOCAL]
    d_local = logm[..., LOCAL] - logm[..., LINEAR]
    t_full, t_local = torch.log(local_err + 1e-3), linear_err - local_err
    c_full, c_local = _corr(d_full, t_full), _corr(d_local, t_local)
    if scope != "global":
        n = m.shape[0]
        l_full = torch.stack([_corr(d_full[i], t_full[i]) for i in range(n)]).mean()
        l_local = torch.stack([_corr(d_local[i], t_local[i]) for i in range(n)]).mean()
        w = 1.0 if scope == "layer" else 0.5
        c_full, c_local = w * l_full + (1 - w) * c_full, w * l_local + (1 - w) * c_local
    return (1 - c_full) + (1 - c_local)


def _corr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of two tensors of the same shape, flattened (0 if either is constant)."""
    a = a.reshape(-1) - a.mean()
    b = b.reshape(-1).to(a.dtype) - b.mean().to(a.dtype)
    return (a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12)


def _budget_of_step(cfg: CalibrationConfig, step: int) -> float | None:
    """The budget of a hard step: one of ``train_budgets``, drawn by a generator seeded with
    the seed and the step (so a resumed run draws the same), or None (argmax) when there are none."""
    if not cfg.train_budgets:
        return None
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return cfg.train_budgets[int(torch.randint(len(cfg.train_budgets), (1,), generator=gen))]


def _dense_pass(routed: RoutedModel, ids: torch.Tensor, cfg: CalibrationConfig):
    """The dense teacher's logits and, when the auxiliary target is on, the cheap experts'
    errors on that pass (training/oracle.py): (logits, (local, linear) errors or None)."""
    if cfg.aux_weight <= 0:
        return routed.dense_logits(ids), None
    maps = routed.linear_maps_for(RoutingSettings(linear_map=cfg.linear_map))
    logits, local_err, linear_err = oracle.dense_pass_errors(routed.model, ids, cfg.window, cfg.n_sink, maps)
    return logits, (local_err, linear_err)


def evaluate_terms(routed, stack, val_ids, dense_val, cfg, errors=None) -> dict:
    """Final ELBO terms on fixed validation windows, sampling with a fixed seed (hard argmax
    routes); ``errors`` [L, n, T] pairs give the auxiliary term too."""
    state = torch.random.get_rng_state()
    torch.manual_seed(cfg.seed + 12345)
    totals = {"loss": 0.0, "task": 0.0, "kl": 0.0, "cost": 0.0, "aux": 0.0}
    with torch.no_grad():
        for i in range(val_ids.shape[0]):
            err = None if errors is None else (errors[0][:, i : i + 1], errors[1][:, i : i + 1])
            terms = elbo_terms(routed, stack, val_ids[i : i + 1], dense_val[i : i + 1], cfg, True, err)
            for k in totals:
                totals[k] += terms[k].item() / val_ids.shape[0]
    torch.random.set_rng_state(state)
    return totals


def calibrate(
    routed: RoutedModel,
    data_path,
    cfg: CalibrationConfig,
    out_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    model_slug: str | None = None,
    on_step: Callable[[dict], None] | None = None,
) -> dict:
    """Train one controller stack; saves it (safetensors + meta.json) and returns the meta.

    ``on_step`` is called after every step (and its checkpoint, if one is due) with that
    step's history row; an exception it raises stops the run there, like an interrupt, and
    leaves the last checkpoint for ``resume``. It only observes: the results are the same
    with or without it. A checkpoint in ``out_dir`` that is not marked finished is refused
    without ``resume`` (training/checkpoints.py).
    """
    split = data_mod.load_split(data_path)  # every data problem surfaces here, before training
    # "auto" is recorded (and trained with) as the map it means for this model
    cfg = dataclasses.replace(cfg, linear_map=linear_maps.resolve(cfg.linear_map, routed.feature_maps))
    slug = model_slug or _slug(routed.name)
    out_dir = Path(out_dir) if out_dir else default_folder(slug, cfg.controller)
    resume_from = checkpoints.start(out_dir, resume)  # before any work: an unfinished run is refused
    tok = routed.tokenizer
    train_ids = data_mod.windows(tok, split.train, cfg.seq_len, "training")
    val_ids = data_mod.windows(tok, split.validation, cfg.seq_len, "validation")[: cfg.val_windows]
    out_dir.mkdir(parents=True, exist_ok=True)
    device = next(routed.model.parameters()).device

    torch.manual_seed(cfg.seed)
    ccfg = config_for_model(routed.model.config, cfg.controller, cfg.features)
    ccfg.hidden, ccfg.prior_strength, ccfg.prior_gamma = cfg.hidden, cfg.prior_strength, cfg.prior_gamma
    ccfg.prior_costs = cfg.prior_costs
    stack = ControllerStack(ccfg, seed=cfg.seed).to(device)
    opt = torch.optim.AdamW(stack.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 8) * 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps))
    )
    order = torch.randperm(train_ids.shape[0], generator=torch.Generator().manual_seed(cfg.seed))
    start, history = 0, []
    ckpt_path = out_dir / CHECKPOINT
    # what a checkpoint must have been made from, besides the settings: this data file and
    # this copy of the model's weights (also recorded in meta.json)
    fingerprint = weights_fingerprint(routed.model)
    if resume_from is not None:
        ckpt = checkpoints.read(resume_from, RESUMED, map_location=device, resume=True)
        _check_resumable(ckpt_path, ckpt, ckpt["config"], asdict(cfg), split, fingerprint)
        stack.load_state_dict(ckpt["stack"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        torch.random.set_rng_state(ckpt["rng"].cpu())  # the CPU generator's state
        start, history = ckpt["step"], ckpt["history"]
        log.info("resuming from step %d (%s)", start, ckpt_path)

    for p in routed.model.parameters():
        p.requires_grad_(False)
    stack.train()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc=f"calibrate {cfg.controller}", dynamic_ncols=True)
    t0 = time.perf_counter()
    try:
        for step in range(start, cfg.steps):
            idx = [int(order[(step * cfg.batch_size + j) % len(order)]) for j in range(cfg.batch_size)]
            batch = train_ids[idx].to(device)
            with torch.no_grad():
                dense, errors = _dense_pass(routed, batch, cfg)
            hard = step >= int(cfg.soft_fraction * cfg.steps)
            budget = _budget_of_step(cfg, step)
            terms = elbo_terms(routed, stack, batch, dense, cfg, hard, errors, budget)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(stack.parameters(), 1.0)
            opt.step()
            sched.step()
            row = {k: round(v.item(), 5) for k, v in terms.items()} | {"step": step + 1, "hard": hard}
            if budget is not None and hard:
                row["budget"] = budget
            history.append(row)
            if bar is not None:
                bar.set_postfix(
                    loss=row["loss"],
                    task=row["task"],
                    kl=row["kl"],
                    cost=row["cost"],
                    mode="hard" if hard else "soft",
                )
                bar.update(1)
            if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == cfg.steps:
                checkpoints.write(
                    ckpt_path,
                    {
                        "config": asdict(cfg),
                        "data_sha256": split.sha256,
                        "weights_fingerprint": fingerprint,
                        "stack": stack.state_dict(),
                        "opt": opt.state_dict(),
                        "sched": sched.state_dict(),
                        "rng": torch.random.get_rng_state(),
                        "step": step + 1,
                        "history": history,
                    },
                )
            if on_step is not None:
                on_step(dict(row))  # a copy: the callback cannot alter the history
    finally:  # an interrupted run closes its progress bar too
        if bar is not None:
            bar.close()
    stack.eval()
    with torch.no_grad():
        dense_val, val_errors = _dense_pass(routed, val_ids.to(device), cfg)
    final = evaluate_terms(routed, stack, val_ids.to(device), dense_val, cfg, val_errors)
    meta = {
        "controller": cfg.controller,
        "model": routed.name,
        # what that model is (its kind and shape), told apart from another model's on load
        "architecture": architecture(routed.model.config),
        # which copy of the model's weights these controllers belong to (routing/fingerprint.py)
        "weights_fingerprint": fingerprint,
        "weights_fingerprint_kind": FINGERPRINT_KIND,
        "hyperparameters": asdict(cfg),
        "feature_maps": _feature_maps_identity(routed, cfg.linear_map),
        "data": split.describe(),
        "train_windows": int(train_ids.shape[0]),
        "validation_windows": int(val_ids.shape[0]),
        "final_validation_terms": {k: round(v, 6) for k, v in final.items()},
        "last_train_terms": history[-1] if history else None,
        "loss_curve_every_10": history[::10],
        "train_seconds_this_run": round(time.perf_counter() - t0, 1),
        "project_commit": git_commit(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
    }
    stack.cpu().save(out_dir, meta)
    checkpoints.mark_finished(ckpt_path)  # its work is saved: a new run in out_dir may replace it
    stack.trained = True
    return stack.meta


def _feature_maps_identity(routed: RoutedModel, linear_map: str) -> dict:
    """Which linear-expert feature map the controllers were trained with: elu + 1, or the
    learned maps' folder and the SHA-256 of their weights file."""
    if linear_map == "elu":
        return {"linear_map": "elu"}
    import hashlib

    from metaattn_viz.routing.linear_maps import WEIGHTS_FILE

    source = Path(routed.feature_maps_source)
    weights = source / WEIGHTS_FILE
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    return {"linear_map": linear_map, "source": str(source), "sha256": digest}


def _slug(name: str) -> str:
    from metaattn_viz.routing.loading import slugify

    return slugify(name)
