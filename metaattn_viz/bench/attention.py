"""`metaattn-viz bench`: routed attention against dense attention, measured side by side.

Every row is a ratio taken in one run on one machine: the routed call and its dense
baseline are timed alternately (so that load from other processes hits both alike)
and the medians are compared. Rows follow the `bench --json` contract (tests/test_kernels.py
checks it): `seq_len, budget, backend, dense_ms, routed_ms, ratio, max_abs_err`, plus `kind`,
`mix`, `baseline`, `dtype`, `device`.

Attention-level rows (`attention_rows`): B = 1, 9 query heads, 3 kv heads, head dim 64
(SmolLM2's attention), routes drawn at random positions for three mixes:
all local (window 64, 4 sinks), all linear, and 25 % full / 25 % linear / 50 % local.
`budget` of such a row is the mix's notional mean cost (the costs of the method:
full 1.0, linear 0.15, local 0.30), not the --budget argument.
- CPU: float32, backend "cpu" against dense causal SDPA.
- CUDA: bfloat16, backend "triton" against dense causal SDPA (flash) and against
  FlexAttention with the route's block mask (linear rows attend to themselves only,
  which flatters FlexAttention).
`max_abs_err` compares the routed output with kernels' dense reference on the last
(up to) 512 query rows.

Whole-model rows (`kind` "model": routing overhead, a 4096-token prefill, decoding after
256 and 8192 tokens of context, the real SmolLM2 against itself unrouted) come from
bench/model.py; `--no-model` leaves them out. `--device`/`--dtype`/`--backend` choose
where everything runs (routing/device.py; default: CUDA bfloat16 Triton where there is a
GPU), `--prefill-len`/`--long-context` the model rows' lengths, `--model-config` a
random-weights build of an architecture (no model file needed).
Never: report a number that was not measured in this run.
"""

from __future__ import annotations

import argparse
import functools
import json as json_mod
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import metaattn_kernels.dispatch as kernels
from metaattn_kernels.dispatch import FULL, LINEAR, LOCAL
from metaattn_viz.bench.args import add_arguments
from metaattn_viz.core.settings import COSTS

HEADS_Q, HEADS_KV, HEAD_DIM = 9, 3, 64
WINDOW, N_SINK = 64, 4
# fractions of tokens routed to (full, linear, local)
MIXES = {"local": (0.0, 0.0, 1.0), "linear": (0.0, 1.0, 0.0), "mix": (0.25, 0.25, 0.5)}
ERR_ROWS = 512  # query rows checked against the dense reference
ATTENTION_REPEATS = 5  # timed repeats of an attention row when --repeats is not given


def mix_weights(mix: str, seq_len: int, seed: int = 0, device="cpu") -> torch.Tensor:
    """One-hot routing weights [1, T, 3] with the mix's fractions at random positions."""
    frac = MIXES[mix]
    g = torch.Generator().manual_seed(seed)
    counts = [round(f * seq_len) for f in frac]
    counts[LOCAL] = seq_len - counts[FULL] - counts[LINEAR]
    routes = torch.cat([torch.full((n,), e, dtype=torch.long) for e, n in enumerate(counts)])
    routes = routes[torch.randperm(seq_len, generator=g)]
    return kernels.routes_to_weights(routes[None]).to(device)  # [1, T, 3]


def notional_cost(mix: str) -> float:
    return round(sum(f * c for f, c in zip(MIXES[mix], COSTS, strict=True)), 4)


def _cpu_name() -> str:
    """e.g. 'AMD EPYC, 2 cores, 1 torch thread'."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    n = torch.get_num_threads()
    return f"{name}, {os.cpu_count()} cores, {n} torch thread{'s' if n > 1 else ''}"


def _timed(fn, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return (time.perf_counter() - t0) * 1e3


def _side_by_side(routed, dense, repeats: int, sync) -> tuple[float, float]:
    """Median ms of each, timed alternately after one warm-up call each."""
    routed(), dense()
    r_ms, d_ms = [], []
    for _ in range(repeats):
        d_ms.append(_timed(dense, sync))
        r_ms.append(_timed(routed, sync))
    return statistics.median(r_ms), statistics.median(d_ms)


def _max_abs_err(q, k, v, w, y) -> float:
    """Routed output vs the dense reference on the last ERR_ROWS query rows."""
    n = min(ERR_ROWS, q.shape[2])
    want, _ = kernels.routed_attention(
        q[:, :, -n:].float(),
        k.float(),
        v.float(),
        w[:, -n:].float(),
        window=WINDOW,
        n_sink=N_SINK,
        backend="reference",
    )
    return float((y[:, :, -n:].float() - want).abs().max())


def _flex_dense_and_masked(q, k, v, w):
    """(dense flex call, routed-mask flex call) for CUDA tensors, compiled."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    t = q.shape[2]
    route = w[0].argmax(-1)  # [T]

    def routed_mask(b, h, qi, ki):
        causal = ki <= qi
        local = causal & ((qi - ki < WINDOW) | (ki < N_SINK))
        return torch.where(route[qi] == FULL, causal, torch.where(route[qi] == LOCAL, local, ki == qi))

    def causal_mask(b, h, qi, ki):
        return ki <= qi

    bm_routed = create_block_mask(routed_mask, None, None, t, t, device=q.device)
    bm_dense = create_block_mask(causal_mask, None, None, t, t, device=q.device)
    return (
        lambda: flex(q, k, v, block_mask=bm_dense, enable_gqa=True),
        lambda: flex(q, k, v, block_mask=bm_routed, enable_gqa=True),
    )


