"""Launch a Triton kernel with as much software pipelining as the GPU's shared memory allows.

Triton pipelines a kernel's loads over `num_stages` stages (3 by default on NVIDIA GPUs), and
each stage holds its own copy of the tiles in shared memory. A head dim of 128 in float32,
or in 16-bit on a GPU with 99 KiB per block (A10G, L4, RTX Pro 6000), needs more than the
GPU has, and Triton refuses the launch (OutOfResources) before anything runs. `launch` then builds the
kernel again with fewer stages, down to 1 (less overlap of loads with arithmetic, the same
results), and remembers what fitted for that kernel, device and specialisation, so later
launches (and a CUDA graph capture) go straight to it.

Fewer stages do not shrink everything: on a T4 (sm_75, 64 KiB, no asynchronous copies) the
linear expert's kernels need more than 64 KiB at head dim 128 whatever the stages, and the
last OutOfResources is raised (the routed model then keeps to the PyTorch path:
metaattn_viz/routing/device.py). `python -m metaattn_viz.bench.compile_check` compiles every
launch for each GPU without one (docs/benchmarks.md).

Under TRITON_INTERPRET=1 there is no shared memory and `num_stages` is ignored.
"""

from __future__ import annotations

from triton.runtime.errors import OutOfResources

from metaattn_kernels.checks import triton_interpreted

STAGES = (3, 2, 1)  # tried in this order; 3 is Triton's default on NVIDIA GPUs
_fitted: dict[tuple, int] = {}  # (kernel, device, specialisation) -> the stages that fitted


def _device() -> object:
    from triton.runtime.driver import driver

    return driver.active.get_current_device()


def launch(kernel, grid, *args, **constexprs) -> None:
    """kernel[grid](*args, **constexprs) at the most stages of STAGES that fit the GPU."""
    if triton_interpreted():
        kernel[grid](*args, **constexprs)
        return
    # what the build's shared memory depends on, cheaply (a decode step launches 2 per layer):
    # the kernel, the GPU, the inputs' dtype (the first argument is a tensor at every launch
    # site) and the constexprs (each call site passes them in one order)
    key = (kernel, _device(), args[0].dtype, tuple(constexprs.values()))
    start = _fitted.get(key, STAGES[0])  # what fitted last time (another specialisation may need fewer)
    tries = [s for s in STAGES if s <= start]
    for stages in tries:
        try:
            kernel[grid](*args, num_stages=stages, **constexprs)
        except OutOfResources:
            if stages == tries[-1]:
                raise
            continue
        _fitted[key] = stages
        return
