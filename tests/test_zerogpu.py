"""ZeroGPU wired into the app (routing/zerogpu.py, app/gpu_work.py, app/generation.py),
checked with a stand-in `spaces` package: its GPU decorator records the duration asked for
and runs the generation in a real forked process, arguments and yields pickled through
queues, as ZeroGPU does. A generation streams the same tokens, routes and quality meter as
without ZeroGPU; the run log and the job registry stay in this process and state changed in
the worker does not come back; the duration follows zerogpu.estimate_seconds; a stop ends
the worker; an error there fails the run cleanly. Off ZeroGPU the decorator is the identity."""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import sys
import threading
import time

import numpy as np
import pytest
from helpers import routed_tiny

from metaattn_viz.app import gpu_work
from metaattn_viz.app.engine import Engine
from metaattn_viz.app.requests import parse_request, parse_settings
from metaattn_viz.routing import device, zerogpu

PROMPT = "The quick brown fox jumps over the lazy dog. "

# The stand-in for Hugging Face's `spaces` package, written to a temporary folder on sys.path.
FAKE_SPACES = '''
"""A stand-in for `spaces` (tests/test_zerogpu.py): GPU(task, duration=...) records the
duration and runs the generator `task` in a forked process, its arguments and every yield
pickled through queues; closing the caller's generator tells the worker to stop at its next
yield, as ZeroGPU does."""
import functools
import inspect
import multiprocessing
import os
import pickle
import threading

calls = []    # (task name, duration asked for), in the calling process
pids = []     # the process that produced each yield
workers = []  # the forked processes
_fork = multiprocessing.get_context("fork")


def GPU(task=None, *, duration=None, size=None):
    if task is None:
        return functools.partial(GPU, duration=duration, size=size)
    if not inspect.isgeneratorfunction(task):
        return _function(task, duration)

    @functools.wraps(task)
    def handler(*args, **kwargs):
        calls.append((task.__name__, duration(*args, **kwargs) if callable(duration) else duration))
        jobs, results, stop = _fork.SimpleQueue(), _fork.SimpleQueue(), _fork.Event()
        proc = _fork.Process(target=_work, args=(task, jobs, results, stop), daemon=True)
        proc.start()
        workers.append(proc)
        jobs.put(pickle.dumps((args, kwargs)))
        try:
            while True:
                kind, payload = results.get()
                if kind == "end":
                    return
                if kind == "error":
                    raise RuntimeError(f"GPU task failed: {payload}")
                pid, item = pickle.loads(payload)
                pids.append(pid)
                try:
                    yield item
                except GeneratorExit:
                    stop.set()
                    raise
        finally:
            while proc.is_alive():  # let a worker blocked on a full pipe finish
                if not results.empty():
                    results.get()
                proc.join(0.05)

    return handler


def _function(task, duration):
    """A plain function: run in a forked process, its result pickled back."""

    @functools.wraps(task)
    def handler(*args, **kwargs):
        calls.append((task.__name__, duration(*args, **kwargs) if callable(duration) else duration))
        results = _fork.SimpleQueue()

        def work():
            try:
                results.put(("ok", pickle.dumps((os.getpid(), task(*args, **kwargs)))))
            except Exception as exc:
                results.put(("error", f"{type(exc).__name__}: {exc}"))

        proc = _fork.Process(target=work, daemon=True)
        # forked from a fresh thread: one that ran OpenMP (torch on the CPU) before would
        # leave the child waiting for its thread pool, which a fork does not copy
        starter = threading.Thread(target=proc.start)
        starter.start()
        starter.join()
        workers.append(proc)
        kind, payload = results.get()
        proc.join()
        if kind == "error":
            raise RuntimeError(f"GPU task failed: {payload}")
        pid, result = pickle.loads(payload)
        pids.append(pid)
        return result

    return handler


def _work(task, jobs, results, stop):
    args, kwargs = pickle.loads(jobs.get())
    gen = task(*args, **kwargs)
    try:
        for item in gen:
            if stop.is_set():
                gen.close()
                break
            results.put(("yield", pickle.dumps((os.getpid(), item))))
    except Exception as exc:
        results.put(("error", f"{type(exc).__name__}: {exc}"))
        return
    results.put(("end", None))
'''

TOUCHED: list[int] = []  # appended to by the worker's stream: must stay empty here


