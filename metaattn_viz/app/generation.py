"""Generations running in their own threads, and the registry of them (one per browser
session).

A `GenerationJob` streams tokens from the hosted model in a worker thread, records the run
as it grows (history.RunRecorder), measures the quality meter when the text is complete
(if asked), and publishes snapshots of the growing trace; `updates(interval)` hands them to
the page at most every `interval` seconds (every token when generation is slower).
`Generations` starts jobs, stops a session's previous one when it starts a new one, and
answers whether a session has one running.

How a run ends, as the routing log records it (docs/architecture.md, the routing log): `done`;
`stopped` when a person ended it (the Stop button, a new Generate in the same session, the
page closed, an API call cancelled); `interrupted` only when the server itself ends mid-run
(`stop_all` at shutdown, which waits for the jobs' last writes), as a process that died
would leave it; `failed` on an error. Never imports
gradio.

The model's work itself is gpu_work.generate, which yields compact updates that the job
applies to its own trace: on ZeroGPU it runs inside ``@spaces.GPU`` in a forked worker
(with the quality meter, so one GPU call serves the request), and anywhere else in the
job's thread (the quality meter then comes from Analysis, whose dense-logits cache it
feeds). Either way the run log, this registry and that cache stay in this process. A stop
closes the update generator: here that ends decoding at once; on ZeroGPU ``spaces`` tells
the worker, which stops at its next token. On ZeroGPU an error after the text is complete
(the worker dying during the quality meter, e.g. at the end of its GPU time) leaves the run
`done` with the note that the quality meter could not be measured, as a failed meter does
off ZeroGPU. The job's thread runs in the context of the
request that started it, so ZeroGPU charges the GPU time to that visitor.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import logging
import threading
import time
import uuid

from metaattn_viz.app import gpu_work
from metaattn_viz.app.analysis import Analysis
from metaattn_viz.app.errors import AppError
from metaattn_viz.app.history import RunHistory
from metaattn_viz.app.host import ModelHost
from metaattn_viz.app.requests import APP_MAX_CONTEXT, GenerateRequest
from metaattn_viz.core.trace import RoutingTrace
from metaattn_viz.routing import zerogpu

log = logging.getLogger(__name__)

QUALITY_FAILED = "The quality meter could not be measured for this run."

STREAM_INTERVAL_S = 0.25  # views refresh at most 4 times a second (every token if slower)
SHUTDOWN_WAIT_S = 10.0  # how long a closing server waits for its generations to end


def snapshot(trace: RoutingTrace) -> RoutingTrace:
    """A consistent copy of a growing trace, cheap: arrays are replaced, never written in
    place, when a trace grows, so sharing them is safe; the lists and dict are copied."""
    return dataclasses.replace(
        trace, token_ids=list(trace.token_ids), tokens=list(trace.tokens), timings=dict(trace.timings)
    )


class GenerationJob:
    """One streaming generation. The worker thread owns the RoutedModel stream and the
    run's recorder; readers take snapshots through `updates()`."""

    def __init__(
        self,
        host: ModelHost,
        history: RunHistory,
        analysis: Analysis,
        request: GenerateRequest,
        key: str | None = None,
        owner: str | None = None,
    ):
        self.host, self.analysis = host, analysis
        self.request = request
        self.key = key or uuid.uuid4().hex
        self.stop_event = threading.Event()
        self.phase = "starting"  # starting | prefill | decoding | quality | done
        self.error: BaseException | None = None
        self.notes: list[str] = list(request.notes)
        self.status: str | None = None  # done | stopped | interrupted | failed
        self._stop_status = "stopped"  # the status a stop leaves (stop(status=...))
        self._quality = request.quality  # the quality meter is wanted (a stop may say no)
        self._recorder = history.recorder("generate", owner)
        self._cond = threading.Condition()
        self._latest: RoutingTrace | None = None
        self._version = 0
        self._done = False
        # the context of the request that starts the job (ZeroGPU reads its visitor from it)
        context = contextvars.copy_context()
        self._thread = threading.Thread(
            target=context.run, args=(self._run,), name=f"generate-{self.key[:8]}", daemon=True
        )

    def start(self) -> GenerationJob:
        self._thread.start()
        return self

    @property
    def run_id(self) -> str | None:
        """The run's id in the routing log (None until logged, or if it is not)."""
        return self._recorder.run_id

    @property
    def done(self) -> bool:
        return self._done

    def stop(self, status: str = "stopped", quality: bool = True) -> None:
        """End the generation after the current token; the run is logged as `status`:
        "stopped" (a person ended it) or "interrupted" (the server is going away, which
        overrides an earlier stop). `quality=False`: no quality meter (nobody will read it,
        as for a cancelled API call); a server going away never measures it."""
        if not self.stop_event.is_set() or status == "interrupted":
            self._stop_status = status
        if not quality or status == "interrupted":
            self._quality = False
        self.stop_event.set()

    def _note(self, note: str | None) -> None:
        if note:
            self.notes.append(note)

    def _publish(self, trace: RoutingTrace | None, done: bool = False) -> None:
        snap = snapshot(trace) if trace is not None else None
        with self._cond:
            if snap is not None:
                self._latest = snap
            self._version += 1
            self._done = self._done or done
            self._cond.notify_all()

    def _run(self) -> None:
        from metaattn_viz.routing.model import Sampling

        req = self.request
        trace = None
        try:
            routed = self.host.routed_model(model=req.model or None)
            model = gpu_work.bind(routed)  # before the GPU call: a forked worker inherits it
            self.phase = "prefill"
            quality_on_gpu = req.quality and zerogpu.active()
            updates = gpu_work.generate_on_gpu(
                model,
                req.prompt,
                req.settings,
                req.max_new_tokens,
                req.controller,
                Sampling(req.temperature, req.top_p, req.seed),
                req.chat,
                APP_MAX_CONTEXT,
                quality_on_gpu,
            )
            ended = False  # the "end" update came: the text is complete, whatever follows
            with contextlib.closing(updates):  # leaving early (a stop, an error) stops the work
                try:
                    for update in updates:
                        trace = gpu_work.apply(trace, update)
                        if update["kind"] == "tokens":
                            self._record(trace)
                            self.phase = "decoding"
                            self._publish(trace)
                            if self.stop_event.is_set():
                                trace.timings["stopped"] = True
                                break
                        elif update["kind"] == "end":
                            ended = True
                            gpu_work.mark_warm()
                            self.status = self._stop_status if self.stop_event.is_set() else "done"
                            if quality_on_gpu and trace.n_tokens > 1:
                                self.phase = "quality"
                                self._publish(trace)
                        elif update["kind"] == "quality" and update["error"]:
                            log.error("quality (dense shadow) pass failed on the GPU: %s", update["error"])
                            self.notes.append(QUALITY_FAILED)
                except Exception:
                    # After "end" only the quality meter runs (on ZeroGPU, in the worker): a
                    # worker that dies there (its time ran out) costs the meter, not the run.
                    if not ended:
                        raise
                    log.exception("the GPU work failed after the text was complete")
                    if quality_on_gpu and trace is not None and trace.n_tokens > 1:
                        self.notes.append(QUALITY_FAILED)
            if self.status is None:  # stopped before decoding ended
                self.status = self._stop_status
            # no dense shadow pass on the way out, nor for a call nobody waits on
            if self._quality and not quality_on_gpu and trace is not None and trace.n_tokens > 1:
                self.phase = "quality"
                self._publish(trace)
                try:
                    trace.kl_to_dense = self.analysis.quality(trace)
                except Exception:  # the generation itself succeeded: keep it
                    log.exception("quality (dense shadow) pass failed")
                    self.notes.append(QUALITY_FAILED)
        except AppError as exc:
            self.error, self.status = exc, "failed"
        except Exception as exc:  # shown as a short message; the detail stays in the log
            log.exception("generation failed")
            self.error, self.status = exc, "failed"
        finally:
            self._note(self._recorder.finish(trace, self.status, self.error))
            self.phase = "done"
            self._publish(trace, done=True)

    def _record(self, trace: RoutingTrace) -> None:
        """The run log follows the trace: started with the routed prompt, then updated."""
        rec = self._recorder
        if rec.run_log is not None and not rec.started:
            self._note(rec.start(trace))
            if trace.truncated:
                self.notes.append(
                    f"The prompt was cut from the left to fit: {trace.truncated} tokens dropped."
                )
        else:
            self._note(rec.update(trace))

    def updates(self, interval: float = STREAM_INTERVAL_S, timeout: float | None = None):
        """Yield snapshots of the trace as it grows, at most one per `interval` seconds
        (always the newest), and a last one when the job ends (possibly None if it failed
        before the prefill). Raises TimeoutError if nothing happens for `timeout` s."""
        seen = -1
        next_at = 0.0
        while True:
            with self._cond:
                # the predicate runs within this iteration, so it sees this `seen`
                if not self._cond.wait_for(
                    lambda: self._version != seen or self._done,  # noqa: B023
                    timeout=timeout,
                ):
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

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker thread to end (at most `timeout` s); whether it has."""
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def result(self, timeout: float | None = None) -> RoutingTrace:
        """Wait for the end; the final trace, or the AppError / error that stopped it."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("the generation is still running")
        if self.error is not None:
            raise self.error
        return self._latest


