"""Compile the Triton kernels for a CUDA GPU on a machine that has none.

Triton's interpreter (TRITON_INTERPRET=1) runs the kernels' maths on CPU tensors, but it
never compiles them: what only a GPU build meets (a `tl.dot` shape or dtype the backend
refuses, more shared memory than the GPU has, more registers than a block may hold) stays
unseen until a GPU is at hand. Triton's compiler itself needs no GPU: given a target
(`GPUTarget("cuda", 90, 32)`) it lowers a kernel to PTX and, with the `ptxas` its wheel
ships, to a cubin.

`compile_only(arch)` installs a stand-in for Triton's CUDA driver that names that target:
every kernel launched inside it (on CPU tensors, through the same launch code the routed
model uses) is compiled for the GPU with the arguments' real specialisation, checked the
way Triton checks before a real launch (shared memory against the GPU's limit, threads
against what its registers allow), and recorded as a `Launch`; nothing runs, so outputs
stay unwritten. Register and spill counts come from the cubin (`cuobjdump -res-usage`).

The kernels must be compiled kernels: in a process where Triton was imported with
TRITON_INTERPRET=1 they are the interpreter's, and `compile_only` refuses.

Never: import metaattn_viz, or know which launches the routed model makes (the caller,
metaattn_viz/bench/compile_check.py, chooses them).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from metaattn_kernels.checks import triton_interpreted

# The most shared memory one block may use, in bytes (the CUDA programming guide's "maximum
# amount of shared memory per thread block", opt-in included), by compute capability.
MAX_SHARED = {75: 64 * 1024, 80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 120: 99 * 1024}
REGISTERS_PER_BLOCK = 65536  # the register file one block may use, every listed capability
MAX_THREADS = 1024
WARP = 32


@dataclass(frozen=True)
class Launch:
    """One kernel launch compiled for `arch`: its grid and what the GPU build needs.
    regs and spill_bytes are None where cuobjdump is not at hand."""

    kernel: str
    arch: int
    grid: tuple[int, int, int]
    num_warps: int
    num_stages: int
    shared: int
    regs: int | None
    spill_bytes: int | None


def max_threads(regs: int | None) -> int:
    """The most threads a block may have when each holds `regs` registers (allocated per
    thread in multiples of 8, per warp in multiples of 256), as the driver reports it."""
    if not regs:
        return MAX_THREADS
    per_warp = -(-(-(-regs // 8) * 8 * WARP) // 256) * 256
    return min(MAX_THREADS, (REGISTERS_PER_BLOCK // per_warp) * WARP)


def _cuobjdump() -> str | None:
    import triton.backends.nvidia as nvidia

    path = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    return path if os.path.exists(path) else None


def resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers per thread, local memory bytes per thread: spills) of a one-kernel cubin,
    from `cuobjdump -res-usage`; (None, None) where cuobjdump is not at hand."""
    tool = _cuobjdump()
    if tool is None:
        return None, None
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", out)
    local = re.search(r"LOCAL:(\d+)", out)
    return (int(regs.group(1)) if regs else None, int(local.group(1)) if local else None)


@dataclass(frozen=True)
class _Function:
    """What stands for a loaded kernel function: its cubin's resource usage."""

    regs: int | None
    spill_bytes: int | None


class _Utils:
    """The driver utilities Triton calls around a launch: device properties and loading a
    binary, here with the GPU's limits and the cubin's resource usage."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_device_properties(self, device):
        return {"max_shared_mem": MAX_SHARED[self.arch]}  # the one property Triton reads for a launch

    def load_binary(self, name, kernel, shared, device):
        regs, spills = resource_usage(kernel)
        return object(), _Function(regs, spills), regs or 0, spills or 0, max_threads(regs)

    def unload_module(self, module):
        pass


class _Launcher:
    """Triton's launcher for one compiled kernel: records the launch with the driver active
    at the time (a kernel compiled in an earlier `compile_only` block keeps its launcher)."""

    def __init__(self, src, metadata):
        self.metadata = metadata

    def __call__(self, gx, gy, gz, stream, function, *args):
        from triton.runtime.driver import driver

        active, md = driver.active, self.metadata
        if isinstance(active, _Driver):
            active.launches.append(
                Launch(
                    md.name,
                    active.arch,
                    (gx, gy, gz),
                    md.num_warps,
                    md.num_stages,
                    md.shared,
                    function.regs,
                    function.spill_bytes,
                )
            )


class _Driver:
    """A stand-in for Triton's CUDA driver: the target is `arch`, launches are recorded."""

    launcher_cls = _Launcher

    def __init__(self, arch: int, launches: list[Launch]):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, WARP)
        self.arch, self.launches = arch, launches
        self.utils = _Utils(arch)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return self.arch  # one device per target: Triton keeps its per-device caches apart

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")

    def get_device_interface(self):
        return torch.cuda

    def map_python_to_cpp_type(self, ty: str) -> str:
        from triton.backends.nvidia.driver import CudaDriver

        return CudaDriver.map_python_to_cpp_type(self, ty)

    def get_benchmarker(self):
        raise NotImplementedError("compile_only: nothing runs, nothing is timed")


@contextmanager
def compile_only(arch: int) -> Iterator[list[Launch]]:
    """Within the block, Triton launches compile for CUDA compute capability `arch` (75,
    80, 86, 89, 90 or 120) and are recorded in the yielded list instead of run. A launch that
    would fail on that GPU raises as Triton raises there (triton.runtime.errors.
    OutOfResources for shared memory or threads, a compilation error for the rest)."""
    if arch not in MAX_SHARED:
        raise ValueError(f"arch must be one of {sorted(MAX_SHARED)}, got {arch}")
    if triton_interpreted():
        raise RuntimeError("compile_only needs compiled kernels: run it without TRITON_INTERPRET=1")
    from triton.runtime.driver import driver

    launches: list[Launch] = []
    previous = driver._active  # None where no driver was ever made (a machine without a GPU)
    driver.set_active(_Driver(arch, launches))
    try:
        yield launches
    finally:
        driver._active = previous
