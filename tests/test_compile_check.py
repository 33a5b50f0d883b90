"""The Triton kernels compiled for real GPUs on this machine, which has none
(kernels/compile_only.py, kernels/triton_launch.py, kernels/triton_probe.py,
metaattn_viz/bench/compile_check.py), and the routed model's choice of backend where a GPU's
shared memory does not fit the kernels (routing/device.py, fit_backend).

Compiling needs Triton's compiled kernels, not its interpreter, so those checks run in a
fresh process without TRITON_INTERPRET. Every kernel is built by Triton's LLVM and the
ptxas its wheel ships, into Triton's own cache: a later run reads the builds back (their
key covers the kernel's source, its specialisation, the options and Triton's version) and
checks them the same way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import ROOT, routed_tiny

from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing import device as device_mod

PROBE = r"""
import json, torch
from metaattn_viz.paths import ensure_kernels_importable
ensure_kernels_importable()
from metaattn_kernels.compile_only import MAX_SHARED, compile_only
from metaattn_kernels.triton_probe import misfit
from metaattn_kernels.triton_routed import routed_attention_triton

cpu, out = torch.device("cpu"), {}
with compile_only(75) as launches:  # a T4: 64 KiB of shared memory per block
    out["t4_d256"] = misfit(8, 4, 256, torch.bfloat16, cpu, window=64, n_sink=4)  # Gemma 2's heads
    del launches[:]
    out["t4_d128_half"] = misfit(32, 8, 128, torch.float16, cpu, window=64, n_sink=4)
    out["t4_half"] = [(x.kernel, x.num_stages, x.shared, x.grid) for x in launches]
    del launches[:]
    out["t4_d128_f32"] = misfit(32, 8, 128, torch.float32, cpu, window=64, n_sink=4)
    out["t4_f32"] = [(x.kernel, x.num_stages, x.shared, x.grid) for x in launches]
with compile_only(86) as launches:  # an A10G, 99 KiB: a float32 prefill at head dim 128
    q, k, v = (torch.randn(1, h, 72, 128) for h in (32, 8, 8))
    routed_attention_triton(q, k, v, torch.full((1, 72, 3), 1 / 3), window=64, n_sink=4)
out["a10g_d128_f32"] = [(x.kernel, x.num_stages, x.shared) for x in launches]
with compile_only(90) as launches:  # an H100 / H200: SmolLM2 in bfloat16, as the GPU check runs it
    out["h100_misfit"] = misfit(9, 3, 64, torch.bfloat16, cpu, window=64, n_sink=4)
out["h100"] = [(x.kernel, x.num_stages, x.shared, x.regs, x.spill_bytes, x.grid) for x in launches]
out["max_shared"] = {str(k): v for k, v in MAX_SHARED.items()}
print(json.dumps(out))
"""


def _run(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)


def _compiled_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONWARNINGS"] = "ignore"
    return env


@pytest.fixture(scope="module")
def compiled():
    r = _run([sys.executable, "-c", PROBE], _compiled_env())
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_a_t4_cannot_hold_head_dim_256_and_the_probe_says_why(compiled):
    assert compiled["t4_d256"] is not None and "shared memory" in compiled["t4_d256"]
    assert "65536" in compiled["t4_d256"]  # the T4's limit, as Triton reports it


def test_a_t4_holds_head_dim_128_in_float16_with_smaller_linear_tiles(compiled):
    """In 16-bit every launch fits a T4: the routed linear kernel's in half the query slots
    and half the output columns per program (a column axis of 2 in its grid)."""
    assert compiled["t4_d128_half"] is None
    launches = compiled["t4_half"]
    assert all(shared <= compiled["max_shared"]["75"] for _, _, shared, _ in launches)
    linear = [grid for kernel, _, _, grid in launches if kernel == "routed_linear_kernel"]
    assert linear and all(grid[2] == 2 for grid in linear)


def test_a_t4_holds_head_dim_128_in_float32_with_fewer_keys_per_softmax_step(compiled):
    """In float32 the softmax experts' 64-key tiles need 80 KiB: they take 32 keys per step."""
    assert compiled["t4_d128_f32"] is None
    launches = compiled["t4_f32"]
    assert all(shared <= compiled["max_shared"]["75"] for _, _, shared, _ in launches)
    kinds = {kernel for kernel, *_ in launches}
    assert {"routed_softmax_kernel", "decode_softmax_kernel", "routed_linear_kernel"} <= kinds


