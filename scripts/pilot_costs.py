"""How well a global-scope pilot stands in for a long text: for each pilot rule, the lambda it
solves and the mean cost one routed pass over the whole text then realises (the budget is
met when that is within routing/prefill.py's GLOBAL_COST_TOLERANCE of it), with the cost
over the first 512 positions and over the rest. The measurement behind `pilot_span`
(docs/benchmarks.md, "The global scope's pilot").

    OMP_NUM_THREADS=1 .venv/bin/python scripts/pilot_costs.py --linear-map learned
    OMP_NUM_THREADS=1 .venv/bin/python scripts/pilot_costs.py --windows 4 --budgets 0.3,0.5

Each rule's pilot is a layer-scope pass over its own prefix, as `prefill` runs it. Texts: the
benchmark text (bench/model.py's), and with ``--windows N`` also the first N windows of the
calibration and of the validation split of corpus/wikitext2 (training/data.py). Prints one
JSON line per text, budget and rule, then one summary line per rule. The bundled model on a
CPU: about 25 s per rule, text and budget on one thread.
"""

from __future__ import annotations

import argparse
import json

import torch

from metaattn_viz.bench.model import _text_ids
from metaattn_viz.core.settings import RoutingSettings
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
}


def records(routed: RoutedModel, settings: RoutingSettings, ids: torch.Tensor, lam=None) -> dict:
    with torch.no_grad(), routed.session(settings, "bayes", lam=lam) as sess:
        routed.model(input_ids=ids, use_cache=False, logits_to_keep=1)
    out = sess.pop_records()
    assert out is not None
    return out


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
    p.add_argument("--rules", default="", help="comma-separated rule names (default: all)")
    p.add_argument("--linear-map", default="learned", choices=("elu", "learned"))
    a = p.parse_args()
    routed = RoutedModel.load()
    rules = dict(RULES)
    rules["pilot_span (shipped)"] = prefill_mod.pilot_span(a.tokens)
    if a.rules:
        rules = {name: rules[name] for name in a.rules.split(",")}
    summary: dict[str, list[float]] = {name: [] for name in rules}
    for budget in (float(b) for b in a.budgets.split(",")):
        s = RoutingSettings(budget=budget, linear_map=a.linear_map)
        for text, ids in texts(routed, a.tokens, a.windows).items():
            for name, (n, first) in rules.items():
                pilot = records(routed, s.with_(scope="layer"), ids[:, :n])["beta"]  # a causal prefix
                lam = prefill_mod.solve_global(
                    pilot[..., first:n, :], s, head_dim=routed.head_dim, n_routed=a.tokens, first=first
                )
                cost = records(routed, s, ids, [lam] * routed.n_layers)["cost"]
                gap = float(cost.mean()) - budget
                summary[name].append(gap)
                row = {
                    "text": text,
                    "budget": budget,
                    "rule": name,
                    "pilot_tokens": n,
                    "solved_from": first,
                    "lambda": round(lam, 4),
                    "cost": round(float(cost.mean()), 4),
                    "cost_first_512": round(float(cost[..., :512].mean()), 4),
                    "cost_rest": round(float(cost[..., 512:].mean()), 4),
                    "within_tolerance": abs(gap) <= prefill_mod.GLOBAL_COST_TOLERANCE,
                }
                print(json.dumps(row), flush=True)
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
