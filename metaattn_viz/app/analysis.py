"""What the page asks of a text it already has: the quality meter (KL to the dense model),
a re-route under other settings, the budget sweep against the baselines, and the attention
one token actually used.

Each is one or a few prefills of the same token ids on the hosted model that made the text
(a trace's ``model``; a text without one, from the API, goes to the default model). The
dense logits are cached per model and text (the last DENSE_CACHE_SIZE), so dragging the
slider with the quality meter on runs one routed pass and no dense one. Re-routes are
logged as `reroute` runs in the background. Never imports gradio; never writes the log itself.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

import numpy as np

from metaattn_viz.app import gpu_work
from metaattn_viz.app.errors import AppError
from metaattn_viz.app.history import RunHistory
from metaattn_viz.app.host import ModelHost
from metaattn_viz.app.requests import APP_MAX_CONTEXT, choice, number, whole
from metaattn_viz.core.settings import COSTS, DEFAULT_CONTROLLER, LINEAR, LOCAL, MIN_COST, RoutingSettings
from metaattn_viz.core.trace import RoutingTrace
from metaattn_viz.routing import zerogpu
from metaattn_viz.routing.controller import KINDS

SWEEP_BUDGETS = (0.2, 0.35, 0.5, 0.75)
DENSE_CACHE_SIZE = 2


class Analysis:
    """Quality, re-route, sweep and inspection over the hosted model."""

    def __init__(self, host: ModelHost, history: RunHistory):
        self.host = host
        self.history = history
        self._dense_cache: OrderedDict = OrderedDict()
        self._dense_lock = threading.Lock()

    def routed_for(self, text):
        """The hosted model that made `text` (its ``model``, if it names one), else the
        default model; AppError if this server does not offer it."""
        return self.host.routed_model(model=getattr(text, "model", None) or None)

    def _dense_logits(self, routed, ids: list[int]):
        key = (routed.name, tuple(ids))
        with self._dense_lock:
            hit = self._dense_cache.get(key)
            if hit is not None:
                self._dense_cache.move_to_end(key)
                return hit
        import torch

        logits = routed.dense_logits(torch.tensor([ids]))[0]  # [T, V]
        with self._dense_lock:
            self._dense_cache[key] = logits
            while len(self._dense_cache) > DENSE_CACHE_SIZE:
                self._dense_cache.popitem(last=False)
        return logits

    def quality(self, trace: RoutingTrace) -> np.ndarray:
        """KL(dense || routed) of the next-token distribution at every position [T]: a dense
        shadow pass, and the routed model replaying the trace's own decisions (forced
        weights), so a streamed generation is measured on exactly what it did
        (gpu_work.quality_kl; on ZeroGPU in a GPU worker, the dense pass there too)."""
        ids = list(trace.token_ids)
        if not ids:
            raise AppError("Nothing to measure: the trace has no tokens.")
        routed = self.routed_for(trace)
        if zerogpu.active():  # the dense logits ([T, vocab]) stay in the worker
            return gpu_work.on_device(routed, gpu_work.quality_kl, trace, passes=2, tokens=len(ids))
        return gpu_work.quality_kl(routed, trace, self._dense_logits(routed, ids))

    def reroute(
        self,
        text,
        settings: RoutingSettings,
        controller: str | None = None,
        log_run: bool = True,
        owner: str | None = None,
    ) -> RoutingTrace:
        """The same text (a trace, or a requests.Text) routed again under `settings` (one
        prefill); logged as `owner`'s `reroute` run in the background."""
        if controller is not None:
            choice("Controller", controller, KINDS)
        if not getattr(text, "token_ids", None):
            raise AppError("Nothing to re-route yet: generate (or replay) a text first.")
        routed = self.routed_for(text)
        if len(text.token_ids) > APP_MAX_CONTEXT:
            raise AppError(
                f"The text has {len(text.token_ids)} tokens; the app re-routes at most {APP_MAX_CONTEXT}."
            )
        t0 = time.perf_counter()
        new = gpu_work.on_device(routed, _reroute, text, settings, controller, tokens=len(text.token_ids))
        dt = time.perf_counter() - t0
        new.timings["tokens_per_s"] = new.n_tokens / dt if dt > 0 else None
        new.timings["reroute_ms"] = 1000 * dt
        if log_run:
            self.history.log_finished(new, "reroute", owner)
        return new

    def sweep(self, text, base: RoutingSettings, budgets=SWEEP_BUDGETS, progress=None) -> list[dict]:
        """KL to dense and realised cost of the text routed at each budget by both
        controllers and the baselines (random, salience top-k at the same budgets;
        all-linear and all-local), plus the dense point (docs/method.md, "Budget"). Rows
        for plots.pareto; `progress(fraction, description)` is called before each pass
        (not on ZeroGPU, where the passes run in a GPU worker)."""
        ids = list(text.token_ids)
        if len(ids) < 2:
            raise AppError("The sweep needs a text of at least two tokens.")
        budgets = [number("Budget", b, MIN_COST, 1.0) for b in budgets]
        routed = self.routed_for(text)
        if zerogpu.active():
            n = 1 + len(budgets) * (len(KINDS) + 2) + 2
            return gpu_work.on_device(
                routed, sweep_rows, ids, base, budgets, None, None, passes=n, tokens=len(ids)
            )
        return sweep_rows(routed, ids, base, budgets, self._dense_logits(routed, ids), progress)

    def inspect(self, trace: RoutingTrace, pos: int, max_tokens: int | None = None):
        """The attention token `pos` actually used (attention_maps.AttentionView), from a
        prefill of its prefix with the trace's decisions forced."""
        if trace is None or trace.n_tokens == 0:
            raise AppError("Nothing to inspect yet: generate (or replay) a text first.")
        pos = whole("Token position", pos, 0, trace.n_tokens - 1)
        try:
            mid = self.host.resolve(trace.model)
        except AppError:
            raise AppError(
                f"This run used the model {trace.model}; the attention view needs that model, "
                "which this server does not offer."
            ) from None
        if not self.host.is_ready(mid):
            self.host.start_loading(mid)
            raise AppError(
                f"The attention view needs the model {trace.model}, which is not loaded yet; "
                "try again in a few seconds."
            )
        routed = self.host.routed_model(model=mid)
        return gpu_work.on_device(routed, attention_view, trace, pos, max_tokens, tokens=pos + 1)


