"""The Triton kernels against the reference twins, at awkward sizes.

Without a GPU they run in the Triton interpreter (TRITON_INTERPRET=1, set by the
module fixture before the kernel modules are imported) on CPU tensors; with CUDA the
same tests run on the GPU. The interpreter is slow: shapes stay small and the grid of
cases is a cover (every size, window, sink count and mix appears), not a product.
"""

from __future__ import annotations

import os
import re
import sys

import pytest
import torch
import torch.nn.functional as F

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# Triton picks interpreter or compiler when a @triton.jit function is defined (its own
# standard library included), so the flag must be set before triton is first imported.
_LATE = DEV == "cpu" and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if DEV == "cpu" and not _LATE:
    os.environ["TRITON_INTERPRET"] = "1"
triton = pytest.importorskip("triton")

from helpers import (  # noqa: E402
    MIXES,
    SIZES,
    TOL,
    WINDOWS,
    RefusingGPU,
    make_qkv,
    make_weights,
    max_err,
    pytest_in_fresh_interpreter,
    stand_in_gpu,
)

in_this_process = pytest.mark.skipif(
    _LATE,
    reason="triton was imported before TRITON_INTERPRET could be set; "
    "test_triton_in_fresh_interpreter runs these tests",
)


@pytest.mark.skipif(not _LATE, reason="the interpreter runs in this process")
def test_triton_in_fresh_interpreter():
    """Fallback: run this file in a fresh process with TRITON_INTERPRET=1 from the start."""
    pytest_in_fresh_interpreter(__file__, timeout=600)


def run(backend, q, k, v, w, **kw):
    from metaattn_kernels.dispatch import routed_attention

    return routed_attention(q, k, v, w, backend=backend, **kw)


def to_dev(*xs):
    return [x.to(DEV) for x in xs]


# a cover of (mix, size, window/sinks): each mix meets each size once, windows cycle
CASES = [
    (mix, *size, *WINDOWS[(i + j) % len(WINDOWS)])
    for i, mix in enumerate(MIXES)
    for j, size in enumerate(SIZES)
]


@in_this_process
@pytest.mark.parametrize("mix,tq,tk,window,n_sink", CASES)
def test_triton_matches_reference(mix, tq, tk, window, n_sink):
    q, k, v = to_dev(*make_qkv(tq=tq, tk=tk, seed=tq + tk))
    w = make_weights(mix, 2, tq).to(DEV)
    kw = dict(window=window, n_sink=n_sink)
    y_ref, (s_ref, z_ref) = run("reference", q, k, v, w, **kw)
    y, (s, z) = run("triton", q, k, v, w, **kw)
    assert y.shape == q.shape and y.dtype == q.dtype
    assert max_err(y, y_ref) <= TOL
    assert max_err(s, s_ref) <= 1e-3 and max_err(z, z_ref) <= 1e-3


@in_this_process
def test_triton_full_equals_sdpa_causal():
    q, k, v = to_dev(*make_qkv(b=1, tq=130))
    y, _ = run("triton", q, k, v, make_weights("full", 1, 130).to(DEV), window=8, n_sink=4)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert max_err(y, want) <= TOL


@in_this_process
def test_triton_local_with_window_covering_t_equals_full():
    q, k, v = to_dev(*make_qkv(b=1, tq=17, tk=130))
    y_local, _ = run("triton", q, k, v, make_weights("local", 1, 17).to(DEV), window=130, n_sink=4)
    y_full, _ = run("triton", q, k, v, make_weights("full", 1, 17).to(DEV), window=130, n_sink=4)
    assert max_err(y_local, y_full) <= TOL


