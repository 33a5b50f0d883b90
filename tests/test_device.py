"""Where the routed model runs: device and dtype choices and their errors, the torch decode
path of any device or dtype (bfloat16 on the CPU included), and the whole model through
the Triton kernels (in Triton's interpreter on this CPU) against the CPU backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
# Triton picks interpreter or compiler when it is first imported: set the flag before that
# (as tests/test_kernels_triton.py does); if it came too late, a fresh process runs the tests.
_LATE = not CUDA and "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
if not CUDA and not _LATE:
    os.environ["TRITON_INTERPRET"] = "1"

from helpers import THREAD_ENV, pytest_in_fresh_interpreter, routed_tiny  # noqa: E402

from metaattn_viz.core.settings import RoutingSettings  # noqa: E402
from metaattn_viz.routing import device as device_mod  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
in_this_process = pytest.mark.skipif(_LATE, reason="triton imported before TRITON_INTERPRET was set")
no_cuda = pytest.mark.skipif(CUDA, reason="checks the machine without CUDA")


def _cli(*args, env=None, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "metaattn_viz", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, **THREAD_ENV, **(env or {})},
    )


# -- parsing and errors ------------------------------------------------------------------------
@pytest.mark.parametrize("spec", ["auto", "cpu", "cuda", "cuda:1", " CUDA:0 "])
def test_device_syntax_is_accepted(spec):
    assert device_mod.parse_device(spec) == spec.strip().lower()


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:x", "mps", ""])
def test_bad_devices_and_dtypes_name_the_choices(spec, monkeypatch):
    monkeypatch.delenv(device_mod.ENV_DEVICE, raising=False)
    if spec == "":  # empty means "not given": the default
        assert device_mod.parse_device(spec or None) == "auto"
        return
    with pytest.raises(ValueError, match=r"device must be one of auto\|cpu\|cuda\|cuda:N"):
        device_mod.parse_device(spec)
    with pytest.raises(ValueError, match="dtype must be one of auto, float32, bfloat16, float16"):
        device_mod.parse_dtype("float64")
    with pytest.raises(ValueError, match="backend must be one of"):
        device_mod.parse_backend("cuda")


def test_auto_and_the_environment(monkeypatch):
    monkeypatch.delenv(device_mod.ENV_DEVICE, raising=False)
    monkeypatch.delenv(device_mod.ENV_DTYPE, raising=False)
    p = device_mod.resolve()
    assert (p.device, p.dtype) == (("cuda:0", "bfloat16") if CUDA else ("cpu", "float32"))
    monkeypatch.setenv(device_mod.ENV_DEVICE, "cpu")
    monkeypatch.setenv(device_mod.ENV_DTYPE, "bfloat16")
    assert device_mod.resolve() == device_mod.Placement("cpu", "bfloat16")
    assert device_mod.resolve(None, "float16").dtype == "float16"  # an argument beats the env


@pytest.mark.parametrize(
    "capability, dtype",
    [((7, 5), "float16"), ((7, 0), "float16"), ((8, 0), "bfloat16"), ((9, 0), "bfloat16")],
)
def test_auto_dtype_on_a_gpu_without_bfloat16_is_float16(capability, dtype, monkeypatch):
    """auto on a GPU: bfloat16 from Ampere (8.0) on, float16 on older ones (a T4 is 7.5),
    which only emulate bfloat16; an explicit dtype is kept. The GPU is a stand-in: torch.cuda
    answers as a machine with that GPU would (the device asked about included)."""
    monkeypatch.delenv(device_mod.ENV_DEVICE, raising=False)
    monkeypatch.delenv(device_mod.ENV_DTYPE, raising=False)
    asked = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: asked.append(d) or capability)
    assert device_mod.resolve() == device_mod.Placement("cuda:0", dtype)
    assert device_mod.resolve("cuda:1") == device_mod.Placement("cuda:1", dtype)
    assert asked == ["cuda:0", "cuda:1"]
    assert device_mod.resolve("cuda", "bfloat16").dtype == "bfloat16"  # asked for: kept
    assert device_mod.resolve("cpu").dtype == "float32"


@no_cuda
def test_cuda_without_cuda_is_refused_naming_cuda():
    with pytest.raises(device_mod.DeviceUnavailable, match="CUDA"):
        device_mod.resolve("cuda")
    with pytest.raises(ValueError, match="CUDA"):  # the CLI exits 2 on ValueError
        device_mod.resolve("cuda:0", "float32")


@no_cuda
def test_triton_on_a_cpu_needs_the_interpreter(monkeypatch):
    cpu = device_mod.Placement("cpu", "float32")
    assert device_mod.resolve_backend("auto", cpu) == "cpu"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert device_mod.resolve_backend("triton", cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(device_mod.DeviceUnavailable, match="TRITON_INTERPRET=1"):
        device_mod.resolve_backend("triton", cpu)


@no_cuda
def test_route_cli_with_cuda_exits_2_naming_cuda():
    out = _cli("route", "--prompt", "x", "--device", "cuda", "--no-log", timeout=120)
    assert out.returncode == 2, out.stderr[-2000:]
    assert "CUDA" in out.stderr and "Traceback" not in out.stderr
    bad = _cli("route", "--prompt", "x", "--dtype", "float64", "--no-log", timeout=120)
    assert bad.returncode == 2 and "dtype must be one of" in bad.stderr


# -- the torch decode path: any device or dtype ---------------------------------------------------
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("hedge", ["off", "soft"])
def test_a_half_precision_model_on_the_cpu_streams_16_tokens(dtype, hedge):
    """A bfloat16 (transformers' default) or float16 model decodes on the CPU: the decode
    step takes the torch path (its numpy fast path is for float32 only)."""
    r = routed_tiny(seed=1, spread=30.0).place("cpu", dtype)
    assert next(r.model.parameters()).dtype == getattr(torch, dtype)
    assert r.runtime() == {"device": "cpu", "dtype": dtype, "backend": "cpu", "linear_map": "elu"}
    s = RoutingSettings(budget=0.5, hedge_policy=hedge, hedge_threshold=0.5, window=8, n_sink=2)
    steps = list(r.stream("half precision on a cpu ", s, max_new_tokens=16))
    trace = steps[-1]
    assert len(steps) == 17 and len(trace.token_ids) - trace.n_prompt_tokens == 16
    assert trace.routes.shape == (r.n_layers, len(trace.token_ids))
    assert np.isfinite(trace.lam).all() and np.isfinite(trace.concentration).all()
    if hedge == "off":  # (hedged decisions cost more than the budget can take back here)
        assert abs(trace.realized_cost - 0.5) < 0.1
    else:
        assert trace.hedged.any()


@pytest.mark.parametrize("scope", ["layer", "global"])
@pytest.mark.parametrize("target, hedge", [(0.3, "off"), (0.6, "soft"), (None, "soft"), (1.0, "off")])
def test_device_decisions_equal_the_python_fast_path(scope, target, hedge, monkeypatch):
    """The decode decisions a GPU makes (decide_step: tensors, lambda and its dual ascent
    on the device, records read once per token) are the CPU fast path's, token for token."""
    import metaattn_viz.routing.session as session_mod
    from metaattn_viz.routing.policies import BudgetPolicy

    r = routed_tiny(seed=1, spread=30.0)
    s = RoutingSettings(
        budget=target, scope=scope, hedge_policy=hedge, hedge_threshold=0.6, window=8, n_sink=2
    )
    prompt = "decoding the same text twice " * 2
    fast = r.route(prompt, s, max_new_tokens=20)
    monkeypatch.setattr(session_mod, "host_decode", lambda device, dtype: False)
    steps: list[int] = []
    original = BudgetPolicy.decide_step
    monkeypatch.setattr(
        BudgetPolicy,
        "decide_step",
        lambda self, layer, beta, position: steps.append(layer) or original(self, layer, beta, position),
    )
    dev = r.route(prompt, s, max_new_tokens=20)
    assert len(steps) == r.n_layers * 20  # every layer of every decode step
    assert dev.token_ids == fast.token_ids
    assert np.array_equal(dev.routes, fast.routes) and np.array_equal(dev.hedged, fast.hedged)
    assert np.allclose(dev.lam, fast.lam, atol=1e-5)
    assert np.allclose(dev.weights, fast.weights, atol=1e-6)
    if target not in (None, 1.0) and hedge == "off":  # (soft hedging pins lambda at its cap here)
        assert len(set(np.unique(dev.lam[:, dev.n_prompt_tokens :]))) > 1  # lambda moved


# -- the whole model through the Triton kernels ------------------------------------------------------
def _prefill_and_decode(r, ids, s, steps=8):
    """Prefill, then `steps` greedy decode steps: (prefill logits, step logits, prefill and
    decode records)."""
    res = r.prefill(ids, s, cache_capacity=ids.shape[1] + steps)
    logits = [res.logits[0, -1]]
    with torch.no_grad(), r.session(s, lam=res.lam) as sess:
        sess.lin_state = list(res.session.lin_state)
        for _ in range(steps):
            nxt = logits[-1].argmax().view(1, 1)
            logits.append(r.model(input_ids=nxt, past_key_values=res.cache).logits[0, -1])
        rec = sess.pop_records()
    return res.logits[0], torch.stack(logits), res.records, rec


def _smollm2_tiny():
    """SmolLM2-135M's architecture (the shipped config) at two layers, random weights."""
    from metaattn_viz.routing import loading
    from metaattn_viz.routing.model import RoutedModel

    loaded = loading.from_config(num_hidden_layers=2, seed=3)
    r = RoutedModel.from_loaded(loaded)
    with torch.no_grad():  # spread the untrained posteriors so that every expert is used
        for stack in r.controllers.values():
            for layer in stack.layers:
                layer.fc2.weight.mul_(30.0)
    return r


@in_this_process
@pytest.mark.parametrize("arch", ["llama", "smollm2"])
@pytest.mark.parametrize("hedge", ["off", "soft"])
def test_whole_model_through_triton_matches_the_cpu_backend(arch, hedge, monkeypatch):
    """Prefill plus 8 decode steps through the Triton kernels (interpreted on this CPU) give
    the CPU backend's logits within 1e-4 and its decisions. The decode steps take the path a
    GPU takes: the decision on the device (decide_step) and kernels.triton_decode."""
    import metaattn_kernels.triton_decode as triton_decode

    r = routed_tiny(seed=1, spread=30.0) if arch == "llama" else _smollm2_tiny()
    ids = torch.randint(0, 250, (1, 40), generator=torch.Generator().manual_seed(7))
    s = RoutingSettings(
        budget=0.5, scope="layer", hedge_policy=hedge, hedge_threshold=0.8, window=8, n_sink=2
    )
    want = _prefill_and_decode(r, ids, s.with_(backend="cpu"))
    calls = []
    real = triton_decode.decode_step_device
    spy = lambda *a, **kw: calls.append(1) or real(*a, **kw)  # noqa: E731
    monkeypatch.setattr(triton_decode, "decode_step_device", spy)
    got = _prefill_and_decode(r, ids, s.with_(backend="triton"))
    assert len(calls) == 8 * r.n_layers  # every decode step of every layer
    assert (got[0] - want[0]).abs().max() <= 1e-4
    assert (got[1] - want[1]).abs().max() <= 1e-4
    for a, b in ((got[2], want[2]), (got[3], want[3])):
        assert np.array_equal(a["routes"], b["routes"]) and np.array_equal(a["hedged"], b["hedged"])
    routes = set(want[2]["routes"].ravel().tolist()) | set(want[3]["routes"].ravel().tolist())
    assert len(routes) >= 2  # a real mix of experts ran
    if hedge == "soft":
        assert want[2]["hedged"].any()


@in_this_process
def test_budget_one_through_triton_equals_dense():
    """Budget 1 is the dense model with the Triton backend chosen, and so is every decision
    forced to full attention through the Triton kernels themselves."""
    from metaattn_kernels.dispatch import FULL, routes_to_weights

    r = routed_tiny(seed=2)
    ids = torch.randint(0, 250, (1, 33), generator=torch.Generator().manual_seed(3))
    dense = r.dense_logits(ids)
    s = RoutingSettings(budget=1.0, backend="triton")
    assert (r.prefill(ids, s).logits - dense).abs().max() <= 1e-4
    full = [routes_to_weights(torch.full((1, 33), FULL))] * r.n_layers
    forced = r.prefill(ids, s.with_(budget=0.5), forced_weights=full)
    assert (forced.logits - dense).abs().max() <= 1e-4
    steps = _prefill_and_decode(r, ids, s)
    with torch.no_grad():
        plain = r.model.generate(ids, max_new_tokens=8, do_sample=False, min_new_tokens=8)
    assert steps[1][:-1].argmax(-1).tolist() == plain[0, 33:].tolist()


@pytest.mark.skipif(not _LATE, reason="the interpreter runs in this process")
def test_triton_model_tests_in_a_fresh_interpreter():
    pytest_in_fresh_interpreter(__file__, "-k", "triton")


@pytest.mark.slow
@no_cuda
def test_route_cli_triton_gives_the_cpu_routes():
    """`TRITON_INTERPRET=1 metaattn-viz route --backend triton` on the real model routes as
    `--backend cpu`, and `--json` says where it ran."""
    common = ["route", "--prompt", "The capital of France is", "--json", "--no-log", "--scope", "layer"]
    cpu = _cli(*common, "--backend", "cpu")
    tri = _cli(*common, "--backend", "triton", env={"TRITON_INTERPRET": "1"}, timeout=900)
    assert cpu.returncode == 0 and tri.returncode == 0, (cpu.stderr + tri.stderr)[-3000:]
    a, b = json.loads(cpu.stdout), json.loads(tri.stdout)
    assert a["runtime"] == {"device": "cpu", "dtype": "float32", "backend": "cpu", "linear_map": "learned"}
    assert b["runtime"] == {"device": "cpu", "dtype": "float32", "backend": "triton", "linear_map": "learned"}
    assert a["routes"] == b["routes"] and a["tokens"] == b["tokens"]
    assert len(set(np.ravel(a["routes"]).tolist())) >= 2


# -- the GPU check runs on a bare CUDA machine -------------------------------------------------------
# what scripts/device_check.sh's machine has no copy of (it has torch, triton, transformers,
# numpy, scipy, pandas, pyarrow and safetensors)
BARE_MACHINE_LACKS = (
    "gradio",
    "gradio_client",
    "duckdb",
    "plotly",
    "accelerate",
    "gguf",
    "bertviz",
    "matplotlib",
)


def test_the_gpu_check_needs_no_web_or_store_packages():
    """scripts/device_check.sh's machine has no gradio, duckdb or plotly: nothing it imports
    (the check, the benchmarks, routing, the app's engine) may need them."""
    code = (
        "import sys\n"
        "import metaattn_viz.bench.gpu_check, metaattn_viz.bench.model, metaattn_viz.bench.attention\n"
        "import metaattn_viz.routing.model, metaattn_viz.routing.zerogpu, metaattn_viz.app.engine\n"
        "import metaattn_viz.app.requests\n"
        "bad = [m for m in ('gradio', 'duckdb', 'plotly') if m in sys.modules]\n"
        "sys.exit(f'imported {bad}' if bad else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]


@no_cuda
def test_the_gpu_check_refuses_a_machine_without_cuda_and_unknown_sections(tmp_path):
    from metaattn_viz.bench import gpu_check

    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert gpu_check.main(["--out", str(tmp_path), "--rehearse", "--only", "checks,speed"]) == 2
    assert not (tmp_path / "gpu_check.json").exists()


@no_cuda
def test_the_device_script_says_there_is_no_cuda_and_exits_2(tmp_path):
    """scripts/device_check.sh on a machine without a GPU: it records what it found (torch,
    triton and transformers versions) and stops with exit code 2 before running anything."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHON=sys.executable)
    out = subprocess.run(
        ["bash", str(ROOT / "scripts" / "device_check.sh")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "no CUDA device" in out.stderr
    found = (tmp_path / "gpu.txt").read_text()
    assert "torch " + torch.__version__ in found and "cuda False" in found
    assert not (tmp_path / "gpu_check.json").exists()


@pytest.mark.slow
def test_the_gpu_check_rehearses_every_section_on_the_cpu(tmp_path):
    """`gpu_check --rehearse`: the GPU acceptance's own code (checks, bench rows, the engine's
    stream) on the CPU through the Triton interpreter, so a GPU session is not the first run
    of it, with the packages the bare GPU machine lacks made unimportable (the engine once
    needed DuckDB with logging off). The timings mean nothing here; what must hold is every
    result the GPU run reads."""
    env = dict(os.environ, **THREAD_ENV, HF_HUB_OFFLINE="1")
    env.pop("TRITON_INTERPRET", None)  # the rehearsal sets it itself
    bare = (
        "import runpy, sys\n"
        f"for name in {BARE_MACHINE_LACKS!r}:\n"
        "    sys.modules[name] = None  # import fails, as where it is not installed\n"
        "runpy.run_module('metaattn_viz.bench.gpu_check', run_name='__main__', alter_sys=True)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", bare, "--rehearse", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
        env=env,
    )
    assert out.returncode == 0, (out.stdout + out.stderr)[-4000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["rehearsal"] is True and report["sizes"]["attention"] == 128
    checks = report["checks"]
    assert checks["ok"] and len(checks["cases"]) == 4
    assert all(c["same_tokens"] and c["decode_max_abs_err"] <= 1e-4 for c in checks["cases"])
    assert checks["bfloat16_streamed_tokens"] == 16
    bench = report["bench"]
    attention = [r for r in bench if r["kind"] == "attention"]
    assert {r["mix"] for r in attention} == {"local", "linear", "mix"}
    assert all(r["backend"] == "triton" and r["dtype"] == "bfloat16" for r in attention)
    model = [r for r in bench if r["kind"] == "model"]
    assert [r["case"] for r in model] == ["routing-overhead", "prefill", "decode", "decode"]
    assert all(r["backend"] == "triton" and r["routed_ms"] > 0 for r in model)
    assert [r["seq_len"] for r in model if r["case"] == "decode"] == [256, 300]
    engine = report["engine"]
    assert engine["ok"] and engine["new_tokens"] == 64
    assert engine["runtime"]["backend"] == "triton" and engine["runtime"]["dtype"] == "bfloat16"


def test_the_shipped_config_builds_smollm2s_architecture():
    from metaattn_viz.routing import loading

    loaded = loading.from_config(num_hidden_layers=1)
    cfg = loaded.model.config
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (
        576,
        9,
        3,
        64,
    )
    assert cfg.vocab_size == 49152 and loaded.loaded_from == "config"
    assert loaded.tokenizer.decode(loaded.tokenizer("héllo")["input_ids"]) == "héllo"


def test_zerogpu_is_a_no_op_elsewhere(monkeypatch):
    from metaattn_viz.routing import zerogpu

    monkeypatch.delenv(zerogpu.ENV_ZEROGPU, raising=False)

    def work(n):
        yield from range(n)

    assert not zerogpu.active() and zerogpu.on_gpu(work, duration=30) is work
    assert zerogpu.estimate_seconds(0) == zerogpu.MIN_SECONDS
    assert zerogpu.estimate_seconds(10_000) == zerogpu.MAX_SECONDS
    assert zerogpu.estimate_seconds(64) < zerogpu.estimate_seconds(256)
