"""The model host: the one RoutedModel a server runs, loaded in the background so the page
answers at once, warmed up, and handed to whoever needs it once it is ready.

Also sets the server's torch threads (`configure_threads`). A model that cannot be loaded
is reported in plain words (AppError) and the server keeps serving everything that does
not need it. Never routes, logs or imports gradio.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from metaattn_viz.app.errors import AppError
from metaattn_viz.core.settings import DEFAULT_CONTROLLER, RoutingSettings

log = logging.getLogger(__name__)

MODEL_WAIT_S = 180.0


def configure_threads() -> int:
    """Torch intra-op threads for the server: METAATTN_THREADS, else half the cores (at
    least 1). Requests run in parallel threads; one op spreading over every core while
    others wait only adds contention (measured: 8x slower decoding on a loaded 2-core box)."""
    import torch

    n = os.environ.get("METAATTN_THREADS")
    threads = int(n) if n else max(1, min(4, (os.cpu_count() or 2) // 2))
    torch.set_num_threads(threads)
    return threads


class ModelHost:
    """The routed model: given (`routed`, for tests) or loaded from `spec` in a thread."""

    def __init__(self, spec: str | None = None, routed=None, threads: bool = True):
        self.spec = spec
        self._routed = routed
        self.model_error: str | None = None
        self.load_seconds: float | None = None
        self._loaded = threading.Event()
        if threads and routed is None:
            configure_threads()
        if routed is not None:
            self._loaded.set()
        else:
            threading.Thread(target=self._load, name="model-loader", daemon=True).start()

    def _load(self) -> None:
        from metaattn_viz.routing.model import RoutedModel

        t0 = time.perf_counter()
        try:
            self._routed = RoutedModel.load(self.spec)
            self.load_seconds = time.perf_counter() - t0
            self._warm_up()
        except Exception as exc:  # shown on the page; the server keeps serving
            log.exception("model loading failed")
            self.model_error = str(exc) or type(exc).__name__
        finally:
            self._loaded.set()

    def _warm_up(self) -> None:
        """One tiny routed pass, so the first user does not pay for lazy initialisation."""
        import torch

        try:
            self._routed.prefill(
                torch.tensor([[1, 2, 3]]), RoutingSettings(), DEFAULT_CONTROLLER, use_cache=False
            )
        except Exception:
            log.warning("warm-up pass failed", exc_info=True)

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and self._routed is not None

    def routed_model(self, timeout: float = MODEL_WAIT_S):
        """The RoutedModel, waiting up to `timeout` s for the load; AppError if it is still
        loading or could not be loaded."""
        if not self._loaded.wait(timeout):
            raise AppError("The model is still loading; try again in a few seconds.")
        if self._routed is None:
            raise AppError(
                f"The model could not be loaded: {self.model_error}. The server log has the details."
            )
        return self._routed

    def status(self) -> dict:
        """The model's part of the page header: ready, name, error, controllers (each with
        its weights notice), and where the passes run (device, dtype, attention backend)."""
        routed = self._routed if self._loaded.is_set() else None
        out: dict = {
            "model_ready": routed is not None,
            "model": None,
            "model_error": self.model_error,
            "controllers": {},
            "load_seconds": self.load_seconds,
        }
        if routed is not None:
            out["model"] = routed.name
            out["controllers"] = {
                k: {"trained": s.trained, "id": s.controller_id, "weights_notice": routed.weights_notice(k)}
                for k, s in routed.controllers.items()
            }
            out["runtime"] = routed.runtime()
        return out


__all__ = ["ModelHost", "configure_threads", "MODEL_WAIT_S"]
