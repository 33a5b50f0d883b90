"""Where the routed model runs: the device, the dtype and the attention backend, resolved
once from what was asked (``--device``/``--dtype``/``--backend``, or the environment
variables ``METAATTN_DEVICE``/``METAATTN_DTYPE``) and what this machine has
(docs/method.md, "Decoding").

- device: ``auto`` (CUDA when torch sees a GPU, else the CPU), ``cpu``, ``cuda`` or
  ``cuda:N``. CUDA asked for where there is none is refused (``DeviceUnavailable``, a
  ``ValueError`` whose message names CUDA: the CLI exits 2 on it).
- dtype: ``auto`` (on CUDA bfloat16, or float16 on a GPU older than Ampere (T4, V100),
  which has no bfloat16 arithmetic of its own and only emulates it; float32 on the CPU),
  ``float32``, ``bfloat16`` or ``float16``. Only CPU float32 takes the numpy decode fast
  path; every other combination decodes through torch on the device (routing/session.py).
- backend (``--backend``, ``METAATTN_BACKEND``): the routed model's default for settings
  that leave it at "auto"; "auto" itself is ``triton`` on CUDA and ``cpu`` otherwise, and
  ``triton`` on the CPU needs the Triton interpreter (``TRITON_INTERPRET=1``). On a GPU
  whose shared memory the kernels' builds do not fit for the model's head layout and dtype
  (head dim 256 on a T4: ``fit_backend`` tries them), "auto" becomes ``cpu``, the PyTorch
  path, with a notice saying why, and ``triton`` named explicitly is refused.

Syntax checks need no torch (the CLI validates before loading anything); availability
checks import it. Never: move a model or load one (model.py does), or choose routes.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from metaattn_kernels.experts import BACKENDS

ENV_DEVICE = "METAATTN_DEVICE"
ENV_DTYPE = "METAATTN_DTYPE"
ENV_BACKEND = "METAATTN_BACKEND"
DEVICES_HELP = "auto|cpu|cuda|cuda:N"
DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


class DeviceUnavailable(ValueError):
    """The device asked for is not on this machine (or the backend cannot run on it)."""


@dataclass(frozen=True)
class Placement:
    """A resolved device and dtype, by name: ``device`` "cpu" or "cuda:N", ``dtype`` one of
    DTYPES other than "auto"."""

    device: str
    dtype: str

    @property
    def torch_device(self) -> Any:
        import torch

        return torch.device(self.device)

    @property
    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)

    @property
    def is_cuda(self) -> bool:
        return self.device.startswith("cuda")


def _asked(spec: str | None, env: str) -> tuple[str, str]:
    """What was asked and where it came from: (the value, "" for a flag or an argument,
    whose caller names it; "<VARIABLE>: " for the environment; "auto" where neither)."""
    if spec is not None:
        return spec, ""
    raw = os.environ.get(env)
    return (raw, f"{env}: ") if raw else ("auto", "")


def parse_device(spec: str | None) -> str:
    """The device asked for (None: ``METAATTN_DEVICE``, else "auto"), checked for syntax only;
    a bad value from the environment is refused naming the variable."""
    raw, source = _asked(spec, ENV_DEVICE)
    value = str(raw).strip().lower()
    if not _DEVICE_RE.match(value):
        raise ValueError(f"{source}device must be one of {DEVICES_HELP}, got {raw!r}")
    return value


def parse_dtype(spec: str | None) -> str:
    """The dtype asked for (None: ``METAATTN_DTYPE``, else "auto"), checked for syntax only."""
    raw, source = _asked(spec, ENV_DTYPE)
    value = str(raw).strip().lower()
    if value not in DTYPES:
        raise ValueError(f"{source}dtype must be one of {', '.join(DTYPES)}, got {raw!r}")
    return value


def parse_backend(spec: str | None) -> str:
    """The backend asked for (None: ``METAATTN_BACKEND``, else "auto"), checked for syntax only."""
    raw, source = _asked(spec, ENV_BACKEND)
    value = str(raw).strip().lower()
    if value not in BACKENDS:
        raise ValueError(f"{source}backend must be one of {', '.join(BACKENDS)}, got {raw!r}")
    return value


def resolve(device: str | None = None, dtype: str | None = None) -> Placement:
    """The placement for what was asked on this machine (module docstring)."""
    import torch

    from metaattn_viz.routing import zerogpu

    dev, dt = parse_device(device), parse_dtype(dtype)
    lazy = zerogpu.active()  # ZeroGPU: the main process places on "cuda", a worker gets the GPU
    has_cuda = lazy or torch.cuda.is_available()
    if dev == "auto":
        dev = "cuda" if has_cuda else "cpu"
    if dev.startswith("cuda") and lazy:
        dev = "cuda:0"
    elif dev.startswith("cuda"):
        if not has_cuda:
            raise DeviceUnavailable(
                f"device {dev!r} asks for CUDA, but torch {torch.__version__} sees no CUDA device "
                "on this machine (use --device cpu or auto)"
            )
        index = int(dev.split(":")[1]) if ":" in dev else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceUnavailable(
                f"device {dev!r}: CUDA has only {torch.cuda.device_count()} device(s) here"
            )
        dev = f"cuda:{index}"
    if dt == "auto":
        if not dev.startswith("cuda"):
            dt = "float32"
        else:
            dt = "bfloat16" if lazy or native_bfloat16(dev) else "float16"
    return Placement(dev, dt)


BFLOAT16_SINCE = (8, 0)  # the first compute capability with bfloat16 in hardware (Ampere)


def native_bfloat16(device: str) -> bool:
    """Whether the GPU ``device`` ("cuda:N") computes in bfloat16 itself: compute capability
    8.0 or later. Older GPUs (a T4 is 7.5) only emulate it (torch.cuda.is_bf16_supported says
    True there too, counting emulation), so ``auto`` takes float16 there, which their tensor
    cores do compute. ZeroGPU's GPUs (H200, RTX Pro 6000) are all newer; its main process has no GPU to
    ask, and ``resolve`` does not."""
    import torch

    return torch.cuda.get_device_capability(device) >= BFLOAT16_SINCE


def placement_of(model) -> Placement:
    """The placement a model's parameters already have."""
    p = next(model.parameters())
    device = str(p.device) if p.device.type != "cuda" else f"cuda:{p.device.index or 0}"
    return Placement(device, str(p.dtype).removeprefix("torch."))


