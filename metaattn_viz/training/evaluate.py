"""Evaluation: the routing policies side by side on real held-out text.

For each policy and budget: perplexity (routed and dense), KL to the dense model, realised
notional cost, real attention-FLOPs ratio, routing entropy (entropy of the posterior mean,
% of log K), and for the Bayesian controller how informative its uncertainty is: the
Spearman correlation between a decision's uncertainty and the relative error of the output
it used, ||o_used - o_full|| / ||o_full||, and the AUROC of uncertainty for the decisions
in the worst 10 % of that error.

Every row also reports its routing variety: the share of decisions that differ from their
layer's majority expert (0 for any static per-layer map; how token-dependent routing is).

Policies: the Bayesian and prior-free controllers (budgets and the unbudgeted argmax), and
the baselines of training/baselines.py: all-local, all-linear, random routing at the same
budget, salience top-k (a Mixture-of-Depths-like baseline), the static per-layer map (within
the budget, and one step up: the fewest full layers that reach it) and its greedy
DuoAttention-style twin calibrated on the calibration split
(training/layer_maps.py), and the oracle per-token router at equal cost, the ceiling
(training/oracle.py; it reads the validation text's own errors). Baselines run below
budget 1 only (at 1 they are the dense model). With the baselines, the Bayesian controller
also runs hedged (``bayes-hedge-total``, ``bayes-hedge-epistemic``) at each budget strictly
between the cheapest cost and 1: uncertain cheap decisions escalated to full attention,
within the same budget (training/hedging.py).
Never imports gradio or the store; computes no FLOPs or uncertainty of its own
(metaattn_kernels.flops and core.dirichlet do).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from metaattn_kernels.flops import attention_flops_ratio
from metaattn_viz.core.dirichlet import uncertainties
from metaattn_viz.core.experts import COSTS, EXPERTS, FULL, LINEAR, LOCAL, MIN_COST
from metaattn_viz.core.settings import DEFAULTS, HEDGE_MEASURES, RoutingSettings
from metaattn_viz.core.variety import routing_variety
from metaattn_viz.routing import linear_maps
from metaattn_viz.routing.controller import KINDS
from metaattn_viz.routing.model import RoutedModel, kl_per_token
from metaattn_viz.training import data as data_mod
from metaattn_viz.training import hedging, layer_maps, oracle
from metaattn_viz.training.baselines import (  # re-exported: app/analysis.py and tests import them here
    budget_shares,
    layer_map_policy,
    random_policy,
    routes_policy,
    salience_policy,
    static_policy,
    units_within,
)

__all__ = [
    "DEFAULT_BUDGETS",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_SEQ_LEN",
    "MIN_SEQ_LEN",
    "auroc",
    "budget_shares",
    "evaluate",
    "flops_ratio",
    "perplexity",
    "random_policy",
    "routing_variety",
    "run_policy",
    "salience_policy",
    "static_policy",
]

DEFAULT_BUDGETS = (0.25, 0.5, 0.75, 1.0)
DEFAULT_MAX_TOKENS = 4096  # validation tokens scored
DEFAULT_SEQ_LEN = 256  # window length
MIN_SEQ_LEN = 2  # a window scores seq_len - 1 next-token predictions
HEDGE_CALIB_WINDOWS = 4  # calibration windows a hedged row's threshold is set on


def perplexity(nll: float, n: int) -> float:
    """exp of the mean negative log-likelihood of `n` tokens; infinite where that is beyond
    float range (a model far off the text), not an OverflowError after the rows have run
    (the report shows it as "–", and `eval --json` as null)."""
    try:
        return math.exp(nll / n)
    except OverflowError:
        return math.inf


def auroc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of `scores` for the labels (booleans, or 0/1, which would
    otherwise index and invert as integers) (Mann-Whitney U); None where it is undefined
    (one class empty, e.g. every error 0 in windows no longer than the local window)."""
    positive = np.asarray(positive, dtype=bool)
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def spearman(a: np.ndarray, b: np.ndarray) -> float | None:
    """Spearman's rank correlation; None where it is undefined (a constant side)."""
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:  # SciPy would warn and give NaN
        return None
    return float(stats.spearmanr(a, b).statistic)


