"""Launch a Triton kernel with as much software pipelining as the GPU's shared memory allows.

Triton pipelines a kernel's loads over `num_stages` stages (3 by default on NVIDIA GPUs), and
each stage holds its own copy of the tiles in shared memory. A head dim of 128 in float32,
or in 16-bit on a GPU with 99 KiB per block (A10G, L4, RTX Pro 6000), needs more than the
GPU has, and Triton refuses the launch (OutOfResources) before anything runs. `launch` then builds the
kernel again with fewer stages, down to 1 (less overlap of loads with arithmetic, the same
results), and remembers what fitted for that kernel, device and specialisation, so later
launches (and a CUDA graph capture) go straight to it.

Fewer stages do not shrink everything: on a T4 (sm_75, 64 KiB, no asynchronous copies) the
routed linear kernel's [128, 128] float32 state tile needs more than 64 KiB at head dim 128
whatever the stages. A launch site may therefore name `smaller` plans, tiles that need
less, which `launch` tries in turn, again from 3 stages down, and remembers:
kernels/triton_routed.py halves the linear kernel's query slots and output columns per
program over a grid with more programs (twice at head dim 256), and the softmax kernels
(there and in kernels/triton_decode.py) take half the keys per inner step over the same
grid. Where nothing fits (head dim 256 on a T4, whose linear chunk states alone need
96 KiB) the last OutOfResources is raised, and the routed model keeps to the PyTorch path
(metaattn_viz/routing/device.py).
`python -m metaattn_viz.bench.compile_check` compiles every launch for each GPU without one
(docs/benchmarks.md).

Under TRITON_INTERPRET=1 there is no shared memory: `num_stages` and `smaller` are ignored
(tests/test_kernels_triton.py stands in a refusing GPU to run the smaller plans there).
"""

from __future__ import annotations

from collections.abc import Sequence

from triton.runtime.errors import OutOfResources

from metaattn_kernels.checks import triton_interpreted

STAGES = (3, 2, 1)  # tried in this order; 3 is Triton's default on NVIDIA GPUs
# (kernel, device, specialisation) -> (the plan, the stages) that fitted: 0 is the given tiles,
# then each of `smaller`
_fitted: dict[tuple, tuple[int, int]] = {}


def _device() -> object:
    from triton.runtime.driver import driver

    return driver.active.get_current_device()


def fewer_keys(grid, block_n: int, head_block: int) -> list[tuple]:
    """The plan both softmax kernels (kernels/triton_routed.py, kernels/triton_decode.py)
    offer as `smaller` at head dims from 128 on: half the keys per inner step over the same
    grid (their programs' rows and outputs do not depend on it; a decode split of whole
    64-key blocks is one of whole 32-key blocks too). Nothing below 128, which always fits."""
    return [(grid, {"BLOCK_N": block_n // 2})] if head_block >= 128 else []


def launch(kernel, grid, *args, smaller: Sequence[tuple] = (), **constexprs) -> None:
    """kernel[grid](*args, **constexprs) at the most stages of STAGES that fit the GPU; where
    none fits, each of ``smaller`` in turn, (grid, the constexprs it changes): smaller tiles
    over a larger grid, again at the most stages that fit. Raises the last OutOfResources
    when nothing fits."""
    if triton_interpreted():
        kernel[grid](*args, **constexprs)
        return
    # what the build's shared memory depends on, cheaply (a decode step launches 2 per layer):
    # the kernel, the GPU, the inputs' dtype (the first argument is a tensor at every launch
    # site) and the constexprs (each call site passes them in one order)
    key = (kernel, _device(), args[0].dtype, tuple(constexprs.values()))
    plans = [(grid, constexprs)] + [(g, {**constexprs, **changed}) for g, changed in smaller]
    # from what fitted last time (another specialisation may need fewer stages)
    first_plan, first_stages = _fitted.get(key, (0, STAGES[0]))
    tries = [
        (i, stages)
        for i in range(first_plan, len(plans))
        for stages in STAGES
        if i > first_plan or stages <= first_stages
    ]
    for n, (i, stages) in enumerate(tries):
        g, c = plans[i]
        try:
            kernel[g](*args, num_stages=stages, **c)
        except OutOfResources:
            if n == len(tries) - 1:
                raise
            continue
        _fitted[key] = (i, stages)
        return