def triton_interpreted() -> bool:
    """Whether Triton runs in its interpreter (CPU tensors, slow: for tests)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def resolve_backend(backend: str, placement: Placement) -> str:
    """The kernel backend "auto" stands for on this placement (others as given), refusing
    Triton on a CPU without the interpreter. Agrees with kernels.dispatch.resolve_backend
    for inference tensors on that device."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "auto":
        return "triton" if placement.is_cuda else "cpu"
    if backend == "triton" and not placement.is_cuda and not triton_interpreted():
        raise DeviceUnavailable(
            "backend 'triton' needs a CUDA device, or TRITON_INTERPRET=1 to run the kernels "
            "in Triton's interpreter on the CPU (slow)"
        )
    return backend


def check_placement(device: str | None, dtype: str | None, backend: str | None) -> Placement:
    """The placement asked for, refused (DeviceUnavailable, ValueError) before anything is
    loaded, moved or routed: CUDA or Triton where they cannot run, an unknown name."""
    placement = resolve(device, dtype)
    resolve_backend(parse_backend(backend), placement)
    return placement


def fit_backend(
    backend: str, placement: Placement, heads: tuple[int, int, int], feature_map: Any = None
) -> tuple[str, str | None]:
    """(the default backend to keep, a notice or None) after trying the Triton kernels'
    launches for ``heads`` (query heads, kv heads, head dim) in the placement's dtype on its
    GPU, with the elu + 1 map and with ``feature_map`` where given
    (metaattn_kernels.triton_probe). Where they fit, or Triton is not what ``backend``
    resolves to on a GPU here, ``backend`` is kept. Where one does not, "auto" becomes
    "cpu" (the PyTorch path on the GPU) and the notice says why; "triton" raises
    DeviceUnavailable. ZeroGPU's main process has no GPU to try: it keeps ``backend``."""
    from metaattn_viz.routing import zerogpu

    if resolve_backend(backend, placement) != "triton" or not placement.is_cuda or zerogpu.active():
        return backend, None
    for fm in [None] + ([feature_map] if feature_map is not None else []):
        reason = _misfit(heads, placement, fm)
        if reason is not None:
            what = (
                f"the Triton kernels do not fit this GPU for {heads[0]}/{heads[1]} heads of dim "
                f"{heads[2]} in {placement.dtype} ({reason})"
            )
            if backend == "triton":
                raise DeviceUnavailable(f"backend 'triton': {what}; use --backend auto or cpu")
            return "cpu", f"{what}: attention runs on the PyTorch path (backend 'cpu') on {placement.device}"
    return backend, None


_MISFITS: dict[tuple, str | None] = {}  # what one process found: the probe compiles kernels


def _misfit(heads: tuple[int, int, int], placement: Placement, feature_map: Any) -> str | None:
    """metaattn_kernels.triton_probe.misfit for this layout and placement, once per process
    (the builds depend on the map's shapes, which the heads fix, not on its values)."""
    key = (heads, placement, feature_map is None)
    if key not in _MISFITS:
        from metaattn_kernels.triton_probe import misfit
        from metaattn_viz.core.settings import DEFAULTS

        _MISFITS[key] = misfit(
            *heads,
            placement.torch_dtype,
            placement.torch_device,
            window=DEFAULTS.window,
            n_sink=DEFAULTS.n_sink,
            feature_map=feature_map,
        )
    return _MISFITS[key]


def host_decode(device: Any, dtype: Any) -> bool:
    """Whether a decode step of tensors on this torch.device and dtype takes the
    plain-Python fast path (numpy controller, floats): CPU float32 only. Called per layer
    and token: kept to two comparisons."""
    global _FLOAT32
    if _FLOAT32 is None:  # torch.float32, looked up once (this module loads without torch)
        import torch

        _FLOAT32 = torch.float32
    return device.type == "cpu" and dtype is _FLOAT32


_FLOAT32: Any = None
