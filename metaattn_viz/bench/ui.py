"""Benchmark of the app's two interactive paths on this machine (docs/benchmarks.md, "App").

1. Slider re-route: a 128-token text routed again at a new budget (each budget scope: the
   default "global" settles one lambda for all layers in 2-3 forward passes, "layer" takes
   one), timed on the server side until the page's figures are built and serialised
   (engine.analysis.reroute + plots.live_views + the Gradio components' postprocess, i.e.
   the JSON that goes on the wire), as a ratio to
   one dense forward pass of the same text. Target <= 1.5. The quality meter's dense
   shadow pass runs after the figures are out (a chained event), so it is not included.
2. Live views during streaming: the same greedy generation timed with nobody watching
   (the job runs to its end) and with the page's consumer (every STREAM_INTERVAL_S: a
   snapshot, the maps figure, the strip and the meters built and serialised). Slowdown =
   watched / unwatched wall time. Target <= 1.15.

Runs alternate (unwatched, watched, unwatched, ...) and medians are reported, because the
CPUs may be shared. Usage: python -m metaattn_viz.bench.ui [--tokens 128] [--new-tokens 64]
[--repeats 5] [--json]. Never imports the store's writer path beyond what Engine does (it
runs without logging so both sides do the same work).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

TEXT = (
    "The lighthouse stood at the end of a long spit of sand, and for forty years the same "
    "family had kept its lamp burning through every storm. Ships passing in the night saw "
    "the beam sweep across the water twice a minute, a steady rhythm that sailors trusted "
    "more than their charts. When the lens was finally replaced by an automatic light, the "
    "keeper wrote in the log that the sea had not noticed the change, but he had. He spent "
    "his last winter there cataloguing the wrecks he had seen, the names of the boats, the "
    "weather on each night, and the small kindnesses of strangers who had rowed out with "
    "bread and letters when the ice closed the harbour for weeks at a time. The archive he "
    "left behind is still read by historians of the coast, who find in it a record of "
    "trade, migration and loss that no official register kept."
)


def machine() -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    return (
        f"{cpu or platform.machine()}, {os.cpu_count()} cores visible, torch "
        f"{torch.__version__} with {torch.get_num_threads()} intra-op thread(s), "
        f"{platform.system()} {platform.release()}"
    )


_COMPONENTS: list = []


def serialise(views) -> int:
    """What the server does to a frame before sending it: the components' postprocess, then
    JSON (orjson, as Gradio's responses). Returns the frame's size in bytes."""
    import gradio as gr
    import orjson

    if not _COMPONENTS:
        _COMPONENTS.extend([gr.HTML(), gr.HighlightedText(), gr.HTML()])
    out = [c.postprocess(v) for c, v in zip(_COMPONENTS, views, strict=True)]
    return sum(len(orjson.dumps(o.model_dump() if hasattr(o, "model_dump") else o)) for o in out)


def bench_reroute(engine, n_tokens: int, repeats: int, scope: str) -> dict:
    import torch

    from metaattn_viz.app import plots
    from metaattn_viz.app.requests import Text, parse_settings

    routed = engine.host.routed_model()
    ids = routed.encode(TEXT)
    while len(ids) < n_tokens:
        ids = ids + ids
    ids = ids[:n_tokens]
    text = Text(ids, routed.token_texts(ids), TEXT, n_tokens)
    x = torch.tensor([ids])
    budgets = [0.25, 0.5, 0.75, 0.35, 0.6]
    dense_s, reroute_s, sizes = [], [], []
    routed.dense_logits(x)  # warm-up (and the first serialise imports gradio)
    # like the slider: each re-route starts from the trace on screen (its posteriors give the
    # global scope a warm start for lambda)
    new = engine.analysis.reroute(text, parse_settings(0.5, scope), log_run=False)
    serialise(plots.live_views(new))
    for i in range(repeats):
        t0 = time.perf_counter()
        routed.dense_logits(x)
        dense_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        new = engine.analysis.reroute(new, parse_settings(budgets[i % len(budgets)], scope), log_run=False)
        sizes.append(serialise(plots.live_views(new)))
        reroute_s.append(time.perf_counter() - t0)
    ratios = [r / d for r, d in zip(reroute_s, dense_s, strict=True)]
    return {
        "benchmark": "reroute",
        "scope": scope,
        "tokens": n_tokens,
        "repeats": repeats,
        "passes": new.timings.get("prefill_passes"),
        "dense_ms": 1000 * statistics.median(dense_s),
        "reroute_ms": 1000 * statistics.median(reroute_s),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "frame_bytes": int(statistics.median(sizes)),
        "target": 1.5,
    }


def bench_streaming(engine, new_tokens: int, repeats: int) -> dict:
    from metaattn_viz.app import plots
    from metaattn_viz.app.generation import STREAM_INTERVAL_S
    from metaattn_viz.app.requests import parse_request, parse_settings

    req = parse_request(TEXT[:400], parse_settings(0.5), max_new_tokens=new_tokens, chat=False, quality=False)

    def unwatched():
        t0 = time.perf_counter()
        trace = engine.generations.start(req).result()
        return time.perf_counter() - t0, trace, 0

    def watched():
        t0 = time.perf_counter()
        job = engine.generations.start(req)
        frames = 0
        for snap in job.updates(STREAM_INTERVAL_S):
            if snap is not None:
                serialise(plots.live_views(snap))
                frames += 1
        trace = job.result()
        return time.perf_counter() - t0, trace, frames

    unwatched()  # warm-up
    plain, live, frames, n = [], [], [], None
    for _ in range(repeats):
        s, tr, _ = unwatched()
        plain.append(s)
        s, tr2, f = watched()
        live.append(s)
        frames.append(f / s)
        n = tr.n_tokens - tr.n_prompt_tokens
        assert tr.token_ids == tr2.token_ids  # greedy: the same work both ways
    slow = [w / p for w, p in zip(live, plain, strict=True)]
    return {
        "benchmark": "streaming",
        "new_tokens": n,
        "repeats": repeats,
        "unwatched_s": statistics.median(plain),
        "watched_s": statistics.median(live),
        "tokens_per_s_unwatched": n / statistics.median(plain),
        "frames_per_s": statistics.median(frames),
        "slowdown": statistics.median(slow),
        "slowdown_min": min(slow),
        "slowdown_max": max(slow),
        "target": 1.15,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m metaattn_viz.bench.ui", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, default=128, help="re-route text length (tokens)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per run")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--model", default=None)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

    from metaattn_viz.app.engine import Engine
    from metaattn_viz.core.settings import SCOPES

    engine = Engine(args.model, log_runs=False)
    try:
        engine.host.routed_model()
        rows = [bench_reroute(engine, args.tokens, args.repeats, scope) for scope in SCOPES]
        rows.append(bench_streaming(engine, args.new_tokens, args.repeats))
    finally:
        engine.close()
    meta = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "controllers_trained": {k: c.trained for k, c in engine.host.routed_model().controllers.items()},
    }
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}, indent=1))
    else:
        *reroutes, s = rows
        print(f"{meta['date']}  {meta['machine']}")
        for r in reroutes:
            print(
                f"re-route of {r['tokens']} tokens, {r['scope']} scope ({r['passes']} "
                f"pass{'es' if r['passes'] != 1 else ''}), until the frame is serialised: "
                f"{r['reroute_ms']:.0f} ms vs dense forward {r['dense_ms']:.0f} ms -> ratio "
                f"{r['ratio']:.2f} (min {r['ratio_min']:.2f}, max {r['ratio_max']:.2f}; "
                f"target <= {r['target']}); frame {r['frame_bytes'] / 1024:.0f} KiB"
            )
        print(
            f"streaming {s['new_tokens']} tokens: {s['unwatched_s']:.2f} s unwatched "
            f"({s['tokens_per_s_unwatched']:.1f} tokens/s), {s['watched_s']:.2f} s with live "
            f"views at {s['frames_per_s']:.1f} frames/s -> slowdown {s['slowdown']:.3f}x "
            f"(min {s['slowdown_min']:.3f}, max {s['slowdown_max']:.3f}; target <= "
            f"{s['target']})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
