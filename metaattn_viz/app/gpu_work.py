"""The GPU work of a generation, as a function of picklable arguments, and how what it
produces travels back to the process that logs it.

``generate`` prefills the prompt and decodes token by token on the hosted model (routing's
``stream``), then, if asked, measures the quality meter (``quality_kl``: a dense pass and a
replay of the run's own decisions). It yields compact updates, never the growing trace:
pickled, a 256-token trace of a 30-layer model weighs 525 kB (263 kB without its spare
growth buffers), a one-token update about 2 kB. The updates are plain dicts of lists,
strings and numpy arrays (no tensors), in this order:

- ``{"kind": "tokens", ...}`` after the prefill and after every new token: the positions
  added since the previous update (token ids and texts, the [L, n] decision arrays) and the
  trace's scalars (timings, output text, truncation); the first also carries the trace's
  class and header (model, controller, settings...);
- ``{"kind": "end", ...}`` when decoding has finished on its own: final timings and text;
- ``{"kind": "quality", "kl": [T] or None, "error": None or a message}`` if asked;
- on ZeroGPU only, ``{"kind": "error", ...}`` (``failure``) in place of the rest when the
  work raised.

``apply`` rebuilds the trace from them on the receiving side. On ZeroGPU
(routing/zerogpu.py) ``generate_on_gpu`` is ``generate`` under ``@spaces.GPU`` (as
``_generate_in_worker``, which sends its errors back, below), decorated when this module is
imported (ZeroGPU wants its GPU functions known at start-up), with a duration estimated
from the request (``gpu_seconds``): it runs in a forked worker, each update is pickled back
as it is produced, and closing the generator in the main process stops the worker at its
next yield. Anywhere else the decorator is the identity and the same code runs in the
calling thread.

Errors, on ZeroGPU: ``spaces`` shows an exception raised in a worker as its bare class name
("RuntimeError", titled "ZeroGPU worker error"), and an AppError's sentence is lost with it.
So the worker catches what the work raises and sends it back as data (``failure``: the
type's name, the message, the worker's traceback, whether it is an AppError), and the main
process raises it again (``apply``, ``on_device``): an AppError with its own sentence, a
built-in exception as itself, any other as a ``WorkerError`` named after it. Its message
and the worker's traceback (a note on the exception) reach the server log with the main
process's traceback. Off ZeroGPU nothing is caught: the exception is the original.

Models, on ZeroGPU: the model travels by name. ``bind`` registers it in a module-level
table in the main process, and a forked worker inherits the table as it was when it was
forked (ZeroGPU moves the weights onto the GPU there, if the model was placed on "cuda"
before the Space launched). ``spaces`` (0.51.3) keeps one worker per decorated function
and reuses it for later calls while it is alive and idle, so a worker knows only the models
bound before it was forked. Two parts make every bound model reach the worker that serves
it:

- on ZeroGPU the model host (app/host.py) loads every offered model before the server
  launches and binds each as it loads it, so all are bound before any GPU call can fork a
  worker, and that worker serves them all;
- a model bound (a new one, or another object under a bound name) after a GPU function was
  called retires the GPU functions' workers: the next call of each GPU function
  goes through a fresh copy of it, decorated again, and ``spaces`` forks a new worker for
  it, which inherits the whole table (and pays the cold start again: ``gpu_seconds``).
  The retired workers are left idle, as ``spaces`` leaves a worker it does not reuse.
  Chosen over the alternatives: a model cannot travel as an argument (its weights would be
  pickled to the worker on every call, and on ZeroGPU the main process holds them as
  emulated CUDA tensors), and ``spaces`` gives no handle to end a worker (one that ends
  itself mid-call is reported as an aborted task). On ZeroGPU the host loads a model after
  start-up only when it was given one to serve (tests, the benchmark) and another is asked
  for.

Never: log runs, touch the job registry or the dense-logits cache (the main process keeps
them, fed by the updates), import gradio or the store.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import functools
import logging
import threading
import traceback
import types
import weakref
from collections.abc import Callable, Generator
from typing import Any, NoReturn

import numpy as np

from metaattn_viz.app.errors import AppError
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.core.trace import _GROWN, RoutingTrace  # the [L, T, ...] fields, in extend's order
from metaattn_viz.routing import zerogpu

log = logging.getLogger(__name__)

QUALITY_PASSES = 2  # the quality meter: a dense pass and a forced replay of the whole text
# Fields an update changes; the rest is the trace's header, sent once.
_CHANGING = frozenset(_GROWN) | {
    "token_ids",
    "tokens",
    "timings",
    "output_text",
    "truncated",
    "n_prompt_tokens",
    "kl_to_dense",
}

# name -> RoutedModel (bind); weak, so that a model the host drops can be freed
_MODELS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()
_warm = False  # whether a GPU generation of this process has finished (gpu_seconds)
_lock = threading.Lock()  # guards _MODELS' changes, _epoch and _called
_epoch = 0  # the GPU functions' generation: bumped by a model bound after one was called
_called = False  # a GPU function was called in this epoch (a worker may hold the table)


def bind(routed) -> str:
    """Register `routed` for the GPU work under its name (returned), in the main process.
    A worker forked later inherits it; if a GPU function was already called (its worker may
    have been forked without it), the next GPU calls go to fresh workers (module docstring)."""
    global _epoch, _called, _warm
    with _lock:
        if _MODELS.get(routed.name) is not routed:
            _MODELS[routed.name] = routed
            if _called:
                _epoch, _called, _warm = _epoch + 1, False, False
                log.info(
                    "model %s bound after the GPU workers started: the next calls get fresh ones", routed.name
                )
    return routed.name


def _routed(model: str):
    routed = _MODELS.get(model)
    if routed is None:
        raise RuntimeError(
            f"the GPU work has no model {model!r}: bind it before the first call (on ZeroGPU "
            "a GPU worker knows only the models bound before it started)"
        )
    return routed


# -- errors raised in a ZeroGPU worker, sent back as data ---------------------------------


class WorkerError(RuntimeError):
    """An exception of a type that is not built in, raised in a ZeroGPU worker and raised
    again in the main process (``raise_failure``) as a subclass named after that type."""


_WORKER_ERRORS: dict[tuple[str, str], type[WorkerError]] = {}


def failure(exc: BaseException) -> dict:
    """`exc`, raised by the GPU work in a worker, as data that pickles (module docstring)."""
    return {
        "kind": "error",
        "type": type(exc).__name__,
        "module": type(exc).__module__,
        "message": str(exc),
        "app": isinstance(exc, AppError),
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }


def _error_type(module: str, name: str) -> type[Exception]:
    if module == "builtins":
        cls = getattr(builtins, name, None)
        if isinstance(cls, type) and issubclass(cls, Exception):
            return cls
    key = (module, name)
    if key not in _WORKER_ERRORS:
        _WORKER_ERRORS[key] = types.new_class(
            name, (WorkerError,), exec_body=lambda ns: ns.update(__module__=module)
        )
    return _WORKER_ERRORS[key]


def raise_failure(update: dict) -> NoReturn:
    """Raise again, in the main process, the exception a ``failure`` describes: an AppError
    with its sentence; else one of the same type name (a built-in type, or a WorkerError
    subclass) with its message and, as a note, the worker's traceback."""
    message = str(update.get("message") or "")
    if update.get("app"):
        raise AppError(message)
    cls = _error_type(str(update.get("module") or ""), str(update.get("type") or "Exception"))
    try:
        exc = cls(message)
    except Exception:  # a built-in type that takes other arguments (UnicodeDecodeError...)
        exc = _error_type("", str(update.get("type")))(message)
    worker_tb = str(update.get("traceback") or "").rstrip()
    if worker_tb:
        exc.add_note(f"Raised in the ZeroGPU worker:\n{worker_tb}")
    raise exc


