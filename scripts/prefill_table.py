"""What the global scope's calibrated lambda saves a prefill: texts of several lengths
routed at budget B with the shipped lambda table (routing/lambda_table.py) and with the
table taken away (the pilot pass, as before tables), against the dense model, interleaved in
one process (dense, with table, without, dense, ...; median of the repeats). Prints one JSON
line per length: the times, the speed-ups over dense, and the passes and pilot tokens each
side took. docs/benchmarks.md, "Lambda by length".

    .venv/bin/python scripts/prefill_table.py --lengths 700,1500,3000 --budget 0.5 --repeats 3
    .venv/bin/python scripts/prefill_table.py --controller priorfree --lengths 300,700,1500,3000

Texts: the benchmark text (bench/model.py's, doubled where it is too short) cut to each
length, as the `bench` prefill row reads it.
"""

from __future__ import annotations

import argparse
import json

import torch

from metaattn_viz.bench.model import _dense_logits, _interleaved, _text_ids, plain_copy
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing.model import RoutedModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", default="700,1500,3000", help="comma-separated text lengths")
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--controller", default="bayes", choices=("bayes", "priorfree"))
    a = p.parse_args()
    routed = RoutedModel.load()
    plain = plain_copy(routed)
    stack = routed.controller(a.controller)
    table = stack.lambda_table
    if table is None:
        p.error(f"the {a.controller} controllers ship no lambda table (make lambda-table)")
    s = RoutingSettings(budget=a.budget)
    for n in (int(v) for v in a.lengths.split(",")):
        ids = _text_ids(routed, n)
        last: dict = {}

        def routed_side(name: str, with_table: bool, ids=ids, last=last) -> None:
            stack.lambda_table = table if with_table else None
            try:
                last[name] = routed.prefill(ids, s, a.controller, use_cache=False)
            finally:
                stack.lambda_table = table

        with torch.no_grad():
            t = _interleaved(
                {
                    "dense": lambda ids=ids: _dense_logits(plain, ids),
                    "table": lambda: routed_side("table", True),
                    "pilot": lambda: routed_side("pilot", False),
                },
                a.repeats,
            )
        row = {"controller": a.controller, "tokens": n, "budget": a.budget, "dense_ms": round(t["dense"], 1)}
        for side in ("table", "pilot"):
            res = last[side]
            row[side] = {
                "ms": round(t[side], 1),
                "speedup": round(t["dense"] / t[side], 3),
                "passes": res.passes,
                "pilot_tokens": res.pilot_tokens,
                "cost": round(float(res.records["cost"].mean()), 4),
            }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
