"""`metaattn-viz examples`: remake the example runs the page shows before its model loads
(app/examples.py writes them to assets/example_traces/). Rerun after new controllers ship."""

from __future__ import annotations

import json
import sys


def add_examples_parser(sub) -> None:
    p = sub.add_parser(
        "examples",
        help="route the example prompts (assets/examples.json) with the bundled model and its shipped "
        "controllers, and write their traces and index (assets/example_traces/)",
    )
    p.add_argument("--out", default=None, help="output folder (default: the shipped assets/example_traces/)")
    p.add_argument(
        "--max-new-tokens", type=int, default=None, help="tokens generated per example (default: as shipped)"
    )
    p.set_defaults(handler=_cmd_examples)


def _cmd_examples(args) -> int:
    from metaattn_viz.app.examples import MAX_NEW_TOKENS, TRACES_DIR, generate
    from metaattn_viz.cli import UserError
    from metaattn_viz.cli.outputs import check_output
    from metaattn_viz.routing.generation import MAX_NEW_TOKENS as GENERATION_CAP

    n = MAX_NEW_TOKENS if args.max_new_tokens is None else args.max_new_tokens
    # one check, before the model loads: at least one new token (an example shows its
    # generation), at most what a generation allows (routing/generation.py, as route checks)
    if not 1 <= n <= GENERATION_CAP:
        raise UserError(f"--max-new-tokens must be at least 1 and at most {GENERATION_CAP}, got {n}")
    # before the model loads: "" refused, and the shipped folder checked too when --out is not given
    if args.out is None:
        out = check_output(TRACES_DIR, "the default --out", folder=True)
    else:
        out = check_output(args.out, "--out", folder=True)
    try:
        index = generate(out=out, max_new_tokens=n, progress=lambda m: print(m, file=sys.stderr))
    except OSError as exc:  # e.g. the disk filled up: the previous traces are left as they were
        raise UserError(f"could not make the example traces in {out}: {exc}") from None
    summary = {k: index[k] for k in ("model", "controllers", "date")}
    print(json.dumps({**summary, "examples": len(index["examples"])}))
    return 0
