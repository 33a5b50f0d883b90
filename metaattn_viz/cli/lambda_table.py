"""`metaattn-viz lambda-table`: make the global scope's calibrated lambda
(routing/lambda_table.py) of the bundled model's shipped controllers, from windows of the
calibration split (each row of the table reads the first that many tokens of each window),
and store it beside each controller asked for (the Bayesian one by default). Rerun after new
controllers ship (a table made for other weights is ignored, and texts take the pilot pass
again)."""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from pathlib import Path


def add_lambda_table_parser(sub) -> None:
    p = sub.add_parser(
        "lambda-table",
        help="the global scope's calibrated lambda by text length and budget "
        "(routing/lambda_table.py), written beside the shipped controllers",
    )
    p.add_argument("--data", default=None, help="UTF-8 text (default: corpus/wikitext2/wiki.dev.raw)")
    p.add_argument(
        "--controllers",
        default="bayes",
        help="comma-separated controller kinds (default bayes; `make lambda-table` also makes the "
        "prior-free controller's, with rows up to 2,048 tokens)",
    )
    p.add_argument(
        "--texts",
        type=int,
        default=8,
        help="windows of the calibration split, from the second on (default 8; the first holds the "
        "benchmark text, which stays out)",
    )
    p.add_argument(
        "--lengths",
        default=None,
        help="comma-separated text lengths, one row each; the windows are as long as the longest "
        "(default 256, 362, 512, 724, 1024, 1448, 2048, 2896, 4096)",
    )
    p.add_argument("--budgets", default=None, help="comma-separated budgets (default 0.2, 0.25, ..., 0.95)")
    p.add_argument(
        "--out",
        default=None,
        help="folder for the table (default: each controller's own); with several "
        "controllers, one subfolder per controller in it (OUT/bayes/, OUT/priorfree/)",
    )
    p.set_defaults(handler=_cmd_lambda_table)


def beyond_context(flag: str, tokens: int, context: int) -> str | None:
    """The one check (and wording) of a length a command asks for against the model's
    context (`RoutedModel.max_context`): None where it fits; lambda-table's --lengths and
    bench's --prefill-len and --long-context are refused with it."""
    if tokens <= context:
        return None
    return f"{flag}: {tokens} tokens is more than the model's context ({context})"


def _budgets(text: str | None) -> tuple[float, ...]:
    from metaattn_viz.cli import UserError
    from metaattn_viz.core.settings import RoutingSettings
    from metaattn_viz.routing import budget as budget_mod
    from metaattn_viz.routing.lambda_table import BUDGETS

    if text is None:
        return BUDGETS
    try:
        values = tuple(sorted({float(b) for b in text.split(",")}))
        for b in values:
            if budget_mod.extreme_route(RoutingSettings(budget=b).budget) is not None:
                raise ValueError(f"{b:g} is an end of the range (nothing to solve)")
    except ValueError as exc:
        raise UserError(f"--budgets: {exc}") from None
    return values


def _lengths(text: str | None) -> tuple[int, ...]:
    from metaattn_viz.cli import UserError
    from metaattn_viz.routing.lambda_table import LENGTHS

    if text is None:
        return LENGTHS
    try:
        values = tuple(sorted({int(n) for n in text.split(",")}))
    except ValueError:
        raise UserError(f"--lengths: comma-separated whole numbers, got {text!r}") from None
    if values[0] < 1:
        raise UserError(f"--lengths must be positive, got {values[0]}")
    return values


def _command(args, kind: str, lengths: tuple[int, ...], budgets: tuple[float, ...]) -> str:
    """The command that makes this table again (what the table's meta records)."""
    words = ["metaattn-viz lambda-table", f"--controllers {kind}", f"--texts {args.texts}"]
    words.append("--lengths " + ",".join(str(n) for n in lengths))
    if args.budgets is not None:
        words.append("--budgets " + ",".join(f"{b:g}" for b in budgets))
    if args.data is not None:
        words.append(f"--data {args.data}")
    return " ".join(words)


def _folders(out: Path | None, kinds: list[str], slug: str | None) -> dict[str, Path]:
    """Where each controller's table goes: `out` (one controller), OUT/<kind> (several: they
    never share one file), or without `out` the controller's own folder (`slug`: the
    model's; None: unknown before it loads, and those are left out)."""
    from metaattn_viz.routing.controller import default_folder

    if out is None:
        return {} if slug is None else {k: default_folder(slug, k) for k in kinds}
    return {k: out / k if len(kinds) > 1 else out for k in kinds}