def flops_ratio(weights: np.ndarray, seq_len: int, head_dim: int, window: int, n_sink: int) -> float:
    """Real attention FLOPs of the decisions [L, B, T, K] of windows starting at position 0,
    relative to all-full (metaattn_kernels.flops)."""
    return attention_flops_ratio(np.arange(seq_len), weights, window, n_sink, head_dim)


def run_policy(
    routed: RoutedModel,
    windows: torch.Tensor,
    dense_logits: list,
    settings,
    controller: str | None,
    policy=None,
    diagnose: bool = False,
) -> dict:
    """One row's measurements over the windows [n, T]. ``policy``: None (the controller
    routes under the settings), a baseline router, or a list of them, one per window."""
    nll, kl, n = 0.0, 0.0, 0
    kl_windows: list[float] = []  # mean KL per window: what paired comparisons of rows read
    weights, costs, routes, hedged, ent, unc_total, unc_epi, rel_err = [], [], [], [], [], [], [], []
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1]
        # a baseline's policy overrides the routes; the controller only has to run
        res = routed.prefill(
            ids,
            settings,
            controller or KINDS[0],
            use_cache=False,
            policy=policy[i] if isinstance(policy, list) else policy,
            diagnose=diagnose,
        )
        logits = res.logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        kl_tokens = kl_per_token(dense_logits[i][0, :-1], logits)
        kl += float(kl_tokens.sum())
        kl_windows.append(float(kl_tokens.mean()))
        n += ids.shape[1] - 1
        rec = res.records
        weights.append(rec["weights"])
        costs.append(rec["cost"])
        routes.append(rec["routes"])
        hedged.append(rec["hedged"])
        # the torch path in float64: the numbers in docs/results.md were computed with it
        u = uncertainties(torch.from_numpy(rec["beta"]).double())
        h = u["total"].numpy()
        ent.append(h)
        if diagnose:
            unc_total.append(h.ravel())
            unc_epi.append(u["epistemic"].numpy().ravel())
            rel_err.append((rec["rel_error"], rec["routes"]))
    w = np.concatenate(weights, 1)
    row: dict[str, Any] = {
        "ppl": perplexity(nll, n),
        "kl_to_dense": kl / n,
        "kl_windows": kl_windows,
        "realized_cost": float(np.concatenate(costs, 1).mean()),
        "attention_flops_ratio": flops_ratio(
            w, windows.shape[1], routed.head_dim, settings.window, settings.n_sink
        ),
        "routing_entropy": float(np.concatenate(ent, 1).mean()) * 100 if controller else None,
        "routing_variety": routing_variety(np.concatenate(routes, 1)),
        "hedged_share": float(np.concatenate(hedged, 1).mean()),
        "expert_shares": {e: float(w[..., k].mean()) for k, e in enumerate(EXPERTS)},
        "tokens": int(n),
    }
    if diagnose:
        err = np.concatenate([np.asarray(e).ravel() for e, _ in rel_err])
        routes_all = np.concatenate([r.ravel() for _, r in rel_err])
        total = np.concatenate(unc_total)
        epi = np.concatenate(unc_epi)
        worst = err >= np.quantile(err, 0.9)
        cheap = routes_all != FULL
        diagnosis: dict[str, float | int | None] = {
            "spearman_total": spearman(total, err),
            "auroc_total_worst10": auroc(total, worst),
            "spearman_epistemic": spearman(epi, err),
            "auroc_epistemic_worst10": auroc(epi, worst),
            "spearman_total_cheap_only": spearman(total[cheap], err[cheap]) if cheap.sum() > 2 else None,
            "decisions": int(err.size),
        }
        row["uncertainty"] = diagnosis
    return row


def _needs_calibration(budgets, baselines: bool, n_layers: int) -> bool:
    """Whether some row reads the calibration split: the layer maps (and the hedged rows,
    whose budgets lie within theirs) at a budget below 1 that a baseline can meet."""
    return baselines and any(b < 1.0 and units_within(b, n_layers) is not None for b in budgets)