@contextlib.contextmanager
def fake_zerogpu(tmp_path, monkeypatch):
    """SPACES_ZERO_GPU=1 with the stand-in `spaces` importable; gpu_work re-imported so that
    its GPU function is decorated by it (ZeroGPU decorates at import). Undone on exit."""
    folder = tmp_path / "fake_spaces"
    (folder / "spaces").mkdir(parents=True)
    (folder / "spaces" / "__init__.py").write_text(FAKE_SPACES)
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.setenv(zerogpu.ENV_ZEROGPU, "1")
    sys.modules.pop("spaces", None)
    import spaces

    importlib.reload(gpu_work)
    try:
        yield spaces
    finally:
        monkeypatch.delenv(zerogpu.ENV_ZEROGPU)
        sys.modules.pop("spaces", None)
        importlib.reload(gpu_work)


def _request(max_new=10, quality=True, prompt=PROMPT):
    return parse_request(prompt, parse_settings(0.5), max_new_tokens=max_new, quality=quality, chat=False)


@pytest.fixture()
def routed():
    return routed_tiny(spread=3.0)


@contextlib.contextmanager
def _engine(routed, path):
    engine = Engine(routed=routed, db=str(path))
    try:
        yield engine
    finally:
        engine.close()


def slowed(routed, delay, on_token=None):
    """`routed` streams one token every `delay` s (in whichever process runs it), and
    notes that process in TOUCHED (state that must not come back from a worker)."""
    original = routed.stream

    def slow_stream(*args, **kwargs):
        TOUCHED.append(os.getpid())
        for n, trace in enumerate(original(*args, **kwargs), 1):
            if on_token is not None:
                on_token(n)
            time.sleep(delay)
            yield trace

    routed.stream = slow_stream


def test_off_zerogpu_the_gpu_work_is_the_plain_function(monkeypatch):
    monkeypatch.delenv(zerogpu.ENV_ZEROGPU, raising=False)
    importlib.reload(gpu_work)
    assert gpu_work.generate_on_gpu is gpu_work.generate


def test_a_generation_on_zerogpu_matches_one_without_and_stays_logged_here(routed, tmp_path, monkeypatch):
    req = _request()
    with _engine(routed, tmp_path / "off.duckdb") as off:
        ref = off.generations.generate(req, timeout=120)
    TOUCHED.clear()
    slowed(routed, 0.0)
    with fake_zerogpu(tmp_path, monkeypatch) as spaces, _engine(routed, tmp_path / "on.duckdb") as on:
        assert zerogpu.active() and gpu_work.generate_on_gpu is not gpu_work.generate
        # ZeroGPU: the main process places the model on CUDA (made lazy by spaces)
        assert device.resolve() == device.Placement("cuda:0", "bfloat16")
        job = on.generations.start(req, key="visitor")
        got = job.result(120)
        assert job.status == "done" and job.error is None

        # the same text, decisions and quality meter, made in another process
        assert spaces.pids and all(pid != os.getpid() for pid in spaces.pids)
        assert TOUCHED == []  # the worker's state does not come back
        assert got.token_ids == ref.token_ids and got.tokens == ref.tokens
        assert got.output_text == ref.output_text and got.n_prompt_tokens == ref.n_prompt_tokens
        assert got.n_tokens == ref.n_prompt_tokens + req.max_new_tokens
        np.testing.assert_array_equal(got.routes, ref.routes)
        np.testing.assert_array_equal(got.hedged, ref.hedged)
        for name in ("concentration", "weights", "cost", "lam"):
            np.testing.assert_allclose(getattr(got, name), getattr(ref, name), rtol=0, atol=1e-6)
        assert got.kl_to_dense is not None and ref.kl_to_dense is not None
        np.testing.assert_allclose(got.kl_to_dense, ref.kl_to_dense, rtol=1e-4, atol=1e-6)
        assert got.model == ref.model and got.settings == ref.settings
        assert {"prefill_ms", "decode_ms", "total_ms"} <= set(got.timings)

        # the duration asked for follows the request (the first call pays for compiling)
        expected = zerogpu.estimate_seconds(
            req.max_new_tokens, len(PROMPT.encode()), gpu_work.QUALITY_PASSES, cold=True
        )
        assert spaces.calls == [("generate", expected)]

        # the run log and the job registry live here
        on.history.flush()
        run = on.history.run_log.get_run(job.run_id)
        assert run["status"] == "done" and run["n_tokens"] == got.n_tokens
        assert not on.generations.running("visitor")


