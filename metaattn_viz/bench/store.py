"""Benchmark of the routing log: insert throughput and the logging overhead of a real
generation (`python -m metaattn_viz.bench.store [--json]`; docs/benchmarks.md,
"Routing log").

- insert throughput, in route rows per second, end to end through RunLog (Arrow tables,
  uncertainty columns, transactions, commits, the final checkpoint): "bulk" writes whole
  traces (start_run + finish, as `route` and re-routing do) from 1 thread (one commit per
  trace: bound by the fsync) and from 4 threads (the writer groups them); "streaming" runs
  8 concurrent streams that append every 4 tokens, as the app does. Also per CPU-second
  of this process, a figure that other tenants of the machine blur less.
- logging overhead: the same greedy generation with the real routed model (torch threads
  as the app server sets them, engine.configure_threads), with and without logging
  (append after every token, finish at the end), in adjacent pairs of alternating order;
  the ratio is the median of logged / unlogged over the pairs, all measured in this run.
  Also the time spent inside the log's calls on the generating
  thread, a figure that machine load does not blur.

Writes only under a temporary folder; never touches the user's log.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from metaattn_viz.core.experts import COSTS, K
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.core.trace import RoutingTrace
from metaattn_viz.store.codec import TRACE_ARRAYS


# -- the traces it writes ---------------------------------------------------------------------
def synthetic_trace(n_layers: int, n_tokens: int, seed: int) -> RoutingTrace:
    """A random but well-formed trace of the size being measured: Dirichlet concentrations,
    routes that follow the posterior mean, 10% hedged decisions with mixed weights, costs,
    lambdas, and token texts with the odd characters a real decode produces."""
    rng = np.random.default_rng(seed)
    L, T = n_layers, n_tokens
    n_prompt = T // 4
    trace = RoutingTrace(
        model="synthetic",
        controller="bayes",
        controller_id=f"bayes-synthetic-{seed}",
        controller_trained=seed % 2 == 0,
        settings=RoutingSettings(budget=0.5, window=32, hedge_policy="soft", linear_map="elu"),
        n_layers=L,
        head_dim=64,
        n_prompt_tokens=n_prompt,
        truncated=seed % 3,
        prompt=f"synthetic prompt {seed} — ünïcode ✓",
        created_at=1.7e9 + seed * 3600.123456,
    )
    conc = rng.gamma(2.0, 1.5, size=(L, T, K)).astype(np.float32) + 0.05  # [L, T, K]
    routes = conc.argmax(-1).astype(np.int8)  # [L, T]
    hedged = rng.random((L, T)) < 0.1
    weights = np.eye(K, dtype=np.float32)[routes]  # [L, T, K]
    mean = conc / conc.sum(-1, keepdims=True)
    weights[hedged] = mean[hedged]
    cost = (weights * np.array(COSTS, np.float32)).sum(-1)  # [L, T]
    lam = rng.normal(0, 0.5, (L, T)).astype(np.float32)
    words = ["the", " cat", " ünï", "\n", " ", "", "✓", "\x00", "<|im_end|>", " sat"]
    tokens = [words[i % len(words)] + (str(i) if i % 7 == 0 else "") for i in range(T)]
    trace.extend(rng.integers(0, 49152, T), tokens, conc, routes, hedged, weights, cost, lam)
    trace.output_text = "".join(tokens[n_prompt:])
    trace.timings = {"prefill_ms": 12.5, "decode_ms": 100.0 + seed, "tokens_per_s": 70.0}
    return trace


def grow(full: RoutingTrace, every: int) -> Iterator[RoutingTrace]:
    """Yield a new trace that grows to `full` (prefill first, then `every` positions at a
    time), as the routed model's stream does."""
    trace = RoutingTrace(
        model=full.model,
        controller=full.controller,
        controller_id=full.controller_id,
        controller_trained=full.controller_trained,
        settings=full.settings,
        n_layers=full.n_layers,
        head_dim=full.head_dim,
        n_prompt_tokens=full.n_prompt_tokens,
        truncated=full.truncated,
        created_at=full.created_at,
        prompt=full.prompt,
    )
    pos = 0
    while pos < full.n_tokens:
        n = full.n_prompt_tokens if pos == 0 and full.n_prompt_tokens else every
        end = min(full.n_tokens, pos + max(1, n))
        trace.extend(
            full.token_ids[pos:end],
            full.tokens[pos:end],
            *(getattr(full, name)[:, pos:end] for name in TRACE_ARRAYS),
        )
        pos = end
        yield trace
    trace.output_text, trace.timings = full.output_text, dict(full.timings)


