"""The `metaattn-viz` command line (also `python -m metaattn_viz`).

Subcommands and their JSON outputs are a contract (docs/architecture.md, "CLI"). Each
handler is a thin adapter over a library call; heavy imports happen inside the handler so
that `--help` is instant. User errors print one plain line and exit 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from metaattn_viz import __version__

EXIT_USAGE = 2


class UserError(Exception):
    """A problem the user can fix (bad setting, missing file, missing model)."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="local HF folder, .gguf file or hub id (default: bundled SmolLM2-135M-"
                        "Instruct; env METAATTN_MODEL)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="metaattn-viz",
        description="Watch Bayesian per-token attention routing (Meta-Attention) inside a real "
                    "language model.",
    )
    parser.add_argument("--version", action="version", version=f"metaattn-viz {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("serve", help="start the web app (Gradio) on HOST:PORT")
    p.add_argument("--host", default=None,
                   help="bind address (default 127.0.0.1; 0.0.0.0 on HF Spaces)")
    p.add_argument("--port", type=int, default=None, help="port (default 7860, or $PORT)")
    _add_model_args(p)
    p.add_argument("--db", default=None, help="routing log database (env METAATTN_DB)")
    p.add_argument("--no-log", action="store_true", help="do not log runs to DuckDB")
    p.set_defaults(handler=_cmd_serve)

    return parser


def _cmd_serve(args) -> int:
    from metaattn_viz.app_server import serve

    serve(host=args.host, port=args.port, model=args.model, db=args.db, log_runs=not args.no_log)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if not getattr(args, "handler", None):
        parser.print_help()
        return EXIT_USAGE
    from metaattn_viz.model_loading import ModelUnavailable

    try:
        return int(args.handler(args) or 0)
    except (UserError, ModelUnavailable) as exc:
        print(f"metaattn-viz {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ValueError as exc:  # settings validation raises ValueError with a plain message
        print(f"metaattn-viz {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