@in_this_process
def test_triton_decode_steps_with_linear_state_equal_prefill():
    t, t0 = 24, 17
    q, k, v = to_dev(*make_qkv(tq=t))
    w = make_weights("hedged", 2, t).to(DEV)
    kw = dict(window=8, n_sink=4)
    y_all, state_all = run("triton", q, k, v, w, **kw)
    y0, state = run("triton", q[:, :, :t0], k[:, :, :t0], v[:, :, :t0], w[:, :t0], **kw)
    ys = [y0]
    for i in range(t0, t):
        yi, state = run(
            "triton",
            q[:, :, i : i + 1],
            k[:, :, : i + 1],
            v[:, :, : i + 1],
            w[:, i : i + 1],
            linear_state=state,
            **kw,
        )
        ys.append(yi)
    assert max_err(torch.cat(ys, dim=2), y_all) <= 1e-5
    assert max_err(state[0], state_all[0]) <= 1e-4 and max_err(state[1], state_all[1]) <= 1e-4
    y_ref, _ = run("reference", q, k, v, w, **kw)
    assert max_err(y_all, y_ref) <= TOL


@in_this_process
def test_triton_uneven_batch_odd_head_dim_no_gqa():
    """Batch rows with different route counts (one with no linear row), D = 24, Hq == Hkv."""
    q, k, v = make_qkv(b=3, hq=4, hkv=4, tq=70, d=24)
    w = make_weights("random", 3, 70)
    w[1] = torch.tensor([0.0, 0.0, 1.0])
    w[2, 3:] = torch.tensor([1.0, 0.0, 0.0])
    q, k, v, w = to_dev(q, k, v, w)
    y_ref, _ = run("reference", q, k, v, w, window=16, n_sink=4)
    y, _ = run("triton", q, k, v, w, window=16, n_sink=4)
    assert max_err(y, y_ref) <= TOL


@in_this_process
def test_triton_non_contiguous_inputs():
    q, k, v = to_dev(*make_qkv(tq=17, tk=30))
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    kt = k.transpose(2, 3).contiguous().transpose(2, 3)
    w = make_weights("hedged", 2, 17).to(DEV)
    wt = w.transpose(0, 1).contiguous().transpose(0, 1)
    assert not qt.is_contiguous() and not kt.is_contiguous() and not wt.is_contiguous()
    y_ref, _ = run("reference", q, k, v, w, window=8, n_sink=4)
    y, _ = run("triton", qt, kt, v, wt, window=8, n_sink=4)
    assert max_err(y, y_ref) <= TOL


@in_this_process
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_half_precision(dtype):
    q, k, v = to_dev(*make_qkv(tq=17, dtype=dtype))
    w = make_weights("hedged", 2, 17).to(DEV)
    y_ref, _ = run("reference", q, k, v, w, window=8, n_sink=4)
    y, _ = run("triton", q, k, v, w, window=8, n_sink=4)
    assert y.dtype == dtype and max_err(y, y_ref) <= 2e-2


@in_this_process
def test_triton_rejects_float64():
    q, k, v = to_dev(*make_qkv(tq=5, dtype=torch.float64))
    with pytest.raises(ValueError, match="float64"):
        run("triton", q, k, v, make_weights("random", 2, 5).to(DEV), window=8, n_sink=4)


class _OnDevice:
    """What `resolve_backend` reads of a tensor: where it lives, its dtype and whether it
    wants grads."""

    def __init__(self, is_cuda: bool, requires_grad: bool = False, dtype: torch.dtype = torch.float32):
        self.is_cuda, self.requires_grad, self.dtype = is_cuda, requires_grad, dtype


class _CudaStandIn(torch.Tensor):
    """A CPU tensor that says it is on CUDA: what `routed_attention` reads to choose "auto"
    (so the choice runs without a GPU); every computation stays on the CPU."""

    @property
    def is_cuda(self):
        return True


def _no_triton(monkeypatch):
    """Make a launch of the Triton path fail the test: "auto" must not take it."""
    import metaattn_kernels.triton_routed as routed

    def refuse(*args, **kw):
        raise AssertionError("backend='auto' took the Triton path")

    monkeypatch.setattr(routed, "routed_attention_triton", refuse)