# -- insert throughput ------------------------------------------------------------------------
def bench_insert_bulk(
    folder: Path, n_runs: int = 40, n_layers: int = 30, n_tokens: int = 1024, n_threads: int = 1
) -> dict:
    """Whole traces (start_run + finish, as `route` and re-routing log them) from n_threads
    threads at once; with several, the writer commits a few runs per transaction."""
    from metaattn_viz.store import RunLog

    traces = [synthetic_trace(n_layers, n_tokens, seed=i) for i in range(4)]
    log = RunLog(folder / f"bulk{n_threads}.duckdb")
    log.finish(log.start_run(traces[0]), traces[0])  # warm-up: the writer's imports

    def worker(k):
        for i in range(k, n_runs, n_threads):
            tr = traces[i % len(traces)]
            log.finish(log.start_run(tr), tr)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_threads)]
    t0, c0 = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()  # the final checkpoint is part of the cost
    dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = n_runs * n_layers * n_tokens
    return {
        "mode": f"bulk, whole traces of {n_layers}x{n_tokens} from {n_threads} thread"
        f"{'s' if n_threads > 1 else ''}",
        "runs": n_runs,
        "route_rows": rows,
        "seconds": dt,
        "cpu_seconds": cpu,
        "route_rows_per_s": rows / dt,
        "route_rows_per_cpu_s": rows / cpu,
    }


def bench_insert_streaming(
    folder: Path, n_streams: int = 8, n_layers: int = 30, n_tokens: int = 2048, every: int = 4
) -> dict:
    """8 streams of 2048 tokens (about a second here; with 512 tokens the run lasted
    0.25 s and start-up costs decided the figure)."""
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
        t0, c0 = time.perf_counter(), time.process_time()
        for t in threads:
            t.join()
        log.close()  # the final checkpoint is part of the cost
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
    rows = n_streams * n_layers * n_tokens
    return {
        "mode": f"streaming ({n_streams} threads growing traces, append every {every} "
        "tokens; includes growing them)",
        "runs": n_streams,
        "route_rows": rows,
        "seconds": dt,
        "cpu_seconds": cpu,
        "route_rows_per_s": rows / dt,
        "route_rows_per_cpu_s": rows / cpu,
    }