def quality_kl(routed, trace: RoutingTrace, dense_logits=None) -> np.ndarray:
    """KL(dense || routed) of the next-token distribution at every position [T] (float32):
    the dense model's logits (given, e.g. from a cache, or computed here), and the routed
    model replaying the trace's own decisions (forced weights), so a generation is measured
    on exactly what it did."""
    import torch

    from metaattn_viz.routing.model import kl_per_token

    ids = list(trace.token_ids)
    if not ids:
        raise ValueError("nothing to measure: the trace has no tokens")
    x = torch.tensor([ids])
    dense = routed.dense_logits(x)[0] if dense_logits is None else dense_logits
    forced = [
        torch.from_numpy(np.ascontiguousarray(trace.weights[layer]))[None] for layer in range(trace.n_layers)
    ]  # [1, T, 3] per layer
    res = routed.prefill(x, trace.settings, trace.controller, forced_weights=forced, use_cache=False)
    return kl_per_token(dense, res.logits[0]).float().cpu().numpy()


def _tokens_update(trace: RoutingTrace, sent: int) -> dict:
    update: dict[str, Any] = {
        "kind": "tokens",
        "ids": list(trace.token_ids[sent:]),
        "tokens": list(trace.tokens[sent:]),
        "arrays": tuple(getattr(trace, f)[:, sent:] for f in _GROWN),
        "timings": dict(trace.timings),
        "output_text": trace.output_text,
        "truncated": trace.truncated,
        "n_prompt_tokens": trace.n_prompt_tokens,
    }
    if sent == 0:
        update["cls"] = type(trace)
        update["header"] = {
            f.name: getattr(trace, f.name) for f in dataclasses.fields(trace) if f.name not in _CHANGING
        }
    return update


