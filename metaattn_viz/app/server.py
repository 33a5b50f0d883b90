"""Start the web app: pick host and port, build the Gradio Blocks, launch.

Host: 127.0.0.1 by default, 0.0.0.0 on Hugging Face Spaces (SPACE_ID set) so the Space's
proxy can reach it. Port: --port, else $PORT / $GRADIO_SERVER_PORT, else 7860.
Public (a Space, or `public=True`, i.e. `serve --public`): visitors see only their own
runs and the queue has limits (deployment.py). MCP (`mcp=True`, i.e. `serve --mcp`):
Gradio's built-in MCP server exposes the page's named API endpoints (generate, reroute,
figure, status, sql, runs, export) as tools at /gradio_api/mcp/; it needs Gradio's MCP
extra (the `mcp` package), and without it the server refuses to start with a sentence
saying so. The model loads in the background after the server is up, so the page answers
at once. Ctrl-C or SIGTERM (a Space or container stopping) ends the server: the runs in
flight are logged `interrupted`, then the routing log closes, and `serve` returns the
signal that ended it (the CLI exits 128 + its number, 130 for Ctrl-C, as other commands
do). A host and port it cannot listen on is `CannotListen`, found before the app is built.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import socket
import threading

log = logging.getLogger(__name__)

DEFAULT_PORT = 7860
MCP_MISSING = (
    '--mcp needs Gradio\'s MCP support, which is not installed: pip install "gradio[mcp]" '
    "(the `mcp` package), then start the server again."
)


# Gradio's MCP server (6.x, gradio/mcp.py) calls the app's endpoints through one cached
# gradio_client.Client: one session for every MCP caller, so one visitor.
MCP_SCOPED = (
    "--mcp is refused where each visitor sees only their own runs (a public server or a "
    "Space): Gradio's MCP server calls the app through one shared client, so every MCP "
    "caller would be the same visitor and read the others' runs. Offer MCP on a local "
    "server, or on a public one whose log is shared on purpose (METAATTN_SHARED_LOG=1)."
)


class CannotListen(OSError):
    """The server could not bind its host and port."""


def mcp_available() -> bool:
    """Whether Gradio's MCP extra (the `mcp` package) is installed."""
    return importlib.util.find_spec("mcp") is not None


def mcp_problem(mcp: bool, public: bool = False) -> str | None:
    """Why `mcp=True` cannot be served here, or None: where visitors' runs are kept apart
    (MCP_SCOPED), or where Gradio's MCP extra is missing (MCP_MISSING)."""
    if not mcp:
        return None
    from metaattn_viz.app.deployment import Deployment

    if Deployment.detect(public).scoped:
        return MCP_SCOPED
    return None if mcp_available() else MCP_MISSING


def check_mcp(mcp: bool, public: bool = False) -> None:
    """Refuse `mcp=True` where it cannot be served (RuntimeError, mcp_problem)."""
    problem = mcp_problem(mcp, public)
    if problem is not None:
        raise RuntimeError(problem)


def resolve_host_port(host: str | None, port: int | None) -> tuple[str, int]:
    if host is None:
        host = "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"
    if port is not None:
        if not 0 < port < 65536:
            raise ValueError(f"--port must be in 1..65535, got {port}")
        return host, port
    # no --port: $PORT, else $GRADIO_SERVER_PORT, else the default; a bad one is refused
    # naming the variable it came from (never --port, which was not given)
    name = "PORT" if os.environ.get("PORT") else "GRADIO_SERVER_PORT"
    env = os.environ.get(name)
    if not env:
        return host, DEFAULT_PORT
    try:
        port = int(env)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise ValueError(f"${name} must be a port number (1..65535), got {env!r}")
    return host, port


def _cannot_listen(host: str, port: int, why) -> CannotListen:
    return CannotListen(
        f"cannot listen on {host}:{port}: the port is taken or the address is not this "
        f"machine's; pass another --port or --host ({why})"
    )


