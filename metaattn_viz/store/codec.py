"""A RoutingTrace to the routing log's rows and back (docs/architecture.md): the runs
row, a slice of positions copied out of a growing trace and encoded as Arrow tables for
`tokens` and `routes`, and, next to them, the decoding of those rows back into an equal
RoutingTrace (a replay).

Pure data: never touches a database (the writer and RunLog do), never imports the model
code or gradio. The uncertainty columns are dirichlet.uncertainties on numpy arrays.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from metaattn_viz.core.dirichlet import uncertainties
from metaattn_viz.core.experts import EXPERTS
from metaattn_viz.core.settings import CONTROLLER_KINDS, RoutingSettings
from metaattn_viz.core.trace import GENERATION_KEYS, RoutingTrace, generation_record
from metaattn_viz.store.schema import SETTINGS_COLUMNS, UNCERTAINTY_COLUMNS

# The per-decision arrays of a trace, each [L, T, ...], in TraceSlice's field order.
TRACE_ARRAYS = ("concentration", "routes", "hedged", "weights", "cost", "lam")


@dataclass
class TraceSlice:
    """Positions [start, end) of one run, copied out of its trace (so the trace may keep
    growing while the writer encodes them)."""

    start: int
    end: int
    token_ids: np.ndarray  # [n] int32
    texts: list[str]
    concentration: np.ndarray  # [L, n, K]
    routes: np.ndarray  # [L, n]
    hedged: np.ndarray  # [L, n]
    weights: np.ndarray  # [L, n, K]
    cost: np.ndarray  # [L, n]
    lam: np.ndarray  # [L, n]
    n_prompt_tokens: int
    truncated: int
    point_estimate: bool
    # the run's row as of this slice (schema.PROGRESS_COLUMNS beyond the counts): the text
    # and measures so far, so that a run that never finishes still shows and finds them
    so_far: dict[str, Any] = field(default_factory=dict)


# -- encoding -------------------------------------------------------------------------------
def utc(epoch_s: float) -> _dt.datetime:
    """A naive UTC datetime, as the log's TIMESTAMP columns hold."""
    return _dt.datetime.fromtimestamp(epoch_s, _dt.UTC).replace(tzinfo=None)