# -- logging overhead of a real generation ----------------------------------------------------
def bench_logging_overhead(
    folder: Path,
    max_new_tokens: int = 64,
    repeats: int = 7,
    prompt: str = "Once upon a time, in a small village,",
) -> dict:
    from metaattn_viz.app.engine import configure_threads
    from metaattn_viz.routing.model import RoutedModel
    from metaattn_viz.store import RunLog

    torch_threads = configure_threads()  # as the app server runs (half the cores)
    routed = RoutedModel.load()
    settings = RoutingSettings(budget=0.5)

    def generate(log):
        """(wall s, process CPU s, s spent inside the log's calls on this thread, tokens)"""
        t0, c0 = time.perf_counter(), time.process_time()
        in_log, trace = 0.0, None
        for trace in routed.stream(prompt, settings, max_new_tokens=max_new_tokens):
            if log is not None:
                t = time.perf_counter()
                if trace.run_id is None:
                    log.start_run(trace)
                log.append(trace.run_id, trace)  # after every token: the app's worst case
                in_log += time.perf_counter() - t
        if log is not None:
            t = time.perf_counter()
            log.finish(trace.run_id, trace)
            in_log += time.perf_counter() - t
        return (time.perf_counter() - t0, time.process_time() - c0, in_log, trace.n_tokens)

    with RunLog(folder / "overhead.duckdb") as log:
        generate(log)  # warm-up both paths: kernels, caches, the writer's imports
        generate(None)
        runs = {False: [], True: []}  # use_log -> [(wall, cpu, in_log)]
        for r in range(repeats):  # adjacent pairs, alternating order: drift hits both alike
            for use_log in (False, True) if r % 2 == 0 else (True, False):
                wall, cpu, spent, n_tokens = generate(log if use_log else None)
                runs[use_log].append((wall, cpu, spent))
    pairs = list(zip(runs[False], runs[True], strict=True))
    return {
        "max_new_tokens": max_new_tokens,
        "tokens": n_tokens,
        "repeats": repeats,
        "torch_threads": torch_threads,
        "plain_s": statistics.median(p[0] for p, _ in pairs),
        "logged_s": statistics.median(g[0] for _, g in pairs),
        "ratio": statistics.median(g[0] / p[0] for p, g in pairs),
        "cpu_ratio": statistics.median(g[1] / p[1] for p, g in pairs),
        "in_log_calls_share": statistics.median(g[2] / p[0] for p, g in pairs),
        "plain_all_s": [p[0] for p, _ in pairs],
        "logged_all_s": [g[0] for _, g in pairs],
    }


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m metaattn_viz.bench.store", description=__doc__.split("\n\n")[0]
    )
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--no-model", action="store_true", help="skip the real-generation overhead measurement")
    ap.add_argument(
        "--repeats", type=int, default=7, help="interleaved plain/logged generation pairs (default 7)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args(argv)
    import duckdb

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "duckdb": duckdb.__version__,
        "load_average_before": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="metaattn-bench-store-") as tmp:
        folder = Path(tmp)
        result["insert"] = [
            bench_insert_bulk(folder),
            bench_insert_bulk(folder, n_threads=4),
            bench_insert_streaming(folder),
        ]
        if not args.no_model:
            result["overhead"] = bench_logging_overhead(folder, args.max_new_tokens, args.repeats)
    if args.json:
        print(json.dumps(result))
        return 0
    print(
        f"routing log benchmark, {result['date']}, {result['machine']}, "
        f"duckdb {result['duckdb']}, load average before "
        f"{', '.join(f'{x:.1f}' for x in result['load_average_before'])} "
        "(other processes share these cores)"
    )
    for r in result["insert"]:
        print(
            f"  insert {r['mode']}: {r['route_rows']} route rows in {r['seconds']:.2f} s = "
            f"{r['route_rows_per_s']:,.0f} route rows/s (target >= 500,000: "
            f"{'met' if r['route_rows_per_s'] >= 5e5 else 'NOT met'}); "
            f"{r['route_rows_per_cpu_s']:,.0f} route rows per CPU-second of this process"
        )
    if "overhead" in result:
        o = result["overhead"]
        print(
            f"  logging overhead, real generation of {o['tokens']} tokens "
            f"({o['max_new_tokens']} new, {o['torch_threads']} torch thread(s) as the app "
            f"server), {o['repeats']} interleaved pairs: median plain "
            f"{o['plain_s']:.3f} s, logged {o['logged_s']:.3f} s; median pair ratio "
            f"{o['ratio']:.3f} (target <= 1.05: {'met' if o['ratio'] <= 1.05 else 'NOT met'}); "
            f"median pair ratio of process CPU time {o['cpu_ratio']:.3f}; "
            f"time inside the log's calls on the generating thread: "
            f"{100 * o['in_log_calls_share']:.2f}% of the plain run"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
