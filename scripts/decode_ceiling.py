"""How fast decoding at a short context could be if the controllers cost nothing: the `bench`
decode row (256 tokens of context, budget 0.3, 48 new tokens, dense and routed blocks
interleaved) with the shipped controllers, and with `ControllerStack.concentration_one`
replaced by a constant posterior (Dir(1, 1, 3), no features read), alternating. What remains
of the gap to dense is the rest of routing: the decision and its dual ascent, the records,
the hooks and session, the experts. docs/benchmarks.md, "CPU decode at 256".

    .venv/bin/python scripts/decode_ceiling.py --rounds 2
"""

from __future__ import annotations

import argparse
import json

import torch

from metaattn_viz.bench.model import decode_speed, plain_copy
from metaattn_viz.routing.controller import ControllerStack
from metaattn_viz.routing.model import RoutedModel

CONSTANT = [1.0, 1.0, 3.0]  # concentrations (full, linear, local): the local expert most likely


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    routed = RoutedModel.load()
    plain = plain_copy(routed)
    shipped = ControllerStack.concentration_one

    def free(self, layer, h, x, position, view=None):
        return list(CONSTANT)

    try:
        for _ in range(a.rounds):
            for name, fn in (("shipped controllers", shipped), ("controllers cost nothing", free)):
                ControllerStack.concentration_one = fn  # type: ignore[method-assign]
                with torch.no_grad():
                    row = decode_speed(routed, plain, a.context, a.budget, new_tokens=48)
                print(
                    json.dumps(
                        {
                            "side": name,
                            "dense_ms": round(row["dense_ms"], 1),
                            "routed_ms": round(row["routed_ms"], 1),
                            "speedup": round(row["speedup"], 3),
                        }
                    ),
                    flush=True,
                )
    finally:
        ControllerStack.concentration_one = shipped  # type: ignore[method-assign]


if __name__ == "__main__":
    main()