def test_the_duration_follows_the_request(routed, tmp_path, monkeypatch):
    long_prompt = "Zürich " * 200  # more bytes than the app's context: capped there
    with fake_zerogpu(tmp_path, monkeypatch) as spaces, _engine(routed, tmp_path / "log.duckdb") as e:
        for req in (_request(max_new=2, quality=False), _request(max_new=30, prompt=long_prompt)):
            e.generations.generate(req, timeout=120)
        from metaattn_viz.app.requests import APP_MAX_CONTEXT

        assert spaces.calls == [
            ("generate", zerogpu.estimate_seconds(2, len(PROMPT.encode()), 0, cold=True)),
            ("generate", zerogpu.estimate_seconds(30, APP_MAX_CONTEXT, gpu_work.QUALITY_PASSES)),
        ]
    assert zerogpu.estimate_seconds(0, 100_000, 2) > zerogpu.estimate_seconds(0, 100_000, 0)
    assert zerogpu.estimate_seconds(0, cold=True) > zerogpu.estimate_seconds(0)


def test_a_stop_on_zerogpu_ends_the_worker_and_is_logged_here(routed, tmp_path, monkeypatch):
    slowed(routed, 0.03)
    with fake_zerogpu(tmp_path, monkeypatch) as spaces, _engine(routed, tmp_path / "log.duckdb") as e:
        job = e.generations.start(_request(max_new=200), key="s")
        n_prompt = None
        for snap in job.updates(interval=0.0, timeout=60):
            n_prompt = snap.n_prompt_tokens
            if snap.n_tokens >= n_prompt + 3:
                break
        assert e.generations.stop("s")
        final = job.result(60)
        assert job.status == "stopped" and final.timings.get("stopped") is True
        assert n_prompt + 3 <= final.n_tokens < n_prompt + 200
        assert final.kl_to_dense is None  # a stopped run is not measured on ZeroGPU
        for proc in spaces.workers:
            proc.join(10)
        assert spaces.workers and not any(p.is_alive() for p in spaces.workers)
        e.history.flush()
        run = e.history.run_log.get_run(job.run_id)
        assert run["status"] == "stopped" and run["n_tokens"] == final.n_tokens


def test_an_error_in_the_worker_fails_the_run_cleanly(routed, tmp_path, monkeypatch):
    original = routed.stream

    def failing(*args, **kwargs):
        stream = original(*args, **kwargs)
        yield next(stream)  # the prefill
        raise ValueError("the GPU fell over")

    routed.stream = failing
    with fake_zerogpu(tmp_path, monkeypatch), _engine(routed, tmp_path / "log.duckdb") as e:
        job = e.generations.start(_request(quality=False))
        with pytest.raises(RuntimeError, match="the GPU fell over"):
            job.result(60)
        assert job.status == "failed"
        last = list(job.updates(timeout=10))[-1]  # the prefill came back before the error
        assert last is not None and last.n_tokens == last.n_prompt_tokens > 0
        e.history.flush()
        run = e.history.run_log.get_run(job.run_id)
        assert run["status"] == "failed" and run["n_tokens"] == last.n_tokens


def test_updates_carry_only_the_new_positions_and_rebuild_the_trace(routed, tmp_path):
    gpu_work.bind(routed)
    from metaattn_viz.routing.model import Sampling

    req = _request(max_new=4)
    updates = list(
        gpu_work.generate(
            routed.name, req.prompt, req.settings, 4, req.controller, Sampling(), False, None, True
        )
    )
    assert [u["kind"] for u in updates] == ["tokens"] * 5 + ["end", "quality"]
    assert "header" in updates[0] and all("header" not in u for u in updates[1:])
    for u in updates[1:5]:  # one decoded token each: [L, 1, ...] arrays
        assert len(u["ids"]) == 1 and all(a.shape[1] == 1 for a in u["arrays"])
        assert len(pickle.dumps(u)) < 4000
    trace = None
    for u in updates:
        trace = gpu_work.apply(trace, pickle.loads(pickle.dumps(u)))
    ref = routed.route(req.prompt, req.settings, 4, controller=req.controller)
    assert trace.token_ids == ref.token_ids and trace.output_text == ref.output_text
    np.testing.assert_array_equal(trace.routes, ref.routes)
    np.testing.assert_allclose(trace.weights, ref.weights, atol=1e-6)
    with _engine(routed, tmp_path / "log.duckdb") as e:  # the page's own quality meter
        reference_kl = e.analysis.quality(ref)
    np.testing.assert_allclose(trace.kl_to_dense, reference_kl, rtol=1e-4, atol=1e-7)


def test_bad_updates_and_unknown_models_are_refused(routed):
    with pytest.raises(ValueError, match="before the first tokens"):
        gpu_work.apply(None, {"kind": "end", "timings": {}, "output_text": ""})
    with pytest.raises(ValueError, match="header"):
        gpu_work.apply(None, {"kind": "tokens"})
    gpu_work.bind(routed)
    first = next(
        gpu_work.generate(routed.name, PROMPT, parse_settings(0.5), 0, "bayes", None, False, None, False)
    )
    trace = gpu_work.apply(None, first)
    with pytest.raises(ValueError, match="unknown update kind"):
        gpu_work.apply(trace, {"kind": "nonsense"})
    with pytest.raises(RuntimeError, match="no model 'elsewhere'"):
        next(
            gpu_work.generate("elsewhere", PROMPT, parse_settings(0.5), 0, "bayes", None, False, None, False)
        )


