"""ZeroGPU wired into the app (routing/zerogpu.py, app/gpu_work.py, app/generation.py),
checked with a stand-in `spaces` package that follows spaces 0.51.3's wrappers: its GPU
decorator records the duration asked for and runs the work in a real forked process,
arguments and results pickled through queues, and reuses that worker for later calls. A
generation streams the same tokens, routes and quality meter as without ZeroGPU; the run
log and the job registry stay in this process and state changed in the worker does not come
back; the duration follows zerogpu.estimate_seconds; a stop stops the worker; every model
the host offers reaches the worker, also one bound after it started; an error there fails
the run cleanly, in the words it has off ZeroGPU, and a worker dying during the quality
meter costs only the meter. Off ZeroGPU the decorator is the identity, and ZeroGPU is
detected exactly as `spaces` detects it."""

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
"""A stand-in for `spaces` (tests/test_zerogpu.py), following spaces 0.51.3's
zero/wrappers.py: GPU(task, duration=...) records the duration asked for and runs `task` (a
generator or a plain function) in a forked worker, its arguments and every result pickled
through queues. Each decorated function keeps ONE worker and reuses it for later calls while
it is alive and idle (a worker knows only what its process inherited when it was forked);
a failed call's worker is not reused. Closing the caller's generator sets the worker's stop
event, which it reads after its next item. An exception raised in the worker comes back as
gr.Error(<its class name>, title="ZeroGPU worker error"); a worker that dies mid-call as
gr.Error("GPU task aborted", same title)."""
import functools
import inspect
import multiprocessing
import os
import pickle
import threading
import time

calls = []    # (task name, duration asked for), in the calling process
pids = []     # the worker process that produced each result received
workers = []  # every worker process forked
drained = []  # after each stop: how many results the worker still sent before it stopped
_fork = multiprocessing.get_context("fork")


class _Worker:
    def __init__(self, task, gen):
        self.args, self.res, self.stop = _fork.SimpleQueue(), _fork.SimpleQueue(), _fork.Event()
        self.proc = _fork.Process(
            target=_loop, args=(task, gen, self.args, self.res, self.stop), daemon=True
        )
        # forked from a fresh thread: one that ran OpenMP (torch on the CPU) before would
        # leave the child waiting for its thread pool, which a fork does not copy
        starter = threading.Thread(target=self.proc.start)
        starter.start()
        starter.join()
        workers.append(self.proc)

    def get(self):
        while self.res.empty():
            if not self.proc.is_alive():  # spaces: its sentinel thread queues None
                return "aborted", None
            time.sleep(0.01)
        return self.res.get()


def _loop(task, gen, args_q, res_q, stop):
    pid = os.getpid()
    while True:
        args, kwargs = pickle.loads(args_q.get())
        stop.clear()
        try:
            if gen:
                items = task(*args, **kwargs)
                for item in items:
                    if stop.is_set():
                        items.close()
                        break
                    res_q.put(("ok", pickle.dumps((pid, item))))
                res_q.put(("end", None))
            else:
                res_q.put(("ok", pickle.dumps((pid, task(*args, **kwargs)))))
        except Exception as exc:
            res_q.put(("error", type(exc).__name__))


def _error(kind, payload):
    import gradio as gr

    message = "GPU task aborted" if kind == "aborted" else payload
    return gr.Error(message, title="ZeroGPU worker error", print_exception=False)


