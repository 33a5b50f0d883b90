"""The routed model: a pretrained Hugging Face causal LM whose every attention layer routes
every token to full, linear or local attention through the meta-controller
(docs/method.md, "Controller", "Budget", "Decoding").

``RoutedModel`` holds the model, its tokenizer and its controllers (one stack per kind of
``controller.KINDS``), installs the routing into the model (routing/session.py), and offers
the passes: ``prefill`` (routing/prefill.py, with the global scope's pilot pass), ``stream``
and ``route`` (routing/generation.py), ``reroute`` (the same text under new settings) and
``dense_logits`` (the unrouted model). The linear expert's learned feature maps shipped for
the model are loaded next to the controllers (routing/linear_maps.py); a session whose
settings say ``linear_map="learned"`` hands them to the kernels. The routing *policy* lives
in policies.py, budget.py and controller.py; the *mechanics* (experts) in the kernels
package. ``load`` places the model, its controllers and its maps on a device and dtype
(routing/device.py: auto is CUDA in bfloat16 where there is a GPU (float16 on one older than
Ampere), else CPU float32);
``runtime`` reports where it runs. ``detach`` (or leaving a ``with`` block) gives the model
back exactly as it was handed over.

Names other packages import from here (kept here, or re-exported): RoutedModel, Sampling,
TrainRouting, kl_per_token, PILOT_TOKENS, GLOBAL_COST_TOLERANCE, register_attention,
ATTN_NAME, prompt_problem. Never: import the store or the UI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from metaattn_viz.core.settings import DEFAULT_CONTROLLER, RoutingSettings, check_settings
from metaattn_viz.core.trace import RoutingTrace
from metaattn_viz.routing import device as device_mod
from metaattn_viz.routing import discovery, generation, linear_maps
from metaattn_viz.routing import prefill as prefill_mod
from metaattn_viz.routing.controller import KINDS, ControllerStack, check_fits, load_for_model
from metaattn_viz.routing.fingerprint import controllers_notice
from metaattn_viz.routing.generation import Sampling
from metaattn_viz.routing.loading import slugify
from metaattn_viz.routing.policies import Baseline, TrainRouting
from metaattn_viz.routing.prefill import GLOBAL_COST_TOLERANCE, PILOT_TOKENS, PrefillResult
from metaattn_viz.routing.session import (
    ATTN_NAME,
    Installation,
    Session,
    active,
    install,
    register_attention,
    uninstall,
)

log = logging.getLogger(__name__)

__all__ = [
    "RoutedModel",
    "Sampling",
    "TrainRouting",
    "PrefillResult",
    "kl_per_token",
    "PILOT_TOKENS",
    "GLOBAL_COST_TOLERANCE",
    "register_attention",
    "ATTN_NAME",
]


# tokens of context a token's text is decoded after: a UTF-8 character has at most 4 bytes
TOKEN_TEXT_CONTEXT = 4


def prompt_problem(prompt) -> str | None:
    """Why `prompt` cannot be routed as text (not text, empty, or holding an unpaired
    surrogate, which is what undecodable bytes on a command line become), or None. Pure, so
    a command checks it before it spends seconds loading the model."""
    if not isinstance(prompt, str):
        return "prompt must be text (or a list of token ids)"
    if not prompt.strip():
        return "prompt is empty: type some text to route"
    bad = next((i for i, ch in enumerate(prompt) if "\ud800" <= ch <= "\udfff"), None)
    if bad is not None:
        return (
            f"prompt is not valid UTF-8 text: an unpaired surrogate (U+{ord(prompt[bad]):04X}) "
            f"at character {bad}"
        )
    return None


class RoutedModel:
    """A causal LM plus its controllers. Thread-safe for concurrent sessions."""

    # the class of the traces it makes: a RoutingTrace, or a subclass that only adds views
    # (the notebook API's draws itself, metaattn_viz/api.py)
    trace_class: type[RoutingTrace] = RoutingTrace

    def __init__(
        self,
        model,
        tokenizer,
        controllers: dict[str, ControllerStack],
        name: str = "model",
        controller_sources: dict | None = None,
        weights_fingerprint: str | None = None,
        feature_maps: linear_maps.MapChoice | None = None,
    ):
        # refused (UnsupportedModel, naming why) before anything reads its config
        sites = discovery.check_supported(model)
        # every module's train/eval mode as handed over: detach gives it back
        self._modes = [(m, m.training) for m in model.modules()]
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.controllers = controllers
        self.controller_sources = controller_sources or {}
        # the loaded weights' fingerprint (None: a model handed over, not loaded here)
        self.weights_fingerprint = weights_fingerprint
        self.slug = slugify(name)
        # the linear expert's learned maps (one per layer, on the model's device), or None
        # with the reason in feature_maps_source; "learned" sessions need them
        choice = feature_maps or linear_maps.MapChoice(None, "none given")
        self.feature_maps_source = choice.source
        cfg = model.config
        self.n_layers: int = cfg.num_hidden_layers
        self.head_dim = discovery.head_dim(model, sites)  # as the attention function receives it
        self.max_context = int(getattr(cfg, "max_position_embeddings", 2048) or 2048)
        self.placement = device_mod.placement_of(self.model)
        self.feature_maps = linear_maps.place(choice.maps, self.device)
        # the kernel backend of sessions whose settings leave it at "auto" (--backend), and
        # why it is not the one asked for, where the Triton kernels do not fit the GPU
        self.backend = "auto"
        self.backend_notice: str | None = None
        self._installed: Installation | None = None
        try:
            self._installed = install(self.model, self.n_layers)
        except Exception:
            self._restore_modes()  # a refused model is handed back as it came
            raise

    # -- placement ----------------------------------------------------------------------------
    def place(
        self, device: str | None = None, dtype: str | None = None, backend: str | None = None
    ) -> RoutedModel:
        """Move the model to a device and dtype (routing/device.py; None: the environment,
        else auto) and its controllers to the device (they stay float32: their features
        are computed in float32 whatever the model's dtype); ``backend`` becomes the
        default kernel backend (None: the environment, else auto; "cpu" where the Triton
        kernels do not fit the GPU, with ``backend_notice`` saying why: device.fit_backend).
        Returns self."""
        placement = device_mod.resolve(device, dtype)
        # triton where it cannot run: refused before the model moves
        device_mod.resolve_backend(device_mod.parse_backend(backend), placement)
        self.model.to(device=placement.torch_device, dtype=placement.torch_dtype)
        for stack in self.controllers.values():
            stack.to(placement.torch_device)
        self.feature_maps = linear_maps.place(self.feature_maps, placement.torch_device)
        self.placement = placement
        return self.use_backend(backend)

    def use_backend(self, backend: str | None = None) -> RoutedModel:
        """Make ``backend`` the default kernel backend where the model is now, without moving
        it (``place``'s last step; the notebook API's for a model routed where it is): None
        is the environment, else auto; Triton where it cannot run is refused, and "auto"
        becomes "cpu" where the Triton kernels do not fit the GPU (``backend_notice`` says
        why). Returns self."""
        placement = self.placement
        asked = device_mod.parse_backend(backend)
        device_mod.resolve_backend(asked, placement)  # refused: the default stays as it was
        cfg = self.model.config
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        fm = self.feature_maps[0] if self.feature_maps else None
        self.backend, self.backend_notice = device_mod.fit_backend(
            asked, placement, (cfg.num_attention_heads, kv_heads, self.head_dim), fm
        )
        if self.backend_notice:
            log.warning("%s", self.backend_notice)
        return self

    @property
    def device(self) -> torch.device:
        return self.placement.torch_device

    @property
    def dtype(self) -> torch.dtype:
        return self.placement.torch_dtype

    def runtime(self, settings: RoutingSettings | None = None) -> dict[str, str]:
        """Where the passes run, as plain strings for the CLI, the status line and /status:
        {"device", "dtype", "backend", "linear_map"} (the attention backend and the linear
        expert's feature map the settings' choices resolve to here; decoding on CPU float32
        takes the plain-Python path of the "cpu" backend), and "backend_notice" where "auto"
        kept to the PyTorch path because the Triton kernels do not fit the GPU (``place``)."""
        settings = settings or RoutingSettings()
        backend = settings.backend
        backend = self.backend if backend == "auto" else backend
        out = {
            "device": self.placement.device,
            "dtype": self.placement.dtype,
            "backend": device_mod.resolve_backend(backend, self.placement),
            "linear_map": linear_maps.resolve(settings.linear_map, self.feature_maps),
        }
        if self.backend_notice and settings.backend == "auto":
            out["backend_notice"] = self.backend_notice
        return out

    # -- attaching and detaching ------------------------------------------------------------
    @property
    def detached(self) -> bool:
        return self._installed is None

    def check_attached(self) -> None:
        """Refuse to route once detached (the model would silently run dense): the one
        error every entry point raises then, a stream between two tokens too."""
        if self._installed is None:
            raise RuntimeError(f"{self.name}: this RoutedModel was detached; route a new one")

    def detach(self):
        """Give the model back exactly as it was handed over: every hook routing added is
        removed, its attention implementation and every module's train/eval mode restored
        (a ``place`` is not undone: that move was asked for). The model then computes what
        it computed before routing, bit for bit. Afterwards this RoutedModel refuses to
        route. Idempotent; returns the model."""
        if self._installed is not None:
            uninstall(self._installed)
            self._installed = None
            self._restore_modes()
        return self.model

    def _restore_modes(self) -> None:
        for module, training in self._modes:
            module.training = training  # not .train(): that would recurse into children

    def __enter__(self) -> RoutedModel:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        model: str | None = None,
        controllers_dir: dict | None = None,
        device: str | None = None,
        dtype: str | None = None,
        backend: str | None = None,
        feature_maps_dir=None,
    ) -> RoutedModel:
        """Load the model (routing/loading.py), its controllers (shipped ones, else
        untrained) and its learned feature maps (shipped ones, else none), placed on
        ``device`` in ``dtype`` with ``backend`` (``place``). The placement is checked
        first: CUDA asked for without one fails before the model loads."""
        from metaattn_viz.routing import loading as model_loading

        device_mod.check_placement(device, dtype, backend)
        loaded = model_loading.load(model)
        return cls.from_loaded(loaded, controllers_dir, feature_maps_dir).place(device, dtype, backend)

    @classmethod
    def from_loaded(cls, loaded, controllers_dir: dict | None = None, feature_maps_dir=None) -> RoutedModel:
        """A RoutedModel of a loaded model (routing/loading.py) with the controllers and
        feature maps shipped for its slug, or those in ``controllers_dir`` (kind -> folder)
        and ``feature_maps_dir``."""
        sites = discovery.check_supported(loaded.model)  # before the controllers read its config
        controllers, sources = {}, {}
        for kind in KINDS:
            folder = (controllers_dir or {}).get(kind)
            choice = load_for_model(loaded.model.config, loaded.slug, kind, folder)
            controllers[kind], sources[kind] = choice.stack, choice.source
        fingerprint = getattr(loaded, "weights_fingerprint", None)
        head_dim = discovery.head_dim(loaded.model, sites)
        maps = linear_maps.load_for_model(loaded.model.config, loaded.slug, feature_maps_dir, head_dim)
        return cls(loaded.model, loaded.tokenizer, controllers, loaded.name, sources, fingerprint, maps)

    def weights_notice(self, kind: str) -> str | None:
        """What to tell the user when the `kind` controllers were calibrated on another copy of
        these weights (meta.json's fingerprint against the loaded one) or for another model
        (fingerprint.controllers_notice), else None. Untrained
        controllers are labelled as such elsewhere; a model not loaded here has no fingerprint."""
        stack = self.controller(kind)
        if not stack.trained or self.weights_fingerprint is None:
            return None
        return controllers_notice(stack.meta or {}, self.weights_fingerprint, self.name, self.model.config)

    def linear_maps_for(self, settings: RoutingSettings) -> list | None:
        """The per-layer feature maps of the linear expert under these settings: None for
        linear_map "elu"; this model's learned maps for "learned" (ValueError when it has
        none, naming the setting)."""
        return linear_maps.select(settings.linear_map, self.feature_maps, self.slug, self.feature_maps_source)

    def resolve_linear_map(self, settings: RoutingSettings) -> RoutingSettings:
        """The settings with linear_map "auto" replaced by the map it means for this model
        (what traces and the run log record)."""
        return settings.with_(linear_map=linear_maps.resolve(settings.linear_map, self.feature_maps))

    def controller_kind(self, controller: Any) -> str:
        """``controller`` checked as what a trace records: the kind name of one of
        ``controllers`` ("bayes" or "priorfree"). Anything else is refused by name, a
        ControllerStack too: a trace names its controllers by kind (its JSON record, a
        figure's title, a re-route), and ``calibrate`` installs the stack it returns under its
        kind, so the name routes with it."""
        kinds = ", ".join(repr(k) for k in sorted(self.controllers))
        if isinstance(controller, ControllerStack):
            raise TypeError(
                f"controller must be a controller kind name ({kinds}), got a ControllerStack: "
                f"pass controller={controller.kind!r} (calibrate installs the stack it returns "
                f"under its kind; put another stack in routed.controllers[{controller.kind!r}] first)"
            )
        if not isinstance(controller, str):
            raise TypeError(
                f"controller must be a controller kind name ({kinds}), got {type(controller).__name__}"
            )
        self.controller(controller)  # an unknown name: ValueError
        return controller

    def controller(self, kind: str | ControllerStack) -> ControllerStack:
        """The controller stack of this kind (a stack given is its own answer), refused where
        it does not fit the model (one put in ``controllers`` by hand: controller.check_fits)."""
        if isinstance(kind, ControllerStack):
            check_fits(kind, self.model.config)
            return kind
        if kind not in self.controllers:
            raise ValueError(f"controller must be one of {sorted(self.controllers)}, got {kind!r}")
        check_fits(self.controllers[kind], self.model.config, kind, f"routed.controllers[{kind!r}]")
        return self.controllers[kind]

    @contextlib.contextmanager
    def session(
        self, settings: RoutingSettings, controller: str | ControllerStack = DEFAULT_CONTROLLER, **kwargs: Any
    ) -> Iterator[Session]:
        """A routing session for the block, in this thread (arguments: session.Session); its
        linear expert uses the feature maps ``settings.linear_map`` selects
        (``linear_maps_for``). Refused once detached: the model would silently run dense."""
        with active(self.new_session(settings, controller, **kwargs)) as sess:
            yield sess

    def new_session(
        self, settings: RoutingSettings, controller: str | ControllerStack = DEFAULT_CONTROLLER, **kwargs: Any
    ) -> Session:
        """`session`'s Session, not yet active: for a pass that runs in steps with other work
        between them (a stream that yields), each step in ``session.active(it)``, so that
        nothing else the thread runs meanwhile is routed into it."""
        self.check_attached()
        stack = self.controller(controller)
        if settings.backend == "auto" and self.backend != "auto":
            settings = settings.with_(backend=self.backend)
        maps = self.linear_maps_for(settings)
        kwargs.setdefault("head_dim", self.head_dim)  # the "flops" cost model's
        return Session(self.n_layers, stack, settings, feature_maps=maps, **kwargs)

    # -- passes -----------------------------------------------------------------------------
    def dense_logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The unrouted model's logits [B, T, V] (the shadow pass for quality)."""
        with torch.no_grad(), self.session(RoutingSettings(budget=1.0), mode="dense"):
            return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits

    def prefill(
        self,
        input_ids: torch.Tensor,
        settings: RoutingSettings,
        controller: str | ControllerStack = DEFAULT_CONTROLLER,
        forced_weights: list[torch.Tensor] | None = None,
        capture_qk: bool = False,
        use_cache: bool = True,
        policy: Baseline | None = None,
        diagnose: bool = False,
        lam_hint: float | None = None,
        cache_capacity: int = 0,
        logits_to_keep: int = 0,
    ) -> PrefillResult:
        """Route a whole text in one forward pass (global scope: a pilot pass first, see
        routing/prefill.py). ``cache_capacity``: tokens the KV cache should hold without
        regrowing (prompt + tokens to decode); ``logits_to_keep``: 0 = logits at every
        position, n = at the last n (transformers' convention)."""
        return prefill_mod.prefill(
            self,
            input_ids,
            settings,
            controller,
            forced_weights=forced_weights,
            capture_qk=capture_qk,
            use_cache=use_cache,
            policy=policy,
            diagnose=diagnose,
            lam_hint=lam_hint,
            cache_capacity=cache_capacity,
            logits_to_keep=logits_to_keep,
        )

    def stream(
        self,
        prompt: str | list[int],
        settings: RoutingSettings | None = None,
        max_new_tokens: int = 64,
        controller: str = DEFAULT_CONTROLLER,
        sampling: Sampling | None = None,
        chat: bool = False,
        stop_event: threading.Event | None = None,
        max_context: int | None = None,
    ) -> Iterator[RoutingTrace]:
        """Prefill the prompt, then decode token by token; yields the growing trace after the
        prefill and after every new token (routing/generation.py)."""
        return generation.stream(
            self, prompt, settings, max_new_tokens, controller, sampling, chat, stop_event, max_context
        )

    def route(
        self, prompt, settings: RoutingSettings | None = None, max_new_tokens: int = 0, **kwargs
    ) -> RoutingTrace:
        """``stream`` to the end: the finished trace. Keyword arguments named after a
        ``RoutingSettings`` field (``budget=0.3``, ``hedge_policy="soft"``...) change
        ``settings`` (default ``RoutingSettings()``); the others go to ``stream``."""
        changes = {k: kwargs.pop(k) for k in list(kwargs) if k in RoutingSettings.__dataclass_fields__}
        check_settings(settings)
        if changes:
            settings = (settings or RoutingSettings()).with_(**changes)
        trace = None
        for step in self.stream(prompt, settings, max_new_tokens, **kwargs):
            trace = step
        assert trace is not None  # stream yields at least the prefill's trace
        return trace

    def reroute(
        self,
        trace: RoutingTrace,
        settings: RoutingSettings,
        controller: str | None = None,
        quality: bool = True,
    ) -> RoutingTrace:
        """Route the same text (prompt and generated tokens) again under new settings, as one
        prefill; with ``quality`` also the KL per token to the dense model."""
        check_settings(settings, required=True)
        if not hasattr(trace, "token_ids"):
            raise TypeError(f"trace must be a RoutingTrace (as route returns), got {type(trace).__name__}")
        controller = self.controller_kind(trace.controller if controller is None else controller)
        if not len(trace.token_ids):
            raise ValueError("nothing to re-route: the trace has no tokens")
        ids = generation.token_ids(list(trace.token_ids), self.model.config.vocab_size)
        new = self.new_trace(controller, settings, trace.prompt)
        new.n_prompt_tokens, new.truncated = trace.n_prompt_tokens, trace.truncated
        new.output_text = trace.output_text
        new.generation = getattr(trace, "generation", None)  # the same text, generated as it was
        hint = None
        previous = getattr(trace, "concentration", None)  # absent on a bare Text (the API)
        if (
            previous is not None
            and previous.shape[1] == len(ids)
            and prefill_mod.solves_globally(settings)
            and controller == trace.controller
        ):
            # warm start: the lambda that meets the new budget on the previous posteriors;
            # routing changes them a little, so prefill checks the cost and re-solves if off
            point_estimate = prefill_mod.is_point_estimate(self, controller)
            hint = prefill_mod.solve_global(
                previous[:, None], settings, point_estimate, head_dim=self.head_dim
            )
        t0 = time.perf_counter()
        res = self.prefill(torch.tensor([ids]), settings, controller, use_cache=False, lam_hint=hint)
        new.timings["prefill_ms"] = 1000 * (time.perf_counter() - t0)
        new.timings["prefill_passes"] = res.passes
        self.extend_trace(new, ids, res.records)
        if quality:
            t1 = time.perf_counter()
            dense = self.dense_logits(torch.tensor([ids]))
            new.kl_to_dense = kl_per_token(dense[0], res.logits[0]).cpu().numpy()
            new.timings["dense_ms"] = 1000 * (time.perf_counter() - t1)
        return new

    # -- text -> trace ------------------------------------------------------------------------
    def encode(self, prompt: str, chat: bool = False) -> list[int]:
        """The prompt's token ids as the model sees them: wrapped in the chat template when
        `applies_chat(chat)`, else as the tokenizer encodes a text by default, with the
        special tokens it adds (a Llama, Gemma or Mistral tokenizer's BOS; SmolLM2's adds
        none), so a trace is of the input ``model.generate(**tokenizer(prompt))`` sees."""
        problem = prompt_problem(prompt)
        if problem is not None:
            raise ValueError(problem)
        tok = self.tokenizer
        if self.applies_chat(chat):
            ids = tok.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
            )
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
        else:
            ids = tok(prompt)["input_ids"]
        if not ids:
            raise ValueError("prompt is empty after tokenisation")
        check_vocabulary(ids, self.model.config.vocab_size, tok)
        return list(ids)

    def applies_chat(self, chat: bool) -> bool:
        """Whether `encode(..., chat)` wraps a prompt in the chat template: asked for, and the
        tokenizer has one (else the prompt is encoded as it is)."""
        return bool(chat) and bool(getattr(self.tokenizer, "chat_template", None))

    def token_texts(self, ids, before=()) -> list[str]:
        """Each token's text, as what it adds to the text of the tokens before it (the
        last few of `before`, then of `ids`): a character that byte-level BPE splits over
        tokens shows whole on the token that completes it, and a token holding only part
        of one shows U+FFFD, where decoding each token alone showed U+FFFD for all of them
        (CJK, emoji, zero-width characters). A SentencePiece token keeps its leading space."""
        decode = self.tokenizer.decode
        context = [int(i) for i in before][-TOKEN_TEXT_CONTEXT:]
        texts = []
        for i in ids:
            prev, cur = decode(context), decode([*context, int(i)])
            text = cur[len(os.path.commonprefix([prev, cur])) :]
            texts.append(text if text or not cur.endswith("\ufffd") else "\ufffd")  # part of one
            context = [*context, int(i)][-TOKEN_TEXT_CONTEXT:]
        return texts

    def new_trace(self, controller: str, settings: RoutingSettings, prompt: str = "") -> RoutingTrace:
        stack = self.controller(self.controller_kind(controller))
        settings = self.resolve_linear_map(settings)
        return self.trace_class(
            model=self.name,
            controller=controller,
            controller_id=stack.controller_id,
            controller_trained=stack.trained,
            settings=settings,
            n_layers=self.n_layers,
            head_dim=self.head_dim,
            prompt=prompt,
        )

    def extend_trace(self, trace: RoutingTrace, ids: list[int], rec: dict[str, np.ndarray]) -> None:
        """Append tokens `ids` and their decisions (records of batch row 0) to the trace."""
        b = 0  # batch row
        trace.extend(
            ids,
            self.token_texts(ids, before=trace.token_ids),
            rec["beta"][:, b],
            rec["routes"][:, b],
            rec["hedged"][:, b],
            rec["weights"][:, b],
            rec["cost"][:, b],
            rec["lam"][:, b],
        )


def check_vocabulary(ids, vocab_size: int, tokenizer) -> None:
    """Refuse token ids the model has no embedding for, from a tokenizer that is not the
    model's (a larger vocabulary): said with both vocabulary sizes, where torch would fail
    with an IndexError deep in the embedding."""
    top = max(int(i) for i in ids)
    if top < vocab_size:
        return
    own = _vocabulary_size(tokenizer)
    theirs = f", the tokenizer's {own}" if own is not None else ""
    raise ValueError(
        f"the tokenizer does not fit the model: it encoded the prompt to token id {top}, but the "
        f"model's vocabulary has {vocab_size} ids{theirs}; pass the model's own tokenizer"
    )


def _vocabulary_size(tokenizer) -> int | None:
    """How many ids a tokenizer has, added tokens included (a transformers tokenizer's len),
    or None where it does not say."""
    try:
        return len(tokenizer)
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
        return size if isinstance(size, int) else None


def kl_per_token(dense_logits: torch.Tensor, routed_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_dense || p_routed) of the next-token distribution at every position [T]."""
    p_log = torch.log_softmax(dense_logits.float(), -1)
    q_log = torch.log_softmax(routed_logits.float(), -1)
    return (p_log.exp() * (p_log - q_log)).sum(-1)
