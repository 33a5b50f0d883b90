"""Evaluation: the routing policies side by side on real held-out text.

For each policy and budget: perplexity (routed and dense), KL to the dense model, realised
notional cost, real attention-FLOPs ratio, routing entropy (entropy of the posterior mean,
% of log K), and for the Bayesian controller how informative its uncertainty is: the
Spearman correlation between a decision's uncertainty and the relative error of the output
it used, ||o_used - o_full|| / ||o_full||, and the AUROC of uncertainty for the decisions
in the worst 10 % of that error.

Policies: the Bayesian and prior-free controllers (budgets and the unbudgeted argmax),
all-local, all-linear, random routing at the same budget, and salience top-k (the tokens
with the largest residual norm get full attention, the rest local; a Mixture-of-Depths-
like baseline). Baselines share the budget's cost through `budget_shares`.
Never imports gradio or the store; computes no FLOPs or uncertainty of its own
(metaattn_kernels.flops and core.dirichlet do).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from scipy import stats

from metaattn_kernels.flops import attention_flops_ratio
from metaattn_viz.core.dirichlet import uncertainties
from metaattn_viz.core.experts import COSTS, EXPERTS, FULL, LINEAR, LOCAL, K
from metaattn_viz.core.settings import DEFAULTS, RoutingSettings
from metaattn_viz.routing.budget import Decisions
from metaattn_viz.routing.controller import KINDS
from metaattn_viz.routing.model import RoutedModel, kl_per_token
from metaattn_viz.training import data as data_mod

DEFAULT_BUDGETS = (0.25, 0.5, 0.75, 1.0)
DEFAULT_MAX_TOKENS = 4096  # validation tokens scored
DEFAULT_SEQ_LEN = 256  # window length


def budget_shares(budget: float) -> tuple[int, int, float]:
    """A two-expert mix meeting the budget: (expensive, cheap, share of expensive).
    Full + local above the local cost, local + linear below it."""
    if budget >= COSTS[LOCAL]:
        return FULL, LOCAL, (budget - COSTS[LOCAL]) / (COSTS[FULL] - COSTS[LOCAL])
    return LOCAL, LINEAR, (budget - COSTS[LINEAR]) / (COSTS[LOCAL] - COSTS[LINEAR])


def _decisions(routes: torch.Tensor) -> Decisions:
    w = torch.nn.functional.one_hot(routes, K).float()
    return Decisions(routes, w, torch.zeros_like(routes, dtype=torch.bool), torch.tensor(COSTS)[routes])


def static_policy(expert: int):
    def policy(layer, x, m, unc):
        return _decisions(torch.full((m.shape[0],), expert, dtype=torch.long))

    return policy


def random_policy(budget: float, seed: int):
    hi, lo, share = budget_shares(budget)
    gen = torch.Generator().manual_seed(seed)

    def policy(layer, x, m, unc):
        n = m.shape[0]
        k = int(round(share * n))
        pick = torch.randperm(n, generator=gen)[:k]
        routes = torch.full((n,), lo, dtype=torch.long)
        routes[pick] = hi
        return _decisions(routes)

    return policy


def salience_policy(budget: float):
    hi, lo, share = budget_shares(budget)

    def policy(layer, x, m, unc):
        sal = x.float().norm(dim=-1).reshape(-1)  # [N]
        n = sal.shape[0]
        k = int(round(share * n))
        routes = torch.full((n,), lo, dtype=torch.long)
        routes[sal.topk(k).indices] = hi
        return _decisions(routes)

    return policy


def auroc(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of `scores` for the boolean labels (Mann-Whitney U)."""
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


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
    nll, kl, n = 0.0, 0.0, 0
    weights, costs, ent, unc_total, unc_epi, rel_err = [], [], [], [], [], []
    for i in range(windows.shape[0]):
        ids = windows[i : i + 1]
        # a baseline's policy overrides the routes; the controller only has to run
        res = routed.prefill(
            ids, settings, controller or KINDS[0], use_cache=False, policy=policy, diagnose=diagnose
        )
        logits = res.logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        kl += float(kl_per_token(dense_logits[i][0, :-1], logits).sum())
        n += ids.shape[1] - 1
        rec = res.records
        weights.append(rec["weights"])
        costs.append(rec["cost"])
        # the torch path in float64: the numbers in docs/results.md were computed with it
        u = uncertainties(torch.from_numpy(rec["beta"]).double())
        h = u["total"].numpy()
        ent.append(h)
        if diagnose:
            unc_total.append(h.ravel())
            unc_epi.append(u["epistemic"].numpy().ravel())
            rel_err.append((rec["rel_error"], rec["routes"]))
    w = np.concatenate(weights, 1)
    row = {
        "ppl": math.exp(nll / n),
        "kl_to_dense": kl / n,
        "realized_cost": float(np.concatenate(costs, 1).mean()),
        "attention_flops_ratio": flops_ratio(
            w, windows.shape[1], routed.head_dim, settings.window, settings.n_sink
        ),
        "routing_entropy": float(np.concatenate(ent, 1).mean()) * 100 if controller else None,
        "expert_shares": {e: float(w[..., k].mean()) for k, e in enumerate(EXPERTS)},
        "tokens": int(n),
    }
    if diagnose:
        err = np.concatenate([np.asarray(e).ravel() for e, _ in rel_err])
        routes = np.concatenate([r.ravel() for _, r in rel_err])
        u = np.concatenate(unc_total)
        epi = np.concatenate(unc_epi)
        worst = err >= np.quantile(err, 0.9)
        cheap = routes != FULL
        row["uncertainty"] = {
            "spearman_total": float(stats.spearmanr(u, err).statistic),
            "auroc_total_worst10": auroc(u, worst),
            "spearman_epistemic": float(stats.spearmanr(epi, err).statistic),
            "auroc_epistemic_worst10": auroc(epi, worst),
            "spearman_total_cheap_only": float(stats.spearmanr(u[cheap], err[cheap]).statistic)
            if cheap.sum() > 2
            else None,
            "decisions": int(err.size),
        }
    return row


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
) -> list[dict]:
    split = data_mod.load_split(data_path)
    val = data_mod.windows(routed.tokenizer, split.validation, seq_len, "validation")
    val = val[: max(1, max_tokens // seq_len)]
    t0 = time.perf_counter()
    dense_logits, dense_nll, n = [], 0.0, 0
    for i in range(val.shape[0]):
        lg = routed.dense_logits(val[i : i + 1])
        dense_logits.append(lg)
        dense_nll += float(torch.nn.functional.cross_entropy(lg[0, :-1].float(), val[i, 1:], reduction="sum"))
        n += seq_len - 1
    dense_ppl = math.exp(dense_nll / n)
    base = RoutingSettings(window=window, n_sink=n_sink, scope=scope)
    common = {
        "dense_ppl": dense_ppl,
        "split": "validation",
        "seq_len": seq_len,
        "window": window,
        "n_sink": n_sink,
        "scope": scope,
    }
    plan = []
    for c in controllers:
        for b in list(budgets) + [None]:
            plan.append((c, b, c, None))
    if baselines:
        plan.append(("all-local", COSTS[LOCAL], None, static_policy(LOCAL)))
        plan.append(("all-linear", COSTS[LINEAR], None, static_policy(LINEAR)))
    for b in budgets if baselines else ():
        if b < 1.0:
            plan.append(("random", b, None, random_policy(b, seed)))
            plan.append(("salience-topk", b, None, salience_policy(b)))
    rows = []
    for name, b, ctrl, policy in plan:
        settings = base.with_(budget=b) if ctrl else base.with_(budget=None)
        diagnose = name == "bayes" and b is None
        row = {
            "controller": name,
            "budget": b,
            **run_policy(routed, val, dense_logits, settings, ctrl, policy, diagnose),
            **common,
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