def GPU(task=None, *, duration=None, size=None):
    if task is None:
        return functools.partial(GPU, duration=duration, size=size)
    gen = inspect.isgeneratorfunction(task)
    idle = []  # the decorated function's worker, while it is idle

    def start(args, kwargs):
        calls.append((task.__name__, duration(*args, **kwargs) if callable(duration) else duration))
        worker = idle.pop() if idle else None
        if worker is None or not worker.proc.is_alive():
            worker = _Worker(task, gen)
        worker.args.put(pickle.dumps((args, kwargs)))
        return worker

    def received(payload):
        pid, item = pickle.loads(payload)
        pids.append(pid)
        return item

    if not gen:

        @functools.wraps(task)
        def call(*args, **kwargs):
            worker = start(args, kwargs)
            kind, payload = worker.get()
            if kind != "ok":
                raise _error(kind, payload)
            idle.append(worker)
            return received(payload)

        return call

    @functools.wraps(task)
    def stream(*args, **kwargs):
        worker = start(args, kwargs)
        while True:
            kind, payload = worker.get()
            if kind == "end":
                idle.append(worker)
                return
            if kind != "ok":
                raise _error(kind, payload)
            try:
                yield received(payload)
            except GeneratorExit:
                worker.stop.set()
                drained.append(0)
                while (kind := worker.get()[0]) == "ok":  # until the worker has stopped
                    drained[-1] += 1
                if kind == "end":
                    idle.append(worker)
                raise

    return stream
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
        for proc in spaces.workers:  # idle workers wait for calls that will not come
            proc.terminate()
            proc.join(10)
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
        assert spaces.calls == [("_generate_in_worker", expected)]

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
            ("_generate_in_worker", zerogpu.estimate_seconds(2, len(PROMPT.encode()), 0, cold=True)),
            ("_generate_in_worker", zerogpu.estimate_seconds(30, APP_MAX_CONTEXT, gpu_work.QUALITY_PASSES)),
        ]
    assert zerogpu.estimate_seconds(0, 100_000, 2) > zerogpu.estimate_seconds(0, 100_000, 0)
    assert zerogpu.estimate_seconds(0, cold=True) > zerogpu.estimate_seconds(0)


def test_a_stop_on_zerogpu_stops_the_worker_and_is_logged_here(routed, tmp_path, monkeypatch):
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
        # the worker stopped at its next token (not after 200) and serves the next request
        assert spaces.drained and spaces.drained[-1] <= 2
        e.generations.generate(_request(max_new=2, quality=False), timeout=60)
        assert len(spaces.workers) == 1 and len(set(spaces.pids)) == 1
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
        with pytest.raises(ValueError, match="the GPU fell over"):  # the worker's own error
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


def _generate_direct(routed, max_new=2):
    """What GenerationJob does: bind, then the updates of one GPU generation."""
    from metaattn_viz.routing.model import Sampling

    name = gpu_work.bind(routed)
    req = _request(max_new=max_new, quality=False)
    updates = gpu_work.generate_on_gpu(
        name, req.prompt, req.settings, max_new, req.controller, Sampling(), False, None, False
    )
    trace = None
    for update in updates:
        trace = gpu_work.apply(trace, update)
    return trace


def test_a_model_bound_after_the_worker_started_gets_a_fresh_worker(tmp_path, monkeypatch):
    """spaces reuses a GPU function's worker, which knows only the models bound before it
    was forked: a model bound later (as the host does for one loaded after start-up) sends
    the next calls to a fresh worker, which knows every model."""
    a, b = routed_tiny("llama"), routed_tiny("qwen2")
    with fake_zerogpu(tmp_path, monkeypatch) as spaces:
        first = _generate_direct(a)
        again = _generate_direct(a)  # the same worker, reused
        assert len(spaces.workers) == 1 and len(set(spaces.pids)) == 1
        late = _generate_direct(b)  # the old code: "the GPU work has no model 'tiny-qwen2'"
        assert len(spaces.workers) == 2 and spaces.pids[-1] != spaces.pids[0]
        back = _generate_direct(a)  # the fresh worker knows both, and is reused in turn
        assert len(spaces.workers) == 2 and spaces.pids[-1] == spaces.pids[-2]
        # no fresh worker for a model bound again, nor for the first binds before any call
        _generate_direct(b)
        assert len(spaces.workers) == 2
    for got, routed in ((first, a), (again, a), (late, b), (back, a)):
        ref = routed.route(PROMPT, parse_settings(0.5), 2)
        assert got.token_ids == ref.token_ids and got.model == routed.name
        np.testing.assert_array_equal(got.routes, ref.routes)


