"""Generation with the routed model: prefill the prompt, then decode token by token,
extending one routing trace in place (docs/method.md, "Decoding").

Decoding starts from the prefill's lambdas (the budget policy then follows the running cost
by dual ascent) and its linear experts' states (each with the feature map it was built
with); the KV cache is the prefill's, sized for the
prompt plus the new tokens. Sampling is greedy at temperature 0, else temperature and
nucleus (top-p) sampling from a seeded generator; generation stops at an EOS token, after
``max_new_tokens``, or when ``stop_event`` is set.

Never: decide routes (the session's policy does) or touch the store or the UI.
"""

from __future__ import annotations

import logging
import numbers
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from metaattn_viz.core.settings import DEFAULT_CONTROLLER, RoutingSettings, check_settings, finite_number
from metaattn_viz.core.trace import RoutingTrace, generation_record
from metaattn_viz.routing.session import active

if TYPE_CHECKING:
    from metaattn_viz.routing.model import RoutedModel

log = logging.getLogger(__name__)

MAX_NEW_TOKENS = 4096


@dataclass
class Sampling:
    """Decoding settings: greedy when temperature == 0."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        finite_number("temperature", self.temperature, 0.0, 5.0)
        if not finite_number("top_p", self.top_p, 0.0, 1.0, what="in (0, 1]") > 0.0:
            raise ValueError(f"top_p must be a finite number in (0, 1], got {self.top_p!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be a whole number in [0, {MAX_SEED}], got {self.seed!r}")


MAX_SEED = 2**63 - 1  # the largest int64: well within what torch.Generator.manual_seed takes


def sample(logits: torch.Tensor, sampling: Sampling, gen: torch.Generator) -> int:
    """The next token from logits [V]."""
    if sampling.temperature == 0.0:
        return int(logits.argmax())
    # on the CPU: the seeded generator is a CPU one, and the draws match on every device
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, -1)
    if sampling.top_p < 1.0:
        sorted_p, idx = probs.sort(descending=True)
        keep = sorted_p.cumsum(0) - sorted_p < sampling.top_p
        probs = torch.zeros_like(probs).scatter(0, idx[keep], sorted_p[keep])
        probs = probs / probs.sum()
    return int(torch.multinomial(probs, 1, generator=gen))


def token_ids(prompt: list, vocab_size: int) -> list[int]:
    """A prompt given as token ids, checked: whole numbers in [0, vocab_size), at least one;
    a list of texts or of id lists (a batch) is refused as such."""
    if not prompt:
        raise ValueError("prompt is empty: type some text to route")
    if any(isinstance(i, (str, bytes, list, tuple)) or getattr(i, "ndim", 0) for i in prompt):
        raise ValueError(
            "prompt is a list of texts or of token-id lists: batches are not supported; "
            "route one text (or one list of token ids) at a time"
        )
    for i in prompt:
        if isinstance(i, bool) or not isinstance(i, numbers.Integral) or not 0 <= int(i) < vocab_size:
            raise ValueError(f"token ids must be whole numbers in [0, {vocab_size}), got {i!r}")
    return [int(i) for i in prompt]


def eos_ids(tokenizer, model) -> set[int]:
    """Every end-of-sequence id the generation config, the model config or the tokenizer
    names."""
    ids = set()
    for src in (getattr(model, "generation_config", None), model.config, tokenizer):
        e = getattr(src, "eos_token_id", None)
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(i) for i in e)
    return ids


def stream(
    routed: RoutedModel,
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
    prefill and after every new token (the same object, extended in place). A prompt too
    long for the context (the smaller of ``max_context`` and the model's, less room for the
    new tokens) is truncated from the left. ``controller``: the kind name ("bayes" or
    "priorfree") of the stack in ``routed.controllers`` to route with, as the trace records
    it; a ControllerStack itself is refused (``RoutedModel.controller_kind``). Once ``routed``
    is detached the stream is refused, between two tokens too, with the error every entry
    point raises then."""
    check_settings(settings)
    settings = RoutingSettings() if settings is None else settings
    sampling = Sampling() if sampling is None else sampling
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be a Sampling, got {type(sampling).__name__}")
    if max_context is not None and (
        isinstance(max_context, bool) or not isinstance(max_context, int) or max_context < 1
    ):
        raise ValueError(f"max_context must be a whole number >= 1 (or None), got {max_context!r}")
    if (
        isinstance(max_new_tokens, bool)
        or not isinstance(max_new_tokens, int)
        or not (0 <= max_new_tokens <= MAX_NEW_TOKENS)
    ):
        raise ValueError(
            f"max_new_tokens must be a whole number in [0, {MAX_NEW_TOKENS}], got {max_new_tokens!r}"
        )
    routed.controller_kind(controller)  # a kind name (the trace records it), else refused
    if isinstance(prompt, list):
        ids = token_ids(prompt, routed.model.config.vocab_size)
    else:
        ids = routed.encode(prompt, chat)
    context = min(max_context or routed.max_context, routed.max_context)  # the smaller limit rules
    limit = context - max_new_tokens
    if limit < 1:
        given = context < routed.max_context  # max_context is the limit, not the model's
        fix = "ask for fewer new tokens" + (" or a larger max_context" if given else "")
        raise ValueError(
            f"max_new_tokens ({max_new_tokens}) must leave room for the prompt in "
            f"{'max_context' if given else 'the model'}'s {context}-token context: {fix}"
        )
    truncated = max(0, len(ids) - limit)
    if truncated:
        log.info("prompt truncated from the left: %d of %d tokens dropped", truncated, len(ids))
        ids = ids[truncated:]
    trace = routed.new_trace(controller, settings, prompt if isinstance(prompt, str) else "")
    chatted = isinstance(prompt, str) and routed.applies_chat(chat)  # what was applied, not asked
    trace.generation = generation_record(
        max_new_tokens, sampling.temperature, sampling.top_p, sampling.seed, chatted
    )
    trace.truncated = truncated
    trace.n_prompt_tokens = len(ids)

    t0 = time.perf_counter()
    res = routed.prefill(
        torch.tensor([ids]), settings, controller, cache_capacity=len(ids) + max_new_tokens, logits_to_keep=1
    )
    trace.timings["prefill_ms"] = 1000 * (time.perf_counter() - t0)
    trace.timings["prefill_passes"] = res.passes
    trace.timings["pilot_tokens"] = res.pilot_tokens
    routed.extend_trace(trace, ids, res.records)
    yield trace

    eos = eos_ids(routed.tokenizer, routed.model)
    gen = torch.Generator().manual_seed(int(sampling.seed))
    logits = res.logits[0, -1]
    cache = res.cache
    new_ids: list[int] = []
    t1 = time.perf_counter()
    # decode steps: the prefill's lambdas, then dual ascent per token. The session (and
    # no_grad) is active during each step only, never across a yield: the caller's thread
    # runs other work between steps (another stream, a plain forward), which must not be
    # routed into this one.
    sess = routed.new_session(settings, controller, lam=res.lam)
    sess.lin_state = list(res.session.lin_state)  # carry the prefill's linear states over
    for _ in range(max_new_tokens):
        if stop_event is not None and stop_event.is_set():
            trace.timings["stopped"] = True
            break
        nxt = sample(logits, sampling, gen)
        if nxt in eos:
            break
        new_ids.append(nxt)
        step_ids = torch.tensor([[nxt]], device=routed.device)
        routed.check_attached()  # detached between two tokens: the step would run dense
        with torch.no_grad(), active(sess):
            out = routed.model(input_ids=step_ids, past_key_values=cache, use_cache=True)
        logits = out.logits[0, -1]
        records = sess.pop_records()
        if records is None:  # no layer routed the step: detached while it ran (another thread)
            routed.check_attached()
            raise RuntimeError(f"{routed.name}: a decode step ran without routing; route a new stream")
        routed.extend_trace(trace, [nxt], records)
        dt = time.perf_counter() - t1
        trace.timings["decode_ms"] = 1000 * dt
        trace.timings["tokens_per_s"] = len(new_ids) / dt if dt > 0 else None
        trace.output_text = routed.tokenizer.decode(new_ids, skip_special_tokens=True)
        yield trace
    trace.timings["total_ms"] = 1000 * (time.perf_counter() - t0)
    trace.output_text = routed.tokenizer.decode(new_ids, skip_special_tokens=True)