def test_auto_backend_is_triton_for_cuda_tensors_unless_they_need_gradients():
    """The choice of "auto", on stand-ins for CUDA tensors (so it runs without a GPU): triton
    for CUDA tensors, the CPU kernels for CPU ones and for a call that must backpropagate
    (the Triton kernels have no backward); other names are returned as given."""
    import metaattn_kernels.dispatch as kernels

    cuda, cpu = _OnDevice(True), _OnDevice(False)
    assert kernels.resolve_backend("auto", cuda, cuda, cuda) == "triton"
    assert kernels.resolve_backend("auto", cpu, cpu, cpu) == "cpu"
    wants_grad = _OnDevice(True, requires_grad=True)
    for tensors in ((cuda, cuda, wants_grad), (wants_grad, cuda, cuda)):
        assert kernels.resolve_backend("auto", *tensors) == "cpu"
        with torch.no_grad():  # no graph is built: nothing needs a backward
            assert kernels.resolve_backend("auto", *tensors) == "triton"
    for name in ("triton", "cpu", "reference"):
        assert kernels.resolve_backend(name, cpu, cpu, cpu) == name
        assert kernels.resolve_backend(name, cuda, cuda, cuda) == name


def test_auto_backend_is_cpu_for_dtypes_triton_does_not_take(monkeypatch):
    """float64 on CUDA: "auto" takes the cpu path (the Triton kernels would refuse it), and
    the call returns the reference's answer instead of raising."""
    import metaattn_kernels.dispatch as kernels

    assert kernels.resolve_backend("auto", *[_OnDevice(True, dtype=torch.float64)] * 3) == "cpu"
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        assert kernels.resolve_backend("auto", *[_OnDevice(True, dtype=dtype)] * 3) == "triton"
    _no_triton(monkeypatch)
    q, k, v = (x.as_subclass(_CudaStandIn) for x in make_qkv(b=1, tq=9, dtype=torch.float64))
    w = make_weights("hedged", 1, 9).double()
    assert q.is_cuda
    y, _ = run("auto", q, k, v, w, window=4, n_sink=1)
    assert y.dtype == torch.float64
    assert max_err(y, run("reference", q, k, v, w, window=4, n_sink=1)[0]) <= 1e-10


@pytest.mark.parametrize("needs", ["linear_state", "features"])
def test_auto_backend_is_cpu_when_a_linear_state_or_features_need_gradients(monkeypatch, needs):
    """On CUDA, "auto" reads every input a gradient may flow to, not only q, k, v and the
    weights: a linear state (or precomputed features) that requires grad takes the cpu path,
    whose output keeps the graph; a linear state's gradients are the reference's."""
    from helpers import random_map

    from metaattn_kernels.reference import linear_state

    _no_triton(monkeypatch)
    q, k, v = make_qkv(b=1, hq=4, hkv=2, tq=9, tk=14, d=8, seed=2)
    w = make_weights("hedged", 1, 9)
    kw = dict(window=4, n_sink=1)
    if needs == "linear_state":
        leaves = [x.clone().requires_grad_() for x in linear_state(k[:, :, :5], v[:, :, :5])]
        kw["linear_state"] = tuple(leaves)
    else:
        fm = random_map(4, 2, 8)
        leaves = [fm.query(q).requires_grad_(), fm.key(k[:, :, 5:]).requires_grad_()]
        kw.update(feature_map=fm, features=tuple(x.as_subclass(_CudaStandIn) for x in leaves))
    cuda = [x.as_subclass(_CudaStandIn) for x in (q, k, v, w)]
    y, _ = run("auto", *cuda, **kw)
    assert y.requires_grad
    y.sum().backward()
    assert all(x.grad is not None and bool(x.grad.abs().sum() > 0) for x in leaves)
    if needs == "linear_state":
        ref_leaves = [x.detach().clone().requires_grad_() for x in leaves]
        y_ref, _ = run("reference", q, k, v, w, **{**kw, "linear_state": tuple(ref_leaves)})
        y_ref.sum().backward()
        assert max_err(y, y_ref) <= TOL
        for a, b in zip(leaves, ref_leaves, strict=True):
            assert max_err(a.grad, b.grad) <= 1e-4