def test_on_zerogpu_one_worker_serves_every_model_the_host_offers(tmp_path, monkeypatch):
    """The host binds every model as it loads them, before any GPU call forks a worker, so
    the worker spaces reuses serves a model first used after it started."""
    from metaattn_viz.app.analysis import Analysis
    from metaattn_viz.app.generation import Generations
    from metaattn_viz.app.history import RunHistory
    from metaattn_viz.app.host import ModelHost

    models = {"model-a": routed_tiny("llama"), "model-b": routed_tiny("qwen2")}

    def loader(choice):
        if choice.spec not in models:
            raise RuntimeError(f"{choice.name} is not offered in this test")
        return models[choice.spec]

    with fake_zerogpu(tmp_path, monkeypatch) as spaces:
        host = ModelHost(["model-a", "model-b"], threads=False, loader=loader)
        history = RunHistory(str(tmp_path / "log.duckdb"))
        generations = Generations(host, history, Analysis(host, history))
        try:
            for spec in ("model-a", "model-b", "model-a"):
                req = _request(max_new=2, quality=False)
                req = parse_request(req.prompt, req.settings, max_new_tokens=2, quality=False, model=spec)
                job = generations.start(req)
                trace = job.result(60)
                assert job.status == "done" and job.error is None, job.error
                assert trace.model == models[spec].name
        finally:
            generations.stop_all()
            history.close()
        assert len(spaces.workers) == 1 and len(set(spaces.pids)) == 1


def test_a_worker_that_dies_during_the_quality_meter_leaves_the_run_done(routed, tmp_path, monkeypatch):
    """After the "end" update only the quality meter runs in the worker: the worker dying
    there (its GPU time ran out) costs the meter, as a failed meter does off ZeroGPU."""
    with fake_zerogpu(tmp_path, monkeypatch), _engine(routed, tmp_path / "log.duckdb") as e:
        monkeypatch.setattr(gpu_work, "quality_kl", lambda *args, **kwargs: os._exit(1))
        job = e.generations.start(_request(max_new=5, quality=True))
        got = job.result(60)
        assert job.status == "done" and job.error is None
        assert "The quality meter could not be measured for this run." in job.notes
        assert got.kl_to_dense is None
        assert got.n_tokens == got.n_prompt_tokens + 5
        e.history.flush()
        run = e.history.run_log.get_run(job.run_id)
        assert run["status"] == "done" and run["n_tokens"] == got.n_tokens
        # a worker dying before the text is complete still fails the run
        monkeypatch.setattr(routed, "stream", lambda *args, **kwargs: os._exit(1))
        job = e.generations.start(_request(max_new=5, quality=True))
        with pytest.raises(Exception, match="GPU task aborted"):
            job.result(60)
        assert job.status == "failed"


class GPUFellOver(Exception):
    """An exception type that is not built in (as torch.OutOfMemoryError is not)."""


