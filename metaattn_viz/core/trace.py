"""RoutingTrace: the one value object that travels from the routed model to the plots,
the store and the CLI (docs/architecture.md, "Data flow").

It holds numpy arrays (never tensors), so views and storage need neither torch nor the
model; a replay from the database, or ``from_json`` of its ``to_json`` record, rebuilds an
equal trace. Derived quantities
(uncertainties, FLOPs ratio, realised cost) are computed from the stored fields, never
stored twice, and by the one definition of each: core.dirichlet's uncertainties (numpy
path) and metaattn_kernels.flops. Never imports torch.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from metaattn_kernels.flops import attention_flops_ratio, attention_flops_totals, lowest_flops_ratio
from metaattn_viz.core.dirichlet import uncertainties
from metaattn_viz.core.experts import COSTS, EXPERTS, FULL, K
from metaattn_viz.core.settings import RoutingSettings

# Default of the array fields: __post_init__ replaces it with empty [L, 0, ...] arrays.
# Typed Any so that the fields can be declared as the arrays they always are after it.
_EMPTY: Any = None
_GROWN = ("concentration", "routes", "hedged", "weights", "cost", "lam")  # [L, T, ...] fields


@dataclass
class RoutingTrace:
    model: str
    controller: str  # "bayes" | "priorfree"
    controller_id: str  # e.g. "bayes-trained-3f2a..." (a content hash of the weights)
    controller_trained: bool
    settings: RoutingSettings
    n_layers: int
    head_dim: int
    token_ids: list[int] = field(default_factory=list)
    tokens: list[str] = field(default_factory=list)
    n_prompt_tokens: int = 0
    concentration: np.ndarray = _EMPTY  # [L, T, K] float32 (prior-free: its probabilities)
    routes: np.ndarray = _EMPTY  # [L, T] int8: expert chosen (see hedged)
    hedged: np.ndarray = _EMPTY  # [L, T] bool
    weights: np.ndarray = _EMPTY  # [L, T, K] float32 mixing weights actually applied
    # [L, T] float32 real cost of each decision under settings.cost_model (routing/costs.py)
    cost: np.ndarray = _EMPTY
    lam: np.ndarray = _EMPTY  # [L, T] float32 lambda in force for each decision
    kl_to_dense: np.ndarray | None = None  # [T] KL(dense || routed) next-token, if measured
    truncated: int = 0  # prompt tokens dropped from the left to fit the context
    timings: dict = field(default_factory=dict)  # prefill_ms, decode_ms, tokens_per_s, ...
    created_at: float = field(default_factory=time.time)
    prompt: str = ""
    output_text: str = ""
    run_id: str | None = None
    # how the text was generated (GENERATION_KEYS -> value; a re-route keeps its source's);
    # None where it is not known (a run logged before schema version 6, a bare text)
    generation: dict | None = None

    def __post_init__(self):
        L = self.n_layers
        if self.concentration is None:
            self.concentration = np.zeros((L, 0, K), np.float32)
            self.routes = np.zeros((L, 0), np.int8)
            self.hedged = np.zeros((L, 0), bool)
            self.weights = np.zeros((L, 0, K), np.float32)
            self.cost = np.zeros((L, 0), np.float32)
            self.lam = np.zeros((L, 0), np.float32)

    def __eq__(self, other: object) -> bool:
        """Equal on every stored field: arrays by value, shape and dtype (NaN equal to NaN), the
        rest by ==; a subclass (the notebook API's Trace) equals a RoutingTrace with the
        same fields. What ``from_json(to_json())`` and a replay from the log keep."""
        if not isinstance(other, RoutingTrace):
            return NotImplemented
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
                if not (
                    isinstance(a, np.ndarray)
                    and isinstance(b, np.ndarray)
                    and a.shape == b.shape
                    and a.dtype == b.dtype
                    and np.array_equal(a, b, equal_nan=a.dtype.kind == "f" and b.dtype.kind == "f")
                ):
                    return False
            elif a != b:
                return False
        return True

    __hash__ = None  # type: ignore[assignment]  # mutable: grows in place

    # -- building ---------------------------------------------------------------------------
    def extend(self, token_ids, tokens, concentration, routes, hedged, weights, cost, lam) -> None:
        """Append T_new positions: arrays [L, T_new, ...].

        Amortised: the array fields are views of buffers with spare room (doubled when
        full), so a trace grown token by token costs O(T) copying, not O(T^2). Positions
        already in a field are never written again, so views handed out earlier (to a
        plot, to the store's writer thread) stay valid."""
        new: tuple[np.ndarray, ...] = (
            np.asarray(concentration, np.float32),
            np.asarray(routes, np.int8),
            np.asarray(hedged, bool),
            np.asarray(weights, np.float32),
            np.asarray(cost, np.float32),
            np.asarray(lam, np.float32),
        )
        n_old = self.routes.shape[1]
        n_new = n_old + new[1].shape[1]
        bufs = self.__dict__.get("_bufs")
        current = [getattr(self, f) for f in _GROWN]
        if (
            bufs is None
            or self.__dict__.get("_buf_n") != n_old
            or bufs[0].shape[1] < n_new
            or any(a.base is not b for a, b in zip(current, bufs, strict=True))
        ):
            cap = max(n_new, 2 * n_old, 16)
            bufs = []
            for a, x in zip(current, new, strict=True):
                b = np.empty((a.shape[0], cap, *x.shape[2:]), x.dtype)
                b[:, :n_old] = a
                bufs.append(b)
            self.__dict__["_bufs"] = bufs
        for f, b, x in zip(_GROWN, bufs, new, strict=True):
            b[:, n_old:n_new] = x
            setattr(self, f, b[:, :n_new])
        self.__dict__["_buf_n"] = n_new
        self.token_ids.extend(int(t) for t in token_ids)
        self.tokens.extend(tokens)

    # -- derived ----------------------------------------------------------------------------
    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def point_estimate(self) -> bool:
        return self.controller == "priorfree"

    @property
    def posterior_mean(self) -> np.ndarray:
        c = self.concentration.astype(np.float64)
        return (c / np.maximum(c.sum(-1, keepdims=True), 1e-30)).astype(np.float32)

    def uncertainty(self, measure: str = "total") -> np.ndarray:
        """[L, T] uncertainty of each decision (see dirichlet.uncertainties)."""
        if self.n_tokens == 0:
            return np.zeros((self.n_layers, 0), np.float32)
        u = uncertainties(self.concentration, point_estimate=self.point_estimate)  # float64
        if measure not in u:
            raise ValueError(f"uncertainty measure must be one of {sorted(u)}, got {measure!r}")
        return u[measure].astype(np.float32)

    @property
    def realized_cost(self) -> float:
        """Mean cost per decision under the settings' cost model (under "flops", a prefill's
        is its attention FLOPs over dense ones; a decode step's is relative to dense there)."""
        return float(self.cost.mean()) if self.cost.size else float("nan")

    def positions(self) -> np.ndarray:
        """Absolute position of every token (after any left truncation)."""
        return np.arange(self.n_tokens)

    def attention_flops(self) -> tuple[float, float]:
        """(routed, dense) attention FLOPs per head summed over decisions (the model of
        metaattn_kernels.flops: hedged decisions pay every expert they compute)."""
        s = self.settings
        return attention_flops_totals(self.positions(), self.weights, s.window, s.n_sink, self.head_dim)

    @property
    def attention_flops_ratio(self) -> float:
        s = self.settings
        return attention_flops_ratio(self.positions(), self.weights, s.window, s.n_sink, self.head_dim)

    @property
    def lowest_flops_ratio(self) -> float:
        """The attention FLOPs ratio of the cheapest routing of these tokens (the floor of a
        budget under the "flops" cost model)."""
        s = self.settings
        return lowest_flops_ratio(self.positions(), s.window, s.n_sink, self.head_dim)

    def full_share_per_token(self) -> np.ndarray:
        """[T] share of layers that gave each token full attention (hedges count by weight)."""
        return self.weights[..., FULL].mean(0) if self.n_tokens else np.zeros(0, np.float32)

    def expert_shares(self) -> dict[str, float]:
        if not self.n_tokens:
            return {e: float("nan") for e in EXPERTS}
        return {e: float(self.weights[..., k].mean()) for k, e in enumerate(EXPERTS)}

    # -- checking ---------------------------------------------------------------------------
    def problem(self) -> str | None:
        """The first value no routed model writes into a trace, as a sentence, or None.
        ``from_json`` runs it after ``record_problem`` (the plain fields' types) and after
        building every array in its exact [n_layers, n_tokens, ...] shape, so it checks
        values only: dims at least 1, the prompt within the text, concentrations finite and
        positive (a prior-free controller's probabilities: >= 0, summing above 0), mixing
        weights finite, >= 0 and summing to 1, costs finite and >= 0, lambdas finite."""
        L, T = self.n_layers, self.n_tokens
        if L < 1 or self.head_dim < 1:
            return f"n_layers and head_dim must be at least 1, got {L} and {self.head_dim}"
        if not 0 <= self.n_prompt_tokens <= T:
            return f"n_prompt_tokens must be between 0 and the {T} tokens, got {self.n_prompt_tokens}"
        if self.truncated < 0:
            return f"truncated must be at least 0, got {self.truncated}"
        if not T:
            return None
        c = self.concentration
        if not np.isfinite(c).all():
            return "concentration must be finite"
        if self.point_estimate:
            if (c < 0).any() or not (c.sum(-1) > 0).all():
                return "concentration (the prior-free controller's probabilities) must be >= 0, not all 0"
        elif not (c > 0).all():
            return "concentration must be > 0 (Dirichlet concentrations)"
        w = self.weights
        if not np.isfinite(w).all() or (w < 0).any():
            return "weights must be finite and >= 0"
        if (np.abs(w.astype(np.float64).sum(-1) - 1.0) > WEIGHT_SUM_TOL).any():
            return "the weights of each decision must sum to 1"
        if not np.isfinite(self.cost).all() or (self.cost < 0).any():
            return "cost must be finite and >= 0"
        if not np.isfinite(self.lam).all():
            return "lam must be finite"
        return None

    # -- export -----------------------------------------------------------------------------
    def to_json(self) -> dict:
        """The `route --json` contract (docs/architecture.md), which is also the trace's
        full record: ``from_json`` rebuilds an equal trace from it. The arrays are written
        unrounded (a float32 is exact as a JSON number); the derived values (uncertainty,
        realised cost, FLOPs ratio, shares) are for readers and never read back."""

        def clean(x: float):
            return None if x is None or not math.isfinite(x) else x

        return {
            "model": self.model,
            "controller": self.controller,
            "controller_id": self.controller_id,
            "controller_trained": self.controller_trained,
            "budget": self.settings.budget,
            "settings": self.settings.to_dict(),
            "cost_model": self.settings.cost_model,  # what cost and realized_cost count
            "experts": list(EXPERTS),
            "costs": list(COSTS),  # the notional costs
            "tokens": list(self.tokens),
            "token_ids": list(self.token_ids),
            "n_prompt_tokens": self.n_prompt_tokens,
            "truncated": self.truncated,
            "routes": self.routes.astype(int).tolist(),
            "hedged": self.hedged.astype(bool).tolist(),
            "uncertainty": np.round(self.uncertainty("total"), 6).tolist(),
            "concentration": _floats(self.concentration),
            "realized_cost": clean(self.realized_cost),
            "attention_flops_ratio": clean(self.attention_flops_ratio),
            "expert_shares": self.expert_shares(),
            "output_text": self.output_text,
            "timings": self.timings,
            "run_id": self.run_id,
            "n_layers": self.n_layers,
            "head_dim": self.head_dim,
            "prompt": self.prompt,
            "created_at": self.created_at,
            "weights": _floats(self.weights),
            "cost": _floats(self.cost),
            "lam": _floats(self.lam),
            "kl_to_dense": None if self.kl_to_dense is None else _floats(self.kl_to_dense),
            "generation": None if self.generation is None else dict(self.generation),
        }

    @classmethod
    def from_json(cls, data: dict | str) -> RoutingTrace:
        """The trace ``to_json`` wrote (its dict or that dict as JSON text), equal to the
        original on every stored field. A record without the arrays (an older ``route
        --json``) is refused, naming what is missing. Always checked (the record may come
        from outside: an API client's, a file): ``record_problem`` before any array is
        built, ``problem`` after; either raises ValueError with the sentence."""
        d = json.loads(data) if isinstance(data, str) else data
        problem = record_problem(d)
        if problem:
            raise ValueError(problem)
        L, T = d["n_layers"], len(d["token_ids"])

        def array(key: str, dtype, *tail: int) -> np.ndarray:
            """d[key] as an [L, T, *tail] array of dtype, refusing any other shape, and
            elements of another kind (text, null, nested lists of uneven length)."""
            shape = (L, T, *tail)
            raw = d[key]
            if isinstance(raw, (list, tuple)) and len(raw) != L:  # before building it
                raise ValueError(f"{key} must hold {L} layers, got {len(raw)}")
            want = " x ".join(map(str, shape))
            try:
                a = np.asarray(raw)
            except ValueError:  # lists of uneven length
                raise ValueError(f"{key} must be an array of {want} (layers x tokens), not ragged") from None
            if a.size == 0 and math.prod(shape) == 0:  # to_json of an empty trace
                return a.astype(dtype).reshape(shape)
            if a.shape != shape:
                raise ValueError(f"{key} must be an array of {want} (layers x tokens), got shape {a.shape}")
            if a.dtype.kind not in _KINDS[np.dtype(dtype).kind]:
                raise ValueError(f"{key} must hold {_KIND_NAMES[np.dtype(dtype).kind]}, got {a.dtype}")
            if key == "routes" and not ((a >= 0) & (a < K)).all():  # before it becomes int8
                found = sorted({int(r) for r in a.flat})[:10]
                raise ValueError(f"routes must be expert indices in [0, {K}), got {found}")
            return a.astype(dtype)

        trace = cls(
            model=d["model"],
            controller=d["controller"],
            controller_id=d["controller_id"],
            controller_trained=d["controller_trained"],
            settings=RoutingSettings.from_dict(d["settings"]),
            n_layers=L,
            head_dim=d["head_dim"],
            token_ids=list(d["token_ids"]),
            tokens=list(d["tokens"]),
            n_prompt_tokens=d["n_prompt_tokens"],
            concentration=array("concentration", np.float32, K),
            routes=array("routes", np.int8),
            hedged=array("hedged", bool),
            weights=array("weights", np.float32, K),
            cost=array("cost", np.float32),
            lam=array("lam", np.float32),
            truncated=d["truncated"],
            timings=dict(d["timings"]),
            created_at=float(d["created_at"]),
            prompt=d["prompt"],
            output_text=d["output_text"],
            run_id=d["run_id"],
            generation=_generation(d.get("generation")),  # absent from records before it
        )
        if d["kl_to_dense"] is not None:
            kl = np.asarray(d["kl_to_dense"])
            if kl.size and kl.dtype.kind not in _KINDS["f"]:
                raise ValueError(f"kl_to_dense must be null or hold numbers, got {kl.dtype}")
            trace.kl_to_dense = kl.astype(np.float32)
        problem = trace.problem()
        if problem:
            raise ValueError(problem)
        return trace


# How a trace's text was generated (routing/generation.py's stream); what a share link
# carries and the log keeps, so that a run can be made again.
GENERATION_KEYS = ("max_new_tokens", "temperature", "top_p", "seed", "chat")


def generation_record(max_new_tokens: int, temperature: float, top_p: float, seed: int, chat: bool) -> dict:
    """A trace's `generation`: GENERATION_KEYS -> the values, as plain Python types."""
    return {
        "max_new_tokens": int(max_new_tokens),
        "temperature": float(temperature),
        "top_p": float(top_p),
        "seed": int(seed),
        "chat": bool(chat),
    }


WEIGHT_SUM_TOL = 1e-3  # how far a decision's mixing weights may sum from 1 (float32 rounding)


def _whole(x) -> bool:
    """Whether `x` is an int (numpy's too), not a bool."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def record_problem(d) -> str | None:
    """The first thing wrong with a trace record's plain fields (what ``from_json`` reads
    before it builds any array), as a sentence, or None. Checks types only where a wrong
    one would be read as something else or crash further on: ints that are ints (not
    bools, floats or text), text that is text, dicts that are dicts."""
    if not isinstance(d, dict):
        return f"a trace record is a dict or its JSON text, got {type(d).__name__}"
    missing = [k for k in _JSON_REQUIRED if k not in d]
    if missing:
        return f"not a full trace record: missing {', '.join(missing)}"
    for name in ("n_layers", "head_dim", "n_prompt_tokens", "truncated"):
        if not _whole(d[name]):
            return f"{name} must be a whole number, got {d[name]!r}"
    ids = d["token_ids"]
    if not isinstance(ids, list) or not all(_whole(t) and t >= 0 for t in ids):
        return "token_ids must be a list of whole numbers >= 0"
    tokens = d["tokens"]
    if not isinstance(tokens, list) or len(tokens) != len(ids) or not all(isinstance(t, str) for t in tokens):
        return f"tokens must be a list of {len(ids)} strings, one per token id"
    for name in ("settings", "timings"):
        if not isinstance(d[name], dict):
            return f"{name} must be a JSON object, got {type(d[name]).__name__}"
    for name in ("model", "controller", "controller_id", "prompt", "output_text"):
        if not isinstance(d[name], str):
            return f"{name} must be text, got {type(d[name]).__name__}"
    if not isinstance(d["controller_trained"], bool):
        return f"controller_trained must be true or false, got {d['controller_trained']!r}"
    if d["run_id"] is not None and not isinstance(d["run_id"], str):
        return f"run_id must be text or null, got {type(d['run_id']).__name__}"
    created = d["created_at"]
    if not isinstance(created, (int, float)) or isinstance(created, bool) or not math.isfinite(created):
        return f"created_at must be a number, got {created!r}"
    kl = d["kl_to_dense"]
    if kl is not None and (not isinstance(kl, list) or len(kl) != len(ids)):
        return f"kl_to_dense must be null or a list of one number per token ({len(ids)})"
    return None


# the kinds of JSON numbers an array of each dtype kind is read from, and their names
_KINDS = {"f": "fiu", "i": "iu", "b": "b"}
_KIND_NAMES = {"f": "numbers", "i": "whole numbers", "b": "true or false"}


# what from_json reads (the rest of to_json's keys are derived)
_JSON_REQUIRED = (
    "model",
    "controller",
    "controller_id",
    "controller_trained",
    "settings",
    "n_layers",
    "head_dim",
    "token_ids",
    "tokens",
    "n_prompt_tokens",
    "truncated",
    "concentration",
    "routes",
    "hedged",
    "weights",
    "cost",
    "lam",
    "kl_to_dense",
    "timings",
    "created_at",
    "prompt",
    "output_text",
    "run_id",
)


def _generation(d) -> dict | None:
    """A record's `generation` (None, or a dict of GENERATION_KEYS), checked."""
    if d is None:
        return None
    if not isinstance(d, dict) or set(d) != set(GENERATION_KEYS):
        raise ValueError(f"generation must be null or hold {', '.join(GENERATION_KEYS)}, got {d!r}")
    try:
        return generation_record(**d)
    except (TypeError, ValueError, OverflowError):
        raise ValueError(f"generation must hold numbers and a flag, got {d!r}") from None


def _floats(a: np.ndarray) -> list:
    """An array as nested lists of JSON numbers, unrounded: float64 holds every float32
    exactly, so reading it back as float32 gives the same bits."""
    return np.asarray(a).astype(np.float64).tolist()


__all__ = ["GENERATION_KEYS", "WEIGHT_SUM_TOL", "RoutingTrace", "generation_record", "record_problem"]
