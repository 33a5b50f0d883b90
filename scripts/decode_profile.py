"""Where a decode step's time goes at a short context: greedy decoding of 48 tokens up to a
256-token context at budget 0.3 (the `bench` decode row's text and settings), dense and
routed, each side's attention modules timed in place (projections, RoPE, cache and
attention function: what routing changes), and on the routed side the parts of its
attention function (the CPU float32 host path, routing/session.py's ``_attend_host``): the
controllers' attention signals, the rest of the controller, the decision and the experts.
Timers wrap the functions, so they add a little to what they time (not measured).
docs/benchmarks.md, "CPU decode at 256".

    .venv/bin/python scripts/decode_profile.py --rounds 3
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from metaattn_viz.bench.model import _dense_decoder, _text_ids, plain_copy
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing import controller as controller_mod
from metaattn_viz.routing import policies, session
from metaattn_viz.routing.model import RoutedModel

spent: collections.Counter[str] = collections.Counter()


def timed_fn(inner, label: str):
    """`inner`, with its time added up under `label`."""

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] += time.perf_counter() - t0

    return wrapper


def timed(owner, name: str, label: str) -> None:
    """Wrap ``owner.name`` so that its time adds up under `label`."""
    setattr(owner, name, timed_fn(getattr(owner, name), label))


def per_token(gen, n: int) -> dict[str, float]:
    """Run `n` steps of `gen`; ms per token, in all and by label."""
    spent.clear()
    t0 = time.perf_counter()
    for _ in range(n):
        next(gen)
    total = time.perf_counter() - t0
    return {"token": 1000 * total / n, **{k: 1000 * v / n for k, v in sorted(spent.items())}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--context", type=int, default=256)
    p.add_argument("--budget", type=float, default=0.3)
    p.add_argument("--tokens", type=int, default=48, help="new tokens per side and round")
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    routed = RoutedModel.load()
    plain = plain_copy(routed)
    attention_class = type(routed.model.model.layers[0].self_attn)  # both models' modules
    timed(attention_class, "forward", "attention modules")
    # the dense side's attention function, transformers' SDPA (looked up per call)
    AttentionInterface.register("sdpa", timed_fn(ALL_ATTENTION_FUNCTIONS["sdpa"], "dense attention function"))
    timed(session.Session, "_attend_host", "routed attention function")
    timed(controller_mod, "signals_one", "controller: attention signals")
    timed(controller_mod.ControllerStack, "concentration_one", "controller: all")
    timed(policies.BudgetPolicy, "decide_one", "decision")
    timed(session.Session, "_experts_host", "experts")
    ids = _text_ids(routed, a.context - a.tokens)  # the last new token ends at the context
    settings = RoutingSettings(budget=a.budget)
    with torch.no_grad():
        for r in range(a.rounds):
            dense = _dense_decoder(plain, ids, a.context)
            routed_gen = routed.stream(ids[0].tolist(), settings, max_new_tokens=a.tokens)
            next(dense), next(routed_gen)  # the prefills
            for side, gen in (("dense", dense), ("routed", routed_gen)):
                row = {k: round(v, 2) for k, v in per_token(gen, a.tokens).items()}
                print(json.dumps({"round": r, "side": side, "ms_per_token": row}), flush=True)


if __name__ == "__main__":
    main()
