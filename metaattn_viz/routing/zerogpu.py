"""ZeroGPU (the shared GPUs of Hugging Face Spaces): run a request's GPU work inside
``@spaces.GPU``, for a duration estimated from the request; anywhere else, do nothing.

On ZeroGPU the Space's main process has no GPU. The model is placed on "cuda" at start-up,
in the thread that imported ``spaces`` (its CUDA emulation makes that lazy), and a function
decorated with ``spaces.GPU`` runs in a forked worker that holds a GPU for at most its
``duration`` seconds; its arguments and what it returns (or yields: a generator streams each
yield back as it comes) are pickled between the processes, and state it changes there does
not survive. So the caller decorates only the pure GPU work (app/gpu_work.py: prefill and
decode, yielding compact updates) and keeps the run log, the job registry and any cache in
the main process, fed by what comes back. Closing the generator in the main process tells
the worker to stop at its next yield (that is how a stop reaches it).

Supported there (the Hub's docs/hub/spaces-zerogpu.md as of 2026-07-21, read 2026-12-05):
torch 2.8.0, 2.9.1, 2.10.0 and 2.11.0, Python 3.12.12 or 3.10.13, a half NVIDIA RTX Pro 6000
Blackwell (48 GB) by default. This project needs torch >= 2.11 (pyproject.toml), so a
ZeroGPU Space pins torch 2.11.0 and the code uses no torch API newer than it;
``torch.compile`` does not run on ZeroGPU.

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
# The torch releases ZeroGPU accepts (module docstring); spaces/requirements-zerogpu.txt
# pins one of them that this project supports (tests/test_zerogpu.py checks it).
TORCH_VERSIONS = ("2.8.0", "2.9.1", "2.10.0", "2.11.0")
MIN_SECONDS, MAX_SECONDS = 10, 120
# Start-up of the worker plus a prefill (seconds), decoding (seconds per new token), a whole
# pass over a text (tokens per second), and the first call of a process (Triton compiles
# its kernels inside it): guesses, generous for SmolLM2-135M; nothing measured on ZeroGPU.
BASE_SECONDS = 8.0
SECONDS_PER_TOKEN = 0.1
PASS_TOKENS_PER_S = 20000
COLD_START_SECONDS = 30.0


def active() -> bool:
    """Whether this process runs on ZeroGPU with the ``spaces`` package importable: the
    variable read exactly as ``spaces`` (0.51.3, ``spaces/config.py``) reads it, "1", "t" or
    "true" in any case and nothing else (not " true": ``spaces`` would not decorate then,
    and the app must not expect it to)."""
    value = os.environ.get(ENV_ZEROGPU)
    if value is None or value.lower() not in ("1", "t", "true"):
        return False
    return importlib.util.find_spec("spaces") is not None


def estimate_seconds(
    max_new_tokens: int, prompt_tokens: int = 0, extra_passes: int = 0, cold: bool = False
) -> int:
    """The GPU time to ask for a request: start-up and prefill, its new tokens, and
    ``extra_passes`` whole passes over prompt and new tokens (the quality meter makes two),
    plus COLD_START_SECONDS for the first call (``cold``); clipped to [MIN_SECONDS,
    MAX_SECONDS] (a longer request must not hold the shared GPU longer)."""
    new, prompt = max(0, int(max_new_tokens)), max(0, int(prompt_tokens))
    need = BASE_SECONDS + SECONDS_PER_TOKEN * new + prompt / PASS_TOKENS_PER_S
    need += max(0, int(extra_passes)) * (prompt + new) / PASS_TOKENS_PER_S
    need += COLD_START_SECONDS if cold else 0.0
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
