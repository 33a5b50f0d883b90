"""The routed model: a pretrained Hugging Face causal LM whose every attention layer routes
every token to full, linear or local attention through the meta-controller.

Plugging in (no forked model code): an attention function is registered with transformers'
``AttentionInterface`` under the name "metaattn"; forward pre-hooks on each decoder layer
and its attention module capture the residual stream x and the normalised attention input
h that the controller reads. Outside a routing session the function is plain SDPA, so the
model behaves exactly as before (``model.generate`` keeps working, with its KV cache).

A *session* (thread-local, so several requests can share one model) carries the settings,
the controllers, the lambdas of the budget solver, the linear experts' recurrent state per
layer, and the records of every decision. Phases are told apart by shapes: a forward whose
keys are as many as its queries is a prefill (lambda solved per layer); one with a cache is
a decode step (lambda follows the running cost by dual ascent). The routing *policy* lives
in budget.py and controller.py; the *mechanics* (experts) in the kernels package.

Padded batches are not supported: every row of a batch must be a full, unpadded sequence.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import metaattn_kernels.dispatch as kernels
from metaattn_kernels.decode import decode_step, linear_state_upto
from metaattn_viz.routing import budget as budget_mod
from metaattn_viz.routing.controller import ControllerStack, load_for_model
from metaattn_viz.core.dirichlet import entropy_of_mean
from metaattn_viz.routing.kv_cache import GrowableCache
from metaattn_viz.core.settings import COSTS, FULL, LINEAR, MIN_COST, RoutingSettings
from metaattn_viz.core.trace import RoutingTrace

log = logging.getLogger(__name__)

ATTN_NAME = "metaattn"
K = len(COSTS)
_LOG_K = math.log(K)
_local = threading.local()
_registered = False
PILOT_TOKENS = 512  # the global scope's pilot pass reads at most this prefix of a long text
_register_lock = threading.Lock()


def _current() -> Session | None:
    return getattr(_local, "session", None)


def _dense_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                     **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                  scaling=scaling, **kwargs)


def metaattn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       **kwargs):
    """transformers attention function: query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D]
    (post-RoPE, cache included) -> ([B, Tq, Hq, D], None)."""
    session = _current()
    if session is None or session.mode == "dense":
        return _dense_attention(module, query, key, value, attention_mask, scaling=scaling,
                                dropout=dropout, **kwargs)
    return session.attend(module, query, key, value, scaling), None


def register_attention() -> None:
    global _registered
    with _register_lock:
        if not _registered:
            from transformers import AttentionInterface

            AttentionInterface.register(ATTN_NAME, metaattn_attention)
            _registered = True


@dataclass
class TrainRouting:
    """How a calibration session mixes experts: a reparameterised Dirichlet sample (Bayes) or
    the softmax point estimate (prior-free); with ``hard`` the forward pass uses the one-hot
    argmax and the gradient flows through the soft weights (straight-through)."""

    hard: bool = False


class Session:
    """State of one routed pass (prefill + decode steps) in one thread."""

    def __init__(self, routed: RoutedModel, controller: ControllerStack,
                 settings: RoutingSettings, mode: str = "route", train: TrainRouting | None = None,
                 lam=None, forced_weights=None, capture_qk: bool = False, policy=None,
                 diagnose: bool = False):
        self.routed = routed
        self.controller = controller
        self.settings = settings
        self.mode = mode  # "route" | "dense" | "train"
        self.train = train
        L = routed.n_layers
        self.x: list = [None] * L
        self.h: list = [None] * L
        self.lin_state: list = [None] * L  # per layer: (S, z, n keys summarised) or None
        # lambda per layer: None until the prefill solves it (or given: global scope, replay)
        self.lam: list[float | None] = list(lam) if lam is not None else [None] * L
        self.lam_given = lam is not None
        self.forced = forced_weights  # [L] list of [B, T, K] tensors, or None
        self.capture_qk = capture_qk
        # policy(layer, x [B,T,D], m [N,K], unc [N]) -> Decisions: a baseline router that
        # replaces the budget solver (evaluation's static, random and salience policies)
        self.policy = policy
        # diagnose: also run full attention for every routed query and record the relative
        # error of the output actually used, ||o_used - o_full|| / ||o_full|| per decision
        self.diagnose = diagnose
        self.qk: list = [None] * L
        self.records: list[list[dict]] = [[] for _ in range(L)]
        self._decode_cost = 0.0
        self.beta_graph: list = []  # training: (layer, beta) with graph, for the KL term

    # -- capture hooks ----------------------------------------------------------------------
    def capture(self, which: str, layer: int, hidden: torch.Tensor) -> None:
        (self.x if which == "x" else self.h)[layer] = hidden

    # -- the routed attention ---------------------------------------------------------------
    def attend(self, module, q, k, v, scaling):
        layer = module.layer_idx
        B, Hq, Tq, D = q.shape
        Tk = k.shape[2]
        offset = Tk - Tq
        s = self.settings
        x, h = self.x[layer], self.h[layer]
        if x is None or h is None or x.shape[1] != Tq:
            raise RuntimeError("routing hooks did not capture this layer's input; is the model "
                               "installed with RoutedModel?")
        one = (B == 1 and Tq == 1 and offset > 0 and self.mode != "train" and self.policy is None
               and self.forced is None)
        if one:  # a decode step: the decision in plain Python (see _route_one)
            beta = self.controller.concentration_one(layer, h, x, offset)  # K floats
            weights, rec = self._route_one(layer, beta)
        else:
            positions = torch.arange(offset, Tk, device=q.device)
            beta = self.controller.concentration(layer, h, x, positions)  # [B, Tq, K]
            if self.mode == "train":
                weights = self._train_weights(beta)
                self.beta_graph.append((layer, beta))
                rec = None
            else:
                weights, rec = self._route(layer, beta.detach(), offset, x)

        state = self.lin_state[layer]  # (S, z, n): the linear expert's state after n keys
        if self.mode != "train" and s.dense and self.forced is None and not self.capture_qk:
            # Budget 1: every decision is full attention, which is exactly the dense model.
            y = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=Tq > 1, scale=scaling, enable_gqa=Hq != k.shape[1])
            self.lin_state[layer] = None
        elif one and not self.capture_qk and kernels.resolve_backend(s.backend, q) == "cpu":
            y, self.lin_state[layer] = decode_step(q, k, v, weights, window=s.window,
                                                   n_sink=s.n_sink, scale=scaling, state=state)
        else:
            if one:
                weights = torch.tensor(weights, dtype=q.dtype, device=q.device).view(1, 1, K)
            if state is not None and state[2] != offset:  # stale (decode steps that skipped it)
                state = linear_state_upto(state, k, v, offset) if state[2] < offset else None
            backend = "reference" if self.mode == "train" else s.backend
            y, new_state = kernels.routed_attention(
                q, k, v, weights.to(q.dtype), window=s.window, n_sink=s.n_sink, scale=scaling,
                linear_state=None if state is None else state[:2], backend=backend)
            self.lin_state[layer] = (*new_state, Tk)
        if self.capture_qk:
            self.qk[layer] = (q.detach(), k.detach(), scaling)
        if self.diagnose and rec is not None:
            if type(rec) is tuple:
                rec = _one_record(*rec)
            full = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=Tq > 1, scale=scaling, enable_gqa=Hq != k.shape[1])
            err = (y - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12)  # [B, Hq, Tq]
            rec["rel_error"] = err.mean(1).float().cpu()  # [B, Tq]
        if rec is not None:
            self.records[layer].append(rec)
        self.x[layer] = self.h[layer] = None
        return y.transpose(1, 2).contiguous()  # [B, Tq, Hq, D]

    def _train_weights(self, beta: torch.Tensor) -> torch.Tensor:
        if self.controller.point_estimate:
            w = beta
        else:
            w = torch.distributions.Dirichlet(beta).rsample()
            w = w.clamp_min(1e-6)
            w = w / w.sum(-1, keepdim=True)
        if self.train is not None and self.train.hard:
            hard = torch.nn.functional.one_hot(w.argmax(-1), K).to(w.dtype)
            w = hard + w - w.detach()
        return w

    def _route(self, layer: int, beta: torch.Tensor, offset: int, x: torch.Tensor):
        B, Tq, _ = beta.shape
        s = self.settings
        m = beta / beta.sum(-1, keepdim=True)  # [B, Tq, K]
        flat_m = m.reshape(-1, K).float()
        unc = entropy_of_mean(flat_m) / _LOG_K  # [N]
        n = flat_m.shape[0]
        if self.policy is not None:
            dec, lam = self.policy(layer, x, flat_m, unc), 0.0
        elif self.forced is not None:
            w = self.forced[layer].reshape(-1, K).to(flat_m)
            routes = w.argmax(-1)
            hedged = (w > 0).sum(-1) > 1
            dec = budget_mod.Decisions(routes, w, hedged, ((w > 0).float()
                                                           * budget_mod.costs_tensor()).sum(-1))
            lam = 0.0
        elif s.dense:
            dec, lam = budget_mod.all_to(FULL, n), -budget_mod.LAM_MAX
        elif s.lam is None and s.budget is not None and s.budget <= MIN_COST:
            dec, lam = budget_mod.all_to(LINEAR, n), budget_mod.LAM_MAX
        elif self.lam[layer] is None or (offset == 0 and not self.lam_given):
            # a prefill: this layer's lambda meets the budget over its own decisions
            dec, lam = budget_mod.route_under_budget(flat_m, unc, s)
            self.lam[layer] = lam
        else:
            lam = self.lam[layer]
            dec = budget_mod.decide(flat_m, unc, lam, s)
            if offset > 0:  # a decode step: lambda follows the running cost
                self._dual_ascent(layer, float(dec.cost.mean()))
        rec = {"beta": beta.float().cpu().numpy(), "routes": dec.routes.view(B, Tq).cpu().numpy(),
               "hedged": dec.hedged.view(B, Tq).cpu().numpy(),
               "weights": dec.weights.view(B, Tq, K).float().cpu().numpy(),
               "cost": dec.cost.view(B, Tq).float().cpu().numpy(),
               "lam": np.full((B, Tq), float(lam), np.float32)}
        return dec.weights.view(B, Tq, K), rec

    def _route_one(self, layer: int, beta: list[float]):
        """A single decode decision in plain Python: the same maths as budget.decide without
        a dozen tiny tensor ops, which would dominate a decode step on a CPU. Returns the
        weights as K floats, and the record."""
        s = self.settings
        if s.dense:
            route, w, hedged, cost, lam = FULL, [1.0, 0.0, 0.0], False, COSTS[FULL], -budget_mod.LAM_MAX
        elif s.lam is None and s.budget is not None and s.budget <= MIN_COST:
            route, w, hedged, cost, lam = LINEAR, [0.0, 1.0, 0.0], False, COSTS[LINEAR], budget_mod.LAM_MAX
        else:
            lam = self.lam[layer]
            route, w, hedged, cost = budget_mod.decide_one(beta, lam, s)
            self._dual_ascent(layer, cost)
        rec = (beta, route, hedged, w, cost, lam)  # a OneRecord: arrays only when popped
        return w, rec

    def _dual_ascent(self, layer: int, cost: float) -> None:
        s = self.settings
        if s.lam is not None or s.budget is None:
            return
        if s.scope == "layer":
            self.lam[layer] = budget_mod.dual_ascent(self.lam[layer], cost, s)
            return
        self._decode_cost += cost
        if layer == self.routed.n_layers - 1:  # one global update per token, after all layers
            mean_cost = self._decode_cost / self.routed.n_layers
            new = budget_mod.dual_ascent(self.lam[layer], mean_cost, s)
            self.lam = [new] * self.routed.n_layers
            self._decode_cost = 0.0

    # -- results ----------------------------------------------------------------------------
    def pop_records(self) -> dict[str, np.ndarray] | None:
        """Every decision since the last pop: arrays [L, B, T, ...] (numpy)."""
        if not self.records[0]:
            return None
        recs, self.records = self.records, [[] for _ in self.records]
        if all(type(r) is tuple for layer in recs for r in layer):  # decode steps only
            return _stack_one_records(recs)
        recs = [[_one_record(*r) if type(r) is tuple else r for r in layer] for layer in recs]
        out = {}
        for key in recs[0][0]:
            per_layer = [np.concatenate([r[key] for r in layer], axis=1) for layer in recs]
            out[key] = np.stack(per_layer)
        return out


ONE_RECORD = ("beta", "routes", "hedged", "weights", "cost", "lam")
_ONE_DTYPES = (np.float32, np.int64, np.bool_, np.float32, np.float32, np.float32)


def _one_record(beta, route, hedged, weights, cost, lam) -> dict[str, np.ndarray]:
    """A decode decision (Session._route_one's tuple) as the record arrays [B=1, T=1, ...]."""
    return {key: np.asarray(value, dtype).reshape(1, 1, -1) if key in ("beta", "weights")
            else np.asarray([[value]], dtype)
            for key, value, dtype in zip(ONE_RECORD, (beta, route, hedged, weights, cost, lam),
                                         _ONE_DTYPES)}


def _stack_one_records(recs: list[list[tuple]]) -> dict[str, np.ndarray]:
    """[L][T] decode tuples -> the record arrays [L, 1, T, ...], one conversion per field."""
    n_layers, n_tokens = len(recs), len(recs[0])
    cols = list(zip(*(r for layer in recs for r in layer)))
    out = {}
    for key, col, dtype in zip(ONE_RECORD, cols, _ONE_DTYPES):
        arr = np.asarray(col, dtype)
        out[key] = arr.reshape(n_layers, 1, n_tokens, *arr.shape[1:])
    return out


@dataclass
class Sampling:
    """Decoding settings: greedy when temperature == 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        t = float(self.temperature)
        if not math.isfinite(t) or not 0.0 <= t <= 5.0:
            raise ValueError(f"temperature must be a finite number in [0, 5], got "
                             f"{self.temperature!r}")
        p = float(self.top_p)
        if not math.isfinite(p) or not 0.0 < p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [B, T, V]
    records: dict
    lam: list
    cache: object
    passes: int = 1  # forward passes over the whole text (a prefix pilot is not one)
    session: Session | None = field(default=None, repr=False)
    pilot_tokens: int = 0  # tokens of the global scope's pilot pass (0: none)


class RoutedModel:
    """A causal LM plus its controllers. Thread-safe for concurrent sessions."""

    def __init__(self, model, tokenizer, controllers: dict[str, ControllerStack],
                 name: str = "model", controller_sources: dict | None = None):
        register_attention()
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.controllers = controllers
        self.controller_sources = controller_sources or {}
        cfg = model.config
        self.n_layers = cfg.num_hidden_layers
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.max_context = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self._install()

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def load(cls, model: str | None = None, controllers_dir: dict | None = None) -> RoutedModel:
        """Load the model (model_loading) and both controllers (shipped ones, else untrained)."""
        from metaattn_viz.routing import loading as model_loading

        loaded = model_loading.load(model)
        return cls.from_loaded(loaded, controllers_dir)

    @classmethod
    def from_loaded(cls, loaded, controllers_dir: dict | None = None) -> RoutedModel:
        controllers, sources = {}, {}
        for kind in ("bayes", "priorfree"):
            folder = (controllers_dir or {}).get(kind)
            choice = load_for_model(loaded.model.config, loaded.slug, kind, folder)
            controllers[kind], sources[kind] = choice.stack, choice.source
        return cls(loaded.model, loaded.tokenizer, controllers, loaded.name, sources)

    def _install(self) -> None:
        model = self.model
        model.set_attn_implementation(ATTN_NAME)
        layers = _decoder_layers(model)
        if len(layers) != self.n_layers:
            raise ValueError(f"found {len(layers)} decoder layers, config says {self.n_layers}")
        for idx, layer in enumerate(layers):
            attn = layer.self_attn
            if getattr(attn, "layer_idx", idx) != idx:
                raise ValueError("attention modules must carry their layer_idx")
            layer.register_forward_pre_hook(_capture_hook("x", idx), with_kwargs=True)
            attn.register_forward_pre_hook(_capture_hook("h", idx), with_kwargs=True)

    def controller(self, kind: str) -> ControllerStack:
        if kind not in self.controllers:
            raise ValueError(f"controller must be one of {sorted(self.controllers)}, got {kind!r}")
        return self.controllers[kind]

    @contextlib.contextmanager
    def session(self, settings: RoutingSettings, controller: str | ControllerStack = "bayes",
                **kwargs):
        stack = controller if isinstance(controller, ControllerStack) else self.controller(controller)
        sess = Session(self, stack, settings, **kwargs)
        prev = _current()
        _local.session = sess
        try:
            yield sess
        finally:
            _local.session = prev

    # -- passes -----------------------------------------------------------------------------
    def dense_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The unrouted model's logits [B, T, V] (the shadow pass for quality)."""
        with torch.no_grad(), self.session(RoutingSettings(budget=1.0), mode="dense"):
            return self.model(input_ids=input_ids, use_cache=False).logits

    def prefill(self, input_ids: torch.Tensor, settings: RoutingSettings,
                controller: str | ControllerStack = "bayes", forced_weights=None,
                capture_qk: bool = False, use_cache: bool = True, policy=None,
                diagnose: bool = False, lam_hint: float | None = None,
                cache_capacity: int = 0) -> PrefillResult:
        """Route a whole text in one forward pass (global scope: see below). ``cache_capacity``:
        tokens the KV cache should hold without regrowing (prompt + tokens to decode).

        Global scope needs one lambda for all layers, but each layer's posterior depends on
        the routes of the layers below, so lambda is solved on the posteriors of a pilot
        pass and the text is routed with it; if the realised mean cost is > 0.015 off the
        budget, lambda is solved again on the posteriors of that pass and the text routed
        once more (at most twice). The pilot is a per-layer-scope pass over the text, or only
        over its first PILOT_TOKENS tokens when the text is longer than twice that (a causal
        prefix: the same posteriors those tokens get in the whole text). A ``lam_hint``
        (e.g. solved on the posteriors of the previous routing of the same text) replaces
        the pilot."""

        def one_pass(s: RoutingSettings, lam=None, ids=input_ids, cache: bool = use_cache):
            kv = GrowableCache(cache_capacity) if cache else None
            with torch.no_grad(), self.session(s, controller, lam=lam,
                                               forced_weights=forced_weights,
                                               capture_qk=capture_qk, policy=policy,
                                               diagnose=diagnose) as sess:
                out = self.model(input_ids=ids, past_key_values=kv, use_cache=cache)
            return PrefillResult(out.logits, sess.pop_records(), list(sess.lam), kv, 1, sess)

        needs_global = (settings.scope == "global" and settings.lam is None
                        and settings.budget is not None and forced_weights is None
                        and policy is None
                        and budget_mod.extreme_lambda(settings.budget) is None)
        if not needs_global:
            return one_pass(settings)
        pilot_tokens = 0
        if lam_hint is not None:
            res = one_pass(settings, lam=[lam_hint] * self.n_layers)
            gap = abs(float(res.records["cost"].mean()) - settings.budget)
            if gap <= 0.015:
                return res
            best, passes = (gap, res), 1
        else:
            t = input_ids.shape[1]
            pilot_ids = input_ids[:, :PILOT_TOKENS] if t > 2 * PILOT_TOKENS else input_ids
            res = one_pass(settings.with_(scope="layer"), ids=pilot_ids, cache=False)
            pilot_tokens = pilot_ids.shape[1]
            best, passes = None, int(pilot_tokens == t)  # a whole-text pilot is a pass
        for _ in range(2):
            lam = self._solve_global(res.records, settings)
            res = one_pass(settings, lam=[lam] * self.n_layers)
            passes += 1
            gap = abs(float(res.records["cost"].mean()) - settings.budget)
            if best is None or gap < best[0]:
                best = (gap, res)
            if gap <= 0.015:
                break
        best[1].passes, best[1].pilot_tokens = passes, pilot_tokens
        return best[1]

    def _solve_global(self, records: dict, settings: RoutingSettings) -> float:
        beta = torch.from_numpy(records["beta"]).reshape(-1, K)
        m = beta / beta.sum(-1, keepdim=True)
        unc = entropy_of_mean(m) / _LOG_K
        return budget_mod.solve_lambda(m, unc, settings.budget, settings)

    # -- text -> trace ------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            raise ValueError("prompt must be text")
        if not prompt.strip():
            raise ValueError("prompt is empty: type some text to route")
        tok = self.tokenizer
        if chat and getattr(tok, "chat_template", None):
            ids = tok.apply_chat_template([{"role": "user", "content": prompt}],
                                          add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tok(prompt, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError("prompt is empty after tokenisation")
        return list(ids)

    def token_texts(self, ids) -> list[str]:
        return [self.tokenizer.decode([int(i)]) for i in ids]

    def new_trace(self, controller: str, settings: RoutingSettings, prompt: str = "") -> RoutingTrace:
        stack = self.controller(controller)
        return RoutingTrace(model=self.name, controller=controller,
                            controller_id=stack.controller_id, controller_trained=stack.trained,
                            settings=settings, n_layers=self.n_layers, head_dim=self.head_dim,
                            prompt=prompt)

    def _extend(self, trace: RoutingTrace, ids, rec: dict) -> None:
        b = 0  # batch row
        trace.extend(ids, self.token_texts(ids), rec["beta"][:, b], rec["routes"][:, b],
                     rec["hedged"][:, b], rec["weights"][:, b], rec["cost"][:, b], rec["lam"][:, b])

    def stream(self, prompt: str | list[int], settings: RoutingSettings | None = None,
               max_new_tokens: int = 64, controller: str = "bayes",
               sampling: Sampling | None = None, chat: bool = False,
               stop_event: threading.Event | None = None, max_context: int | None = None):
        """Prefill the prompt, then decode token by token; yields the growing trace after the
        prefill and after every new token (the same object, extended in place)."""
        settings = settings or RoutingSettings()
        sampling = sampling or Sampling()
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not (
                0 <= max_new_tokens <= 4096):
            raise ValueError(f"max_new_tokens must be a whole number in [0, 4096], got "
                             f"{max_new_tokens!r}")
        self.controller(controller)  # validates the name
        ids = list(prompt) if isinstance(prompt, list) else self.encode(prompt, chat)
        if not ids:
            raise ValueError("prompt is empty: type some text to route")
        limit = min(max_context or self.max_context, self.max_context) - max_new_tokens
        if limit < 1:
            raise ValueError(f"max_new_tokens must leave room for the prompt in the "
                             f"{self.max_context}-token context")
        truncated = max(0, len(ids) - limit)
        if truncated:
            log.info("prompt truncated from the left: %d of %d tokens dropped", truncated, len(ids))
            ids = ids[truncated:]
        trace = self.new_trace(controller, settings, prompt if isinstance(prompt, str) else "")
        trace.truncated = truncated
        trace.n_prompt_tokens = len(ids)

        t0 = time.perf_counter()
        input_ids = torch.tensor([ids])
        res = self.prefill(input_ids, settings, controller,
                           cache_capacity=len(ids) + max_new_tokens)
        trace.timings["prefill_ms"] = 1000 * (time.perf_counter() - t0)
        trace.timings["prefill_passes"] = res.passes
        trace.timings["pilot_tokens"] = res.pilot_tokens
        self._extend(trace, ids, res.records)
        yield trace

        eos = _eos_ids(self.tokenizer, self.model)
        gen = torch.Generator().manual_seed(int(sampling.seed))
        logits = res.logits[0, -1]
        cache = res.cache
        new_ids: list[int] = []
        t1 = time.perf_counter()
        with torch.no_grad(), self.session(settings, controller, lam=res.lam) as sess:
            # decode steps: the prefill's lambdas, then dual ascent per token
            sess.lin_state = list(res.session.lin_state)  # carry the prefill's linear states over
            for _ in range(max_new_tokens):
                if stop_event is not None and stop_event.is_set():
                    trace.timings["stopped"] = True
                    break
                nxt = _sample(logits, sampling, gen)
                if nxt in eos:
                    break
                new_ids.append(nxt)
                out = self.model(input_ids=torch.tensor([[nxt]]), past_key_values=cache,
                                 use_cache=True)
                logits = out.logits[0, -1]
                self._extend(trace, [nxt], sess.pop_records())
                dt = time.perf_counter() - t1
                trace.timings["decode_ms"] = 1000 * dt
                trace.timings["tokens_per_s"] = len(new_ids) / dt if dt > 0 else None
                trace.output_text = self.tokenizer.decode(new_ids, skip_special_tokens=True)
                yield trace
        trace.timings["total_ms"] = 1000 * (time.perf_counter() - t0)
        trace.output_text = self.tokenizer.decode(new_ids, skip_special_tokens=True)

    def route(self, prompt, settings: RoutingSettings | None = None, max_new_tokens: int = 0,
              **kwargs) -> RoutingTrace:
        trace = None
        for trace in self.stream(prompt, settings, max_new_tokens, **kwargs):
            pass
        return trace

    def reroute(self, trace: RoutingTrace, settings: RoutingSettings,
                controller: str | None = None, quality: bool = True) -> RoutingTrace:
        """Route the same text (prompt and generated tokens) again under new settings, as one
        prefill; with ``quality`` also the KL per token to the dense model."""
        controller = controller or trace.controller
        ids = list(trace.token_ids)
        if not ids:
            raise ValueError("nothing to re-route: the trace has no tokens")
        new = self.new_trace(controller, settings, trace.prompt)
        new.n_prompt_tokens, new.truncated = trace.n_prompt_tokens, trace.truncated
        new.output_text = trace.output_text
        hint = None
        previous = getattr(trace, "concentration", None)  # absent on a bare Text (the API)
        if (previous is not None and previous.shape[1] == len(ids)
                and settings.scope == "global" and settings.lam is None
                and settings.budget is not None
                and budget_mod.extreme_lambda(settings.budget) is None
                and controller == trace.controller):
            # warm start: the lambda that meets the new budget on the previous posteriors;
            # routing changes them a little, so prefill checks the cost and re-solves if off
            hint = self._solve_global({"beta": previous[:, None]}, settings)
        t0 = time.perf_counter()
        res = self.prefill(torch.tensor([ids]), settings, controller, use_cache=False,
                           lam_hint=hint)
        new.timings["prefill_ms"] = 1000 * (time.perf_counter() - t0)
        new.timings["prefill_passes"] = res.passes
        self._extend(new, ids, res.records)
        if quality:
            t1 = time.perf_counter()
            dense = self.dense_logits(torch.tensor([ids]))
            new.kl_to_dense = kl_per_token(dense[0], res.logits[0]).numpy()
            new.timings["dense_ms"] = 1000 * (time.perf_counter() - t1)
        return new


def kl_per_token(dense_logits: torch.Tensor, routed_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_dense || p_routed) of the next-token distribution at every position [T]."""
    p_log = torch.log_softmax(dense_logits.float(), -1)
    q_log = torch.log_softmax(routed_logits.float(), -1)
    return (p_log.exp() * (p_log - q_log)).sum(-1)


def _decoder_layers(model):
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    layers = getattr(base, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder layers found (need a LLaMA-style "
                         "model using transformers' attention interface)")
    return layers


def _capture_hook(which: str, layer: int):
    def hook(module, args, kwargs):
        sess = _current()
        if sess is not None and sess.mode != "dense":
            hidden = args[0] if args else kwargs["hidden_states"]
            sess.capture(which, layer, hidden)
        return None

    return hook


def _eos_ids(tokenizer, model) -> set[int]:
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(i) for i in e)
    return ids


def _sample(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator) -> int:
    if sampling.temperature == 0.0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / sampling.temperature, -1)
    if sampling.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))
