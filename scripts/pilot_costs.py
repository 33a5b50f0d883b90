"""How well a global-scope pilot stands in for a long text: for each pilot rule, the lambda it
solves and the mean cost one routed pass over the whole text then realises (the budget is
met when that is within routing/prefill.py's GLOBAL_COST_TOLERANCE of it), with the cost
over the first 512 positions and over the rest. The measurement behind `pilot_span`
(docs/benchmarks.md, "The global scope's pilot").

    OMP_NUM_THREADS=1 .venv/bin/python scripts/pilot_costs.py --linear-map learned

Runs the bundled model on the benchmark text (bench/model.py's), a few minutes on a CPU.
"""

from __future__ import annotations

import argparse
import json

import torch

from metaattn_viz.bench.model import _text_ids
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing import prefill as prefill_mod
from metaattn_viz.routing.model import RoutedModel

# (pilot tokens, first position solved on): the rule until 2026-12-06, then the candidates
RULES = {"prefix 512, all": (512, 0), "prefix 512, from 256": (512, 256), "prefix 1024, all": (1024, 0)}


def records(routed: RoutedModel, settings: RoutingSettings, ids: torch.Tensor, lam=None) -> dict:
    with torch.no_grad(), routed.session(settings, "bayes", lam=lam) as sess:
        routed.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    out = sess.pop_records()
    assert out is not None
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--linear-map", default="learned", choices=("elu", "learned"))
    a = p.parse_args()
    routed = RoutedModel.load()
    ids = _text_ids(routed, a.tokens)
    s = RoutingSettings(budget=a.budget, linear_map=a.linear_map)
    rules = dict(RULES)
    rules["pilot_span (shipped)"] = prefill_mod.pilot_span(a.tokens)
    longest = max(n for n, _ in rules.values())
    pilot = records(routed, s.with_(scope="layer"), ids[:, :longest])["beta"]  # a causal prefix
    for name, (n, first) in rules.items():
        lam = prefill_mod.solve_global(
            pilot[..., first:n, :], s, head_dim=routed.head_dim, n_routed=a.tokens, first=first
        )
        cost = records(routed, s, ids, [lam] * routed.n_layers)["cost"]
        row = {
            "rule": name,
            "pilot_tokens": n,
            "solved_from": first,
            "lambda": round(lam, 4),
            "cost": round(float(cost.mean()), 4),
            "cost_first_512": round(float(cost[..., :512].mean()), 4),
            "cost_rest": round(float(cost[..., 512:].mean()), 4),
            "within_tolerance": abs(float(cost.mean()) - a.budget) <= prefill_mod.GLOBAL_COST_TOLERANCE,
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
