"""Benchmark of the routing log: insert throughput and the logging overhead of a real
generation (`python -m metaattn_viz.bench_store [--json]`; docs/benchmarks.md,
"Routing log").

- insert throughput, in route rows per second, end to end through RunLog (Arrow tables,
  uncertainty columns, transactions, commit): "bulk" writes whole traces (start_run +
  finish, as `route` and re-routing do); "streaming" runs 8 concurrent streams that
  append every 4 tokens, as the app does.
- logging overhead: the same greedy generation with the real routed model, with and
  without logging (append after every token, finish at the end), interleaved, median of
  the repeats; the ratio is logged / unlogged, both measured in this run.

Also home of `synthetic_trace` / `grow`, random traces of any size that the store's tests
use. Writes only under a temporary folder; never touches the user's log.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from metaattn_viz.settings import EXPERTS, RoutingSettings
from metaattn_viz.trace import RoutingTrace

K = len(EXPERTS)


def empty_like(trace: RoutingTrace) -> RoutingTrace:
    """A trace with the same run fields as `trace` and no positions yet."""
    return RoutingTrace(model=trace.model, controller=trace.controller,
                        controller_id=trace.controller_id,
                        controller_trained=trace.controller_trained, settings=trace.settings,
                        n_layers=trace.n_layers, head_dim=trace.head_dim,
                        n_prompt_tokens=trace.n_prompt_tokens, truncated=trace.truncated,
                        created_at=trace.created_at, prompt=trace.prompt)


def synthetic_trace(n_layers: int = 30, n_tokens: int = 100, seed: int = 0,
                    controller: str = "bayes", budget: float | None = 0.5,
                    n_prompt_tokens: int | None = None) -> RoutingTrace:
    """A random but well-formed trace: Dirichlet concentrations, routes that follow the
    posterior mean, some hedged decisions with mixed weights, costs, lambdas, odd tokens."""
    rng = np.random.default_rng(seed)
    L, T = n_layers, n_tokens
    n_prompt = T // 4 if n_prompt_tokens is None else n_prompt_tokens
    trace = RoutingTrace(
        model="synthetic", controller=controller, controller_id=f"{controller}-synthetic-{seed}",
        controller_trained=seed % 2 == 0, settings=RoutingSettings(budget=budget, window=32,
                                                                   hedge_policy="soft"),
        n_layers=L, head_dim=64, n_prompt_tokens=n_prompt, truncated=seed % 3,
        prompt=f"synthetic prompt {seed} — ünïcode ✓", created_at=1.7e9 + seed * 3600.123456)
    if controller == "priorfree":  # a point estimate: its "concentration" is a probability
        conc = rng.dirichlet(np.ones(K), size=(L, T)).astype(np.float32)  # [L, T, K]
    else:
        conc = rng.gamma(2.0, 1.5, size=(L, T, K)).astype(np.float32) + 0.05  # [L, T, K]
    routes = conc.argmax(-1).astype(np.int8)  # [L, T]
    hedged = rng.random((L, T)) < 0.1
    weights = np.eye(K, dtype=np.float32)[routes]  # [L, T, K]
    mean = conc / conc.sum(-1, keepdims=True)
    weights[hedged] = mean[hedged]
    cost = (weights * np.array([1.0, 0.15, 0.30], np.float32)).sum(-1)  # [L, T]
    lam = rng.normal(0, 0.5, (L, T)).astype(np.float32)
    words = ["the", " cat", " ünï", "\n", " ", "", "✓", "\x00", "<|im_end|>", " sat"]
    tokens = [words[i % len(words)] + (str(i) if i % 7 == 0 else "") for i in range(T)]
    trace.extend(rng.integers(0, 49152, T), tokens, conc, routes, hedged, weights, cost, lam)
    trace.output_text = "".join(tokens[n_prompt:])
    trace.timings = {"prefill_ms": 12.5, "decode_ms": 100.0 + seed, "tokens_per_s": 70.0}
    return trace


def grow(full: RoutingTrace, chunks):
    """Yield a new trace that grows to `full` (prefill first, then by `chunks` sizes, an
    int or an iterable of ints), as the routed model's stream does."""
    trace = empty_like(full)
    sizes = iter(chunks) if not isinstance(chunks, int) else None
    pos = 0
    while pos < full.n_tokens:
        n = full.n_prompt_tokens if pos == 0 and full.n_prompt_tokens else (
            chunks if sizes is None else next(sizes))
        end = min(full.n_tokens, pos + max(1, int(n)))
        trace.extend(full.token_ids[pos:end], full.tokens[pos:end],
                     full.concentration[:, pos:end], full.routes[:, pos:end],
                     full.hedged[:, pos:end], full.weights[:, pos:end], full.cost[:, pos:end],
                     full.lam[:, pos:end])
        pos = end
        yield trace
    trace.output_text, trace.timings = full.output_text, dict(full.timings)


