"""The app's engine: everything the page does, as plain objects with their own tests.

One `Engine` per server composes the parts; the page (ui.py and its tabs) calls them
directly:

- `host`         the routed models offered (app/models.py), each loaded in the background
                 on first use, the default one at once (host.ModelHost);
- `history`      the routing log: runs written as they happen, read back for History
                 (history.RunHistory);
- `analysis`     quality meter, re-route, budget sweep, token inspector (analysis.Analysis);
- `generations`  streaming generations in worker threads, one per browser session
                 (generation.Generations);
- `deployment`   public or local: whose runs each visitor sees, what the page says about
                 it and about storage, the queue limits (deployment.Deployment).

What the page sends is parsed in requests.py; user mistakes and unavailable resources raise
errors.AppError with a plain sentence. Never imports gradio.
"""

from __future__ import annotations

from pathlib import Path

from metaattn_viz.app.analysis import Analysis
from metaattn_viz.app.deployment import Deployment
from metaattn_viz.app.generation import Generations
from metaattn_viz.app.history import RunHistory
from metaattn_viz.app.host import ModelHost, configure_threads
from metaattn_viz.app.requests import APP_MAX_CONTEXT


class Engine:
    """The app's state: the model, the log, the analyses over them, the running jobs."""

    def __init__(
        self,
        model: str | list[str] | None = None,
        db: str | None = None,
        log_runs: bool = True,
        routed=None,
        threads: bool = True,
        deployment: Deployment | None = None,
    ):
        # detected from the environment by default, so a Space is never served unscoped
        self.deployment = deployment if deployment is not None else Deployment.detect()
        self.host = ModelHost(model, routed=routed, threads=threads)
        self.history = RunHistory(db, enabled=log_runs)
        self.analysis = Analysis(self.host, self.history)
        self.generations = Generations(self.host, self.history, self.analysis)

    def status(self) -> dict:
        """What the page header (and the /status endpoint) shows: model, controllers (with
        their weights notice), where it runs, logging, who sees the runs and whether they
        last, and how many tokens are routed at most."""
        model, logging = self.host.status(), self.history.status()
        # the log's file deleted or replaced while open, on its own (log_problem says a
        # failed write the same way): the header words it as what it is, no failed write
        run_log = self.history.run_log
        logging["log_file_problem"] = run_log.file_problem() if run_log is not None else None
        if self.deployment.public and logging["log_path"]:  # a visitor needs no server paths
            logging = {**logging, "log_path": Path(logging["log_path"]).name}
        return {
            "model_ready": model["model_ready"],
            "model": model["model"],
            "model_error": model["model_error"],
            "model_id": model["model_id"],
            "models": model["models"],  # every model offered: id, label, loaded, loading, error
            "controllers": model["controllers"],
            "runtime": model.get("runtime"),  # device, dtype, attention backend (None while loading)
            **logging,
            "load_seconds": model["load_seconds"],
            "max_context": APP_MAX_CONTEXT,
            **self.deployment.status(),
        }

    def close(self) -> None:
        self.generations.stop_all()
        self.history.close()


# configure_threads: the benchmarks set a server's threads the way the app does.
__all__ = ["Engine", "configure_threads"]
