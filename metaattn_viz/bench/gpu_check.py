"""The GPU acceptance in one command (`python -m metaattn_viz.bench.gpu_check`, run by
scripts/device_check.sh): correctness of the routed model on CUDA against the CPU, then the
benchmark rows, then one generation through the app's engine, written as JSON to an output
folder.

It runs on a bare CUDA machine: torch, triton, transformers, numpy, scipy, pandas, pyarrow,
safetensors; no gradio, duckdb or plotly (tests/test_device.py checks the imports), no
network, no model file (SmolLM2-135M's architecture is built from the config the repository
ships, assets/models/smollm2-135m/config.json, with random weights: speed does not depend
on their values).

1. checks: a tiny Llama-style model, routed on CUDA in float32 with the Triton kernels (and
   the device-side decode decisions) against the same model on the CPU (float32, the numpy
   decode path): prefill logits, 8 greedy decode steps, routes, hedging off and soft, and
   budget 1.0 equal to the dense model; the decode decision and its attention run with
   torch.cuda.set_sync_debug_mode("error") (no host synchronisation); the same model in
   bfloat16 streams 16 tokens.
2. bench: the attention rows (T = 16384, bfloat16, Triton against SDPA/flash and
   FlexAttention) and the whole-model rows (SmolLM2 architecture, random weights, budget 0.3:
   routing overhead, a 16384-token prefill, decoding after 256 and 32768 tokens).
3. engine: one 64-token greedy generation through app.engine.Engine (no web layer), its
   tokens/s.

``--rehearse`` runs the same three sections on this machine's CPU, with the Triton kernels
through the interpreter (TRITON_INTERPRET=1, set here when triton is not imported yet), the
tiny model's architecture in place of SmolLM2's and small sizes (``SIZES``): a check of the
script's own code where there is no GPU (tests/test_device.py runs it), whose timings mean
nothing; its JSON says ``"rehearsal": true``.

Never: download anything, or write outside the output folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

from metaattn_viz.core.settings import RoutingSettings

PROMPT = "The routed model runs on the GPU with the Triton kernels, token after token, "
TOL_LOGITS = 1e-4  # float32, Triton (IEEE dots) against the CPU
# the bench section's lengths: (attention rows' T, whole-model prefill, long decode context)
SIZES = {"full": (16384, 16384, 32768), "quick": (4096, 4096, 4096), "rehearsal": (128, 128, 300)}
SECTIONS = ("checks", "bench", "engine")  # the module docstring's 1, 2 and 3, in that order


def _tiny_config():
    """The tiny model's architecture: Llama-style, grouped-query attention, RoPE."""
    import transformers

    return transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=96,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=1024,
        tie_word_embeddings=False,
    )


def _tiny(seed: int = 0):
    """A tiny routed model (``_tiny_config``), untrained controllers whose posteriors vary
    (so every expert is used)."""
    import transformers

    from metaattn_viz.routing import loading
    from metaattn_viz.routing.controller import KINDS, ControllerStack, config_for_model
    from metaattn_viz.routing.model import RoutedModel

    cfg = _tiny_config()
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    ctrl = {k: ControllerStack(config_for_model(model.config, k), seed=seed) for k in KINDS}
    with torch.no_grad():
        for stack in ctrl.values():
            for layer in stack.layers:
                layer.fc2.weight.mul_(30.0)
    return RoutedModel(model, loading.ByteTokenizer(), ctrl, "tiny-llama")


def _prefill_and_decode(r, ids: torch.Tensor, s: RoutingSettings, steps: int):
    """Prefill `ids`, then `steps` greedy decode steps: (logits [steps + 1] on the CPU, the
    decode records, the tokens)."""
    res = r.prefill(ids, s, cache_capacity=ids.shape[1] + steps)
    logits, tokens = [res.logits[0, -1].float().cpu()], []
    with torch.no_grad(), r.session(s, lam=res.lam) as sess:
        sess.lin_state = list(res.session.lin_state)
        for _ in range(steps):
            nxt = int(logits[-1].argmax())
            tokens.append(nxt)
            out = r.model(input_ids=torch.tensor([[nxt]], device=r.device), past_key_values=res.cache)
            logits.append(out.logits[0, -1].float().cpu())
        rec = sess.pop_records()
    return torch.stack(logits), res.records, rec, tokens, res.logits[0].float().cpu()


