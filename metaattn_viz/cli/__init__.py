"""The `metaattn-viz` command line (also `python -m metaattn_viz`).

Subcommands and their JSON outputs are a contract (docs/architecture.md, "CLI"). Each
handler is a thin adapter over a library call; heavy imports happen inside the handler so
that `--help` is instant. Choices and defaults are read from their one definition (core's
RoutingSettings and experts, the controller registry, the store's export formats), never
written here. User errors print one plain line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import shlex
import signal
import sys
import traceback
from collections.abc import Sequence

from metaattn_viz import __version__
from metaattn_viz.core.experts import K
from metaattn_viz.core.settings import (
    CONTROLLER_KINDS,
    COST_MODELS,
    DEFAULT_CONTROLLER,
    DEFAULTS,
    HEDGE_POLICIES,
    LINEAR_MAPS,
    MIN_COST,
    SCOPES,
    RoutingSettings,
)

EXIT_USAGE = 2
BUDGET_RANGE = f"[{MIN_COST:g}, 1]"


class _Choices(Sequence):
    """The choices of an option, read from a module's tuple (their one definition) the
    first time argparse needs them: to check a value or to print that subcommand's help.
    The store imports duckdb, which `metaattn-viz --help` must not pay for."""

    def __init__(self, module: str, name: str):
        self._source = (module, name)
        self._values: tuple | None = None

    def _get(self) -> tuple:
        if self._values is None:
            module, name = self._source
            self._values = tuple(getattr(importlib.import_module(module), name))
        return self._values

    def __getitem__(self, i):
        return self._get()[i]

    def __len__(self) -> int:
        return len(self._get())


def _add_choice(p: argparse.ArgumentParser, flag: str, module: str, name: str, **kwargs) -> None:
    # Set after add_argument: argparse formats the choices while adding an argument, which
    # would import the module now.
    p.add_argument(flag, **kwargs).choices = _Choices(module, name)


def _add_controller_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--controller", choices=CONTROLLER_KINDS, default=DEFAULT_CONTROLLER)


def _whole(lo: int, hi: int | None = None):
    """An argparse type: a whole number in [lo, hi] (argparse names the flag and exits 2)."""

    def parse(text: str) -> int:
        span = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number {span}, got {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be a whole number {span}, got {value}")
        return value

    return parse


def _path(text: str) -> str:
    """An argparse type: a path that is not empty (an empty --db would quietly mean the
    default log)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("is empty: give a path")
    return text


class UserError(Exception):
    """A problem the user can fix (bad setting, missing file, missing model)."""


