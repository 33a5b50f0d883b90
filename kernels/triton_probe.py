"""Whether the Triton kernels fit a GPU for one head layout and dtype, found by trying.

What a kernel build needs in shared memory depends on the head dim, the dtype and the GPU
(kernels/triton_launch.py tries fewer pipeline stages first, then smaller tiles where a
launch site offers them). Where even that does not fit (head dim 256 on a T4),
Triton refuses the launch with OutOfResources before it runs.
`routed_launches` makes each kind of launch the routed model makes (a prefill with every
expert and hedged rows, a one-row step with a linear state, a decode step on the device) on
a few tokens of the given layout and device; `misfit` says what Triton refused when one is
refused (None when all fit). What a build needs in shared memory depends on the layout, the
dtype and the constexprs, not on the number of tokens, so a layout that fits here fits a
long text.
metaattn_viz/bench/compile_check.py makes the same launches for GPUs that are not here.

Never: choose a backend (the routed model does: metaattn_viz/routing/model.py) or import
metaattn_viz.
"""

from __future__ import annotations

import torch
from triton.runtime.errors import OutOfResources

from metaattn_kernels.feature_maps import FeatureMap

# more than one 64-key block, and not a multiple of 16 (Triton specialises integer
# arguments on that: this takes the variant with masked edges)
PROBE_TOKENS = 72


def routed_launches(
    q_heads: int,
    kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    window: int,
    n_sink: int,
    feature_map: FeatureMap | None = None,
) -> None:
    """Make each kind of launch the routed model makes on a GPU, on PROBE_TOKENS tokens of
    this layout: a prefill (hard-routed rows of every expert and hedged rows), one query row
    with a given linear state (the step that packs a kv head's query heads into one block)
    and a decode step with its weights on the device. Raises what Triton raises."""
    from metaattn_kernels.triton_decode import decode_step_device
    from metaattn_kernels.triton_routed import routed_attention_triton

    t = PROBE_TOKENS
    g = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(1, h, t, head_dim, generator=g).to(device, dtype) for h in (q_heads, kv_heads, kv_heads)
    )
    w = torch.softmax(torch.randn(1, t, 3, generator=g), -1)  # hedged rows
    w[0, ::2] = torch.nn.functional.one_hot(torch.arange(0, t, 2) % 3, 3).float()  # hard rows, every expert
    w = w.to(device)
    local = dict(window=window, n_sink=n_sink, feature_map=feature_map)
    _, state = routed_attention_triton(q, k, v, w.to(dtype), **local)
    routed_attention_triton(q[:, :, -1:], k, v, w[:, -1:].to(dtype), linear_state=state, **local)
    decode_step_device(q[:, :, -1:], k, v, w[:, -1:], **local)


def misfit(*layout, **options) -> str | None:
    """None when every launch of `routed_launches` (same arguments) fits the GPU, else what
    Triton refused, in a line: "shared memory: needs 98304 bytes per block, the GPU has 65536"."""
    try:
        routed_launches(*layout, **options)
    except OutOfResources as e:
        unit = " bytes" if e.name == "shared memory" else ""
        return f"{e.name}: needs {e.required}{unit} per block, the GPU has {e.limit}"
    return None
