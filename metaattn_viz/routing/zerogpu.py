"""ZeroGPU (the shared GPUs of Hugging Face Spaces): run a request's GPU work inside
``@spaces.GPU``, for a duration estimated from the request; anywhere else, do nothing.

On ZeroGPU the Space's main process has no GPU. The model is placed on "cuda" at start-up
(``spaces`` makes that lazy), and a function decorated with ``spaces.GPU`` runs in a
forked worker that holds a GPU for at most its ``duration`` seconds; what it returns (or
yields: a generator streams each yield back as it comes) is pickled to the main process,
and state it changes there does not survive. So the caller decorates only the pure GPU
work (prefill + decode, yielding traces), and keeps the run log, the job registry and any
cache in the main process, fed by what comes back.

Supported there (Spaces docs, mid-2026): Python 3.10 or 3.12 and torch 2.1 up to about
2.11; this project needs torch >= 2.11 (pyproject.toml), so a ZeroGPU Space pins torch 2.11
and uses no torch API newer than it. ``torch.compile`` does not run on ZeroGPU.

Never: import gradio or the store, or hold state that the forked worker would need.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from typing import Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])

ENV_ZEROGPU = "SPACES_ZERO_GPU"  # set by Spaces on ZeroGPU hardware
MIN_SECONDS, MAX_SECONDS = 10, 120
# Start-up of the worker plus a prefill (seconds), and decoding (seconds per new token):
# generous for SmolLM2-135M on an H200 slice, where decoding runs at tens of tokens/s.
BASE_SECONDS = 8.0
SECONDS_PER_TOKEN = 0.1


def active() -> bool:
    """Whether this process runs on ZeroGPU with the ``spaces`` package importable."""
    if os.environ.get(ENV_ZEROGPU, "").strip().lower() not in ("1", "true", "yes"):
        return False
    return importlib.util.find_spec("spaces") is not None


def estimate_seconds(max_new_tokens: int, prompt_tokens: int = 0) -> int:
    """The GPU time to ask for a request: start-up and prefill, plus its tokens, clipped to
    [MIN_SECONDS, MAX_SECONDS] (a longer request must not hold the shared GPU longer)."""
    need = BASE_SECONDS + SECONDS_PER_TOKEN * max(0, int(max_new_tokens)) + prompt_tokens / 20000
    return int(min(max(need, MIN_SECONDS), MAX_SECONDS))


def on_gpu(fn: F, duration: Callable[..., int] | int | None = None) -> F:
    """``fn`` under ``spaces.GPU`` on ZeroGPU (``duration``: seconds, or a function of
    ``fn``'s arguments returning them; None: the ``spaces`` default); ``fn`` itself
    anywhere else."""
    if not active():
        return fn
    import spaces

    gpu = spaces.GPU  # type: ignore[attr-defined]  # (no stubs)
    decorated = gpu(fn) if duration is None else gpu(fn, duration=duration)
    return functools.wraps(fn)(decorated)  # type: ignore[return-value]