def generate(
    model: str,
    prompt: str,
    settings: RoutingSettings,
    max_new_tokens: int,
    controller: str,
    sampling,
    chat: bool,
    max_context: int | None,
    quality: bool,
) -> Generator[dict, None, None]:
    """Prefill and decode `prompt` on the model bound as `model` (routing.generation.stream;
    `sampling` a routing.generation.Sampling), then with `quality` measure the quality meter;
    yields the updates of the module docstring. Stopping is closing this generator."""
    routed = _routed(model)
    stream = routed.stream(
        prompt, settings, max_new_tokens, controller, sampling=sampling, chat=chat, max_context=max_context
    )
    trace, sent = None, 0
    with contextlib.closing(stream):  # a close (a stop) here closes the stream, and its session
        for trace in stream:
            yield _tokens_update(trace, sent)
            sent = trace.n_tokens
    if trace is None:
        raise RuntimeError("the stream produced no trace")
    yield {"kind": "end", "timings": dict(trace.timings), "output_text": trace.output_text}
    if quality and trace.n_tokens > 1:
        kl, error = None, None
        try:
            kl = quality_kl(routed, trace)
        except Exception as exc:  # the generation itself succeeded: keep it
            log.exception("quality (dense shadow) pass failed")
            error = f"{type(exc).__name__}: {exc}"
        yield {"kind": "quality", "kl": kl, "error": error}


def _generate_in_worker(*args, **kwargs) -> Generator[dict, None, None]:
    """``generate`` (its arguments) as it runs in a ZeroGPU worker: what it raises is yielded
    as a ``failure`` (module docstring). A stop (GeneratorExit) passes through."""
    try:
        yield from generate(*args, **kwargs)
    except Exception as exc:
        yield failure(exc)


def gpu_seconds(
    model: str,
    prompt: str,
    settings: RoutingSettings,
    max_new_tokens: int,
    controller: str,
    sampling,
    chat: bool,
    max_context: int | None,
    quality: bool,
) -> int:
    """The GPU time `generate` asks for on ZeroGPU (zerogpu.estimate_seconds), from its own
    arguments: the prompt's UTF-8 bytes bound its tokens (a byte-level token covers at least
    one byte), capped at the context; the first generation of this process also pays for
    compiling the kernels."""
    prompt_tokens = len(prompt.encode("utf-8"))
    if max_context:
        prompt_tokens = min(prompt_tokens, max_context)
    extra = QUALITY_PASSES if quality else 0
    return zerogpu.estimate_seconds(max_new_tokens, prompt_tokens, extra, cold=not _warm)


def mark_warm() -> None:
    """A GPU generation finished: later ones need no compile time (gpu_seconds)."""
    global _warm
    _warm = True