def test_fewer_pipeline_stages_where_three_do_not_fit(compiled):
    launches = compiled["a10g_d128_f32"]
    limit = compiled["max_shared"]["86"]
    assert {k for k, *_ in launches} >= {"routed_softmax_kernel", "routed_linear_kernel", "mix_kernel"}
    assert all(shared <= limit for _, _, shared in launches)
    assert any(stages < 3 for _, stages, _ in launches)  # three stages need more than 99 KiB here


def test_every_kernel_of_the_routed_model_builds_for_an_h100(compiled):
    assert compiled["h100_misfit"] is None
    launches = compiled["h100"]
    names = {x[0] for x in launches}
    assert names == {
        "routed_softmax_kernel",
        "linear_chunk_state_kernel",
        "routed_linear_kernel",
        "mix_kernel",
        "decode_softmax_kernel",
    }
    limit = compiled["max_shared"]["90"]
    for kernel, stages, shared, regs, spills, grid in launches:
        assert stages == 3 and 0 <= shared <= limit, kernel
        assert regs is not None and 0 < regs <= 255 and spills == 0, kernel  # read from the cubin
        assert len(grid) == 3 and min(grid) >= 1


def test_the_compile_check_command(tmp_path):
    out = tmp_path / "cc.json"
    cmd = [sys.executable, "-m", "metaattn_viz.bench.compile_check", "--arch", "90", "--dtype", "bfloat16"]
    r = _run([*cmd, "--layout", "gpu-check-tiny", "--map", "elu", "--json", str(out)], _compiled_env())
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] and report["failed"] == 0 and len(report["results"]) == 1
    res = report["results"][0]
    assert (res["arch"], res["gpu"], res["dtype"], res["layout"], res["map"]) == (
        90,
        "H100, H200",
        "bfloat16",
        "gpu-check-tiny",
        "elu",
    )
    assert len(res["launches"]) == 10 and "sm_90 bfloat16 gpu-check-tiny" in r.stdout
    bad = _run([*cmd[:3], "--arch", "99"])
    assert bad.returncode == 2 and "--arch 99" in bad.stderr
    env = dict(_compiled_env(), TRITON_INTERPRET="1")
    interp = _run(cmd, env)
    assert interp.returncode == 2 and "TRITON_INTERPRET" in interp.stderr


def test_compile_only_refuses_bad_targets_and_the_interpreter(monkeypatch):
    from metaattn_kernels.compile_only import compile_only

    with pytest.raises(ValueError, match="arch must be one of"):
        with compile_only(61):
            pass
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET"):
        with compile_only(90):
            pass


@pytest.mark.parametrize(
    "regs, threads", [(0, 1024), (32, 1024), (64, 1024), (128, 512), (255, 256), (168, 384)]
)
def test_threads_a_block_may_have_for_its_registers(regs, threads):
    """The CUDA occupancy rules: registers per thread in multiples of 8, per warp in
    multiples of 256, 65,536 per block, at most 1,024 threads."""
    from metaattn_kernels.compile_only import max_threads

    assert max_threads(regs) == threads


# -- the routed model's backend where the kernels do not fit -----------------------------------
CUDA = device_mod.Placement("cuda:0", "bfloat16")  # a T4 refuses the kernels at head dim 256
T4_REASON = "shared memory: needs 98304 bytes per block, the GPU has 65536"  # (triton_probe.misfit's words)


def _misfit(monkeypatch, reason):
    import metaattn_kernels.triton_probe as probe

    calls = []

    def fake(*args, **kw):
        calls.append((args, kw))
        return reason

    monkeypatch.setattr(probe, "misfit", fake)
    monkeypatch.setattr(device_mod, "_MISFITS", {})
    monkeypatch.setattr("metaattn_viz.routing.zerogpu.active", lambda: False)
    return calls


def test_auto_keeps_to_pytorch_on_a_gpu_the_kernels_do_not_fit(monkeypatch):
    calls = _misfit(monkeypatch, T4_REASON)
    backend, notice = device_mod.fit_backend("auto", CUDA, (8, 4, 256))
    assert backend == "cpu" and "PyTorch path" in notice and "65536" in notice and "dim 256" in notice
    args, kw = calls[0]
    assert args[:4] == (8, 4, 256, torch.bfloat16) and str(args[4]) == "cuda:0"
    assert device_mod.fit_backend("auto", CUDA, (8, 4, 256)) == (backend, notice)
    assert len(calls) == 1  # tried once per process: the probe compiles kernels