def test_the_job_thread_runs_in_the_context_of_the_request_that_started_it(routed, tmp_path):
    import contextvars

    visitor = contextvars.ContextVar("visitor", default=None)
    seen = []
    original = routed.stream

    def spying(*args, **kwargs):
        seen.append((visitor.get(), threading.current_thread().name))
        yield from original(*args, **kwargs)

    routed.stream = spying
    with _engine(routed, tmp_path / "log.duckdb") as e:
        visitor.set("alice")
        e.generations.generate(_request(max_new=1, quality=False), timeout=60)
    assert seen and seen[0][0] == "alice" and seen[0][1].startswith("generate-")


def test_the_zerogpu_requirements_pin_a_torch_that_zerogpu_and_this_project_accept():
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    text = (root / "spaces/requirements-zerogpu.txt").read_text()
    pinned = re.search(r"^torch==(\S+)$", text, re.MULTILINE).group(1)
    floor = re.search(r'"torch>=([\d.]+)"', (root / "pyproject.toml").read_text()).group(1)

    def version(v):
        return tuple(int(x) for x in v.split("."))

    assert pinned in zerogpu.TORCH_VERSIONS and version(pinned) >= version(floor)
    assert re.search(r"^spaces==", text, re.MULTILINE)


def test_the_analyses_run_in_a_gpu_worker_on_zerogpu(routed, tmp_path, monkeypatch):
    """Quality, re-route, sweep and the attention view each run in a forked GPU worker on
    ZeroGPU and give what they give without it; each asks for GPU time by its passes."""
    req = _request(max_new=4, quality=False)
    with _engine(routed, tmp_path / "off.duckdb") as off:
        trace = off.generations.generate(req, timeout=120)
        settings = parse_settings(0.3)
        want = (
            off.analysis.quality(trace),
            off.analysis.reroute(trace, settings, log_run=False),
            off.analysis.sweep(trace, trace.settings, budgets=(0.5,)),
            off.analysis.inspect(trace, 5),
        )
    with fake_zerogpu(tmp_path, monkeypatch) as spaces, _engine(routed, tmp_path / "on.duckdb") as on:
        got = (
            on.analysis.quality(trace),
            on.analysis.reroute(trace, settings, log_run=False),
            on.analysis.sweep(trace, trace.settings, budgets=(0.5,)),
            on.analysis.inspect(trace, 5),
        )
        assert len(spaces.pids) == 4 and os.getpid() not in spaces.pids
        assert [name for name, _ in spaces.calls] == ["run"] * 4
        assert all(zerogpu.MIN_SECONDS <= seconds <= zerogpu.MAX_SECONDS for _, seconds in spaces.calls)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(got[1].routes, want[1].routes)
    assert [r["policy"] for r in got[2]] == [r["policy"] for r in want[2]]
    kls = [[r["kl_to_dense"] for r in rows] for rows in (got[2], want[2])]
    np.testing.assert_allclose(kls[0], kls[1], rtol=1e-4)
    assert pickle.dumps(got[3]) == pickle.dumps(want[3]) or got[3] == want[3]


def test_on_zerogpu_the_host_loads_every_model_in_this_thread_before_launch(tmp_path, monkeypatch):
    """spaces moves only what was placed before launch, from the thread that imported it:
    the host loads every offered model right away, in the calling thread, without a
    warm-up pass, and never drops one."""
    from metaattn_viz.app.host import ModelHost

    loads = []

    class Loaded:
        def __init__(self, choice):
            loads.append((choice.id, threading.get_ident()))
            self.name, self.controllers = choice.name, {}

        def prefill(self, *args, **kwargs):  # a warm-up pass would need the GPU
            raise AssertionError("no warm-up pass on ZeroGPU")

    with fake_zerogpu(tmp_path, monkeypatch):
        host = ModelHost(["model-a", "model-b", "model-c"], threads=False, max_loaded=1, loader=Loaded)
        ids = [mid for _, mid in host.choices()]
        assert [mid for mid, _ in loads] == ids and len(ids) >= 3  # all, before __init__ returned
        assert {thread for _, thread in loads} == {threading.get_ident()}
        assert host.loaded_ids() == ids and host.max_loaded >= len(ids)  # none dropped
        assert all(host.is_ready(mid) for mid in ids)