def _check_folders(folders: dict[str, Path], flag: str) -> None:
    """UserError naming `flag` for a table folder (or its table file) that cannot be written,
    before the tables' minutes of work: a table made must not be lost, nor left alone."""
    from metaattn_viz.cli.outputs import check_output
    from metaattn_viz.routing import lambda_table

    for folder in folders.values():
        check_output(folder, flag, folder=True)
        check_output(folder / lambda_table.FILE, flag, folder=False)


def _cmd_lambda_table(args) -> int:
    from metaattn_viz.cli import UserError
    from metaattn_viz.cli.outputs import check_output
    from metaattn_viz.core.settings import DEFAULTS
    from metaattn_viz.paths import REPO_ROOT
    from metaattn_viz.routing import lambda_table
    from metaattn_viz.routing.controller import KINDS
    from metaattn_viz.routing.model import RoutedModel
    from metaattn_viz.training import data as data_mod

    out_arg = check_output(args.out, "--out", folder=True)  # before the build, which takes minutes
    budgets = _budgets(args.budgets)
    lengths = _lengths(args.lengths)
    kinds = [k.strip() for k in args.controllers.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        raise UserError(f"--controllers must name some of {', '.join(KINDS)}, got {args.controllers!r}")
    _check_folders(_folders(out_arg, kinds, None), "--out")  # each controller's, before any work
    if args.texts < 1:
        raise UserError(f"--texts must be at least 1, got {args.texts}")
    data = Path(args.data) if args.data else REPO_ROOT / "corpus" / "wikitext2" / "wiki.dev.raw"
    split = data_mod.load_split(data)  # a bad file fails before the model loads
    routed = RoutedModel.load()
    too_long = beyond_context("--lengths", lengths[-1], routed.max_context)
    if too_long is not None:
        raise UserError(too_long)
    untrained = [k for k in kinds if not routed.controller(k).trained]
    if untrained:
        raise UserError(f"no trained {', '.join(untrained)} controllers (`make calibrate`)")
    folders = _folders(out_arg, kinds, routed.slug)
    if out_arg is None:  # the controllers' own folders, known once the model has loaded
        _check_folders(folders, "the controller's folder")
    # window 0 is left out: the benchmark's text (bench/model.py) opens the calibration split,
    # so that the prefill row of `bench` routes a text the table was not made from
    tokens = lengths[-1]
    try:
        wins = data_mod.windows(routed.tokenizer, split.train, tokens, "calibration")[1 : args.texts + 1]
    except data_mod.TooShort as exc:  # lambda-table has no --seq-len: its windows are its longest length
        remedy = f"give a longer file or shorter --lengths (the windows are as long as the longest, {tokens})"
        raise UserError(str(exc.with_remedy(remedy))) from None
    if wins.shape[0] < args.texts:  # window 0 stays out (above): --texts N needs N + 1 windows
        held = wins.shape[0] + 1
        fix = f"give --texts {held - 1} or fewer, " if held > 1 else "give "
        raise UserError(
            f"--texts {args.texts} needs {args.texts + 1} calibration windows of {tokens} tokens (the "
            f"first stays out), but {data} holds {held}: {fix}a longer file or shorter --lengths"
        )
    texts = [wins[i : i + 1].to(routed.device) for i in range(wins.shape[0])]
    written = {}
    for kind in kinds:

        def progress(message: str, kind: str = kind) -> None:
            print(f"{kind}: {message}", file=sys.stderr)

        table = lambda_table.build(routed, kind, texts, DEFAULTS, budgets, lengths, progress)
        meta = {
            **table.meta,
            "data": str(data.relative_to(REPO_ROOT)) if data.is_relative_to(REPO_ROOT) else str(data),
            "split": f"calibration, windows 1-{len(texts)} of {tokens} tokens",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": _command(args, kind, lengths, budgets),
        }
        out = folders[kind]
        out.mkdir(parents=True, exist_ok=True)
        path = out / lambda_table.FILE
        tmp = path.with_suffix(".json.tmp")  # a run stopped halfway leaves the old table whole
        tmp.write_text(dataclasses.replace(table, meta=meta).to_json())
        tmp.replace(path)
        written[kind] = str(path)
    summary = {"tables": written, "budgets": list(budgets), "lengths": list(lengths), "texts": len(texts)}
    print(json.dumps(summary))
    return 0