def attention_rows(
    seq_lens=(1024, 4096),
    repeats: int = ATTENTION_REPEATS,
    device: str | None = None,
    mixes=tuple(MIXES),
    dtype: str | None = None,
    backend: str | None = None,
) -> list[dict]:
    """Attention-level rows: routed kernels vs dense attention, per sequence length and mix,
    on the placement device/dtype resolve to (routing/device.py: auto is CUDA bfloat16 with
    the Triton kernels where there is a GPU, else CPU float32 with the cpu kernels)."""
    from metaattn_viz.routing import device as device_mod

    placement = device_mod.resolve(device, dtype)
    device = placement.device
    cuda = placement.is_cuda
    dtype = placement.torch_dtype
    backend = device_mod.resolve_backend(device_mod.parse_backend(backend), placement)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    where = torch.cuda.get_device_name() if cuda else _cpu_name()
    rows = []
    for t in seq_lens:
        g = torch.Generator().manual_seed(t)
        q = torch.randn(1, HEADS_Q, t, HEAD_DIM, generator=g).to(device, dtype)
        k = torch.randn(1, HEADS_KV, t, HEAD_DIM, generator=g).to(device, dtype)
        v = torch.randn(1, HEADS_KV, t, HEAD_DIM, generator=g).to(device, dtype)
        sdpa = functools.partial(F.scaled_dot_product_attention, q, k, v, is_causal=True, enable_gqa=True)
        for mix in mixes:
            w = mix_weights(mix, t, seed=t, device=device)
            with torch.no_grad():
                call = functools.partial(
                    kernels.routed_attention, q, k, v, w, window=WINDOW, n_sink=N_SINK, backend=backend
                )
                y, _ = call()
                err = _max_abs_err(q, k, v, w, y)
                baselines = [("sdpa", call, sdpa)]
                if cuda:
                    flex_dense, flex_routed = _flex_dense_and_masked(q, k, v, w)
                    baselines.append(("flex", call, flex_dense))
                    baselines.append(("flex_masked", call, flex_routed))
                for name, routed, dense in baselines:
                    r_ms, d_ms = _side_by_side(routed, dense, repeats, sync)
                    rows.append(
                        dict(
                            kind="attention",
                            seq_len=t,
                            budget=notional_cost(mix),
                            mix=mix,
                            backend=backend,
                            baseline=name,
                            dtype=str(dtype).removeprefix("torch."),
                            device=where,
                            dense_ms=round(d_ms, 3),
                            routed_ms=round(r_ms, 3),
                            ratio=round(r_ms / d_ms, 4),
                            max_abs_err=err,
                        )
                    )
    return rows


def run_bench(
    seq_lens=(1024, 4096),
    budget: float = 0.3,
    json: bool = False,
    repeats: int | None = None,
    model: bool = True,
    long_context: int = 8192,
    device: str | None = None,
    dtype: str | None = None,
    backend: str | None = None,
    prefill_len: int = 4096,
    model_config: str | None = None,
) -> list[dict]:
    """All benchmark rows; prints them (a JSON list with json=True, else one line per row).
    model=True adds the whole-model rows of bench/model.py (routing overhead, prefill, decode).
    `repeats` applies to every timed row; None keeps each row's own (ATTENTION_REPEATS here,
    bench/model.py's for the model rows: the counts docs/benchmarks.md records). The model
    is loaded first, so a row that runs past its context is refused before anything is timed."""
    from metaattn_viz.bench.model import model_rows, rows_model

    attention_repeats = ATTENTION_REPEATS if repeats is None else repeats
    routed = rows_model(long_context, prefill_len, device, dtype, backend, model_config) if model else None
    rows = attention_rows(seq_lens, repeats=attention_repeats, device=device, dtype=dtype, backend=backend)
    if model:
        rows += [
            dict(kind="model", mix=f"budget {r['budget']}", baseline="dense model", **r)
            for r in model_rows(
                routed=routed,
                budget=budget,
                long_context=long_context,
                prefill_len=prefill_len,
                device=device,
                dtype=dtype,
                backend=backend,
                model_config=model_config,
                repeats=repeats,
            )
        ]
    if json:
        print(json_mod.dumps(rows, indent=1))
    else:
        for r in rows:
            err = "" if r.get("max_abs_err") is None else f"  err {r['max_abs_err']:.1e}"
            label = r.get("case", r["mix"])
            print(
                f"{r['kind']:9s} T={r['seq_len']:6d} {label:16s} {r['backend']:6s} vs "
                f"{r['baseline']:11s} dense {r['dense_ms']:9.2f} ms  routed {r['routed_ms']:9.2f} ms"
                f"  ratio {r['ratio']:.3f}{err}"
            )
    return rows


def run_from_args(a) -> int:
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        seq_lens = [int(s) for s in a.seq_lens.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seq-lens must be comma-separated whole numbers, got {a.seq_lens!r}") from None
    if not seq_lens or min(seq_lens) < 1:
        raise ValueError(f"--seq-lens must be whole numbers >= 1, got {a.seq_lens!r}")
    run_bench(
        seq_lens,
        a.budget,
        a.json,
        a.repeats,
        model=not a.no_model,
        long_context=a.long_context,
        device=a.device,
        dtype=a.dtype,
        backend=a.backend,
        prefill_len=a.prefill_len,
        model_config=a.model_config,
    )
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="metaattn-viz bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