def _new_baselines(routed, calib, val, budgets, settings, calib_windows: int) -> list:
    """Plan entries (name, budget, make) of the layer maps and the oracle at the budgets
    below 1 (`calib`: the calibration split's windows); ``make()`` -> (policy, extra row
    fields) runs their calibration or errors pass the first time a row needs it, and the
    results are reused across budgets."""
    cache: dict = {}
    n_layers = routed.n_layers

    def calibrator() -> layer_maps.LayerMapCalibrator:
        if "maps" not in cache:
            cache["maps"] = layer_maps.LayerMapCalibrator(routed, calib[:calib_windows], settings)
        return cache["maps"]

    def static(b, at_least=False):
        cal = calibrator()
        experts = layer_maps.static_map(cal.ranking(), b, at_least)
        assert experts is not None
        info = {
            **cal.describe(),
            "layer_kl_alone_local": cal.sensitivity(),
            "ranking": cal.ranking(),
            "passes": n_layers,
        }
        return layer_map_policy(experts), {"layer_experts": layer_maps.describe(experts), "calibration": info}

    # the greedy runs its rounds once, up to the largest evaluated budget's count of full layers
    n_full = max((layer_maps.full_layers(b, n_layers) or 0 for b in budgets if b < 1.0), default=0)

    def greedy(b):
        cal = calibrator()
        order, order_kl = cal.greedy_order(n_full)
        experts = layer_maps.greedy_map(order, b, n_layers)
        assert experts is not None
        info = {**cal.describe(), "order": order, "kl_after_each": order_kl, "passes": cal.greedy_passes}
        return layer_map_policy(experts), {"layer_experts": layer_maps.describe(experts), "calibration": info}

    def errors() -> list:
        """Each window's expert errors, the linear expert's with the feature maps the rows
        route with (below the local cost the oracle ranks local against that linear)."""
        if "errors" not in cache:
            maps = routed.linear_maps_for(settings)
            cache["errors"] = [
                oracle.expert_errors(routed.model, val[i : i + 1], settings.window, settings.n_sink, maps)
                for i in range(val.shape[0])
            ]
        return cache["errors"]

    def oracle_policy(b):
        policies = []
        for local_err, linear_err in errors():  # [L, 1, T] each
            routes = oracle.oracle_routes(local_err[:, 0], linear_err[:, 0], b)
            assert routes is not None
            policies.append(routes_policy(routes))
        return policies, {"oracle": True, "errors_from": oracle.ERRORS_FROM}

    plan = []
    for b in budgets:
        if b >= 1.0:
            continue
        if units_within(b, n_layers) is None:  # below the cheapest cost: no baseline meets it
            continue
        plan.append(("static-layers", b, lambda b=b: static(b)))
        plan.append(("static-layers-up", b, lambda b=b: static(b, at_least=True)))
        if layer_maps.full_layers(b, n_layers) is not None:  # full + local only
            plan.append(("greedy-layers", b, lambda b=b: greedy(b)))
        plan.append(("oracle-tokens", b, lambda b=b: oracle_policy(b)))
    return plan


