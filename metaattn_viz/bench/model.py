"""Whole-model benchmarks: routing overhead and end-to-end routed vs dense speed.

Every figure is a ratio against the dense model measured in the same run, in the same
process, interleaved (dense, routed, dense, routed, ...) and summarised by the median, since
these machines are noisy; each side gets one untimed warm-up call first. The
routing-overhead and prefill rows time OVERHEAD_REPEATS and PREFILL_REPEATS calls each
unless `bench --repeats` says otherwise. The dense model is `plain_copy`: the same weights
without the routing hooks, on transformers' SDPA attention. Nothing here asserts on time; the rows are
printed (and `metaattn-viz bench` includes them). Never: time the two sides in different runs,
or leave autograd switched off for the caller.

Rows (the `bench --json` contract: seq_len, budget, backend, dense_ms, routed_ms, ratio,
max_abs_err, plus `case`, `device`, `dtype`):
- routing-overhead: prefill of 256 tokens at budget 1.0 (the controllers and the solver run,
  the experts are exact SDPA); target ratio <= 1.15 (CUDA: <= 1.2).
- prefill: a 4096-token prefill at the budget (CUDA: 16384); speed-up = dense_ms /
  routed_ms (target >= 1.15; CUDA >= 1.6); `passes` and `pilot_tokens` say how many
  forward passes the global scope's lambda search took (routing/prefill.py).
- decode: tokens/s of greedy decoding after a context of 256 and 8192 tokens (CUDA: 32768);
  speed-up = dense_ms / routed_ms per token (targets >= 1.0 at 256 and >= 1.3 at the long
  context). Neither side is captured in a CUDA graph.

The model runs where RoutedModel.place put it (routing/device.py); on CUDA every timed call
ends with a synchronisation. `model_config` builds the architecture from a config.json
with random weights (routing/loading.from_config) for machines without the model file.
"""

from __future__ import annotations

import statistics
import time

import torch

from metaattn_viz.bench.args import LONG_DECODE_NEW_TOKENS
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing.kv_cache import GrowableCache
from metaattn_viz.routing.model import RoutedModel


def _sync_for(routed: RoutedModel):
    """What makes a timing end when the device's work has (CUDA runs asynchronously)."""
    return torch.cuda.synchronize if routed.device.type == "cuda" else (lambda: None)


# timed repeats of the rows whose --repeats was not given (docs/benchmarks.md records them)
OVERHEAD_REPEATS = 7
PREFILL_REPEATS = 3