def _add_model_args(p: argparse.ArgumentParser, runtime: bool = True, several: bool = False) -> None:
    more = "; repeat it to offer several models on the page (env METAATTN_MODELS=A,B)" if several else ""
    p.add_argument(
        "--model",
        type=_path,
        default=None,
        action="append" if several else "store",
        help="local HF folder, .gguf file or hub id (default: bundled SmolLM2-135M-"
        f"Instruct; env METAATTN_MODEL){more}",
    )
    if runtime:
        add_runtime_args(p)


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    """--device, --dtype and --backend (routing/device.py: their one definition; checked in
    the handler, before any model loads)."""
    p.add_argument(
        "--device",
        default=None,
        help="auto|cpu|cuda|cuda:N (default auto: CUDA when there is a GPU; env METAATTN_DEVICE)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        help="auto|float32|bfloat16|float16 (default auto: bfloat16 on CUDA, float16 on a GPU "
        "older than Ampere such as a T4, float32 on the CPU; env METAATTN_DTYPE)",
    )
    p.add_argument(
        "--backend",
        default=None,
        help="attention kernels: auto|cpu|triton|reference (default auto: Triton on CUDA; "
        "triton on a CPU needs TRITON_INTERPRET=1; env METAATTN_BACKEND)",
    )


def runtime_from_args(args) -> tuple[str | None, str | None, str | None]:
    """(device, dtype, backend) as asked, checked against this machine (exit 2 if CUDA is
    asked for without one, or Triton where it cannot run)."""
    from metaattn_viz.routing import device as device_mod

    device_mod.resolve_backend(
        device_mod.parse_backend(args.backend), device_mod.resolve(args.device, args.dtype)
    )
    return args.device, args.dtype, args.backend


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaattn-viz",
        description="Watch Bayesian per-token attention routing (Meta-Attention) inside a real "
        "language model.",
    )
    parser.add_argument("--version", action="version", version=f"metaattn-viz {__version__}")
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="debug logging; an error with its traceback"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="start the web app (Gradio) on HOST:PORT")
    p.add_argument("--host", default=None, help="bind address (default 127.0.0.1; 0.0.0.0 on HF Spaces)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860, or $PORT)")
    _add_model_args(p, several=True)
    _add_db_args(p, no_log_help="do not log runs to DuckDB")
    p.add_argument(
        "--public",
        action="store_true",
        help="serve as a public deployment: each visitor sees only their own runs, queue limits "
        "(automatic when SPACE_ID is set)",
    )
    p.add_argument("--mcp", action="store_true", help="also offer the API as MCP tools (needs gradio[mcp])")
    p.set_defaults(handler=_cmd_serve)

    p = sub.add_parser(
        "export", help="export the routing log as Parquet or CSV, partitioned by day (hive style)"
    )
    p.add_argument("--db", type=_path, default=None, help="routing log database (env METAATTN_DB)")
    p.add_argument("--out", required=True, help="output folder (runs/, tokens/, routes/ ...)")
    _add_choice(p, "--format", "metaattn_viz.store", "EXPORT_FORMATS", default="parquet")
    p.set_defaults(handler=_cmd_export)

    from metaattn_viz.cli.route import add_route_parser

    add_route_parser(sub)

    from metaattn_viz.cli.calibrate import add_calibrate_parser

    add_calibrate_parser(sub)

    p = sub.add_parser(
        "eval",
        help="compare routing policies on held-out text: the rows on stdout at the end (a line "
        "each, or --json), each also on stderr as it is scored",
    )
    p.add_argument("--data", required=True, help="UTF-8 text file; its validation split is used")
    p.add_argument("--budgets", default=None, help="comma-separated budgets")
    p.add_argument("--max-tokens", type=_whole(1), default=None, help="validation tokens to score")
    # 2: a window scores seq_len - 1 next-token predictions (training/evaluate.py, MIN_SEQ_LEN)
    p.add_argument(
        "--seq-len",
        type=_whole(2),
        default=None,
        help="window length (default 256; at most the model's context, checked once it loads)",
    )
    p.add_argument("--window", type=_whole(1), default=DEFAULTS.window, help="local expert window")
    p.add_argument(
        "--scope",
        default=DEFAULTS.scope,
        choices=SCOPES,
        help=f"budget scope of the controllers' rows (default {DEFAULTS.scope})",
    )
    p.add_argument(
        "--no-baselines",
        action="store_true",
        help="only the controllers (skip all baseline rows: static, random, salience, layer maps, oracle)",
    )
    p.add_argument(
        "--calib-windows",
        type=_whole(1),
        default=None,
        help="calibration-split windows the layer-map baselines are measured on (default 2)",
    )
    p.add_argument(
        "--linear-map",
        default=DEFAULTS.linear_map,
        choices=LINEAR_MAPS,
        help=f"the linear expert's feature map in every routed pass (default {DEFAULTS.linear_map})",
    )
    p.add_argument(
        "--report",
        default=None,
        help="also write the tables into this markdown file (and pareto.png beside it)",
    )
    _add_model_args(p)
    p.add_argument(
        "--json", action="store_true", help="print the rows on stdout as a JSON list (default: a line each)"
    )
    p.set_defaults(handler=_cmd_eval)

    p = sub.add_parser("bench", help="speed: routed vs dense attention and whole model (ratios)")
    from metaattn_viz.bench.args import add_arguments as add_bench_arguments

    add_bench_arguments(p)
    p.set_defaults(handler=_cmd_bench)

    # thin: every argument goes to the training module's own parser (see main)
    p = sub.add_parser(
        "feature-maps",
        add_help=False,
        help="distil the linear expert's feature maps (python -m metaattn_viz.training.feature_maps; "
        "`metaattn-viz feature-maps --help` for its options)",
    )
    p.set_defaults(handler=_cmd_feature_maps)

    from metaattn_viz.cli.examples import add_examples_parser

    add_examples_parser(sub)

    from metaattn_viz.cli.lambda_table import add_lambda_table_parser

    add_lambda_table_parser(sub)

    from metaattn_viz.deploy.cli import add_deploy_parser

    add_deploy_parser(sub)
    return parser


