"""`metaattn-viz route`: route one prompt (given on the command line, or `-` for standard
input), optionally generate, print the trace as a table or JSON, and log it."""

from __future__ import annotations

import sys

STDIN = "-"


def add_route_parser(sub) -> None:
    from metaattn_viz.cli import _add_db_args, _add_model_args, _add_routing_args, _whole

    p = sub.add_parser("route", help="route a prompt (and optionally generate) and print the trace")
    p.add_argument("--prompt", required=True, help="text to route; - reads it from standard input (UTF-8)")
    _add_routing_args(p)
    p.add_argument(
        "--max-new-tokens", type=_whole(0), default=0, help="tokens to generate (default 0, at most 4096)"
    )
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--seed", type=_whole(0), default=0, help="sampling seed")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    _add_model_args(p)
    _add_db_args(p)
    p.add_argument("--json", action="store_true", help="print the trace as one JSON object")
    p.set_defaults(handler=cmd_route)


def prompt_text(value: str, stdin=None) -> str:
    """The prompt `--prompt` names: the value itself, or standard input read whole as UTF-8
    for "-". Undecodable bytes are refused with their offset."""
    if value != STDIN:
        return value
    data = (stdin if stdin is not None else sys.stdin.buffer).read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        from metaattn_viz.cli import UserError

        byte = f"byte {exc.start} ({data[exc.start]:#04x})"
        raise UserError(f"standard input is not valid UTF-8 text: {byte}") from None


def cmd_route(args) -> int:
    import json

    from metaattn_viz.cli import UserError, runtime_from_args, settings_from_args
    from metaattn_viz.routing.generation import MAX_NEW_TOKENS
    from metaattn_viz.routing.model import RoutedModel, Sampling, prompt_problem

    settings = settings_from_args(args)  # validate before loading anything
    sampling = Sampling(temperature=args.temperature, seed=args.seed)
    prompt = prompt_text(args.prompt)
    problem = prompt_problem(prompt)
    if problem is not None:
        source = "standard input" if args.prompt == STDIN else "--prompt"
        raise UserError(f"{source}: {problem}")
    if args.max_new_tokens > MAX_NEW_TOKENS:
        raise UserError(
            f"--max-new-tokens must be a whole number in [0, {MAX_NEW_TOKENS}], got {args.max_new_tokens}"
        )
    if not args.no_log:
        log_path(args.db)  # a log that cannot be written is refused before the model loads
    device, dtype, backend = runtime_from_args(args)
    routed = RoutedModel.load(args.model, device=device, dtype=dtype, backend=backend)
    trace = routed.route(
        prompt,
        settings,
        max_new_tokens=args.max_new_tokens,
        controller=args.controller,
        sampling=sampling,
        chat=args.chat,
    )
    if not args.no_log:
        trace.run_id = log_trace(trace, args.db)
    if args.json:
        # where it ran: device, dtype and the attention backend actually used
        extra = {
            "runtime": routed.runtime(settings),
            "weights_notice": routed.weights_notice(trace.controller),
        }
        print(json.dumps({**trace.to_json(), **extra}, ensure_ascii=False))
    else:
        from metaattn_viz.cli.table import trace_table

        notice = routed.weights_notice(trace.controller)
        if notice:
            print(f"note ({trace.controller} controllers): {notice}", file=sys.stderr)

        print(trace_table(trace))
    return 0


def log_path(db):
    """The routing log's path (--db, else METAATTN_DB, else the default), when a file can be
    written there (writable.py, as `export` checks its --out); else UserError naming where
    the path came from and why, before any work."""
    import os

    from metaattn_viz import store
    from metaattn_viz.cli.outputs import check_output
    from metaattn_viz.paths import DB_ENV

    path = store.resolve_db_path(db)
    if db:
        check_output(path, "--db", folder=False)
        return path
    from metaattn_viz.cli import UserError

    source = DB_ENV if os.environ.get(DB_ENV, "").strip() else "the routing log"
    try:
        check_output(path, source, folder=False)
    except UserError as exc:
        raise UserError(f"{exc} (pass --db with another path, or --no-log)") from None
    return path


def log_trace(trace, db) -> str | None:
    """Write a finished trace to the routing log; a log problem never loses the result: any
    failure (an unreadable, locked or malformed database) is a warning naming the log, and
    the trace is printed all the same. Ctrl-C is not a log problem: it is KeyboardInterrupt
    (DuckDB's own report of it too, store/interrupts.py); a run it cuts short is marked
    `interrupted` when the log closes."""
    from metaattn_viz import store
    from metaattn_viz.store.interrupts import keyboard_interrupts

    path = store.resolve_db_path(db)
    try:
        with keyboard_interrupts(), store.RunLog(path) as log:
            run_id = log.start_run(trace, kind="route")
            log.finish(run_id, trace, status="done")
        return run_id
    except store.StoreUnavailable as exc:
        print(f"warning: run not logged: {exc}", file=sys.stderr)
    except Exception as exc:  # noqa: BLE001 - whatever the log raised, the result is kept
        print(f"warning: run not logged to {path}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return None