def _reroute(routed, text, settings: RoutingSettings, controller: str | None) -> RoutingTrace:
    return routed.reroute(text, settings, controller, quality=False)


def attention_view(routed, trace: RoutingTrace, pos: int, max_tokens: int | None = None):
    """The attention token `pos` of `trace` used (attention_maps.AttentionView): a prefill of
    its prefix with the trace's decisions forced, capturing q and k."""
    import torch

    from metaattn_viz.app import attention_maps

    ids = torch.tensor([trace.token_ids[: pos + 1]])
    forced = [
        torch.from_numpy(np.ascontiguousarray(trace.weights[layer, : pos + 1]))[None]
        for layer in range(trace.n_layers)
    ]  # [1, pos+1, 3] per layer
    res = routed.prefill(
        ids, trace.settings, trace.controller, forced_weights=forced, capture_qk=True, use_cache=False
    )
    kw = {} if max_tokens is None else {"max_tokens": max_tokens}
    return attention_maps.attention_view(
        res.session.qk,
        trace.weights,
        trace.tokens,
        pos,
        trace.settings.window,
        trace.settings.n_sink,
        **kw,
    )


def sweep_rows(
    routed, ids: list[int], base: RoutingSettings, budgets, dense=None, progress=None
) -> list[dict]:
    """The rows of ``Analysis.sweep`` for token ids `ids` on `routed` (`dense`: the dense
    logits [T, V], None: computed here). Each row's `realized_cost` is in the cost model's
    units (`cost_model`): under "flops" every row's is its share of dense attention FLOPs,
    what the controllers' budget counts there. The baselines (random, salience top-k, static)
    meet their budget in notional costs, as they are defined, so under "flops" they sit at
    what that really spends (random at B = 0.3 near 0.75 on a long text), not at B."""
    import torch

    from metaattn_viz.routing.model import kl_per_token
    from metaattn_viz.training.evaluate import flops_ratio, random_policy, salience_policy, static_policy

    if dense is None:
        dense = routed.dense_logits(torch.tensor([ids]))[0]
    x = torch.tensor([ids])
    T = len(ids)
    jobs = []
    for controller in KINDS:
        for b in budgets:
            jobs.append((controller, b, dict(settings=base.with_(budget=b), controller=controller)))
    for b in budgets:
        jobs.append(("random", b, dict(settings=base.with_(budget=b), policy=random_policy(b, seed=0))))
        jobs.append(("salience", b, dict(settings=base.with_(budget=b), policy=salience_policy(b))))
    for expert, name in ((LINEAR, "all-linear"), (LOCAL, "all-local")):
        jobs.append(
            (
                "static",
                None,
                dict(settings=base.with_(budget=COSTS[expert]), policy=static_policy(expert), label=name),
            )
        )
    rows = []
    for i, (policy, budget, kw) in enumerate(jobs):
        if progress is not None:
            progress(i / len(jobs), f"{policy} {'' if budget is None else budget}")
        label = kw.pop("label", None)
        res = routed.prefill(
            x, kw.pop("settings"), kw.pop("controller", DEFAULT_CONTROLLER), use_cache=False, **kw
        )
        rec = res.records
        kl = kl_per_token(dense[:-1], res.logits[0, :-1])
        flops = flops_ratio(rec["weights"], T, routed.head_dim, base.window, base.n_sink)
        rows.append(
            {
                "policy": policy,
                "budget": budget,
                "label": label,
                # a policy's records carry notional costs whatever the cost model
                "realized_cost": flops if base.cost_model == "flops" else float(rec["cost"].mean()),
                "cost_model": base.cost_model,
                "kl_to_dense": float(kl.mean()),
                "flops_ratio": flops,
                "tokens": T,
            }
        )
    rows.append(
        {
            "policy": "dense",
            "budget": 1.0,
            "label": "dense (every decision full)",
            "realized_cost": 1.0,
            "cost_model": base.cost_model,
            "kl_to_dense": 0.0,
            "flops_ratio": 1.0,
            "tokens": T,
        }
    )
    return rows


__all__ = ["Analysis", "SWEEP_BUDGETS", "DENSE_CACHE_SIZE"]