def check_correctness(device: str) -> dict:
    """Section 1 of the module docstring."""
    out: dict = {"cases": []}
    cpu, gpu = _tiny(), _tiny().place(device, "float32", "triton")
    ids = torch.tensor([list(PROMPT.encode())])
    for budget in (0.5, 1.0):
        for hedge in ("off", "soft"):
            s = RoutingSettings(budget=budget, hedge_policy=hedge, hedge_threshold=0.5, window=8, n_sink=2)
            a = _prefill_and_decode(cpu, ids, s, 8)
            b = _prefill_and_decode(gpu, ids, s, 8)
            case = {
                "budget": budget,
                "hedge": hedge,
                "prefill_max_abs_err": float((a[4] - b[4]).abs().max()),
                "decode_max_abs_err": float((a[0] - b[0]).abs().max()),
                "same_prefill_routes": bool((a[1]["routes"] == b[1]["routes"]).all()),
                "same_decode_routes": bool((a[2]["routes"] == b[2]["routes"]).all()),
                "same_tokens": a[3] == b[3],
                "hedged": int(a[1]["hedged"].sum() + a[2]["hedged"].sum()),
            }
            if budget == 1.0:
                dense = cpu.dense_logits(ids)[0].float()
                case["budget1_vs_dense"] = float((b[4] - dense).abs().max())
            case["ok"] = (
                case["prefill_max_abs_err"] <= TOL_LOGITS
                and case["decode_max_abs_err"] <= TOL_LOGITS
                and case["same_prefill_routes"]
                and case["same_decode_routes"]
                and case["same_tokens"]
                and case.get("budget1_vs_dense", 0.0) <= TOL_LOGITS
            )
            out["cases"].append(case)
    out["decision_sync_free"] = _decision_is_sync_free(gpu)
    bf16 = _tiny().place(device, "bfloat16", "triton")
    trace = bf16.route(PROMPT, RoutingSettings(budget=0.5, hedge_policy="soft"), max_new_tokens=16)
    out["bfloat16_streamed_tokens"] = len(trace.token_ids) - trace.n_prompt_tokens
    sync_ok = out["decision_sync_free"] is True or gpu.device.type != "cuda"
    out["ok"] = all(c["ok"] for c in out["cases"]) and sync_ok and (out["bfloat16_streamed_tokens"] == 16)
    return out


def _decision_is_sync_free(r) -> bool | str:
    """A decode decision (controller, decide_step, dual ascent, record) and the attention it
    routes (kernels.triton_decode, the cache of a 300-token context, the linear state caught
    up) with CUDA's sync debugging set to raise on any host synchronisation. The first token
    runs before that: it copies the prefill's lambdas to the device once per generation
    (`BudgetPolicy.decide_step`), a synchronising copy; every token after it is checked."""
    from metaattn_kernels.triton_decode import decode_step_device
    from metaattn_viz.routing.policies import BudgetPolicy

    if r.device.type != "cuda":
        return "not on CUDA: not checked"
    s = RoutingSettings(budget=0.5, hedge_policy="soft")
    pol = BudgetPolicy(s, r.n_layers, [0.3] * r.n_layers)
    stack = r.controller("bayes")
    d = r.model.config.hidden_size
    h = torch.randn(1, 1, d, device=r.device)
    x = torch.randn(1, 1, d, device=r.device)
    pos = torch.arange(40, 41, device=r.device)
    cfg = r.model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = r.head_dim
    q = torch.randn(1, hq, 1, hd, device=r.device)
    k, v = (torch.randn(1, hkv, 300, hd, device=r.device) for _ in range(2))
    from metaattn_viz.routing.signals import AttentionView, SignalState

    # controllers that read attention features get this step's q and keys (and their sums)
    view = (
        AttentionView(q, k, None, s.window, s.n_sink, SignalState(r.n_layers))
        if stack.uses_attention
        else None
    )

    def token(position: int) -> None:
        for layer in range(r.n_layers):
            weights, _ = pol.decide_step(layer, stack.concentration(layer, h, x, pos, view), position)
            decode_step_device(q, k, v, weights, window=s.window, n_sink=s.n_sink)

    with torch.no_grad():
        token(40)  # the generation's first token: its one copy of lambda to the device
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            token(41)
        except RuntimeError as exc:
            return f"synchronised: {exc}"
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return True