@in_this_process
def test_triton_refuses_inputs_that_require_grad():
    """backend="triton" has no backward: an input that requires grad is refused by name
    (its output would carry no graph, and a loss would silently lose the attention terms);
    under torch.no_grad() the same call runs."""
    from helpers import random_map

    from metaattn_kernels.reference import linear_state

    q, k, v = to_dev(*make_qkv(b=1, hq=4, hkv=2, tq=5, tk=8, d=8))
    w = make_weights("hedged", 1, 5).to(DEV)
    fm = random_map(4, 2, 8).to(DEV)
    inputs = [q, k, v, w, *linear_state(k[:, :, :3], v[:, :, :3]), fm.query(q), fm.key(k[:, :, 3:])]
    names = [
        "q",
        "k",
        "v",
        "weights",
        "linear_state S",
        "linear_state z",
        "features phi(q)",
        "features phi(k)",
    ]
    for i, name in enumerate(names):
        args = [x.clone().requires_grad_(j == i) for j, x in enumerate(inputs)]
        kw = dict(window=4, n_sink=1, linear_state=tuple(args[4:6]), feature_map=fm, features=tuple(args[6:]))
        with pytest.raises(ValueError, match=rf"backend='triton'.*{re.escape(name)} requires grad"):
            run("triton", *args[:4], **kw)
        with torch.no_grad():
            y, _ = run("triton", *args[:4], **kw)
        assert not y.requires_grad and y.shape == q.shape


@pytest.mark.skipif(DEV != "cuda", reason="auto picks triton only for CUDA tensors")
def test_auto_backend_is_triton_on_cuda():
    """The same choice on real CUDA tensors."""
    import metaattn_kernels.dispatch as kernels

    q, k, v = to_dev(*make_qkv(tq=5))
    assert kernels.resolve_backend("auto", q, k, v) == "triton"


@in_this_process
def test_triton_linear_takes_smaller_tiles_where_the_gpu_refuses_the_larger(monkeypatch):
    """Head dim 128 on a GPU that refuses the linear kernel's [128, 128] state tile at every
    pipeline stage: `launch` goes on to half the query slots and half the output columns
    per program over a grid with a column axis, remembers that, and the results are the
    reference's (a prefill with hedged rows, then one row with the linear state)."""
    import metaattn_kernels.triton_routed as routed

    refusing = RefusingGPU(routed.routed_linear_kernel, lambda c: c["BLOCK_DV"] == c["BLOCK_D"])
    monkeypatch.setattr(routed, "routed_linear_kernel", refusing)
    stand_in_gpu(monkeypatch)  # the ladder runs on a CPU too
    q, k, v = to_dev(*make_qkv(b=1, hq=4, hkv=2, tq=40, d=128, seed=3))
    w = make_weights("hedged", 1, 40).to(DEV)
    kw = dict(window=8, n_sink=4)
    y_ref, state_ref = run("reference", q, k, v, w, **kw)
    y, state = run("triton", q, k, v, w, **kw)
    assert max_err(y, y_ref) <= TOL and max_err(state[0], state_ref[0]) <= 1e-3
    # the whole-tile plan at 3, 2 and 1 stages, then the smaller one at 3 stages
    prefill = refusing.launches
    assert [(c["BLOCK_M"], c["BLOCK_DV"], st) for _, c, st in prefill] == [
        (64, 128, 3),
        (64, 128, 2),
        (64, 128, 1),
        (32, 64, 3),
    ]
    assert (
        prefill[-1][0][0] == 2 * prefill[0][0][0] and prefill[-1][0][2] == 2
    )  # twice the blocks, 2 column blocks
    refusing.launches = []
    again, _ = run("triton", q, k, v, w, **kw)  # remembered: the smaller plan straight away
    assert [(c["BLOCK_M"], c["BLOCK_DV"], st) for _, c, st in refusing.launches] == [(32, 64, 3)]
    assert torch.equal(again, y)
    # one query row after a state, hedged over all three experts (its query heads packed in
    # 16 slots: not halved below tl.dot's least), against the reference's
    refusing.launches = []
    _, before = run("reference", q[:, :, :39], k[:, :, :39], v[:, :, :39], w[:, :39], **kw)
    last = (q[:, :, 39:], k, v, torch.full((1, 1, 3), 1 / 3, device=DEV))
    y_last, _ = run("triton", *last, linear_state=before, **kw)
    assert [(c["BLOCK_M"], c["BLOCK_DV"]) for _, c, _ in refusing.launches][-1] == (16, 64)
    assert max_err(y_last, run("reference", *last, linear_state=before, **kw)[0]) <= TOL