def test_triton_named_on_such_a_gpu_is_refused(monkeypatch):
    _misfit(monkeypatch, T4_REASON)
    with pytest.raises(device_mod.DeviceUnavailable, match="backend 'triton'.*do not fit"):
        device_mod.fit_backend("triton", CUDA, (8, 4, 256))


def test_kernels_that_fit_or_are_not_asked_for_leave_the_backend(monkeypatch):
    calls = _misfit(monkeypatch, None)
    fm = object()
    assert device_mod.fit_backend("auto", CUDA, (9, 3, 64), fm) == ("auto", None)
    assert [kw["feature_map"] for _, kw in calls] == [None, fm]  # the elu + 1 kernels, then the learned
    calls.clear()
    assert device_mod.fit_backend("cpu", CUDA, (9, 3, 64)) == ("cpu", None)
    assert device_mod.fit_backend("auto", device_mod.Placement("cpu", "float32"), (9, 3, 64)) == (
        "auto",
        None,
    )
    assert calls == []  # nothing tried where Triton is not the backend


def test_place_reports_the_backend_kept(monkeypatch):
    r = routed_tiny()
    seen = []

    def fake(backend, placement, heads, fm):
        seen.append((backend, placement, heads))
        return "cpu", "the kernels do not fit (test)"

    monkeypatch.setattr(device_mod, "fit_backend", fake)
    r.place("cpu", "float32", "auto")
    cfg = r.model.config
    assert seen == [
        (
            "auto",
            device_mod.Placement("cpu", "float32"),
            (cfg.num_attention_heads, cfg.num_key_value_heads, r.head_dim),
        )
    ]
    assert r.backend == "cpu" and r.backend_notice == "the kernels do not fit (test)"
    assert r.runtime()["backend"] == "cpu"
    assert r.runtime()["backend_notice"] == "the kernels do not fit (test)"  # route --json, /status
    assert "backend_notice" not in r.runtime(RoutingSettings(backend="reference"))  # not what was asked


def test_the_report_table_says_what_fitted_per_gpu():
    from metaattn_viz.bench.compile_check import markdown_table

    def res(arch, dtype, ok=True, stages=(3,), error=None):
        launches = [{"num_stages": s} for s in stages]
        r = {
            "arch": arch,
            "dtype": dtype,
            "layout": "llama-d128",
            "map": "elu",
            "ok": ok,
            "launches": launches,
        }
        return r if ok else {**r, "error": error}

    refused = "OutOfResources: out of resource: shared memory, Required: 98304, Hardware limit: 65536."
    split = {"kernel": "routed_linear_kernel", "num_stages": 3, "grid": [2, 32, 2]}
    table = markdown_table(
        [
            res(75, "bfloat16", ok=False, stages=(3,), error=refused),
            res(86, "bfloat16", stages=(3, 1, 2)),
            res(90, "bfloat16"),
            {**res(90, "bfloat16", stages=(2,)), "map": "learned"},  # one cell: both maps, the least stages
            res(75, "float16", stages=(3,)),
            {**res(75, "float16"), "launches": [split]},  # the linear kernel's smaller plan
        ]
    ).splitlines()
    assert table[0] == "| GPU | llama-d128, bfloat16 | llama-d128, float16 |"
    assert table[2:] == [
        "| sm_75 (T4, 64 KiB) | no: 96 KiB | ok, smaller linear tiles |",
        "| sm_86 (A10G, 99 KiB) | ok, 1 stage | not compiled |",
        "| sm_90 (H100, H200, 227 KiB) | ok, 2 stages | not compiled |",
    ]


def test_what_counts_as_a_defect():
    """Exit code 1 for a build error anywhere, or the app's model refused; a layout of another
    model refused for shared memory is what the routed model meets on the PyTorch path."""
    from metaattn_viz.bench.compile_check import SHIPPED_LAYOUT, is_defect

    refused = {"ok": False, "error": "OutOfResources: out of resource: shared memory, Required: 98304"}
    assert not is_defect({**refused, "layout": "llama-d128"})
    assert is_defect({**refused, "layout": SHIPPED_LAYOUT})
    assert is_defect({"ok": False, "layout": "llama-d128", "error": "CompilationError: at 12:4: ..."})
    assert not is_defect({"ok": True, "layout": SHIPPED_LAYOUT})