def evaluate(
    routed: RoutedModel,
    data_path,
    budgets=DEFAULT_BUDGETS,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    window: int = DEFAULTS.window,
    n_sink: int = DEFAULTS.n_sink,
    seed: int = 0,
    controllers=KINDS,
    progress=None,
    scope: str = DEFAULTS.scope,
    baselines: bool = True,
    calib_windows: int = layer_maps.DEFAULT_CALIB_WINDOWS,
    linear_map: str = DEFAULTS.linear_map,
) -> list[dict]:
    """The rows of every policy at every budget (module docstring); ``calib_windows``:
    calibration windows the layer maps are measured on; ``linear_map``: the linear expert's
    feature map in every routed pass ("elu" or the shipped "learned" maps)."""
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < MIN_SEQ_LEN:
        # a window of one token predicts nothing: perplexity would divide by zero tokens
        raise ValueError(f"seq_len (--seq-len) must be a whole number >= {MIN_SEQ_LEN}, got {seq_len!r}")
    linear_map = linear_maps.resolve(linear_map, routed.feature_maps)  # rows name the map used
    # checked before any model work (a window out of range is refused here, not after the dense pass)
    base = RoutingSettings(window=window, n_sink=n_sink, scope=scope, linear_map=linear_map)
    split = data_mod.load_split(data_path)
    val = data_mod.windows(routed.tokenizer, split.validation, seq_len, "validation")
    val = val[: max(1, max_tokens // seq_len)]
    # the calibration split's windows (layer maps, hedge thresholds), also before the dense
    # pass: a split too short for one window is refused here, not after the controllers' rows
    calib = None
    if _needs_calibration(budgets, baselines, routed.n_layers):
        calib = data_mod.windows(routed.tokenizer, split.train, seq_len, "calibration")
    t0 = time.perf_counter()
    dense_logits, dense_nll, n = [], 0.0, 0
    for i in range(val.shape[0]):
        lg = routed.dense_logits(val[i : i + 1])
        dense_logits.append(lg)
        dense_nll += float(torch.nn.functional.cross_entropy(lg[0, :-1].float(), val[i, 1:], reduction="sum"))
        n += seq_len - 1
    dense_ppl = perplexity(dense_nll, n)
    common = {
        "linear_map": linear_map,
        "dense_ppl": dense_ppl,
        "split": "validation",
        # what the report says the rows were measured on (training/report.py)
        "data_file": Path(split.path).name,
        "validation_rule": split.validation_rule(),
        "seq_len": seq_len,
        "window": window,
        "n_sink": n_sink,
        "scope": scope,
    }

    def fixed(policy):
        return lambda: (policy, {})

    def hedged(b: float, measure: str):
        """A hedged Bayesian row: its threshold from the calibration split (training/hedging.py)."""
        assert calib is not None  # a hedged row's budget is one the layer maps run at
        windows = calib[:HEDGE_CALIB_WINDOWS]
        value = hedging.threshold(routed, windows, base.with_(budget=b, hedge_measure=measure), "bayes")
        info = {
            "policy": hedging.POLICY,
            "measure": measure,
            "threshold": value,
            "quantile": hedging.QUANTILE,
            "threshold_windows": int(windows.shape[0]),
        }
        return None, {"hedge": info}

    plan = []  # (row name, budget, controller or None, make() -> (policy, extra row fields))
    for c in controllers:
        for b in list(budgets) + [None]:
            plan.append((c, b, c, fixed(None)))
    if baselines and "bayes" in controllers:
        for b in budgets:
            if MIN_COST < b < 1.0:
                for m in HEDGE_MEASURES:
                    plan.append((f"bayes-hedge-{m}", b, "bayes", lambda b=b, m=m: hedged(b, m)))
    if baselines:
        plan.append(("all-local", COSTS[LOCAL], None, fixed(static_policy(LOCAL))))
        plan.append(("all-linear", COSTS[LINEAR], None, fixed(static_policy(LINEAR))))
    for b in budgets if baselines else ():
        if b < 1.0:
            plan.append(("random", b, None, fixed(random_policy(b, seed))))
            plan.append(("salience-topk", b, None, fixed(salience_policy(b))))
    if baselines:
        new = _new_baselines(routed, calib, val, budgets, base, calib_windows)
        plan += [(name, b, None, make) for name, b, make in new]
    rows = []
    for name, b, ctrl, make in plan:
        settings = base.with_(budget=b) if ctrl else base.with_(budget=None)
        diagnose = name == "bayes" and b is None
        policy, extra = make()
        if "hedge" in extra:
            h = extra["hedge"]
            settings = hedging.hedged_settings(settings, h["measure"], h["threshold"])
        row = {
            "controller": name,
            "budget": b,
            **run_policy(routed, val, dense_logits, settings, ctrl, policy, diagnose),
            **common,
            **extra,
        }
        if ctrl:
            stack = routed.controller(ctrl)
            row["controller_id"] = stack.controller_id
            row["controller_trained"] = stack.trained
        rows.append(row)
        if progress:
            progress(row)
    for r in rows:
        r["eval_seconds_total"] = round(time.perf_counter() - t0, 1)
    return rows
