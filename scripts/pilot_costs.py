"""How well a global-scope pilot stands in for a long text: for each pilot rule, the lambda it
solves and the mean cost one routed pass over the whole text then realises (the budget is
met when that is within routing/prefill.py's GLOBAL_COST_TOLERANCE of it), with the cost
over the first 512 positions and over the rest. The measurement behind `pilot_span`
(docs/benchmarks.md, "The global scope's pilot").

    OMP_NUM_THREADS=1 .venv/bin/python scripts/pilot_costs.py --linear-map learned
    OMP_NUM_THREADS=1 .venv/bin/python scripts/pilot_costs.py --windows 4 --budgets 0.3,0.5
    .venv/bin/python scripts/pilot_costs.py --windows 4 --budgets 0.3,0.5 \
        --rules "prefix 512, from 256, drift;prefix 256, from 128, drift;pilot_span (shipped)"
    .venv/bin/python scripts/pilot_costs.py --windows 4 --budgets 0.3,0.5 --tokens 2048 \
        --rules "pilot_span (shipped)" --leave-one-out resolved
    .venv/bin/python scripts/pilot_costs.py --windows 4 --budgets 0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9 --table

Each rule's pilot is a layer-scope pass over its own prefix, as `prefill` runs it. Texts: the
benchmark text (bench/model.py's), and with ``--windows N`` also the first N windows of the
calibration and of the validation split of corpus/wikitext2 (training/data.py). Prints one
JSON line per text, budget and rule, then one summary line per rule. The bundled model on a
CPU: about 25 s per rule, text and budget on one thread.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from metaattn_viz.bench.model import _text_ids
from metaattn_viz.core.experts import MIN_COST, K
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing import budget as budget_mod
from metaattn_viz.routing import prefill as prefill_mod
from metaattn_viz.routing.model import RoutedModel

# (pilot tokens, first position solved on), for a 4096-token text: the rules compared so far
RULES = {
    "prefix 512, all": (512, 0),
    "prefix 512, from 256": (512, 256),
    "prefix 640, from 320": (640, 320),
    "prefix 768, from 384": (768, 384),
    "prefix 768, from 512": (768, 512),
    "prefix 1024, all": (1024, 0),
    "prefix 1024, from 512": (1024, 512),
    # (..., True): lambda solved again for the budget less the pilot's drift (drift_shift);
    # measured 2026-12-06 and not shipped (docs/benchmarks.md)
    "prefix 256, from 128, drift": (256, 128, True),
    "prefix 512, from 256, drift": (512, 256, True),
    "prefix 768, from 384, drift": (768, 384, True),
}


def drift_shift(
    beta: np.ndarray, lam: float, s: RoutingSettings, pe: bool, first: int, n_routed: int
) -> float:
    """How much more than on the pilot's later half `lam` would spend per decision over the
    positions 0..n_routed-1 (notional costs), if the pilot's mean cost per position grew as
    a + b ln(p + 1): b from the means over the pilot's positions [0, first) and [first, n)
    at `lam` (beta [L, B, n, K] of the positions 0..n-1; pe: the prior-free controller's)."""
    b = torch.from_numpy(beta)
    n = b.shape[-2]
    flat = b.reshape(-1, K)
    unc = budget_mod.hedge_uncertainty(flat, s, pe)
    cost = budget_mod.decide(flat / flat.sum(-1, keepdim=True), unc, lam, s).cost
    by_pos = cost.reshape(-1, n).mean(0).double()  # [n]
    logp = torch.log1p(torch.arange(n_routed, dtype=torch.float64))
    l1, l2 = logp[:first].mean(), logp[first:n].mean()
    slope = (by_pos[first:].mean() - by_pos[:first].mean()) / (l2 - l1)
    return float(slope * (logp.mean() - l2))


def texts(routed: RoutedModel, n_tokens: int, n_windows: int) -> dict[str, torch.Tensor]:
    out = {"bench": _text_ids(routed, n_tokens)}
    if n_windows:
        from metaattn_viz.paths import REPO_ROOT
        from metaattn_viz.training import data

        split = data.load_split(REPO_ROOT / "corpus" / "wikitext2" / "wiki.dev.raw")
        for name, articles in (("calibration", split.train), ("validation", split.validation)):
            wins = data.windows(routed.tokenizer, articles, n_tokens, name)[:n_windows]
            for i in range(wins.shape[0]):
                ids = wins[i : i + 1].to(routed.device)
                if not torch.equal(ids, out["bench"]):  # (the benchmark text opens the corpus)
                    out[f"{name}{i}"] = ids
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--budgets", default="0.3", help="comma-separated budgets")
    p.add_argument("--windows", type=int, default=0, help="also N windows of each corpus split")
    p.add_argument("--rules", default="", help="rule names separated by ';' (default: all)")
    p.add_argument("--linear-map", default="learned", choices=("elu", "learned"))
    p.add_argument("--controller", default="bayes", choices=("bayes", "priorfree"))
    p.add_argument(
        "--leave-one-out",
        nargs="?",
        const="pilot",
        choices=("pilot", "resolved"),
        help="also route each text at the mean of the lambdas solved on the other texts: by the "
        "shipped rule's pilot (pilot, the default), or where the search settles (resolved: "
        "prefill.resolved_lambda, what a lambda table holds), i.e. what a lambda calibrated on "
        "other texts of this length would realise",
    )
    p.add_argument(
        "--table",
        action="store_true",
        help="also route each text at the lambda of the controller's shipped lambda table "
        "(routing/lambda_table.py), where it covers the text; with no --rules, no pilot rule runs",
    )
    a = p.parse_args()
    shipped = "pilot_span (shipped)"
    rules = dict(RULES)
    rules[shipped] = prefill_mod.pilot_span(a.tokens)
    if a.leave_one_out and not a.windows:
        p.error("--leave-one-out needs other texts: give --windows")
    if a.table and not a.rules:
        rules = {}
    elif a.rules:
        if a.leave_one_out and shipped not in [name.strip() for name in a.rules.split(";")]:
            p.error(f"--leave-one-out needs the rule {shipped!r}")
        unknown = [name for name in a.rules.split(";") if name.strip() not in rules]
        if unknown:
            p.error(f"unknown rules {unknown}; known: {'; '.join(rules)}")
        rules = {name.strip(): rules[name.strip()] for name in a.rules.split(";")}
    routed = RoutedModel.load()
    loo = f"others' mean {a.leave_one_out} lambda (leave one out)"
    tabled = "lambda table (shipped)"
    extra = [*([loo] if a.leave_one_out else []), *([tabled] if a.table else [])]
    summary: dict[str, list[float]] = {name: [] for name in [*rules, *extra]}
    table = routed.controller(a.controller).lambda_table
    if a.table and table is None:
        p.error(f"the {a.controller} controllers ship no lambda table (make lambda-table)")
    corpus = texts(routed, a.tokens, a.windows)
    pe = prefill_mod.is_point_estimate(routed, a.controller)

    def realised(s: RoutingSettings, ids: torch.Tensor, lam: float, row: dict) -> None:
        cost = prefill_mod.pass_records(routed, ids, s, a.controller, [lam] * routed.n_layers)["cost"]
        assert s.budget is not None
        gap = float(cost.mean()) - s.budget
        summary[row["rule"]].append(gap)
        row |= {
            "lambda": round(lam, 4),
            "cost": round(float(cost.mean()), 4),
            "cost_first_512": round(float(cost[..., :512].mean()), 4),
            "cost_rest": round(float(cost[..., 512:].mean()), 4),
            "within_tolerance": abs(gap) <= prefill_mod.GLOBAL_COST_TOLERANCE,
        }
        print(json.dumps(row), flush=True)

    for budget in (float(b) for b in a.budgets.split(",")):
        s = RoutingSettings(budget=budget, linear_map=a.linear_map)
        solved: dict[str, float] = {}  # the shipped rule's lambda per text
        for text, ids in corpus.items():
            for name, (n, first, *drift) in rules.items():
                layer_scope = s.with_(scope="layer")
                pilot = prefill_mod.pass_records(routed, ids[:, :n], layer_scope, a.controller)["beta"]
                lam = prefill_mod.solve_global(
                    pilot[..., first:n, :], s, pe, head_dim=routed.head_dim, n_routed=a.tokens, first=first
                )
                shift = 0.0
                if drift:
                    shift = drift_shift(pilot, lam, s, pe, first, a.tokens)
                    target = min(max(budget - shift, MIN_COST + 1e-3), 1.0 - 1e-3)  # inside the range
                    lam = prefill_mod.solve_global(pilot[..., first:n, :], s.with_(budget=target), pe)
                if name == shipped:
                    solved[text] = lam
                    if a.leave_one_out == "resolved":
                        solved[text] = prefill_mod.resolved_lambda(routed, ids, s, a.controller)
                row = {"text": text, "budget": budget, "rule": name, "pilot_tokens": n, "solved_from": first}
                realised(s, ids, lam, row | {"drift_shift": round(shift, 4)})
        if a.leave_one_out:
            for text, ids in corpus.items():
                others = [lam for other, lam in solved.items() if other != text]
                row = {"text": text, "budget": budget, "rule": loo, "pilot_tokens": 0, "solved_from": 0}
                row["others"] = a.leave_one_out
                realised(s, ids, sum(others) / len(others), row)
        if a.table:
            assert table is not None
            for text, ids in corpus.items():
                lam_table = table.lookup(routed.resolve_linear_map(s), ids.shape[1])
                if lam_table is not None:
                    row = {"text": text, "budget": budget, "rule": tabled}
                    realised(s, ids, lam_table, row | {"pilot_tokens": 0, "solved_from": 0})
    for name, gaps in summary.items():
        within = sum(abs(g) <= prefill_mod.GLOBAL_COST_TOLERANCE for g in gaps)
        worst = max(gaps, key=abs)
        print(
            json.dumps(
                {"rule": name, "within_tolerance": f"{within}/{len(gaps)}", "worst_gap": round(worst, 4)}
            )
        )


if __name__ == "__main__":
    main()
