"""What sharing the feature maps saves in a prefill: a 4096-token prefill at budget 0.3 (the
`bench` prefill row's text and settings) timed three ways, interleaved in one process: the
dense model (`plain_copy`), the routed model as shipped (the linear expert takes phi(q) and
phi(k) as the controllers' attention signals mapped them: routing/signals.py, `take_mapped`)
and the routed model whose linear expert maps q and k itself again (the behaviour before;
the same numbers bit for bit). The measurement behind docs/benchmarks.md, "Shared feature
maps".

    .venv/bin/python scripts/prefill_features.py --repeats 6
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from metaattn_viz.bench.model import _dense_logits, _text_ids, plain_copy
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing import session as session_mod
from metaattn_viz.routing.model import RoutedModel


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--repeats", type=int, default=6)
    a = p.parse_args()
    torch.set_grad_enabled(False)
    routed = RoutedModel.load()
    plain = plain_copy(routed)
    ids = _text_ids(routed, a.tokens)
    s = RoutingSettings(budget=a.budget)
    shared = session_mod.take_mapped

    def unshared(*args):
        shared(*args)  # empties the slot, hands nothing over
        return None

    sides = {
        "dense": lambda: _dense_logits(plain, ids),
        "shared": lambda: routed.prefill(ids, s, use_cache=False),
        "unshared": lambda: routed.prefill(ids, s, use_cache=False),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(a.repeats):
        for name, run in sides.items():
            session_mod.take_mapped = unshared if name == "unshared" else shared  # type: ignore[assignment]
            t0 = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - t0)
            print(json.dumps({"side": name, "s": round(times[name][-1], 3)}), flush=True)
    session_mod.take_mapped = shared  # type: ignore[assignment]
    med = {name: statistics.median(v) for name, v in times.items()}
    pairs = [u / sh for u, sh in zip(times["unshared"], times["shared"], strict=True)]
    print(
        json.dumps(
            {
                "median_s": {k: round(v, 3) for k, v in med.items()},
                "speedup_shared": round(med["dense"] / med["shared"], 3),
                "speedup_unshared": round(med["dense"] / med["unshared"], 3),
                "unshared_over_shared_per_repeat": [round(r, 3) for r in pairs],
                "threads": torch.get_num_threads(),
            }
        )
    )


if __name__ == "__main__":
    main()
