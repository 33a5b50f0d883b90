"""Arguments of `metaattn-viz bench`, kept apart so that `--help` needs no torch: never
imports torch or the benchmarks themselves. Every number is checked here, by argparse
(exit code 2, the flag named), before the first row is timed or a model is built."""

from __future__ import annotations

import argparse

# The long decode row (bench/model.py, model_rows) decodes 16 new tokens after a prompt of
# --long-context - 16 tokens: at least one prompt token is needed (a shorter context would
# slice the excerpt from its end and decode almost all of it).
LONG_DECODE_NEW_TOKENS = 16


def add_arguments(p: argparse.ArgumentParser) -> None:
    # one definition each: whole-number ranges, --device/--dtype/--backend, the budget's range
    from metaattn_viz.cli import BUDGET_RANGE, _whole, add_runtime_args
    from metaattn_viz.core.settings import RoutingSettings

    def budget(text: str) -> float:
        try:
            value = float(text)
            RoutingSettings(budget=value)  # the budget's range: not finite or outside it, refused
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number in {BUDGET_RANGE}, got {text!r}") from None
        return value

    p.add_argument("--seq-lens", default="1024,4096", help="comma-separated sequence lengths")
    p.add_argument(
        "--budget", type=budget, default=0.3, help=f"compute budget of the end-to-end rows, in {BUDGET_RANGE}"
    )
    p.add_argument("--repeats", type=_whole(1), default=5, help="timed repeats per row (median reported)")
    p.add_argument("--threads", type=_whole(1), default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--no-model", action="store_true", help="attention rows only (no SmolLM2 rows)")
    p.add_argument(
        "--long-context",
        type=_whole(LONG_DECODE_NEW_TOKENS + 1),
        default=8192,
        help="context of the long decode row (default 8192)",
    )
    p.add_argument(
        "--prefill-len",
        type=_whole(1),
        default=4096,
        help="tokens of the whole-model prefill row (default 4096)",
    )
    p.add_argument(
        "--model-config",
        default=None,
        help="build the model from this config.json with random weights (speed does not depend "
        "on them; e.g. assets/models/smollm2-135m/config.json) instead of loading the bundled one",
    )
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    add_runtime_args(p)
