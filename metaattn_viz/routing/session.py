"""A routing session: the state of one routed pass (prefill + decode steps) in one thread,
and the plumbing that lets transformers' attention layers reach it.

Plugging in (no forked model code): an attention function is registered with transformers'
``AttentionInterface`` under the name ``ATTN_NAME``; forward pre-hooks on each decoder
layer and its attention module capture the residual stream x and the normalised attention
input h that the controller reads. ``install`` keeps the hooks' handles and the attention
implementation it replaced, so ``uninstall`` gives the model back exactly as it was.
Outside a session (or in a "dense" one) the function is plain SDPA, so an SDPA model
behaves exactly as before (``model.generate`` keeps working, with its KV cache; an eager
model computes the same attention through SDPA, equal within rounding). Sessions are
thread-local, so several requests can share one model.

A session carries the settings, the controllers, the routing policy (routing/policies.py:
which mode decides the weights), the linear expert's feature map per layer (None: elu + 1;
else the learned maps the model handed over, docs/method.md, Experts), the linear experts'
recurrent state per layer, and the records of every decision. A linear state keeps the
map it was built with: it is stored with it, and catching it up or reading it out always
uses that map, also in a later session that carries the state over (decoding after a
prefill). Phases are told apart by shapes: a forward whose keys are as
many as its queries is a prefill; one with a cache is a decode step. A one-token decode
step of a policy with ``fast_decode`` is decided apart from the batched path: on CPU
float32 in plain Python (numpy controller, ``decide_one``, ``kernels.cpu_decode.decode_step_numpy``;
``_attend_host``; both host paths run the experts through ``_experts_host``) because a
dozen tiny tensor ops would dominate it; on any other device or
dtype (a GPU, a bfloat16 model) on the device (``decide_step``: controller, decision and
dual ascent as tensors, nothing read back per layer; the records are read once per token
by ``pop_records``); through Triton its attention is
``kernels.triton_decode.decode_step_device``, which reads the route from device memory, so
a step is a fixed sequence of launches.

Padded batches are not supported: every row of a batch must be a full, unpadded sequence.
Never: decide routes (the policies do) or compute the experts (the kernels do).
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

import metaattn_kernels.dispatch as kernels
from metaattn_kernels.cpu_decode import decode_step_numpy
from metaattn_kernels.decode import linear_state_upto
from metaattn_kernels.feature_maps import FeatureMap
from metaattn_viz.core.experts import K
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing import discovery
from metaattn_viz.routing.controller import ControllerStack
from metaattn_viz.routing.costs import CostModel
from metaattn_viz.routing.device import host_decode
from metaattn_viz.routing.policies import (
    Baseline,
    BaselinePolicy,
    BudgetPolicy,
    ForcedPolicy,
    RoutingPolicy,
    TrainPolicy,
    TrainRouting,
)
from metaattn_viz.routing.records import as_dict, collect
from metaattn_viz.routing.signals import AttentionView, SignalState, take_mapped

ATTN_NAME = "metaattn"
MODES = ("route", "dense", "train")

_local = threading.local()
_registered = False
_register_lock = threading.Lock()


def current() -> Session | None:
    """This thread's active session, if any."""
    return getattr(_local, "session", None)


@contextlib.contextmanager
def active(session: Session) -> Iterator[Session]:
    """Make `session` this thread's active one for the block (sessions nest)."""
    prev = current()
    _local.session = session
    try:
        yield session
    finally:
        _local.session = prev


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scaling) -> torch.Tensor:
    """Plain causal attention [B, Hq, Tq, D] of the queries at the last Tq of the Tk key
    positions: budget 1, and the reference of `diagnose`."""
    tq, tk = q.shape[2], k.shape[2]
    mask = None  # a query block after a cache: causal from its own positions (SDPA's is_causal
    if 1 < tq < tk:  # would align the block with the first keys)
        mask = torch.ones(tq, tk, dtype=torch.bool, device=q.device).tril(tk - tq)
    return torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=tq == tk > 1, scale=scaling, enable_gqa=q.shape[1] != k.shape[1]
    )


def _dense_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )


