"""Arguments of `metaattn-viz bench`, kept apart so that `--help` needs no torch: never
imports torch or the benchmarks themselves."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-lens", default="1024,4096", help="comma-separated sequence lengths")
    p.add_argument("--budget", type=float, default=0.3, help="compute budget of the end-to-end rows")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per row (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    p.add_argument("--no-model", action="store_true", help="attention rows only (no SmolLM2 rows)")
    p.add_argument(
        "--long-context", type=int, default=8192, help="context of the long decode row (default 8192)"
    )
    p.add_argument(
        "--prefill-len", type=int, default=4096, help="tokens of the whole-model prefill row (default 4096)"
    )
    p.add_argument(
        "--model-config",
        default=None,
        help="build the model from this config.json with random weights (speed does not depend "
        "on them; e.g. assets/models/smollm2-135m/config.json) instead of loading the bundled one",
    )
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    from metaattn_viz.cli import add_runtime_args  # one definition of --device/--dtype/--backend

    add_runtime_args(p)
