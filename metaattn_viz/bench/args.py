"""Arguments of `metaattn-viz bench`, kept apart so that `--help` needs no torch: never
imports torch or the benchmarks themselves. Every number is checked here, by argparse
(exit code 2, the flag named), before the first row is timed or a model is built."""

from __future__ import annotations

import argparse

# The long decode row (bench/model.py, model_rows) decodes 16 new tokens after a prompt of
# --long-context - 16 tokens: at least one prompt token is needed (a shorter context would
# slice the excerpt from its end and decode almost all of it).
LONG_DECODE_NEW_TOKENS = 16


def model_config(text: str) -> str:
    """An argparse type: the path of a transformers config.json (or a folder holding one)
    that exists, is JSON and names its model_type; checked here, as the command line is
    read, so that a bad one is a usage error before any import or work (and a missing path
    is never looked up on the Hub)."""
    import json
    from pathlib import Path

    path = Path(text).expanduser()
    file = path / "config.json" if path.is_dir() else path
    if not file.is_file():
        raise argparse.ArgumentTypeError(f"no such file: {file}")
    try:
        config = json.loads(file.read_bytes())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not JSON"
        raise argparse.ArgumentTypeError(f"{file} is not a readable config.json ({reason})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise argparse.ArgumentTypeError(f"{file} has no model_type: not a transformers config.json")
    return text


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
    p.add_argument(
        "--repeats",
        type=_whole(1),
        default=None,
        help="timed repeats of every row, after a warm-up (median reported; default 5 for the "
        "attention rows, 7 for routing-overhead and 3 for prefill; decode times blocks of tokens)",
    )
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
        type=model_config,
        default=None,
        help="build the model from this config.json with random weights (speed does not depend "
        "on them; e.g. assets/models/smollm2-135m/config.json) instead of loading the bundled one",
    )
    p.add_argument("--json", action="store_true", help="print the rows as one JSON list")
    add_runtime_args(p)