class Generations:
    """The running generations, one per key (a browser session; API calls get their own)."""

    def __init__(self, host: ModelHost, history: RunHistory, analysis: Analysis):
        self.host, self.history, self.analysis = host, history, analysis
        self._jobs: dict[str, GenerationJob] = {}
        self._lock = threading.Lock()
        self._closing = False  # stop_all ran: the server is going away, nothing new starts

    def start(
        self, request: GenerateRequest, key: str | None = None, owner: str | None = None
    ) -> GenerationJob:
        """Start a generation, logged as `owner`'s run (a key of store.owners, or None); a
        second one under the same key (a browser session) stops the first. Refused once the
        server is closing (`stop_all`). A job is registered and started under one lock, so
        `stop_all` never finds one it cannot wait for."""
        job = GenerationJob(self.host, self.history, self.analysis, request, key, owner)
        with self._lock:
            if self._closing:
                raise AppError("The server is shutting down: no new generation starts. Try again shortly.")
            old = self._jobs.get(job.key)
            if old is not None and not old.done:
                old.stop()
            self._jobs[job.key] = job
            for k in [k for k, j in self._jobs.items() if j.done and k != job.key]:
                del self._jobs[k]
            return job.start()

    def stop(self, key: str) -> bool:
        """Stop the running generation of `key`; False if there is none."""
        with self._lock:
            job = self._jobs.get(key)
        if job is None or job.done:
            return False
        job.stop()
        return True

    def running(self, key: str) -> bool:
        with self._lock:
            job = self._jobs.get(key)
        return job is not None and not job.done

    def generate(
        self, request: GenerateRequest, timeout: float | None = None, owner: str | None = None
    ) -> RoutingTrace:
        """Blocking generation (tests and the GPU check; the API endpoint awaits its job so
        that a cancelled call can stop it)."""
        return self.start(request, owner=owner).result(timeout)

    def stop_all(self, wait: float = SHUTDOWN_WAIT_S) -> None:
        """The server is closing: every running generation ends as `interrupted`. Waits up
        to `wait` s in all for them to end (after their current token and their last log
        write), so that none is cut off at interpreter exit. Later starts are refused."""
        with self._lock:
            self._closing = True
            jobs = list(self._jobs.values())
        for job in jobs:
            job.stop("interrupted")
        deadline = time.monotonic() + wait
        for job in jobs:
            job.join(max(0.0, deadline - time.monotonic()))


__all__ = ["GenerationJob", "Generations", "snapshot", "STREAM_INTERVAL_S"]