def metaattn_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: query [B, Hq, Tq, D], key/value [B, Hkv, Tk, D]
    (post-RoPE, cache included) -> ([B, Tq, Hq, D], None)."""
    session = current()
    if session is None or session.mode == "dense":
        return _dense_attention(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )
    discovery.check_call(module, attention_mask, kwargs)
    session.check_mask(attention_mask, query.shape[2], key.shape[2])
    return session.attend(module, query, key, value, scaling), None


def register_attention() -> None:
    """Register ``metaattn_attention`` with transformers under ``ATTN_NAME`` (once)."""
    global _registered
    with _register_lock:
        if not _registered:
            from transformers import AttentionInterface
            from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

            AttentionInterface.register(ATTN_NAME, metaattn_attention)
            # the masks SDPA gets (None where plain causal): without one registered,
            # transformers builds no mask at all and a padded batch would pass unseen
            AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)
            _registered = True


def _capture_hook(which: str, layer: int):
    def hook(module, args, kwargs):
        sess = current()
        if sess is not None and sess.mode != "dense":
            hidden = args[0] if args else kwargs["hidden_states"]
            sess.capture(which, layer, hidden)
        return None

    return hook


@dataclass
class Installation:
    """What ``install`` changed on a model, so that ``uninstall`` can undo exactly that: the
    attention implementation it replaced and the handles of the hooks it added."""

    model: Any
    attn_implementation: str
    handles: list[torch.utils.hooks.RemovableHandle] = field(default_factory=list)


def install(model, n_layers: int) -> Installation:
    """Route `model`'s attention through sessions: the attention function and the hooks.
    Finds the attention layers and refuses a model routing cannot honour
    (routing/discovery.py) before changing anything, so a refused model is left as it was."""
    if getattr(model.config, "_attn_implementation", None) == ATTN_NAME:
        raise ValueError(
            "this model is routed already (by another RoutedModel, e.g. a notebook cell run "
            "twice): detach that one first (.detach()), or keep using it"
        )
    sites = discovery.check_supported(model)
    if len(sites) != n_layers:
        raise ValueError(f"found {len(sites)} attention layers, the controllers have {n_layers}")
    register_attention()
    done = Installation(model, model.config._attn_implementation)
    model.set_attn_implementation(ATTN_NAME)
    for site in sites:
        idx = site.layer_idx
        done.handles.append(site.block.register_forward_pre_hook(_capture_hook("x", idx), with_kwargs=True))
        done.handles.append(
            site.attention.register_forward_pre_hook(_capture_hook("h", idx), with_kwargs=True)
        )
    return done


def uninstall(done: Installation) -> None:
    """Undo ``install``: remove its hooks and give the model back the attention
    implementation it had (idempotent: a second call finds nothing left to undo)."""
    for handle in done.handles:
        handle.remove()
    done.handles.clear()
    if done.model.config._attn_implementation != done.attn_implementation:
        done.model.set_attn_implementation(done.attn_implementation)


class Session:
    """State of one routed pass (prefill + decode steps) in one thread.

    mode: "route" (inference), "dense" (plain SDPA, nothing recorded) or "train". The
    routing policy is chosen once from the arguments: ``train`` (mode "train"), else a
    baseline ``policy`` (a function, see policies.Baseline), else ``forced_weights`` ([L]
    tensors [B, T, K]), else the budget (``lam``: lambdas per layer to start from, e.g. the
    global scope's or a prefill's). ``feature_maps``: the linear expert's map per layer
    (None: elu + 1). ``capture_qk`` keeps every layer's (q, k, scaling, feature map of its
    linear expert) for the attention maps; ``diagnose`` also runs full attention and records
    the relative error of the output actually used, ||o_used - o_full|| / ||o_full|| per
    decision. ``head_dim``: the model's attention head dimension, which the "flops" cost
    model needs (routing/costs.py); every decode decision is handed its position.
    """

    def __init__(
        self,
        n_layers: int,
        controller: ControllerStack,
        settings: RoutingSettings,
        mode: str = "route",
        train: TrainRouting | None = None,
        lam: list[float | None] | None = None,
        forced_weights: list[torch.Tensor] | None = None,
        capture_qk: bool = False,
        policy: Baseline | None = None,
        diagnose: bool = False,
        feature_maps: list[FeatureMap] | None = None,
        head_dim: int | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if policy is not None and forced_weights is not None:
            raise ValueError("give a baseline policy or forced weights, not both")
        self.controller = controller
        self.settings = settings
        self.mode = mode
        self.beta_graph: list[tuple[int, torch.Tensor]] = []  # training: (layer, beta), graph kept
        self.routing: RoutingPolicy
        if mode == "train":
            self.routing = TrainPolicy(
                train or TrainRouting(), controller.point_estimate, n_layers, self.beta_graph
            )
        elif policy is not None:
            self.routing = BaselinePolicy(policy, n_layers)
        elif forced_weights is not None:
            self.routing = ForcedPolicy(forced_weights, n_layers, CostModel.of(settings, head_dim))
        else:
            self.routing = BudgetPolicy(settings, n_layers, lam, controller.point_estimate, head_dim)
        self.capture_qk = capture_qk
        self.diagnose = diagnose
        # Budget 1: every decision is full attention, which is exactly the dense model
        self._sdpa = self.routing.sdpa_when_dense and settings.dense and not capture_qk
        self._backend = self.routing.backend or settings.backend
        # a CPU float32 decode step runs decode_step_numpy (what `attend` would choose for it:
        # neither backend resolves to Triton on a CPU tensor unless named, and the experts'
        # backend resolves to "cpu"); see _attend_host
        self._host_cpu = not self._sdpa and self._backend != "triton" and settings.backend in ("auto", "cpu")
        if feature_maps is not None and len(feature_maps) != n_layers:
            raise ValueError(
                f"feature_maps must hold one map per layer ({n_layers}), got {len(feature_maps)}"
            )
        self.feature_maps = feature_maps
        self.x: list[torch.Tensor | None] = [None] * n_layers
        self.h: list[torch.Tensor | None] = [None] * n_layers
        # per layer: (S, z, n keys summarised, the feature map it was built with) or None
        self.lin_state: list = [None] * n_layers
        self.qk: list = [None] * n_layers
        self.records: list[list[Any]] = [[] for _ in range(n_layers)]
        self.signals = SignalState(n_layers)  # running sums of the controllers' attention features
        self._reads_attention = controller.uses_attention  # looked up once: read per layer and token
        self._mask_checked: weakref.ref | None = None  # the last attention mask found plain causal

    @property
    def lam(self) -> list[float | None]:
        """The lambda per layer the routing stands at (None where none was solved)."""
        return self.routing.current_lam()

    def check_mask(self, mask: torch.Tensor | None, tq: int, tk: int) -> None:
        """Refuse an attention mask that is not plain causal (a padded batch): routing would
        ignore it. Checked once per mask object (a forward hands every layer the same one)."""
        if mask is None or (self._mask_checked is not None and self._mask_checked() is mask):
            return
        if not discovery.is_plain_causal(mask, tq, tk):
            raise discovery.UnsupportedModel(
                "the attention mask is not plain causal (padded batches are not supported: "
                "route each sequence on its own, unpadded)"
            )
        self._mask_checked = weakref.ref(mask)

    def capture(self, which: str, layer: int, hidden: torch.Tensor) -> None:
        (self.x if which == "x" else self.h)[layer] = hidden

    def attend(self, module, q, k, v, scaling) -> torch.Tensor:
        """The routed attention of one layer: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D]
        (cache included) -> [B, Tq, Hq, D]."""
        layer = module.layer_idx
        B, Hq, Tq, D = q.shape
        Tk = k.shape[2]
        offset = Tk - Tq
        s = self.settings
        x, h = self.x[layer], self.h[layer]
        if x is None or h is None or x.shape[1] != Tq:
            raise RuntimeError(
                "routing hooks did not capture this layer's input; is the model installed with RoutedModel?"
            )
        routing = self.routing
        one = B == 1 and Tq == 1 and offset > 0 and routing.fast_decode
        if (
            one
            and self._host_cpu
            and not (self.capture_qk or self.diagnose)
            and host_decode(q.device, q.dtype)
        ):
            return self._attend_host(layer, q, k, v, scaling, x, h)
        # a decode step through Triton (a GPU, or the interpreter) keeps its route on the
        # device and runs kernels.triton_decode: no host synchronisation per layer
        device_step = one and not self.capture_qk and kernels.resolve_backend(self._backend, q) == "triton"
        host = one and not device_step and host_decode(q.device, q.dtype)
        rec: Any
        view = None  # what of q and k the controllers read (signals.AttentionView), if any
        if self.controller.uses_attention:
            fm_view = self.feature_maps[layer] if self.feature_maps is not None else None
            view = AttentionView(q, k, fm_view, s.window, s.n_sink, self.signals)
        if host:  # a decode step on CPU float32: the decision in plain Python
            beta_one = self.controller.concentration_one(layer, h, x, offset, view)  # K floats
            weights_one, rec = routing.decide_one(layer, beta_one, offset)
        elif one:  # a decode step elsewhere: the decision stays on the device
            positions = torch.arange(offset, Tk, device=q.device)
            beta = self.controller.concentration(layer, h, x, positions, view)  # [1, 1, K]
            weights, rec = routing.decide_step(layer, beta, offset)
        else:
            positions = torch.arange(offset, Tk, device=q.device)
            beta = self.controller.concentration(layer, h, x, positions, view)  # [B, Tq, K]
            weights, rec = routing.decide(layer, beta, offset, x)

        # (S, z, n, map): the linear expert's state after n keys, and the map it was built
        # with, which it keeps (a state summed with one map cannot be read with another)
        held = self.lin_state[layer]
        fm = self.feature_maps[layer] if self.feature_maps is not None else None
        state = None
        if held is not None:
            state, fm = held[:3], held[3]
        # phi(q) and phi(k) the controllers' signals computed under this map, if they did
        mapped = None if view is None else take_mapped(self.signals, layer, q, k, fm)
        if self._sdpa:
            y = _sdpa(q, k, v, scaling)
            self.lin_state[layer] = None
        elif host and not self.capture_qk and kernels.resolve_backend(s.backend, q) == "cpu":
            y = self._experts_host(layer, q, k, v, scaling, weights_one, state, fm, view)
        elif device_step:
            from metaattn_kernels.triton_decode import decode_step_device

            y, stepped = decode_step_device(
                q,
                k,
                v,
                weights,
                window=s.window,
                n_sink=s.n_sink,
                scale=scaling,
                state=state,
                feature_map=fm,
            )
            self.lin_state[layer] = (*stepped, fm)
        else:
            if host:
                weights = torch.tensor(weights_one, dtype=q.dtype, device=q.device).view(1, 1, K)
            if state is not None and state[2] != offset:  # stale (decode steps that skipped it)
                state = linear_state_upto(state, k, v, offset, fm) if state[2] < offset else None
            y, new_state = kernels.routed_attention(
                q,
                k,
                v,
                weights.to(q.dtype),
                window=s.window,
                n_sink=s.n_sink,
                scale=scaling,
                linear_state=None if state is None else state[:2],
                backend=self._backend,
                feature_map=fm,
                features=mapped,
            )
            self.lin_state[layer] = (*new_state, Tk, fm)
        if self.capture_qk:
            self.qk[layer] = (q.detach(), k.detach(), scaling, fm)
        if self.diagnose and rec is not None:
            rec = as_dict(rec)
            full = _sdpa(q, k, v, scaling)
            err = (y - full).norm(dim=-1) / full.norm(dim=-1).clamp_min(1e-12)  # [B, Hq, Tq]
            rec["rel_error"] = err.mean(1).float().cpu()  # [B, Tq]
        if rec is not None:
            self.records[layer].append(rec)
        self.x[layer] = self.h[layer] = None
        return y.transpose(1, 2).contiguous()  # [B, Tq, Hq, D]

    def _attend_host(self, layer: int, q, k, v, scaling, x, h) -> torch.Tensor:
        """`attend` for one decode step of one sequence on CPU float32 with the CPU experts
        (``_host_cpu``; neither ``capture_qk`` nor ``diagnose``): the same steps in the same
        order with none of the branching, since on a CPU a decode step is per-call overhead.
        q [1, Hq, 1, D], k/v [1, Hkv, Tk, D] -> [1, 1, Hq, D]."""
        s = self.settings
        maps = self.feature_maps
        view = None
        if self._reads_attention:
            view = AttentionView(
                q, k, None if maps is None else maps[layer], s.window, s.n_sink, self.signals
            )
        offset = k.shape[2] - 1
        beta_one = self.controller.concentration_one(layer, h, x, offset, view)  # K floats
        weights_one, rec = self.routing.decide_one(layer, beta_one, offset)
        held = self.lin_state[layer]
        if held is None:
            state, fm = None, None if maps is None else maps[layer]
        else:
            state, fm = held[:3], held[3]
        y = self._experts_host(layer, q, k, v, scaling, weights_one, state, fm, view)
        self.records[layer].append(rec)
        self.x[layer] = self.h[layer] = None
        return y.reshape(1, 1, q.shape[1], q.shape[3])  # one query: [1, Hq, 1, D] as [1, 1, Hq, D]

    def _experts_host(
        self, layer: int, q, k, v, scaling, weights: list[float], state, fm, view: AttentionView | None
    ) -> torch.Tensor:
        """The experts of one decode step on CPU float32 (``kernels.cpu_decode.decode_step_numpy``),
        the one definition both decode paths on the host run: the linear expert continues
        `state` (S, z, n) built with map `fm` and reuses the features the controller computed
        of q and the new key under the same map (``SignalState.phi``); the state it leaves
        is kept for the layer. q [1, Hq, 1, D], k/v [1, Hkv, Tk, D] -> y [1, Hq, 1, D]."""
        phi = None
        if view is not None:
            phi, self.signals.phi[layer] = self.signals.phi[layer], None
            if phi is not None and (phi[0] != k.shape[2] or phi[1] is not fm):
                phi = None
        s = self.settings
        y, stepped = decode_step_numpy(
            q,
            k,
            v,
            weights,
            window=s.window,
            n_sink=s.n_sink,
            scale=scaling,
            state=state,
            feature_map=fm,
            phi=None if phi is None else phi[2:],
        )
        self.lin_state[layer] = None if stepped is None else (*stepped, fm)
        return y

    def pop_records(self) -> dict[str, np.ndarray] | None:
        """Every decision since the last pop: arrays [L, B, T, ...] (numpy)."""
        if not self.records[0]:
            return None
        recs, self.records = self.records, [[] for _ in self.records]
        return collect(recs)
