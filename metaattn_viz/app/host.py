"""The model host: the routed models a server offers (app/models.py), each loaded on first
use in the background so the page answers at once, warmed up, and handed to whoever needs
it once it is ready.

The default model (the first choice) starts loading when the host is made. Loads run one
at a time (one lock); at most ``max_loaded`` models stay loaded (METAATTN_MAX_MODELS,
default 2), the least recently used dropped first. A dropped model is only forgotten: a
generation still running on it keeps its own reference until it ends.

On ZeroGPU (routing/zerogpu.py) every offered model is loaded when the host is made, in
the calling thread, before the server launches, and none is dropped later. There every model
is bound for the GPU work (gpu_work.bind) as soon as it is loaded, so all are bound before
any GPU call can fork a worker, and the one worker `spaces` reuses knows them all; a
model loaded after a GPU call (only when the host was given a model object to serve, as
tests and the benchmark do) gets fresh workers (gpu_work's docstring, "Models").

Also sets the server's torch threads (`configure_threads`). A model that cannot be loaded
is reported in plain words (AppError) and the server keeps serving everything that does
not need it. Never routes, logs or imports gradio.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable

from metaattn_viz.app import gpu_work
from metaattn_viz.app.environment import whole_from_env
from metaattn_viz.app.errors import AppError, quoted
from metaattn_viz.app.models import ModelChoice, catalogue, model_id, model_label
from metaattn_viz.core.settings import DEFAULT_CONTROLLER, RoutingSettings
from metaattn_viz.routing import zerogpu

log = logging.getLogger(__name__)

MODEL_WAIT_S = 180.0
ENV_MAX_MODELS = "METAATTN_MAX_MODELS"
DEFAULT_MAX_LOADED = 2


def configure_threads() -> int:
    """Torch intra-op threads for the server: METAATTN_THREADS, else half the cores (at
    least 1). Requests run in parallel threads; one op spreading over every core while
    others wait only adds contention (measured: 8x slower decoding on a loaded 2-core box)."""
    import torch

    threads = whole_from_env("METAATTN_THREADS", max(1, min(4, (os.cpu_count() or 2) // 2)), 1, 1024)
    torch.set_num_threads(threads)
    return threads


def max_loaded_from_env() -> int:
    return whole_from_env(ENV_MAX_MODELS, DEFAULT_MAX_LOADED, 1)


def load_routed(choice: ModelChoice):
    """The RoutedModel of a choice (routing/loading.py's resolution, shipped controllers)."""
    from metaattn_viz.routing.model import RoutedModel

    return RoutedModel.load(choice.spec)


class ModelHost:
    """The routed models: `routed` given (tests, the benchmark) is the default and loaded;
    else the models of `spec` (one spec, several, or None: see app/models.py) are offered
    and the default one is loaded in a thread. `loader(choice)` makes a RoutedModel."""

    def __init__(
        self,
        spec: str | Iterable[str] | None = None,
        routed=None,
        threads: bool = True,
        max_loaded: int | None = None,
        loader: Callable[[ModelChoice], object] = load_routed,
    ):
        self.max_loaded = max_loaded_from_env() if max_loaded is None else int(max_loaded)
        if self.max_loaded < 1:
            raise ValueError(f"max_loaded must be >= 1, got {max_loaded!r}")
        self._loader = loader
        self._lock = threading.Lock()  # guards the dicts below
        self._load_lock = threading.Lock()  # one load at a time
        self._loaded: OrderedDict[str, object] = OrderedDict()  # id -> RoutedModel, LRU first
        self._done: dict[str, threading.Event] = {}  # id -> set when its last load ended
        self._errors: dict[str, str] = {}
        self._seconds: dict[str, float] = {}
        if threads and routed is None:
            configure_threads()
        choices = catalogue(spec) if routed is None else catalogue([])
        if routed is not None:
            given = ModelChoice(
                model_id(routed.name),
                None,
                routed.name,
                {k: s.trained for k, s in routed.controllers.items()},
            )
            choices = [given] + [c for c in choices if c.id != given.id]
        self._choices: dict[str, ModelChoice] = {c.id: c for c in choices}
        self.default_id = choices[0].id
        self.spec = self._choices[self.default_id].spec
        # ZeroGPU (routing/zerogpu.py): `spaces` moves to the GPU only what was placed before
        # the Space launched, from the thread that imported it, so every offered model is
        # loaded (and bound for the GPU work, before any GPU call forks a worker) here, now,
        # in this thread, without a warm-up pass (it would need the GPU), and none is loaded
        # or dropped later
        self.preload = zerogpu.active()
        if self.preload:
            self.max_loaded = max(self.max_loaded, len(self._choices))
        if routed is not None:
            if self.preload:
                gpu_work.bind(routed)
            self._loaded[self.default_id] = routed
            self._done[self.default_id] = threading.Event()
            self._done[self.default_id].set()
        elif self.preload:
            for mid in self._choices:
                self._done[mid] = threading.Event()
                self._load(mid, self._done[mid], warm=False)
        else:
            self._start(self.default_id)

    # -- which model ------------------------------------------------------------------------
    def choices(self) -> list[tuple[str, str]]:
        """(label, id) of every model offered, the default first, for a dropdown. A model
        whose controllers are untrained is labelled "(untrained controllers)"; once loaded,
        the label follows the controllers it really has."""
        out = []
        for c in self._choices.values():
            routed = self._loaded.get(c.id)
            trained = c.trained if routed is None else {k: s.trained for k, s in routed.controllers.items()}
            out.append((model_label(c.name, trained), c.id))
        return out

    def resolve(self, model: str | None = None) -> str:
        """The id of `model`: an id, a model name (a trace's ``model``) or a spec the
        operator passed; None or "" is the default. AppError naming the offered models else."""
        if not model:
            return self.default_id
        if model in self._choices:
            return model
        for c in self._choices.values():
            if model in (c.name, c.spec) or model_id(model) == c.id:
                return c.id
        offered = ", ".join(c.name for c in self._choices.values())
        raise AppError(f"This server does not offer the model {quoted(model)} (it offers: {offered}).")

    # -- loading ----------------------------------------------------------------------------
    def start_loading(self, model: str | None = None) -> str:
        """Start loading `model` in the background unless it is loaded, loading or failed
        (a failed load is not retried: its error stays on the page); its id."""
        return self._start(self.resolve(model))[0]

    def _start(self, mid: str) -> tuple[str, threading.Event]:
        with self._lock:
            event = self._done.get(mid)
            if event is not None:
                return mid, event
            event = self._done[mid] = threading.Event()
        threading.Thread(
            target=self._load, args=(mid, event), name=f"model-loader-{mid}", daemon=True
        ).start()
        return mid, event

    def _load(self, mid: str, done: threading.Event, warm: bool = True) -> None:
        with self._load_lock:
            t0 = time.perf_counter()
            try:
                routed = self._loader(self._choices[mid])
                if self.preload:  # ZeroGPU: bound before the calls that name it (module docstring)
                    gpu_work.bind(routed)
                if warm:
                    self._warm_up(routed)
                with self._lock:
                    self._loaded[mid] = routed
                    self._seconds[mid] = time.perf_counter() - t0
                    self._evict(keep=mid)
            except Exception as exc:  # shown on the page; the server keeps serving
                log.exception("loading the model %s failed", mid)
                with self._lock:
                    self._errors[mid] = str(exc) or type(exc).__name__
            finally:
                done.set()

    def _evict(self, keep: str) -> None:
        """Drop the least recently used models beyond max_loaded (holding self._lock)."""
        for mid in list(self._loaded):
            if len(self._loaded) <= self.max_loaded:
                break
            if mid != keep:
                del self._loaded[mid]
                del self._done[mid]  # a later use loads it again
                log.info("model %s unloaded (at most %d stay loaded)", mid, self.max_loaded)

    @staticmethod
    def _warm_up(routed) -> None:
        """One tiny routed pass, so the first user does not pay for lazy initialisation."""
        import torch

        try:
            routed.prefill(torch.tensor([[1, 2, 3]]), RoutingSettings(), DEFAULT_CONTROLLER, use_cache=False)
        except Exception:
            log.warning("warm-up pass failed", exc_info=True)

    def is_ready(self, model: str | None = None) -> bool:
        return self.resolve(model) in self._loaded

    @property
    def ready(self) -> bool:
        """The default model is loaded."""
        return self.is_ready()

    def loaded_ids(self) -> list[str]:
        """The ids of the loaded models, least recently used first."""
        with self._lock:
            return list(self._loaded)

    def routed_model(self, timeout: float = MODEL_WAIT_S, model: str | None = None):
        """The RoutedModel of `model` (see `resolve`; None: the default), loading it if it is
        not loaded and waiting up to `timeout` s; AppError if it is still loading or could
        not be loaded."""
        mid = self.resolve(model)
        deadline = time.monotonic() + timeout
        for _ in range(3):  # a model unloaded between its load and this call loads again
            _, event = self._start(mid)
            if not event.wait(max(0.0, deadline - time.monotonic())):
                name = self._choices[mid].name
                raise AppError(f"The model {name} is still loading; try again in a few seconds.")
            with self._lock:
                routed = self._loaded.get(mid)
                if routed is not None:
                    self._loaded.move_to_end(mid)
                    return routed
                error = self._errors.get(mid)
            if error is not None:
                raise AppError(f"The model could not be loaded: {error}. The server log has the details.")
        raise AppError("The model was unloaded to make room for another; try again.")

    # -- what the page says -----------------------------------------------------------------
    @property
    def model_error(self) -> str | None:
        return self._errors.get(self.default_id)

    @property
    def load_seconds(self) -> float | None:
        return self._seconds.get(self.default_id)

    def models(self) -> list[dict]:
        """Every offered model: id, label, name, loaded, loading, error."""
        out = []
        labels = dict((mid, label) for label, mid in self.choices())
        with self._lock:
            for mid, c in self._choices.items():
                event = self._done.get(mid)
                out.append(
                    {
                        "id": mid,
                        "label": labels[mid],
                        "name": c.name,
                        "loaded": mid in self._loaded,
                        "loading": event is not None and not event.is_set(),
                        "error": self._errors.get(mid),
                    }
                )
        return out

    def status(self, model: str | None = None) -> dict:
        """The model's part of the page header (`model`, default the default model): ready,
        name, error, controllers (each with its weights notice), where the passes run
        (device, dtype, attention backend), and every model offered (`models`)."""
        mid = self.resolve(model)
        routed = self._loaded.get(mid)
        out: dict = {
            "model_ready": routed is not None,
            "model": None,
            "model_id": mid,
            "model_error": self._errors.get(mid),
            "controllers": {},
            "load_seconds": self._seconds.get(mid),
            "models": self.models(),
        }
        if routed is not None:
            out["model"] = routed.name
            out["controllers"] = {
                k: {"trained": s.trained, "id": s.controller_id, "weights_notice": routed.weights_notice(k)}
                for k, s in routed.controllers.items()
            }
            out["runtime"] = routed.runtime()
        return out


__all__ = [
    "ModelHost",
    "configure_threads",
    "load_routed",
    "max_loaded_from_env",
    "MODEL_WAIT_S",
    "DEFAULT_MAX_LOADED",
    "ENV_MAX_MODELS",
]