def _on_a_refusing_gpu(monkeypatch, kernel: str, refuse, mix: str, **shape) -> list:
    """Route random q, k, v of `shape` (make_qkv's arguments, b and tq among them) mixed as
    `mix` through the Triton path on a stand-in GPU on which kernels.triton_routed's
    `kernel` refuses what `refuse` says is too large; the output must be the reference's.
    Returns the launches of `kernel` tried: (grid, constexprs, stages)."""
    import metaattn_kernels.triton_routed as routed

    refusing = RefusingGPU(getattr(routed, kernel), refuse)
    monkeypatch.setattr(routed, kernel, refusing)
    stand_in_gpu(monkeypatch)
    q, k, v = to_dev(*make_qkv(**shape))
    w = make_weights(mix, shape["b"], shape["tq"]).to(DEV)
    kw = dict(window=8, n_sink=4)
    y, _ = run("triton", q, k, v, w, **kw)
    assert max_err(y, run("reference", q, k, v, w, **kw)[0]) <= TOL
    return refusing.launches


@in_this_process
def test_triton_softmax_takes_fewer_keys_per_step_where_the_gpu_refuses_more(monkeypatch):
    """Head dim 128 in float32 on a GPU that refuses the softmax experts' 64-key tiles at
    every stage (a T4): the launch goes on with 32 keys per inner step over the same grid,
    and full and local rows (with sinks) are the reference's."""
    launches = _on_a_refusing_gpu(
        monkeypatch,
        "routed_softmax_kernel",
        lambda c: c["BLOCK_N"] == 64,
        "random",
        b=1,
        hq=4,
        hkv=2,
        tq=70,
        d=128,
        seed=4,
    )
    assert [(c["BLOCK_N"], st) for _, c, st in launches] == [(64, 3), (64, 2), (64, 1), (32, 3)]
    assert len({g for g, _, _ in launches}) == 1  # the same grid


@in_this_process
def test_triton_linear_halves_its_tiles_again_at_head_dim_256(monkeypatch):
    """Head dim 256 on a GPU of 99 KiB per block refuses the linear kernel's state tile of
    128 columns as well: the next plan halves again (16 query slots, 64 columns, 4 column
    blocks), and the output is the reference's."""
    launches = _on_a_refusing_gpu(
        monkeypatch,
        "routed_linear_kernel",
        lambda c: c["BLOCK_DV"] > 64,
        "hedged",
        b=1,
        hq=2,
        hkv=1,
        tq=20,
        d=256,
        seed=5,
    )
    plans = [(c["BLOCK_M"], c["BLOCK_DV"], grid[2]) for grid, c, _ in launches]
    assert plans[0] == (32, 256, 1) and plans[-1] == (16, 64, 4)
    assert (16, 128, 2) in plans  # the plan between, refused in its turn