# -- insert throughput ------------------------------------------------------------------------
def bench_insert_bulk(folder: Path, n_runs: int = 40, n_layers: int = 30,
                      n_tokens: int = 1024) -> dict:
    from metaattn_viz.store import RunLog

    traces = [synthetic_trace(n_layers, n_tokens, seed=i) for i in range(4)]
    log = RunLog(folder / "bulk.duckdb")
    log.finish(log.start_run(traces[0]), traces[0])  # warm-up: the writer's imports
    t0 = time.perf_counter()
    for i in range(n_runs):
        tr = traces[i % len(traces)]
        log.finish(log.start_run(tr), tr)
    log.close()  # the final checkpoint is part of the cost
    dt = time.perf_counter() - t0
    rows = n_runs * n_layers * n_tokens
    return {"mode": "bulk", "runs": n_runs, "route_rows": rows, "seconds": dt,
            "route_rows_per_s": rows / dt}


def bench_insert_streaming(folder: Path, n_streams: int = 8, n_layers: int = 30,
                           n_tokens: int = 512, every: int = 4) -> dict:
    from metaattn_viz.store import RunLog

    fulls = [synthetic_trace(n_layers, n_tokens, seed=i) for i in range(n_streams)]
    with RunLog(folder / "stream.duckdb") as log:
        log.finish(log.start_run(fulls[0]), fulls[0])  # warm-up
        barrier = threading.Barrier(n_streams + 1)

        def stream(full):
            barrier.wait()
            trace = None
            for trace in grow(full, every):
                if trace.run_id is None:
                    log.start_run(trace)
                log.append(trace.run_id, trace)
            log.finish(trace.run_id, trace)

        threads = [threading.Thread(target=stream, args=(f,)) for f in fulls]
        for t in threads:
            t.start()
        barrier.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        log.close()  # the final checkpoint is part of the cost
        dt = time.perf_counter() - t0
    rows = n_streams * n_layers * n_tokens
    return {"mode": f"streaming ({n_streams} streams, append every {every} tokens)",
            "runs": n_streams, "route_rows": rows, "seconds": dt, "route_rows_per_s": rows / dt}


# -- logging overhead of a real generation ----------------------------------------------------
def bench_logging_overhead(folder: Path, max_new_tokens: int = 64, repeats: int = 5,
                           prompt: str = "Explain why the sky is blue, in a few sentences.") -> dict:
    from metaattn_viz.routing import RoutedModel
    from metaattn_viz.store import RunLog

    routed = RoutedModel.load()
    settings = RoutingSettings(budget=0.5)

    def generate(log):
        t0 = time.perf_counter()
        trace = None
        for trace in routed.stream(prompt, settings, max_new_tokens=max_new_tokens):
            if log is not None:
                if trace.run_id is None:
                    log.start_run(trace)
                log.append(trace.run_id, trace)
        if log is not None:
            log.finish(trace.run_id, trace)
        return time.perf_counter() - t0, trace.n_tokens

    with RunLog(folder / "overhead.duckdb") as log:
        generate(log)  # warm-up both paths: kernels, caches, the writer's imports
        generate(None)
        plain, logged = [], []
        for _ in range(repeats):  # interleaved, so drift hits both alike
            plain.append(generate(None)[0])
            t, n_tokens = generate(log)
            logged.append(t)
    p, g = statistics.median(plain), statistics.median(logged)
    return {"max_new_tokens": max_new_tokens, "tokens": n_tokens, "repeats": repeats,
            "plain_s": p, "logged_s": g, "ratio": g / p, "plain_all_s": plain,
            "logged_all_s": logged}


def machine() -> str:
    import os

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m metaattn_viz.bench_store",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--no-model", action="store_true",
                    help="skip the real-generation overhead measurement")
    ap.add_argument("--repeats", type=int, default=5, help="generation repeats (default 5)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    import duckdb

    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(),
              "duckdb": duckdb.__version__}
    with tempfile.TemporaryDirectory(prefix="metaattn-bench-store-") as tmp:
        folder = Path(tmp)
        result["insert"] = [bench_insert_bulk(folder), bench_insert_streaming(folder)]
        if not args.no_model:
            result["overhead"] = bench_logging_overhead(folder, args.max_new_tokens,
                                                        args.repeats)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"routing log benchmark, {result['date']}, {result['machine']}, "
          f"duckdb {result['duckdb']}")
    for r in result["insert"]:
        print(f"  insert {r['mode']}: {r['route_rows']} route rows in {r['seconds']:.2f} s = "
              f"{r['route_rows_per_s']:,.0f} route rows/s (target >= 500,000: "
              f"{'met' if r['route_rows_per_s'] >= 5e5 else 'NOT met'})")
    if "overhead" in result:
        o = result["overhead"]
        print(f"  logging overhead, real generation of {o['tokens']} tokens "
              f"({o['max_new_tokens']} new), median of {o['repeats']}: plain {o['plain_s']:.3f} s, "
              f"logged {o['logged_s']:.3f} s, ratio {o['ratio']:.3f} (target <= 1.05: "
              f"{'met' if o['ratio'] <= 1.05 else 'NOT met'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