def _add_routing_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--budget",
        default=str(DEFAULTS.budget),
        help=f"mean cost per decision (under --cost-model) in {BUDGET_RANGE}, or 'none' for "
        f"the posterior's own argmax (default {DEFAULTS.budget})",
    )
    _add_controller_arg(p)
    p.add_argument(
        "--scope",
        default=DEFAULTS.scope,
        choices=SCOPES,
        help="budget met over all layers (default: layers compete) or by every layer",
    )
    p.add_argument(
        "--hedge",
        default=DEFAULTS.hedge_policy,
        choices=HEDGE_POLICIES,
        help=f"hedging policy for uncertain cheap decisions (default {DEFAULTS.hedge_policy})",
    )
    p.add_argument(
        "--hedge-threshold",
        type=float,
        default=DEFAULTS.hedge_threshold,
        help=f"total uncertainty (fraction of log {K}) above which to hedge",
    )
    p.add_argument(
        "--window", type=int, default=DEFAULTS.window, help=f"local expert window (default {DEFAULTS.window})"
    )
    p.add_argument(
        "--sinks", type=int, default=DEFAULTS.n_sink, help=f"attention sinks (default {DEFAULTS.n_sink})"
    )
    p.add_argument(
        "--linear-map",
        default=DEFAULTS.linear_map,
        choices=LINEAR_MAPS,
        help="the linear expert's feature map: elu (elu + 1) or learned (the maps shipped for "
        f"the model, assets/feature_maps/) (default {DEFAULTS.linear_map})",
    )
    cost_help = "what the budget counts: notional costs, or flops (a share of dense attention FLOPs)"
    p.add_argument("--cost-model", default=DEFAULTS.cost_model, choices=COST_MODELS, help=cost_help)


def _add_db_args(p: argparse.ArgumentParser, no_log_help: str = "do not log this run") -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--db", type=_path, default=None, help="routing log database (env METAATTN_DB)")
    g.add_argument("--no-log", action="store_true", help=no_log_help)


# The routing settings' flags by their RoutingSettings field: a refusal names the flag
_SAME_NAME = ("budget", "scope", "hedge_threshold", "window", "linear_map", "cost_model")
SETTING_FLAGS = {"hedge_policy": "--hedge", "n_sink": "--sinks"}
SETTING_FLAGS |= {f: "--" + f.replace("_", "-") for f in _SAME_NAME}


def settings_from_args(args) -> RoutingSettings:
    budget = None if str(args.budget).strip().lower() == "none" else args.budget
    if budget is not None:
        try:
            budget = float(budget)
        except ValueError:
            raise UserError(
                f"--budget must be a number in {BUDGET_RANGE} or 'none', got {args.budget!r}"
            ) from None
    try:
        return RoutingSettings(
            budget=budget,
            scope=args.scope,
            hedge_policy=args.hedge,
            hedge_threshold=args.hedge_threshold,
            window=args.window,
            n_sink=args.sinks,
            linear_map=args.linear_map,
            cost_model=args.cost_model,
        )
    except ValueError as exc:  # RoutingSettings names the setting first: say its flag
        flag = SETTING_FLAGS.get(str(exc).split(" ", 1)[0])
        raise UserError(f"{flag}: {exc}" if flag else str(exc)) from None