def _fails(routed, kind):  # a GPU task (gpu_work.on_device): travels by name
    from metaattn_viz.app.errors import AppError

    if kind == "app":
        raise AppError("The text is too long for this model.")
    if kind == "custom":
        raise GPUFellOver("2 GiB asked, 1 GiB free")
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_errors_in_the_worker_reach_the_user_as_off_zerogpu(routed, tmp_path, monkeypatch):
    """spaces shows a worker's exception as its bare class name: the GPU work sends its
    errors back as data instead, and the main process raises them again, so the page says
    what it says off ZeroGPU (an AppError's own sentence; else the usual sentence with the
    type's name) and the server log has the worker's traceback."""
    from metaattn_viz.app.errors import AppError
    from metaattn_viz.app.ui_errors import as_gr_error

    original = routed.stream

    def failing(prompt, *args, **kwargs):  # in the worker: it keeps what it was forked with
        stream = original(prompt, *args, **kwargs)
        yield next(stream)  # the prefill
        if "sentence" in prompt:
            raise AppError("The prompt is too long for this model.")
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    routed.stream = failing
    with fake_zerogpu(tmp_path, monkeypatch) as spaces, _engine(routed, tmp_path / "log.duckdb") as e:
        job = e.generations.start(_request(quality=False))
        with pytest.raises(RuntimeError, match="illegal memory access") as caught:
            job.result(60)
        assert type(caught.value) is RuntimeError and job.status == "failed"
        assert any("Raised in the ZeroGPU worker" in note for note in caught.value.__notes__)
        shown = as_gr_error(caught.value, "generating")
        assert shown.message.startswith(
            "Something went wrong while generating (RuntimeError). The server log"
        )

        job = e.generations.start(_request(quality=False, prompt="A sentence of its own."))
        with pytest.raises(AppError, match=r"^The prompt is too long for this model\.$"):
            job.result(60)
        assert as_gr_error(job.error, "generating").message == "The prompt is too long for this model."
        assert job.status == "failed"

        # the analyses (gpu_work.on_device -> run)
        with pytest.raises(AppError, match=r"^The text is too long for this model\.$"):
            gpu_work.on_device(routed, _fails, "app")
        with pytest.raises(gpu_work.WorkerError, match="2 GiB asked") as caught:
            gpu_work.on_device(routed, _fails, "custom")
        assert type(caught.value).__name__ == "GPUFellOver"
        assert as_gr_error(caught.value, "re-routing").message.startswith(
            "Something went wrong while re-routing (GPUFellOver)."
        )
        with pytest.raises(RuntimeError, match="illegal memory access") as caught:
            gpu_work.on_device(routed, _fails, "runtime")
        assert type(caught.value) is RuntimeError
        # an error sent back as data leaves the worker healthy: each GPU function kept one
        assert len(spaces.workers) == 2


def test_a_bare_zerogpu_worker_error_gets_the_usual_sentence():
    """What spaces still shows as a class name (e.g. a result that would not pickle) reads
    as the app's usual sentence; spaces' other messages (quota, queue) pass through."""
    import gradio as gr

    from metaattn_viz.app.ui_errors import as_gr_error

    bare = gr.Error("PicklingError", title="ZeroGPU worker error")
    assert as_gr_error(bare, "generating").message == (
        "Something went wrong while generating (PicklingError). The server log has the details; "
        "the app is still running."
    )
    quota = gr.Error("You have exceeded your ZeroGPU quota (60s requested vs. 10s left).", title="ZeroGPU")
    assert as_gr_error(quota, "generating") is quota
    aborted = gr.Error("GPU task aborted", title="ZeroGPU worker error")
    assert as_gr_error(aborted, "generating") is aborted


@pytest.mark.parametrize(
    "value, on",
    [("1", True), ("t", True), ("true", True), ("TRUE", True), ("T", True)]
    + [(" true", False), ("true\n", False), ("yes", False), ("0", False), ("", False), (None, False)],
)
def test_zerogpu_is_detected_exactly_as_spaces_detects_it(value, on, tmp_path, monkeypatch):
    """spaces (0.51.3, config.py) decorates when SPACES_ZERO_GPU.lower() is "1", "t" or
    "true", with no stripping: the app thinks it is on ZeroGPU exactly then."""
    folder = tmp_path / "fake_spaces"
    (folder / "spaces").mkdir(parents=True)
    (folder / "spaces" / "__init__.py").write_text(FAKE_SPACES)
    monkeypatch.syspath_prepend(str(folder))
    if value is None:
        monkeypatch.delenv(zerogpu.ENV_ZEROGPU, raising=False)
    else:
        monkeypatch.setenv(zerogpu.ENV_ZEROGPU, value)
    assert zerogpu.active() is on