def _interleaved(fns: dict, repeats: int, sync=lambda: None) -> dict[str, float]:
    """Median ms of each function, timed in turn `repeats` times after one untimed warm-up
    call each (as bench/attention.py's rows: a first call pays for allocations and caches)."""
    for fn in fns.values():
        fn()
    sync()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(1000 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def _where(routed: RoutedModel, settings: RoutingSettings) -> dict:
    """The row's `backend`, `device` and `dtype`: where the routed side ran."""
    return routed.runtime(settings)


def plain_copy(routed: RoutedModel):
    """The dense baseline: a copy of the routed model's transformer without the routing hooks,
    on transformers' own SDPA attention, i.e. the model as it was before RoutedModel
    touched it (the dormant hooks cost the model ~2 % per decode step)."""
    import copy

    model = copy.deepcopy(routed.model)
    for module in model.modules():
        module._forward_pre_hooks.clear()
        module._forward_pre_hooks_with_kwargs.clear()
    model.set_attn_implementation("sdpa")
    return model.eval()


def _dense_logits(plain, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return plain(input_ids=ids, use_cache=False).logits


def _text_ids(routed: RoutedModel, n: int) -> torch.Tensor:
    from metaattn_viz.paths import REPO_ROOT

    # the text every recorded row (docs/benchmarks.md) was measured on; another text would
    # change the routes and the decoded tokens, so the rows would no longer be comparable
    text = (REPO_ROOT / "tests" / "data" / "wikitext2_excerpt.txt").read_text()
    ids = routed.tokenizer(text, add_special_tokens=False)["input_ids"]
    while len(ids) < n:
        ids = ids + ids
    return torch.tensor([ids[:n]], device=routed.device)


def routing_overhead(routed: RoutedModel, plain, seq_len: int = 256, repeats: int = OVERHEAD_REPEATS) -> dict:
    ids = _text_ids(routed, seq_len)
    s = RoutingSettings(budget=1.0)
    with torch.no_grad():
        dense = _dense_logits(plain, ids)
        err = float((routed.prefill(ids, s, use_cache=False).logits - dense).float().abs().max())
        t = _interleaved(
            {
                "dense": lambda: _dense_logits(plain, ids),
                "routed": lambda: routed.prefill(ids, s, use_cache=False),
            },
            repeats,
            _sync_for(routed),
        )
    return {
        "case": "routing-overhead",
        "seq_len": seq_len,
        "budget": 1.0,
        **_where(routed, s),
        "dense_ms": t["dense"],
        "routed_ms": t["routed"],
        "ratio": t["routed"] / t["dense"],
        "target": "ratio <= 1.15",
        "max_abs_err": err,
    }


def prefill_speed(
    routed: RoutedModel,
    plain,
    seq_len: int = 4096,
    budget: float = 0.3,
    repeats: int = PREFILL_REPEATS,
    linear_map: str = "auto",
    scope: str = "global",
) -> dict:
    """The prefill row (module docstring); ``scope`` "layer" times the one-pass scope, which
    needs no pilot (docs/benchmarks.md compares the two)."""
    ids = _text_ids(routed, seq_len)
    s = RoutingSettings(budget=budget, linear_map=linear_map, scope=scope)
    last = []  # the routed side's PrefillResult: how many passes the global scope took

    def routed_side():
        last[:] = [routed.prefill(ids, s, use_cache=False)]

    with torch.no_grad():
        t = _interleaved(
            {"dense": lambda: _dense_logits(plain, ids), "routed": routed_side}, repeats, _sync_for(routed)
        )
    return {
        "case": "prefill",
        "seq_len": seq_len,
        "budget": budget,
        "scope": scope,
        **_where(routed, s),
        "dense_ms": t["dense"],
        "routed_ms": t["routed"],
        "ratio": t["routed"] / t["dense"],
        "speedup": t["dense"] / t["routed"],
        "target": "speedup >= 1.15",
        "max_abs_err": None,
        # whole-text passes and the pilot's tokens: one pass more costs a whole dense forward
        "passes": last[0].passes,
        "pilot_tokens": last[0].pilot_tokens,
    }


def _dense_decoder(plain, ids: torch.Tensor, capacity: int):
    """Greedy decoding with the plain model: prefill, then yields once per new token."""
    cache = GrowableCache(capacity)
    with torch.no_grad():
        out = plain(input_ids=ids, past_key_values=cache, use_cache=True)
    yield
    while True:
        nxt = out.logits[:, -1:].argmax(-1)
        with torch.no_grad():
            out = plain(input_ids=nxt, past_key_values=cache, use_cache=True)
        yield


def decode_speed(
    routed: RoutedModel, plain, context: int, budget: float = 0.3, new_tokens: int = 24, block: int = 4
) -> dict:
    """Per-token decode time after `context` tokens, dense vs routed (greedy, same text).

    Each side prefills once; then blocks of `block` tokens alternate (dense, routed, dense,
    ...) and the per-token time is the median over the blocks. Both sides keep their KV in
    the same cache class (kv_cache.GrowableCache); the routed side is `RoutedModel.stream`,
    i.e. everything the app does per token (controllers, decisions, records, trace).
    """
    ids = _text_ids(routed, context - new_tokens)  # the last new token ends at `context`
    s = RoutingSettings(budget=budget)
    dense = _dense_decoder(plain, ids, context)
    routed_gen = routed.stream(ids[0].tolist(), s, max_new_tokens=new_tokens)
    next(dense), next(routed_gen)  # the prefills
    per_token = {"dense": [], "routed": []}
    sync = _sync_for(routed)
    done = 0
    while done < new_tokens:
        n = min(block, new_tokens - done)
        for name, gen in (("dense", dense), ("routed", routed_gen)):
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                if next(gen, StopIteration) is StopIteration:  # the routed text hit EOS
                    raise RuntimeError("decode benchmark: generation stopped early")
            sync()
            per_token[name].append(1000 * (time.perf_counter() - t0) / n)
        done += n
    routed_gen.close()
    d, r = statistics.median(per_token["dense"]), statistics.median(per_token["routed"])
    return {
        "case": "decode",
        "seq_len": context,
        "budget": budget,
        **_where(routed, s),
        "dense_ms": d,
        "routed_ms": r,
        "ratio": r / d,
        "speedup": d / r,
        "dense_tokens_per_s": 1000 / d,
        "routed_tokens_per_s": 1000 / r,
        "target": "speedup >= 1.3" if context >= 8192 else "speedup >= 1.0",
        "max_abs_err": None,
    }


def random_weights_model(
    model_config: str, device=None, dtype=None, backend=None, max_context: int = 8192
) -> RoutedModel:
    """The architecture of a config.json with random weights and untrained controllers,
    placed (routing/device.py); no end-of-sequence token, so greedy decoding never stops
    early, and a context of at least `max_context` tokens."""
    from metaattn_viz.routing import loading

    loaded = loading.from_config(model_config, eos_token_id=None)
    cfg = loaded.model.config
    cfg.max_position_embeddings = max(int(cfg.max_position_embeddings), max_context)
    return RoutedModel.from_loaded(loaded).place(device, dtype, backend)


def check_context(context: int, prefill_len: int, long_context: int) -> None:
    """A ValueError naming the flag (bench's --prefill-len, --long-context) whose row would
    run past the model's `context` tokens, in lambda-table's words for its --lengths."""
    from metaattn_viz.cli.lambda_table import beyond_context

    for flag, tokens in (("--prefill-len", prefill_len), ("--long-context", long_context)):
        problem = beyond_context(flag, tokens, context)
        if problem is not None:
            raise ValueError(problem)


def rows_model(
    long_context: int = 8192,
    prefill_len: int = 4096,
    device: str | None = None,
    dtype: str | None = None,
    backend: str | None = None,
    model_config: str | None = None,
    quick: bool = False,
) -> RoutedModel:
    """The model of `model_rows`: the bundled one, or the architecture of `model_config`
    with random weights (its context made long enough for both rows), placed; refused
    (`check_context`) where the prefill or long decode row would run past its context, as
    soon as it is known and before any row is timed (quick runs neither row)."""
    if model_config:
        context = max(long_context, prefill_len) + 64
        routed = random_weights_model(model_config, device, dtype, backend, context)
    else:
        routed = RoutedModel.load(device=device, dtype=dtype, backend=backend)
    if not quick:
        check_context(routed.max_context, prefill_len, long_context)
    return routed


def model_rows(
    routed: RoutedModel | None = None,
    budget: float = 0.3,
    long_context: int = 8192,
    quick: bool = False,
    prefill_len: int = 4096,
    device: str | None = None,
    dtype: str | None = None,
    backend: str | None = None,
    model_config: str | None = None,
    repeats: int | None = None,
) -> list[dict]:
    """The whole-model rows; `routed` or, without one, the bundled model (or the architecture
    of `model_config` with random weights, its context made long enough for both rows)
    placed on device/dtype with backend. `repeats`: the timed repeats of the routing-overhead
    and prefill rows (None: OVERHEAD_REPEATS and PREFILL_REPEATS, what docs/benchmarks.md
    records); the decode rows time blocks of tokens. A model loaded here is checked by
    `rows_model` (its context against the rows) before any row is timed."""
    if routed is None:
        routed = rows_model(long_context, prefill_len, device, dtype, backend, model_config, quick)
    plain = plain_copy(routed)
    with torch.no_grad():  # scoped: never switch autograd off for the caller
        timed = {} if repeats is None else {"repeats": repeats}
        rows = [routing_overhead(routed, plain, **timed)]
        if quick:
            rows.append(decode_speed(routed, plain, 256, budget, new_tokens=8))
            return rows
        rows.append(prefill_speed(routed, plain, prefill_len, budget, **timed))
        rows.append(decode_speed(routed, plain, 256, budget, new_tokens=48))
        rows.append(decode_speed(routed, plain, long_context, budget, new_tokens=LONG_DECODE_NEW_TOKENS))
    return rows


if __name__ == "__main__":
    import json

    for row in model_rows():
        print(json.dumps(row))