def _cmd_serve(args) -> int:
    from metaattn_viz.app.server import CannotListen, mcp_problem, resolve_host_port
    from metaattn_viz.routing import device as device_mod

    problem = mcp_problem(args.mcp, args.public)  # before anything loads
    if problem is not None:
        raise UserError(problem)
    host, port = resolve_host_port(args.host, args.port)  # ValueError: a usage error
    runtime_from_args(args)  # refuse a bad device before the server starts
    # the app loads its model with RoutedModel.load(), which reads these
    for env, value in (
        (device_mod.ENV_DEVICE, args.device),
        (device_mod.ENV_DTYPE, args.dtype),
        (device_mod.ENV_BACKEND, args.backend),
    ):
        if value is not None:
            os.environ[env] = value
    from metaattn_viz.app.server import serve

    try:
        signum = serve(
            host=host,
            port=port,
            model=args.model,
            db=args.db,
            log_runs=not args.no_log,
            public=args.public,
            mcp=args.mcp,
        )
    except CannotListen as exc:
        raise UserError(str(exc)) from None
    if signum == signal.SIGINT:  # Ctrl-C: as every command ends on it
        return _interrupted()
    return 128 + signum if signum else 0  # SIGTERM: 143, as a shell reports it


def _cmd_export(args) -> int:
    from metaattn_viz import store
    from metaattn_viz.cli.outputs import check_output

    out = check_output(args.out, "--out", folder=True)
    try:
        counts = store.export(store.resolve_db_path(args.db), out, args.format)
    except store.StoreUnavailable as exc:
        raise UserError(str(exc)) from None
    except OSError as exc:  # the folder could not be made or written after all
        raise UserError(f"--out {out}: {exc.strerror or exc}") from None
    print(
        f"exported {counts['runs']} runs, {counts['tokens']} tokens, {counts['routes']} route "
        f"rows to {args.out} ({args.format}, partitioned by day)"
    )
    return 0