def check_listen(host: str, port: int) -> None:
    """CannotListen unless `host`:`port` can be bound now (as Gradio binds it: with
    SO_REUSEADDR, so a port in TIME_WAIT passes), before anything is built or loaded. Gradio
    tries again when it starts listening: a port taken in between is still refused."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # "[::1]", as Gradio takes it
    try:
        family, kind, proto, _, address = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(address)
    except OSError as exc:  # taken, not this machine's address, or no such host (gaierror)
        raise _cannot_listen(host, port, exc.strerror or exc) from None


def serve(
    host: str | None = None,
    port: int | None = None,
    model: str | list[str] | None = None,
    db: str | None = None,
    log_runs: bool = True,
    public: bool = False,
    mcp: bool = False,
) -> int | None:
    """Serve the page until a stop signal; the signal's number (None: Gradio's loop ended
    without one)."""
    check_mcp(mcp, public)  # before anything loads
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from metaattn_viz.app.deployment import Deployment
    from metaattn_viz.app.theme import PAGE_CSS
    from metaattn_viz.app.ui import build_app

    host, port = resolve_host_port(host, port)
    check_listen(host, port)  # before the app is built and its model starts loading
    deployment = Deployment.detect(public)
    limits = deployment.limits  # METAATTN_QUEUE_SIZE checked before the model starts loading
    demo = build_app(model=model, db=db, log_runs=log_runs, deployment=deployment)
    log.info(
        "serving on http://%s:%d (%s; runs visible to %s)",
        host,
        port,
        "public" if deployment.public else "local",
        "their owner" if deployment.scoped else "everyone",
    )
    signals: list[int] = []  # the stop signals received
    _stop_on_signals(demo.engine, signals)
    try:
        try:
            # api_open=False: the direct REST routes (POST /gradio_api/run/<name>) would skip
            # the queue and its limits; clients go through the queue (gradio_client does)
            demo.queue(
                default_concurrency_limit=limits.default, max_size=limits.max_size, api_open=False
            ).launch(
                server_name=host,
                server_port=port,
                show_error=True,
                share=False,
                allowed_paths=[str(_assets_dir())],
                css=PAGE_CSS,
                mcp_server=mcp,
            )
        except OSError as exc:
            if "port" not in str(exc).lower():  # another failure of the launch: not a bind
                raise
            # Gradio found nowhere to listen ("Cannot find empty port ..."; nothing is served yet)
            raise _cannot_listen(host, port, exc) from exc
    finally:  # Ctrl-C or SIGTERM: the runs in flight end as "interrupted", the log closes
        demo.engine.close()
    # Gradio's loop takes the KeyboardInterrupt of a stop signal (stop_handler) and returns
    return signals[0] if signals else None


def stop_handler(engine, signals: list[int] | None = None):
    """The handler of SIGTERM and SIGINT: the running generations are told to stop at once
    (after their current token, as "interrupted"), the signal is added to `signals`, then
    KeyboardInterrupt ends Gradio's wait loop and `serve` closes the engine. Gradio's close
    waits up to 5 s for open event streams first: stopped only then, a generation decoded on
    for those seconds, past a container's stop grace (Docker's 10 s) with what came after."""

    def interrupt(signum, frame):
        if signals is not None:
            signals.append(signum)
        # on a thread of its own: the handler runs in the main thread, which may hold the
        # generations' lock itself (a second Ctrl-C while `serve` closes the engine)
        threading.Thread(target=engine.generations.stop_all, kwargs={"wait": 0.0}, daemon=True).start()
        raise KeyboardInterrupt

    return interrupt


def _stop_on_signals(engine, signals: list[int]) -> None:
    """SIGTERM (a container or Space stopping, `kill`) ends the server as Ctrl-C does
    (stop_handler, which adds each to `signals`). Python's default for SIGTERM is to die at
    once, without a word in the log."""
    if threading.current_thread() is not threading.main_thread():
        return  # signal handlers can only be set from the main thread
    handler = stop_handler(engine, signals)
    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def _assets_dir():
    from metaattn_viz.paths import ASSETS_DIR

    return ASSETS_DIR
