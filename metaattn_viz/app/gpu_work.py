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
- ``{"kind": "quality", "kl": [T] or None, "error": None or a message}`` if asked.

``apply`` rebuilds the trace from them on the receiving side. On ZeroGPU
(routing/zerogpu.py) ``generate_on_gpu`` is ``generate`` under ``@spaces.GPU``, decorated
when this module is imported (ZeroGPU wants its GPU functions known at start-up), with a
duration estimated from the request (``gpu_seconds``): it runs in a forked worker, each
update is pickled back as it is produced, and closing the generator in the main process
stops the worker at its next yield. Anywhere else the decorator is the identity and the
same code runs in the calling thread. The model travels by name: ``bind`` registers it in
a module-level table in the main process before the first call, and a forked worker
inherits the table (ZeroGPU moves the weights onto the GPU there, if the model was placed
on "cuda" before the Space launched).

Never: log runs, touch the job registry or the dense-logits cache (the main process keeps
them, fed by the updates), import gradio or the store.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import weakref
from collections.abc import Generator
from typing import Any

import numpy as np

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


def bind(routed) -> str:
    """Register `routed` for the GPU work under its name (returned). Called in the main
    process before the calls that name it, so that a worker forked later inherits it."""
    _MODELS[routed.name] = routed
    return routed.name


def _routed(model: str):
    routed = _MODELS.get(model)
    if routed is None:
        raise RuntimeError(
            f"the GPU work has no model {model!r}: bind it before the first call (on ZeroGPU "
            "a GPU worker knows only the models bound before it started)"
        )
    return routed


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


# Decorated once, at import (ZeroGPU registers its GPU functions at start-up).
generate_on_gpu = zerogpu.on_gpu(generate, duration=gpu_seconds)


def run(task, model: str, *args, passes: int = 1, tokens: int = 0) -> Any:
    """``task(routed, *args)`` on the model bound as `model`, returning its (picklable)
    result: the page's analyses (quality, re-route, sweep, attention view) on the GPU.
    `task` is a module-level function (it travels by name); `passes` and `tokens` (the
    prefills it runs and the tokens of each) size the GPU time asked for (run_seconds)."""
    return task(_routed(model), *args)


def run_seconds(task, model: str, *args, passes: int = 1, tokens: int = 0) -> int:
    """The GPU time `run` asks for on ZeroGPU: `passes` prefills of `tokens` tokens."""
    return zerogpu.estimate_seconds(0, tokens, max(0, passes - 1), cold=not _warm)


run_on_gpu = zerogpu.on_gpu(run, duration=run_seconds)


def on_device(routed, task, *args, passes: int = 1, tokens: int = 0) -> Any:
    """``task(routed, *args)``: in a ZeroGPU worker when on ZeroGPU (the model bound first),
    else right here."""
    if not zerogpu.active():
        return task(routed, *args)
    return run_on_gpu(task, bind(routed), *args, passes=passes, tokens=tokens)


def apply(trace: RoutingTrace | None, update: dict) -> RoutingTrace:
    """The trace with `update` applied (the first "tokens" update creates it; later ones
    extend it in place, as the stream did): the receiving side of ``generate``."""
    kind = update.get("kind")
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
    "bind",
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