def bench_rows(device: str, config: str, sizes: str = "full") -> list[dict]:
    """Section 2 of the module docstring, at the lengths ``SIZES[sizes]``."""
    from metaattn_viz.bench.attention import attention_rows
    from metaattn_viz.bench.model import model_rows

    attention_len, prefill, long_context = SIZES[sizes]
    repeats = 1 if sizes == "rehearsal" else 5  # the interpreter takes ~1 s a call
    rows = attention_rows([attention_len], repeats=repeats, device=device, dtype="bfloat16", backend="triton")
    for r in model_rows(
        budget=0.3,
        long_context=long_context,
        prefill_len=prefill,
        device=device,
        dtype="bfloat16",
        backend="triton",
        model_config=config,
    ):
        rows.append(dict(kind="model", **r))
    return rows


def engine_stream(device: str, config: str) -> dict:
    """Section 3 of the module docstring."""
    from metaattn_viz.app.engine import Engine
    from metaattn_viz.app.requests import GenerateRequest
    from metaattn_viz.bench.model import random_weights_model

    routed = random_weights_model(config, device, "bfloat16", "triton")
    engine = Engine(routed=routed, log_runs=False, threads=False)
    try:
        s = RoutingSettings(budget=0.3)
        t0 = time.perf_counter()
        trace = engine.generations.generate(
            GenerateRequest(PROMPT, s, max_new_tokens=64, chat=False, quality=False), timeout=300
        )
        wall = time.perf_counter() - t0
    finally:
        engine.close()
    new = len(trace.token_ids) - trace.n_prompt_tokens
    return {
        "new_tokens": new,
        "tokens_per_s": trace.timings.get("tokens_per_s"),
        "wall_s": wall,
        "realized_cost": trace.realized_cost,
        "runtime": routed.runtime(s),
        "ok": new == 64,
    }


def _environment() -> dict:
    import transformers
    import triton

    return {
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "transformers": transformers.__version__,
        "cuda": torch.version.cuda,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m metaattn_viz.bench.gpu_check", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--out", default=os.environ.get("OUT") or "device-out", help="output folder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--config", default=None, help="model config.json (default: SmolLM2-135M's, shipped)")
    p.add_argument("--quick", action="store_true", help="short bench rows (4096 tokens)")
    p.add_argument(
        "--rehearse",
        action="store_true",
        help="run every section on the CPU through the Triton interpreter, with a tiny model "
        "and small sizes: checks this script without a GPU (the timings mean nothing)",
    )
    p.add_argument("--only", default=",".join(SECTIONS), help="sections to run, comma-separated")
    a = p.parse_args(argv)
    from metaattn_viz.routing import loading

    sections_asked = a.only.split(",")
    unknown = [n for n in sections_asked if n not in SECTIONS]
    if unknown:
        print(f"unknown section(s) {unknown}: choose among {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    config = a.config or str(loading.SMOLLM2_CONFIG)
    sizes = "quick" if a.quick else "full"
    if a.rehearse:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("--rehearse needs TRITON_INTERPRET=1 before triton is imported", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
        a.device, sizes = "cpu", "rehearsal"
        if a.config is None:  # the tiny model's architecture, written into the output folder
            _tiny_config().save_pretrained(out / "rehearsal-config")
            config = str(out / "rehearsal-config" / "config.json")
    elif not torch.cuda.is_available():
        print("no CUDA device: nothing to check here (--rehearse runs it on the CPU)", file=sys.stderr)
        return 2
    report: dict = {
        "environment": _environment(),
        "rehearsal": a.rehearse,
        "sizes": dict(zip(("attention", "prefill", "long_context"), SIZES[sizes], strict=True)),
    }
    sections = {
        "checks": lambda: check_correctness(a.device),
        "bench": lambda: bench_rows(a.device, config, sizes),
        "engine": lambda: engine_stream(a.device, config),
    }
    status = 0
    for name in sections_asked:
        t0 = time.perf_counter()
        try:
            report[name] = sections[name]()
        except Exception as exc:  # one section failing must not hide the others' results
            report[name] = {
                "ok": False,
                "error": f"{type(exc).__name__}: {exc}",
                "traceback": traceback.format_exc(),
            }
        seconds = time.perf_counter() - t0
        result = report[name]
        if isinstance(result, dict) and not result.get("ok", True):
            status = 1
        print(f"{name}: {seconds:.1f} s", json.dumps(result, default=str)[:4000], flush=True)
        (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    return status


if __name__ == "__main__":
    raise SystemExit(main())
