"""Start the web app: pick host and port, build the Gradio Blocks, launch.

Host: 127.0.0.1 by default, 0.0.0.0 on Hugging Face Spaces (SPACE_ID set) so the Space's
proxy can reach it. Port: --port, else $PORT / $GRADIO_SERVER_PORT, else 7860.
Public (a Space, or `public=True`, i.e. `serve --public`): visitors see only their own
runs and the queue has limits (deployment.py). The model loads in the background after
the server is up, so the page answers at once.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)

DEFAULT_PORT = 7860


def resolve_host_port(host: str | None, port: int | None) -> tuple[str, int]:
    if host is None:
        host = "0.0.0.0" if os.environ.get("SPACE_ID") else "127.0.0.1"
    if port is None:
        env = os.environ.get("PORT") or os.environ.get("GRADIO_SERVER_PORT")
        port = int(env) if env else DEFAULT_PORT
    if not 0 < port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {port}")
    return host, port


def serve(
    host: str | None = None,
    port: int | None = None,
    model: str | None = None,
    db: str | None = None,
    log_runs: bool = True,
    public: bool = False,
) -> None:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from metaattn_viz.app.deployment import Deployment
    from metaattn_viz.app.ui import build_app

    host, port = resolve_host_port(host, port)
    deployment = Deployment.detect(public)
    demo = build_app(model=model, db=db, log_runs=log_runs, deployment=deployment)
    limits = deployment.limits
    log.info(
        "serving on http://%s:%d (%s; runs visible to %s)",
        host,
        port,
        "public" if deployment.public else "local",
        "their owner" if deployment.scoped else "everyone",
    )
    demo.queue(default_concurrency_limit=limits.default, max_size=limits.max_size).launch(
        server_name=host,
        server_port=port,
        show_error=True,
        share=False,
        allowed_paths=[str(_assets_dir())],
    )


def _assets_dir():
    from metaattn_viz.paths import ASSETS_DIR

    return ASSETS_DIR
