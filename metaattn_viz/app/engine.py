"""The app's engine: everything the page does, as plain functions with their own tests.

One `Engine` per server holds the routed model (loaded in the background, so the page
answers at once), the routing log writer, and the running generations. The UI (ui.py) is a
thin adapter over it: parse the controls, call one method, draw the result.

- `start(request)` runs a generation in a worker thread: the model streams tokens, the run
  is logged to DuckDB in batches (start_run after the prefill, append at most every
  LOG_EVERY_S, finish at the end), and `job.updates(interval)` hands the growing trace to
  the page at most every `interval` seconds (every token when slower). With `quality` on, a
  dense shadow pass measures KL(dense || routed) per token when the text is complete.
- `reroute`, `quality`, `sweep` re-route the same text under other settings (one prefill
  each; the dense logits are cached per text, so dragging the slider runs one pass).
- `inspect` recomputes the attention a token actually used (attention_maps).
- `replay`, `runs`, `compare`, `sql`, `export` read the routing log without the model.

User mistakes and unavailable resources raise `AppError` with a plain sentence; anything
unexpected is logged with its traceback and reported as a short AppError by the caller.
Never imports gradio.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import tempfile
import threading
import time
import unicodedata
import uuid
import zipfile
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaattn_viz.core.settings import (COSTS, HEDGE_POLICIES, LINEAR, LOCAL, MIN_COST, SCOPES,
                                   RoutingSettings)
from metaattn_viz.core.trace import RoutingTrace

log = logging.getLogger(__name__)

CONTROLLERS = ("bayes", "priorfree")
MAX_PROMPT_CHARS = 16_000
MAX_NEW_TOKENS = 256
# The app routes at most this many tokens (prompt + generation; the prompt is cut from the
# left): every view and the sweep stay interactive on two CPU cores.
APP_MAX_CONTEXT = int(os.environ.get("METAATTN_APP_MAX_CONTEXT", "512"))
STREAM_INTERVAL_S = 0.25  # views refresh at most 4 times a second (every token if slower)
LOG_EVERY_S = 0.25  # routing-log batches while streaming
SWEEP_BUDGETS = (0.2, 0.35, 0.5, 0.75)
MODEL_WAIT_S = 180.0
DENSE_CACHE_SIZE = 2


class AppError(Exception):
    """A problem to show the user in plain words (the server log has any detail)."""


# ---------------------------------------------------------------------------------------
# Parsing what the page (or an API client) sends
# ---------------------------------------------------------------------------------------
def clean_prompt(text) -> tuple[str, list[str]]:
    """The prompt as the model will see it, and notes on what was changed. Control
    characters (other than newline and tab) and unpaired surrogates are removed; mixed
    scripts and emoji pass unchanged. Empty or over-long prompts raise AppError."""
    if text is None:
        text = ""
    if not isinstance(text, str):
        raise AppError(f"The prompt must be text, got {type(text).__name__}.")
    notes = []
    if len(text) > MAX_PROMPT_CHARS:
        raise AppError(f"The prompt is {len(text):,} characters long; the app takes at most "
                       f"{MAX_PROMPT_CHARS:,} (the model routes the last {APP_MAX_CONTEXT} "
                       "tokens anyway). Shorten it and try again.")
    kept, dropped = [], 0
    for ch in text.replace("\r\n", "\n"):
        cat = unicodedata.category(ch)
        if (cat == "Cc" and ch not in "\n\t") or cat == "Cs":
            dropped += 1
        else:
            kept.append(ch)
    text = "".join(kept)
    if dropped:
        notes.append(f"Removed {dropped} control character{'s' if dropped != 1 else ''} "
                     "from the prompt.")
    if not text.strip():
        raise AppError("The prompt is empty: type some text (or pick an example) first.")
    return text, notes


def _number(name: str, value, lo: float, hi: float) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AppError(f"{name} must be a number between {lo:g} and {hi:g}, got {value!r}.") \
            from None
    if not math.isfinite(v) or not lo <= v <= hi:
        raise AppError(f"{name} must be between {lo:g} and {hi:g}, got {value!r}.")
    return v


def _whole(name: str, value, lo: int, hi: int) -> int:
    if isinstance(value, bool):
        raise AppError(f"{name} must be a whole number between {lo} and {hi}, got {value!r}.")
    v = _number(name, value, lo, hi)
    if v != int(v):
        raise AppError(f"{name} must be a whole number between {lo} and {hi}, got {value!r}.")
    return int(v)


def _choice(name: str, value, options) -> str:
    if value not in options:
        raise AppError(f"{name} must be one of {', '.join(map(str, options))}, got {value!r}.")
    return value


DEFAULTS = RoutingSettings()  # the project's defaults: the page and the API start from them


def parse_settings(budget=DEFAULTS.budget, scope=DEFAULTS.scope,
                   hedge_policy=DEFAULTS.hedge_policy, hedge_threshold=DEFAULTS.hedge_threshold,
                   window=DEFAULTS.window, n_sink=DEFAULTS.n_sink) -> RoutingSettings:
    """RoutingSettings from the controls; budget None means no budget (the argmax)."""
    b = None if budget is None else _number("Budget", budget, MIN_COST, 1.0)
    try:
        return RoutingSettings(
            budget=b, scope=_choice("Budget scope", scope, SCOPES),
            hedge_policy=_choice("Hedge policy", hedge_policy, HEDGE_POLICIES),
            hedge_threshold=_number("Hedge threshold", hedge_threshold, 0.0, 1.0),
            window=_whole("Local window", window, 1, 4096),
            n_sink=_whole("Attention sinks", n_sink, 0, 64))
    except ValueError as exc:  # anything RoutingSettings refuses beyond these checks
        raise AppError(str(exc)) from None


@dataclass(frozen=True)
class GenerateRequest:
    prompt: str
    settings: RoutingSettings
    controller: str = "bayes"
    max_new_tokens: int = 48
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    chat: bool = False
    quality: bool = True
    notes: tuple = ()


def parse_request(prompt, settings: RoutingSettings, controller="bayes", max_new_tokens=48,
                  temperature=0.0, top_p=1.0, seed=0, chat=False, quality=True
                  ) -> GenerateRequest:
    text, notes = clean_prompt(prompt)
    return GenerateRequest(
        prompt=text, settings=settings, controller=_choice("Controller", controller, CONTROLLERS),
        max_new_tokens=_whole("Max new tokens", max_new_tokens, 0, MAX_NEW_TOKENS),
        temperature=_number("Temperature", temperature, 0.0, 2.0),
        top_p=_number("Top-p", top_p, 0.01, 1.0), seed=_whole("Seed", seed, 0, 2**31 - 1),
        chat=bool(chat), quality=bool(quality), notes=tuple(notes))


@dataclass
class Text:
    """What a re-route needs of a trace: the token ids and where they came from (a
    RoutingTrace has all of these; the API builds one from a trace's JSON)."""

    token_ids: list[int]
    tokens: list[str]
    prompt: str = ""
    n_prompt_tokens: int = 0
    truncated: int = 0
    output_text: str = ""
    controller: str = "bayes"


def text_from_json(d, vocab_size: int) -> Text:
    """A Text from the JSON of a trace (`trace.to_json()`), checked."""
    if not isinstance(d, dict) or "token_ids" not in d:
        raise AppError("Expected a trace as returned by the generate endpoint (a JSON object "
                       "with token_ids).")
    ids = d.get("token_ids")
    if not isinstance(ids, list) or not ids or not all(
            isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab_size for i in ids):
        raise AppError(f"token_ids must be a non-empty list of token ids in [0, {vocab_size}).")
    if len(ids) > APP_MAX_CONTEXT:
        raise AppError(f"The trace has {len(ids)} tokens; the app re-routes at most "
                       f"{APP_MAX_CONTEXT}.")
    tokens = d.get("tokens")
    if not isinstance(tokens, list) or len(tokens) != len(ids):
        tokens = [str(i) for i in ids]
    controller = d.get("controller") if d.get("controller") in CONTROLLERS else "bayes"
    n_prompt = d.get("n_prompt_tokens")
    n_prompt = n_prompt if isinstance(n_prompt, int) and 0 <= n_prompt <= len(ids) else len(ids)
    return Text(list(ids), [str(t) for t in tokens], str(d.get("prompt") or ""), n_prompt,
                int(d.get("truncated") or 0), str(d.get("output_text") or ""), controller)


def snapshot(trace: RoutingTrace) -> RoutingTrace:
    """A consistent copy of a growing trace, cheap: arrays are replaced, never written in
    place, when a trace grows, so sharing them is safe; the lists and dict are copied."""
    return dataclasses.replace(trace, token_ids=list(trace.token_ids),
                               tokens=list(trace.tokens), timings=dict(trace.timings))


def configure_threads() -> int:
    """Torch intra-op threads for the server: METAATTN_THREADS, else half the cores (at
    least 1). Requests run in parallel threads; one op spreading over every core while
    others wait only adds contention (measured: 8x slower decoding on a loaded 2-core box)."""
    import torch

    n = os.environ.get("METAATTN_THREADS")
    threads = int(n) if n else max(1, min(4, (os.cpu_count() or 2) // 2))
    torch.set_num_threads(threads)
    return threads


# ---------------------------------------------------------------------------------------
# A generation running in its own thread
# ---------------------------------------------------------------------------------------
class GenerationJob:
    """One streaming generation. The worker thread owns the RoutedModel stream and the
    log; readers take snapshots through `updates()`."""

    def __init__(self, engine: Engine, request: GenerateRequest, key: str | None = None):
        self.engine = engine
        self.request = request
        self.key = key or uuid.uuid4().hex
        self.stop_event = threading.Event()
        self.phase = "starting"  # starting | prefill | decoding | quality | done
        self.error: BaseException | None = None
        self.notes: list[str] = list(request.notes)
        self.run_id: str | None = None
        self.status: str | None = None  # done | interrupted | failed
        self._cond = threading.Condition()
        self._latest: RoutingTrace | None = None
        self._version = 0
        self._done = False
        self._thread = threading.Thread(target=self._run, name=f"generate-{self.key[:8]}",
                                        daemon=True)

    def start(self) -> GenerationJob:
        self._thread.start()
        return self

    @property
    def done(self) -> bool:
        return self._done

    def stop(self) -> None:
        self.stop_event.set()

    def _publish(self, trace: RoutingTrace, done: bool = False) -> None:
        snap = snapshot(trace) if trace is not None else None
        with self._cond:
            if snap is not None:
                self._latest = snap
            self._version += 1
            self._done = self._done or done
            self._cond.notify_all()

    def _run(self) -> None:
        from metaattn_viz.routing.model import Sampling

        eng, req = self.engine, self.request
        trace = None
        run_log = eng.run_log
        last_log = 0.0
        try:
            routed = eng.routed_model()
            self.phase = "prefill"
            sampling = Sampling(req.temperature, req.top_p, req.seed)
            stream = routed.stream(req.prompt, req.settings, req.max_new_tokens, req.controller,
                                   sampling=sampling, chat=req.chat, stop_event=self.stop_event,
                                   max_context=APP_MAX_CONTEXT)
            for trace in stream:
                if self.run_id is None and run_log is not None:
                    self.run_id = eng.log_call(lambda: run_log.start_run(trace, "generate"))
                    if self.run_id is None:
                        run_log = None
                        self.notes.append(eng.log_problem or "This run is not logged.")
                    last_log = time.monotonic()
                    if trace.truncated:
                        self.notes.append(f"The prompt was cut from the left to fit: "
                                          f"{trace.truncated} tokens dropped.")
                elif run_log is not None and time.monotonic() - last_log >= LOG_EVERY_S:
                    if eng.log_call(lambda: run_log.append(self.run_id, trace)) is None:
                        run_log = None
                        self.notes.append(eng.log_problem or "This run is no longer logged.")
                    last_log = time.monotonic()
                self.phase = "decoding"
                self._publish(trace)
            self.status = "interrupted" if self.stop_event.is_set() else "done"
            if req.quality and trace is not None and trace.n_tokens > 1:
                self.phase = "quality"
                self._publish(trace)
                try:
                    trace.kl_to_dense = eng.quality(trace)
                except Exception:  # the generation itself succeeded: keep it
                    log.exception("quality (dense shadow) pass failed")
                    self.notes.append("The quality meter could not be measured for this run.")
        except AppError as exc:
            self.error, self.status = exc, "failed"
        except Exception as exc:  # shown as a short message; the detail stays in the log
            log.exception("generation failed")
            self.error, self.status = exc, "failed"
        finally:
            if self.run_id is not None and run_log is not None and trace is not None:
                err = None if self.error is None else f"{type(self.error).__name__}: {self.error}"
                if eng.log_call(lambda: run_log.finish(self.run_id, trace, self.status,
                                                       error=err), default=False) is False:
                    self.notes.append(eng.log_problem or "The run could not be logged.")
            self.phase = "done"
            self._publish(trace, done=True)

    def updates(self, interval: float = STREAM_INTERVAL_S, timeout: float | None = None):
        """Yield snapshots of the trace as it grows, at most one per `interval` seconds
        (always the newest), and a last one when the job ends (possibly None if it failed
        before the prefill). Raises TimeoutError if nothing happens for `timeout` s."""
        seen = -1
        next_at = 0.0
        while True:
            with self._cond:
                if not self._cond.wait_for(lambda: self._version != seen or self._done,
                                           timeout=timeout):
                    raise TimeoutError("the generation made no progress")
                done, snap, seen = self._done, self._latest, self._version
            if done:
                yield snap
                return
            wait = next_at - time.monotonic()
            if wait > 0:  # throttle: sleep, then hand over whatever is newest by then
                with self._cond:
                    self._cond.wait_for(lambda: self._done, timeout=wait)
                    done, snap, seen = self._done, self._latest, self._version
                if done:
                    yield snap
                    return
            next_at = time.monotonic() + interval
            if snap is not None:
                yield snap

    def result(self, timeout: float | None = None) -> RoutingTrace:
        """Wait for the end; the final trace, or the AppError / error that stopped it."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the generation is still running")
        if self.error is not None:
            raise self.error
        return self._latest


# ---------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------
class Engine:
    """App-level state: the model (loaded in the background), the log, running jobs."""

    def __init__(self, model: str | None = None, db: str | None = None, log_runs: bool = True,
                 routed=None, threads: bool = True):
        self.spec = model
        self._routed = routed
        self.model_error: str | None = None
        self._loaded = threading.Event()
        self.load_seconds: float | None = None
        if threads and routed is None:
            configure_threads()
        if routed is not None:
            self._loaded.set()
        else:
            threading.Thread(target=self._load, name="model-loader", daemon=True).start()
        from metaattn_viz import store

        self.run_log, self.log_problem = store.open_or_explain(db, enabled=log_runs)
        self._jobs: dict[str, GenerationJob] = {}
        self._jobs_lock = threading.Lock()
        self._dense_cache: OrderedDict = OrderedDict()
        self._dense_lock = threading.Lock()
        self._logger = ThreadPoolExecutor(1, thread_name_prefix="run-log")

    # -- the model --------------------------------------------------------------------------
    def _load(self) -> None:
        from metaattn_viz.routing.model import RoutedModel

        t0 = time.perf_counter()
        try:
            self._routed = RoutedModel.load(self.spec)
            self.load_seconds = time.perf_counter() - t0
            self._warm_up()
        except Exception as exc:  # shown on the page; the server keeps serving
            log.exception("model loading failed")
            self.model_error = str(exc) or type(exc).__name__
        finally:
            self._loaded.set()

    def _warm_up(self) -> None:
        """One tiny routed pass, so the first user does not pay for lazy initialisation."""
        import torch

        try:
            self._routed.prefill(torch.tensor([[1, 2, 3]]), RoutingSettings(), "bayes",
                                 use_cache=False)
        except Exception:
            log.warning("warm-up pass failed", exc_info=True)

    @property
    def ready(self) -> bool:
        return self._loaded.is_set() and self._routed is not None

    def routed_model(self, timeout: float = MODEL_WAIT_S):
        if not self._loaded.wait(timeout):
            raise AppError("The model is still loading; try again in a few seconds.")
        if self._routed is None:
            raise AppError(f"The model could not be loaded: {self.model_error}. The server log "
                           "has the details.")
        return self._routed

    def status(self) -> dict:
        """What the page header shows: model, controllers, logging."""
        routed = self._routed if self._loaded.is_set() else None
        out = {"model_ready": routed is not None, "model": None, "model_error": self.model_error,
               "controllers": {}, "logging": self.run_log is not None,
               "log_path": str(self.run_log.path) if self.run_log is not None else None,
               "log_problem": self.log_problem, "load_seconds": self.load_seconds,
               "max_context": APP_MAX_CONTEXT}
        if routed is not None:
            out["model"] = routed.name
            out["controllers"] = {k: {"trained": s.trained, "id": s.controller_id}
                                  for k, s in routed.controllers.items()}
        return out

    # -- the log ----------------------------------------------------------------------------
    def log_call(self, fn, default=None):
        """Run a routing-log call; on a store problem keep serving without logging."""
        from metaattn_viz import store

        try:
            return fn()
        except store.StoreUnavailable as exc:
            log.warning("routing log: %s", exc)
            self.log_problem = f"Runs are not being logged: {exc}"
            return default

    def _require_log(self):
        if self.run_log is None:
            raise AppError(self.log_problem or "The routing log is not available.")
        return self.run_log

    def _log_finished(self, trace: RoutingTrace, kind: str) -> None:
        """Log a complete trace (a re-route) off the request path."""
        run_log = self.run_log
        if run_log is None:
            return

        def write():
            rid = self.log_call(lambda: run_log.start_run(trace, kind))
            if rid is not None:
                self.log_call(lambda: run_log.finish(rid, trace, "done"))

        self._logger.submit(write)

    # -- generation -------------------------------------------------------------------------
    def start(self, request: GenerateRequest, key: str | None = None) -> GenerationJob:
        """Start a generation; a second one under the same key (a browser session) stops
        the first."""
        job = GenerationJob(self, request, key)
        with self._jobs_lock:
            old = self._jobs.get(job.key)
            if old is not None and not old.done:
                old.stop()
            self._jobs[job.key] = job
            for k in [k for k, j in self._jobs.items() if j.done and k != job.key]:
                del self._jobs[k]
        return job.start()

    def stop(self, key: str) -> bool:
        """Stop the running generation of `key`; False if there is none."""
        with self._jobs_lock:
            job = self._jobs.get(key)
        if job is None or job.done:
            return False
        job.stop()
        return True

    def running(self, key: str) -> bool:
        with self._jobs_lock:
            job = self._jobs.get(key)
        return job is not None and not job.done

    def generate(self, request: GenerateRequest, timeout: float | None = None) -> RoutingTrace:
        """Blocking generation (the API endpoint)."""
        return self.start(request).result(timeout)

    # -- re-routing and quality -------------------------------------------------------------
    def _dense_logits(self, ids: list[int]):
        key = tuple(ids)
        with self._dense_lock:
            hit = self._dense_cache.get(key)
            if hit is not None:
                self._dense_cache.move_to_end(key)
                return hit
        import torch

        logits = self.routed_model().dense_logits(torch.tensor([ids]))[0]  # [T, V]
        with self._dense_lock:
            self._dense_cache[key] = logits
            while len(self._dense_cache) > DENSE_CACHE_SIZE:
                self._dense_cache.popitem(last=False)
        return logits

    def quality(self, trace: RoutingTrace) -> np.ndarray:
        """KL(dense || routed) of the next-token distribution at every position [T]: a dense
        shadow pass, and the routed model replaying the trace's own decisions (forced
        weights), so a streamed generation is measured on exactly what it did."""
        import torch

        from metaattn_viz.routing.model import kl_per_token

        routed = self.routed_model()
        ids = list(trace.token_ids)
        if not ids:
            raise AppError("Nothing to measure: the trace has no tokens.")
        dense = self._dense_logits(ids)
        forced = [torch.from_numpy(np.ascontiguousarray(trace.weights[layer]))[None]
                  for layer in range(trace.n_layers)]
        res = routed.prefill(torch.tensor([ids]), trace.settings, trace.controller,
                             forced_weights=forced, use_cache=False)
        return kl_per_token(dense, res.logits[0]).numpy()

    def reroute(self, text, settings: RoutingSettings, controller: str | None = None,
                log_run: bool = True) -> RoutingTrace:
        """The same text routed again under `settings` (one prefill); logged as a
        `reroute` run in the background."""
        routed = self.routed_model()
        if controller is not None:
            _choice("Controller", controller, CONTROLLERS)
        if not getattr(text, "token_ids", None):
            raise AppError("Nothing to re-route yet: generate (or replay) a text first.")
        if len(text.token_ids) > APP_MAX_CONTEXT:
            raise AppError(f"The text has {len(text.token_ids)} tokens; the app re-routes at "
                           f"most {APP_MAX_CONTEXT}.")
        t0 = time.perf_counter()
        new = routed.reroute(text, settings, controller, quality=False)
        dt = time.perf_counter() - t0
        new.timings["tokens_per_s"] = new.n_tokens / dt if dt > 0 else None
        new.timings["reroute_ms"] = 1000 * dt
        if log_run:
            self._log_finished(new, "reroute")
        return new

    def sweep(self, text, base: RoutingSettings, budgets=SWEEP_BUDGETS,
              progress=None) -> list[dict]:
        """KL to dense and realised cost of the text routed at each budget by both
        controllers and the baselines (random, salience top-k at the same budgets;
        all-linear and all-local), plus the dense point. Rows for plots.pareto."""
        import torch

        from metaattn_viz.training.evaluate import (flops_ratio, random_policy, salience_policy,
                                           static_policy)
        from metaattn_viz.routing.model import kl_per_token

        routed = self.routed_model()
        ids = list(text.token_ids)
        if len(ids) < 2:
            raise AppError("The sweep needs a text of at least two tokens.")
        budgets = [_number("Budget", b, MIN_COST, 1.0) for b in budgets]
        dense = self._dense_logits(ids)
        x = torch.tensor([ids])
        T = len(ids)
        jobs = []
        for controller in CONTROLLERS:
            for b in budgets:
                jobs.append((controller, b, dict(settings=base.with_(budget=b),
                                                 controller=controller)))
        for b in budgets:
            jobs.append(("random", b, dict(settings=base.with_(budget=b),
                                           policy=random_policy(b, seed=0))))
            jobs.append(("salience", b, dict(settings=base.with_(budget=b),
                                             policy=salience_policy(b))))
        for expert, name in ((LINEAR, "all-linear"), (LOCAL, "all-local")):
            jobs.append(("static", None, dict(settings=base.with_(budget=COSTS[expert]),
                                              policy=static_policy(expert), label=name)))
        rows = []
        for i, (policy, budget, kw) in enumerate(jobs):
            if progress is not None:
                progress(i / len(jobs), f"{policy} {'' if budget is None else budget}")
            label = kw.pop("label", None)
            res = routed.prefill(x, kw.pop("settings"), kw.pop("controller", "bayes"),
                                 use_cache=False, **kw)
            rec = res.records
            kl = kl_per_token(dense[:-1], res.logits[0, :-1])
            rows.append({"policy": policy, "budget": budget, "label": label,
                         "realized_cost": float(rec["cost"].mean()),
                         "kl_to_dense": float(kl.mean()),
                         "flops_ratio": flops_ratio(rec["weights"], T, routed.head_dim,
                                                    base.window, base.n_sink),
                         "tokens": T})
        rows.append({"policy": "dense", "budget": 1.0, "label": "dense (every decision full)",
                     "realized_cost": 1.0, "kl_to_dense": 0.0, "flops_ratio": 1.0, "tokens": T})
        return rows

    # -- inspection -------------------------------------------------------------------------
    def inspect(self, trace: RoutingTrace, pos: int, max_tokens: int | None = None):
        """The attention token `pos` actually used (attention_maps.AttentionView), from a
        prefill of its prefix with the trace's decisions forced."""
        import torch

        from metaattn_viz.app import attention_maps

        if trace is None or trace.n_tokens == 0:
            raise AppError("Nothing to inspect yet: generate (or replay) a text first.")
        pos = _whole("Token position", pos, 0, trace.n_tokens - 1)
        if not self.ready:
            raise AppError("The attention view needs the model, which is not loaded yet.")
        routed = self.routed_model()
        if trace.model != routed.name:
            raise AppError(f"This run used the model {trace.model}; the attention view needs "
                           f"that model (this server runs {routed.name}).")
        ids = torch.tensor([trace.token_ids[:pos + 1]])
        forced = [torch.from_numpy(np.ascontiguousarray(trace.weights[layer, :pos + 1]))[None]
                  for layer in range(trace.n_layers)]
        res = routed.prefill(ids, trace.settings, trace.controller, forced_weights=forced,
                             capture_qk=True, use_cache=False)
        kw = {} if max_tokens is None else {"max_tokens": max_tokens}
        return attention_maps.attention_view(res.session.qk, trace.weights, trace.tokens, pos,
                                             trace.settings.window, trace.settings.n_sink, **kw)

    # -- history ----------------------------------------------------------------------------
    def replay(self, run_id: str) -> RoutingTrace:
        from metaattn_viz import store

        run_log = self._require_log()
        run_id = (run_id or "").strip()
        if not run_id:
            raise AppError("Pick a run first (click a row of the runs table).")
        try:
            return run_log.load_trace(run_id)
        except store.UnknownRun:
            raise AppError(f"There is no run {run_id!r} in the routing log.") from None
        except store.StoreUnavailable as exc:
            raise AppError(str(exc)) from None

    def runs(self, text: str = "", status: str | None = None, controller: str | None = None,
             order_by: str = "-created_at", limit: int = 200):
        """The runs table for the History tab (a DataFrame, newest first by default)."""
        from metaattn_viz import store

        run_log = self._require_log()
        try:
            df = run_log.list_runs(limit=limit, status=status or None,
                                   controller=controller or None, text=(text or "").strip() or None,
                                   order_by=order_by)
        except ValueError as exc:
            raise AppError(str(exc)) from None
        except store.StoreUnavailable as exc:
            raise AppError(str(exc)) from None
        cols = ["run_id", "created_at", "status", "kind", "controller", "budget", "scope",
                "hedge_policy", "n_tokens", "realized_cost", "flops_ratio", "wall_ms",
                "prompt", "output_text"]
        df = df[[c for c in cols if c in df.columns]].copy()
        for c in ("prompt", "output_text"):
            if c in df.columns:
                df[c] = df[c].fillna("").map(lambda s: s if len(s) <= 80 else s[:79] + "\u2026")
        for c in ("realized_cost", "flops_ratio"):
            if c in df.columns:
                df[c] = df[c].round(3)
        if "wall_ms" in df.columns:
            df["wall_ms"] = df["wall_ms"].round(0)
        if "created_at" in df.columns:
            df["created_at"] = df["created_at"].astype(str).str.slice(0, 19)
        return df

    def compare(self, run_a: str, run_b: str):
        """Two runs side by side: (their traces, the per-token comparison DataFrame)."""
        from metaattn_viz import store

        a, b = self.replay(run_a), self.replay(run_b)
        try:
            df = self._require_log().compare(a.run_id, b.run_id)
        except store.StoreUnavailable as exc:
            raise AppError(str(exc)) from None
        return a, b, df

    def sql(self, query: str, max_rows: int = 500):
        """The read-only SQL console: (DataFrame, notice)."""
        from metaattn_viz.store import console as sql_console
        from metaattn_viz import store

        if not (query or "").strip():
            raise AppError("Type a query first, e.g. SELECT * FROM runs LIMIT 10.")
        try:
            return sql_console.run_readonly_query(self._require_log(), query, max_rows=max_rows)
        except sql_console.ConsoleError as exc:
            raise AppError(str(exc)) from None
        except store.StoreUnavailable as exc:
            raise AppError(str(exc)) from None

    def export(self, fmt: str = "parquet") -> Path:
        """The whole log as partitioned Parquet or CSV in one zip file."""
        from metaattn_viz import store

        fmt = _choice("Format", fmt, store.EXPORT_FORMATS)
        run_log = self._require_log()
        work = Path(tempfile.mkdtemp(prefix="metaattn-export-"))
        out = work / "routing-log"
        try:
            run_log.flush(timeout=10)
            store.export(run_log, out, fmt)
        except store.StoreUnavailable as exc:
            raise AppError(str(exc)) from None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        archive = work / f"metaattn-routing-log-{stamp}-{fmt}.zip"
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(out.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(out).as_posix())
        return archive

    def flush(self, timeout: float | None = 30.0) -> None:
        """Wait until every run handed to the log so far is committed."""
        self._logger.submit(lambda: None).result(timeout)
        if self.run_log is not None:
            self.log_call(lambda: self.run_log.flush(timeout))

    def close(self) -> None:
        for job in list(self._jobs.values()):
            job.stop()
        self._logger.shutdown(wait=True)
        if self.run_log is not None:
            self.run_log.close()


__all__ = ["Engine", "GenerationJob", "GenerateRequest", "AppError", "Text", "DEFAULTS",
           "clean_prompt",
           "parse_settings", "parse_request", "text_from_json", "snapshot", "CONTROLLERS",
           "MAX_PROMPT_CHARS", "MAX_NEW_TOKENS", "APP_MAX_CONTEXT", "SWEEP_BUDGETS"]