class _OnGpu:
    """``fn`` under ``spaces.GPU`` (zerogpu.on_gpu), decorated at import (ZeroGPU reports
    its GPU functions at start-up), and decorated again, as a fresh copy, after a model was
    bound once a GPU function had been called: ``spaces`` keeps its workers per decorated
    function, so the copy gets a fresh worker that knows every bound model (module
    docstring)."""

    def __init__(self, fn: Callable[..., Any], duration: Callable[..., int]):
        self._fn, self._duration = fn, duration
        self._epoch = _epoch
        self._decorated = zerogpu.on_gpu(fn, duration=duration)
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        global _called
        with _lock:
            if self._epoch != _epoch:
                fn = self._fn
                copy = types.FunctionType(
                    fn.__code__, fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
                )
                copy.__kwdefaults__ = fn.__kwdefaults__
                self._decorated = zerogpu.on_gpu(functools.update_wrapper(copy, fn), duration=self._duration)
                self._epoch = _epoch
            _called = True
            decorated = self._decorated
        return decorated(*args, **kwargs)


def run(task, model: str, *args, passes: int = 1, tokens: int = 0) -> dict:
    """``task(routed, *args)`` on the model bound as `model`, in a ZeroGPU worker: the page's
    analyses (quality, re-route, sweep, attention view) on the GPU. Returns
    ``{"kind": "ok", "value": <its picklable result>}``, or the ``failure`` of what it raised
    (``on_device`` unpacks it). `task` is a module-level function (it travels by name);
    `passes` and `tokens` (the prefills it runs and the tokens of each) size the GPU time
    asked for (run_seconds)."""
    try:
        return {"kind": "ok", "value": task(_routed(model), *args)}
    except Exception as exc:
        return failure(exc)


def run_seconds(task, model: str, *args, passes: int = 1, tokens: int = 0) -> int:
    """The GPU time `run` asks for on ZeroGPU: `passes` prefills of `tokens` tokens."""
    return zerogpu.estimate_seconds(0, tokens, max(0, passes - 1), cold=not _warm)


# The GPU functions, decorated at import on ZeroGPU (ZeroGPU reports them at start-up);
# anywhere else the plain functions.
generate_on_gpu: Callable[..., Any]
run_on_gpu: Callable[..., Any]
if zerogpu.active():
    generate_on_gpu = _OnGpu(_generate_in_worker, gpu_seconds)
    run_on_gpu = _OnGpu(run, run_seconds)
else:
    generate_on_gpu, run_on_gpu = generate, run


def on_device(routed, task, *args, passes: int = 1, tokens: int = 0) -> Any:
    """``task(routed, *args)``: in a ZeroGPU worker when on ZeroGPU (the model bound first;
    what it raised there is raised again here), else right here."""
    if not zerogpu.active():
        return task(routed, *args)
    result = run_on_gpu(task, bind(routed), *args, passes=passes, tokens=tokens)
    if result.get("kind") == "error":
        raise_failure(result)
    return result["value"]


def apply(trace: RoutingTrace | None, update: dict) -> RoutingTrace:
    """The trace with `update` applied (the first "tokens" update creates it; later ones
    extend it in place, as the stream did): the receiving side of ``generate``. A
    ``failure`` (on ZeroGPU) raises what the worker raised."""
    kind = update.get("kind")
    if kind == "error":
        raise_failure(update)
    if kind == "tokens":
        if trace is None:
            if "header" not in update:
                raise ValueError("the first update of a generation must carry the trace's header")
            trace = update["cls"](**update["header"])
        trace.extend(update["ids"], update["tokens"], *update["arrays"])
        trace.truncated, trace.n_prompt_tokens = update["truncated"], update["n_prompt_tokens"]
    elif trace is None:
        raise ValueError(f"a {kind!r} update before the first tokens of the generation")
    elif kind == "quality":
        if update["kl"] is not None:
            trace.kl_to_dense = np.asarray(update["kl"], np.float32)
        return trace
    elif kind != "end":
        raise ValueError(f"unknown update kind {kind!r}")
    trace.timings.update(update["timings"])
    trace.output_text = update["output_text"]
    return trace


__all__ = [
    "WorkerError",
    "bind",
    "failure",
    "raise_failure",
    "generate",
    "generate_on_gpu",
    "gpu_seconds",
    "mark_warm",
    "apply",
    "quality_kl",
    "QUALITY_PASSES",
    "run",
    "run_on_gpu",
    "run_seconds",
    "on_device",
]