def _parse_budgets(text: str, flag: str = "--budgets") -> list[float]:
    try:
        budgets = [float(b) for b in text.split(",") if b.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated numbers in {BUDGET_RANGE}, got {text!r}") from None
    from metaattn_viz.core.settings import RoutingSettings

    for b in budgets:
        RoutingSettings(budget=b)  # validates the range
    if not budgets:
        raise UserError(f"{flag} is empty")
    return budgets


def _cmd_eval(args) -> int:
    import json

    from metaattn_viz.cli.outputs import check_output
    from metaattn_viz.routing.model import RoutedModel
    from metaattn_viz.training import data as data_mod
    from metaattn_viz.training.evaluate import DEFAULT_BUDGETS, DEFAULT_MAX_TOKENS, DEFAULT_SEQ_LEN, evaluate

    report = check_output(args.report, "--report", folder=False)  # before minutes of work
    if report is not None:
        from metaattn_viz.training.report import report_problem

        problem = report_problem(report)
        if problem is not None:
            raise UserError(f"--report {report} {problem}")
    budgets = list(DEFAULT_BUDGETS) if args.budgets is None else _parse_budgets(args.budgets)
    max_tokens = DEFAULT_MAX_TOKENS if args.max_tokens is None else args.max_tokens
    seq_len = DEFAULT_SEQ_LEN if args.seq_len is None else args.seq_len
    if max_tokens < seq_len:
        raise UserError(f"--max-tokens must be at least --seq-len ({seq_len})")
    # the rows' settings, checked before the model loads and the dense pass runs (a window
    # out of range is refused here, naming it)
    try:
        RoutingSettings(window=args.window, scope=args.scope, linear_map=args.linear_map)
    except ValueError as exc:  # only --window can be out of range: the others are choices
        raise UserError(f"--window: {exc}") from None
    try:
        data_mod.load_split(args.data)
    except data_mod.DataError as exc:
        raise UserError(str(exc)) from None
    device, dtype, backend = runtime_from_args(args)
    routed = RoutedModel.load(args.model, device=device, dtype=dtype, backend=backend)
    # the model's context is known once it has loaded: checked then, before any pass
    from metaattn_viz.cli.lambda_table import beyond_context

    too_long = beyond_context("--seq-len", seq_len, routed.max_context)
    if too_long is not None:
        raise UserError(too_long)

    def progress(row):  # each row as it is scored, on stderr: stdout gets the rows at the end
        print(_eval_line(row), file=sys.stderr)

    try:
        rows = evaluate(
            routed,
            args.data,
            budgets,
            max_tokens=max_tokens,
            seq_len=seq_len,
            window=args.window,
            progress=progress,
            scope=args.scope,
            baselines=not args.no_baselines,
            linear_map=args.linear_map,
            **({} if args.calib_windows is None else {"calib_windows": args.calib_windows}),
        )
    except data_mod.DataError as exc:
        raise UserError(str(exc)) from None
    if args.json:  # the rows first: a report that fails to write loses nothing
        from metaattn_viz.training.report import finite_or_null

        print(json.dumps(finite_or_null(rows), allow_nan=False))  # strict JSON: NaN is null
    else:
        for row in rows:
            print(_eval_line(row))
    if report is not None:
        from pathlib import Path

        from metaattn_viz.training.report import PLOT_FILE, write_report

        cmd = shlex.join(["metaattn-viz", *args.argv])  # quoted: it reruns as written
        try:
            write_report(rows, report, cmd)
        except OSError as exc:  # name the path that failed: the plot is written after the report
            failed = report if exc.filename is None else Path(os.fsdecode(exc.filename))
            what = "" if failed == report else f": {failed}"
            if failed.name == PLOT_FILE:
                what = f" was written, but not its plot {failed}"
            raise UserError(f"--report {report}{what}: {exc.strerror or exc} (the rows are above)") from None
    return 0


def _eval_line(row: dict) -> str:
    """One row of `eval` as a line of text (its progress on stderr, its result on stdout)."""
    return (
        f"{row['controller']:>14} budget={row['budget']} cost={row['realized_cost']:.3f} "
        f"ppl={row['ppl']:.2f} kl={row['kl_to_dense']:.4f}"
    )


def _cmd_feature_maps(args) -> int:
    from metaattn_viz.training.feature_maps import main as feature_maps_main

    return feature_maps_main(args.rest)


def _cmd_bench(args) -> int:
    from metaattn_viz.bench.attention import run_from_args

    return run_from_args(args)


def from_subcommand(argv: list[str], command: str | None) -> list[str]:
    """The command line from the subcommand on, global flags (-v) left out: what a report
    records as the command that reruns it (after "metaattn-viz", shell-quoted)."""
    return argv[argv.index(command) :] if command in argv else argv


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # parse_args, except that `feature-maps` hands what follows it to its own parser
    args, rest = parser.parse_known_args(argv)
    if rest and args.command != "feature-maps":
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    args.argv = from_subcommand(list(sys.argv[1:] if argv is None else argv), args.command)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    from metaattn_viz.routing.loading import ModelUnavailable

    try:
        code = int(args.handler(args) or 0)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's flush at exit
        return code
    except BrokenPipeError:  # stdout's reader went away (`| head`): end quietly
        return _stdout_gone()
    except (UserError, ModelUnavailable) as exc:
        print(f"metaattn-viz {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # settings validation raises ValueError with a plain message
        # an internal ValueError reads the same: -v shows where it came from
        if args.verbose:
            traceback.print_exc()
        print(f"metaattn-viz {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return _interrupted()
    except Exception as exc:
        if "duckdb" in sys.modules:  # DuckDB's report of a Ctrl-C is an interrupt as well
            from metaattn_viz.store.interrupts import is_interrupt

            if is_interrupt(exc):
                return _interrupted()
        raise


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a command Ctrl-C ended
EXIT_PIPE = 141  # 128 + SIGPIPE, as a shell reports a command whose reader went away


def _interrupted() -> int:
    print("interrupted", file=sys.stderr)
    return EXIT_INTERRUPTED


def _stdout_gone() -> int:
    """After a BrokenPipeError on stdout: point stdout at /dev/null, so that the
    interpreter's own flush at exit finds nowhere to fail again (Python's documented
    recipe for SIGPIPE), and end with the shell's status for it."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (AttributeError, OSError, ValueError):  # stdout is no file descriptor (captured)
        pass
    return EXIT_PIPE