def _finite_or_none(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def _json_default(o: object) -> object:
    if isinstance(o, np.generic):
        return o.item()
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


def run_row(run_id: str, trace: RoutingTrace, kind: str, owner: str | None = None) -> dict[str, Any]:
    """The runs row that start_run writes (status `running`, no positions yet)."""
    row = {
        "run_id": run_id,
        "created_at": utc(trace.created_at),
        "status": "running",
        "owner": owner,
        "kind": kind,
        "model": safe_text(trace.model),
        "controller": trace.controller,
        "controller_id": trace.controller_id,
        "controller_trained": bool(trace.controller_trained),
        "n_layers": int(trace.n_layers),
        "head_dim": int(trace.head_dim),
        "n_tokens": 0,
        "n_prompt_tokens": int(trace.n_prompt_tokens),
        "truncated": int(trace.truncated),
        "prompt": safe_text(trace.prompt),
        # the server's process and machine, for whoever runs it; not in a visitor's own
        # rows (an owner's run: a public deployment), which show the visitor what they read
        "pid": os.getpid() if owner is None else None,
        "host": socket.gethostname() if owner is None else None,
    }
    settings = trace.settings.to_dict()
    for name, column in SETTINGS_COLUMNS.items():
        row[column] = settings[name]
    for key in GENERATION_KEYS:  # the runs columns have the keys' names
        row[key] = None if trace.generation is None else trace.generation[key]
    return row


def run_wall_ms(trace: RoutingTrace, logged_ms: float) -> float:
    """The run's wall time: the trace's own account where it has one (a generation's
    `total_ms`, or its prefill and decoding so far when it was cut short; a re-route's
    `reroute_ms`), else `logged_ms`, from its start in the log to its end there. A run is
    started in the log only after its prefill (a stream), or once it is complete (a
    re-route, `route`): that alone gave a re-route about 1 ms."""
    ms = {}
    for key in ("total_ms", "reroute_ms", "prefill_ms", "decode_ms"):
        v = trace.timings.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            ms[key] = float(v)
    if "total_ms" in ms or "reroute_ms" in ms:
        return ms.get("total_ms", ms.get("reroute_ms", logged_ms))
    if "prefill_ms" in ms:
        return ms["prefill_ms"] + ms.get("decode_ms", 0.0)
    return logged_ms


def final_fields(
    run_id: str, trace: RoutingTrace, status: str, error: str | None, wall_ms: float, finished_at: float
) -> dict[str, Any]:
    """The runs fields that finish writes (schema.FINAL_COLUMNS); `wall_ms`: from the run's
    start in the log to its end there (`run_wall_ms` prefers the trace's own account)."""
    return {
        "run_id": run_id,
        "status": status,
        "finished_at": utc(finished_at),
        "prompt": safe_text(trace.prompt),
        "output_text": safe_text(trace.output_text),
        "realized_cost": _finite_or_none(trace.realized_cost),
        "flops_ratio": _finite_or_none(trace.attention_flops_ratio),
        "wall_ms": run_wall_ms(trace, wall_ms),
        "timings": json.dumps(trace.timings, default=_json_default),
        "error": None if error is None else safe_text(error),
    }


def kl_table(run_id: str, trace: RoutingTrace) -> pa.Table | None:
    """(run_id, pos, kl_to_dense) for the tokens of a run that measured it, else None."""
    if trace.kl_to_dense is None:
        return None
    values = np.asarray(trace.kl_to_dense, np.float32).ravel()  # [T]
    return pa.table(
        {
            "run_id": pa.array([run_id] * len(values), pa.string()),
            "pos": np.arange(len(values), dtype=np.int32),
            "kl_to_dense": values,
        }
    )


def snapshot(trace: RoutingTrace, start: int) -> TraceSlice | None:
    """Copy the positions of `trace` from `start` to its current end (None if none)."""
    arrays = [getattr(trace, name) for name in TRACE_ARRAYS]
    token_ids, texts = trace.token_ids, trace.tokens
    # Another thread may be extending the trace: take the length every field already has.
    end = min(len(token_ids), len(texts), *(a.shape[1] for a in arrays))
    if end <= start:
        return None
    conc, routes, hedged, weights, cost, lam = (np.array(a[:, start:end]) for a in arrays)
    return TraceSlice(
        start,
        end,
        np.asarray(token_ids[start:end], np.int32),
        list(texts[start:end]),
        conc,
        routes,
        hedged,
        weights,
        cost,
        lam,
        int(trace.n_prompt_tokens),
        int(trace.truncated),
        trace.point_estimate,
        {
            "output_text": safe_text(trace.output_text),
            "realized_cost": _finite_or_none(trace.realized_cost),
            "flops_ratio": _finite_or_none(trace.attention_flops_ratio),
        },
    )


def merge_slices(slices: list[tuple[str, TraceSlice]]) -> list[tuple[str, TraceSlice]]:
    """Join each run's consecutive slices of a writer round into one (a stream appends a
    few positions at a time; building tables per slice would cost more than inserting)."""
    merged: dict[str, list[TraceSlice]] = {}
    out: list[tuple[str, list[TraceSlice]]] = []
    for rid, sl in slices:
        group = merged.get(rid)
        if group is not None and group[-1].end == sl.start:
            group.append(sl)
        else:
            merged[rid] = group = [sl]
            out.append((rid, group))
    result = []
    for rid, group in out:
        if len(group) == 1:
            result.append((rid, group[0]))
            continue
        last = group[-1]
        cat = {
            name: np.concatenate([getattr(g, name) for g in group], axis=1) for name in TRACE_ARRAYS
        }  # along positions
        result.append(
            (
                rid,
                TraceSlice(
                    group[0].start,
                    last.end,
                    np.concatenate([g.token_ids for g in group]),
                    [t for g in group for t in g.texts],
                    **cat,
                    n_prompt_tokens=last.n_prompt_tokens,
                    truncated=last.truncated,
                    point_estimate=last.point_estimate,
                    so_far=last.so_far,
                ),
            )
        )
    return result


_SURROGATE = re.compile("[\ud800-\udfff]")


def safe_text(s: str) -> str:
    """Text as valid UTF-8, which Arrow and DuckDB require: a lone surrogate (from a broken
    decode, or an undecodable byte of a command line) becomes U+FFFD. Token texts, the
    prompt, the output and the error all pass through it, so one such character can never
    fail a write round (and with it every run in the round)."""
    return _SURROGATE.sub("\ufffd", s)


def uncertainty_columns(concentration: np.ndarray, point_estimate: bool) -> dict[str, np.ndarray]:
    """The uncertainty columns of `routes` for concentrations [..., K]: the measures of
    dirichlet.uncertainties (docs/method.md, Uncertainty), float32. On numpy arrays, not
    torch tensors: on 2 busy cores torch's per-op cost made these columns 3-5x slower
    than numpy (and slower than the whole DuckDB insert), competing with the generation
    for the intra-op pool."""
    beta = np.asarray(concentration, np.float64)
    measures = uncertainties(beta, point_estimate=point_estimate)
    return {UNCERTAINTY_COLUMNS[name]: np.asarray(v).astype(np.float32) for name, v in measures.items()}


def slice_tables(slices: list[tuple[str, TraceSlice]]) -> tuple[pa.Table, pa.Table]:
    """(tokens, routes) Arrow tables for the slices of one writer round; route rows are
    layer-major within each slice."""
    dictionary = pa.array([rid for rid, _ in slices], pa.string())
    tok_idx: list[np.ndarray] = []
    route_idx: list[np.ndarray] = []
    texts: list[str] = []
    cols: dict[str, list[np.ndarray]] = {
        c: []
        for c in (
            "pos_t",
            "token_id",
            "is_prompt",
            "layer",
            "pos",
            "expert",
            "hedged",
            "cost",
            "lam",
            *(f"conc_{e}" for e in EXPERTS),
            *(f"weight_{e}" for e in EXPERTS),
            *UNCERTAINTY_COLUMNS.values(),
        )
    }
    for i, (_, s) in enumerate(slices):
        L, n = s.routes.shape  # [L, n]
        positions = np.arange(s.start, s.end, dtype=np.int32)
        tok_idx.append(np.full(n, i, np.int32))
        cols["pos_t"].append(positions)
        cols["token_id"].append(s.token_ids)
        texts.extend(safe_text(t) for t in s.texts)
        cols["is_prompt"].append(positions < s.n_prompt_tokens)
        route_idx.append(np.full(L * n, i, np.int32))
        cols["layer"].append(np.repeat(np.arange(L, dtype=np.int16), n))  # layer-major
        cols["pos"].append(np.tile(positions, L))
        cols["expert"].append(s.routes.astype(np.int8).ravel())
        cols["hedged"].append(s.hedged.astype(bool).ravel())
        cols["cost"].append(s.cost.astype(np.float32).ravel())
        cols["lam"].append(s.lam.astype(np.float32).ravel())
        for k, e in enumerate(EXPERTS):
            cols[f"conc_{e}"].append(s.concentration[..., k].astype(np.float32).ravel())
            cols[f"weight_{e}"].append(s.weights[..., k].astype(np.float32).ravel())
        for column, values in uncertainty_columns(s.concentration, s.point_estimate).items():
            cols[column].append(values.ravel())  # [L, n] -> layer-major

    def run_id_column(idx: list[np.ndarray]) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(pa.array(np.concatenate(idx)), dictionary)

    tokens = pa.table(
        {
            "run_id": run_id_column(tok_idx),
            "pos": np.concatenate(cols["pos_t"]),
            "token_id": np.concatenate(cols["token_id"]),
            "text": pa.array(texts, pa.string()),
            "is_prompt": np.concatenate(cols["is_prompt"]),
        }
    )
    route_cols: dict[str, Any] = {"run_id": run_id_column(route_idx)}
    for c in (
        "layer",
        "pos",
        "expert",
        "hedged",
        *(f"conc_{e}" for e in EXPERTS),
        *(f"weight_{e}" for e in EXPERTS),
        "cost",
        "lam",
        *UNCERTAINTY_COLUMNS.values(),
    ):
        route_cols[c] = np.concatenate(cols[c])
    return tokens, pa.table(route_cols)


# -- decoding -------------------------------------------------------------------------------
def decode_trace(
    run: Mapping[str, Any], tokens: Mapping[str, np.ndarray], routes: Mapping[str, np.ndarray]
) -> RoutingTrace:
    """The RoutingTrace of a runs row, its tokens rows and its routes rows (columns as
    numpy arrays, Q.TOKENS_OF_RUN and Q.ROUTES_OF_RUN): the inverse of the encoding
    above. The caller checks that there are n_tokens token rows and n_layers x n_tokens
    route rows. A value this version rejects (a setting out of range in an old or edited
    log, a controller it does not know, timings that are not JSON) raises ValueError naming
    it."""
    L, T = int(run["n_layers"]), int(run["n_tokens"])
    layer, pos = np.asarray(routes["layer"], np.intp), np.asarray(routes["pos"], np.intp)

    def grid(values: np.ndarray, dtype: npt.DTypeLike) -> np.ndarray:
        out: np.ndarray = np.zeros((L, T), dtype)  # [L, T]
        out[layer, pos] = np.asarray(values, dtype)
        return out

    def grid3(prefix: str) -> np.ndarray:  # [L, T, K]
        return np.stack([grid(routes[f"{prefix}_{e}"], np.float32) for e in EXPERTS], -1)

    kl = np.ma.filled(np.ma.asarray(tokens["kl_to_dense"], np.float32), np.nan)  # NULL: NaN
    if run["controller"] not in CONTROLLER_KINDS:  # the page's radio, a re-route, a link: none has it
        raise ValueError(
            f"its controller {str(run['controller'])[:80]!r} is not one this version knows "
            f"({', '.join(CONTROLLER_KINDS)})"
        )
    try:
        settings = RoutingSettings.from_dict({name: run[column] for name, column in SETTINGS_COLUMNS.items()})
    except (ValueError, TypeError) as exc:
        raise ValueError(f"its routing settings are not ones this version accepts ({exc})") from exc
    try:
        timings = json.loads(run["timings"]) if run["timings"] else {}
        if not isinstance(timings, dict):
            raise ValueError("not a JSON object")
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        raise ValueError(f"its timings {str(run['timings'])[:80]!r} are not a JSON object ({exc})") from exc
    try:
        generation = (
            None
            if run.get("max_new_tokens") is None
            else generation_record(**{key: run[key] for key in GENERATION_KEYS})
        )
    except (ValueError, TypeError) as exc:
        values = {key: run.get(key) for key in GENERATION_KEYS}
        raise ValueError(f"its generation settings {values} cannot be read ({exc})") from exc
    return RoutingTrace(
        model=run["model"],
        controller=run["controller"],
        controller_id=run["controller_id"],
        controller_trained=bool(run["controller_trained"]),
        settings=settings,
        n_layers=L,
        head_dim=int(run["head_dim"]),
        token_ids=[int(t) for t in tokens["token_id"]],
        tokens=[str(t) for t in tokens["text"]],
        n_prompt_tokens=int(run["n_prompt_tokens"]),
        concentration=grid3("conc"),
        routes=grid(routes["expert"], np.int8),
        hedged=grid(routes["hedged"], bool),
        weights=grid3("weight"),
        cost=grid(routes["cost"], np.float32),
        lam=grid(routes["lam"], np.float32),
        kl_to_dense=None if T == 0 or np.isnan(kl).all() else kl,
        truncated=int(run["truncated"]),
        timings=timings,
        created_at=run["created_at"].replace(tzinfo=_dt.UTC).timestamp(),
        prompt=run["prompt"] or "",
        output_text=run["output_text"] or "",
        run_id=run["run_id"],
        generation=generation,
    )
