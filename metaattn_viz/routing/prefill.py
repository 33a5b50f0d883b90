"""A prefill: one routed forward pass over a whole text, and the global scope's search for
the one lambda that all layers share (docs/method.md, "Budget").

Global scope needs one lambda for all layers, but each layer's posterior depends on the
routes of the layers below, so lambda is solved on the posteriors of a pilot pass and the
text is routed with it; if the realised mean cost misses the budget by more than
``GLOBAL_COST_TOLERANCE``, lambda is solved again on the posteriors of that pass and the text
routed once more (at most twice). The pilot is a per-layer-scope pass over the text, or,
when the text is longer than ``PILOT_TOKENS``, over a causal prefix of it (the same
posteriors those tokens get in the whole text): a quarter of the text, at least half and at
most all of ``PILOT_TOKENS`` (``pilot_span``). Lambda is then solved on the prefix's later
half only: at a given lambda the controllers route a text's first positions cheaper than
its later ones (the position feature and the far mass grow along the text), so the later
half stands in better for the rest. A lambda hint (e.g. solved on the posteriors of the
previous routing of the same text) replaces the pilot, and so does the controller's
calibrated lambda (routing/lambda_table.py: by length, the mean of the lambdas this search
settles at on calibration texts, ``resolved_lambda``) for a text it covers; either way the
text is routed once at that lambda, and solved again from that pass only if it misses the
budget.
Under the "flops" cost model (routing/costs.py) all layers' decisions are one group, and a
lambda solved on a prefix pilot is carried to the whole text at the same price per FLOP
(``CostModel.carry_lambda``), and a budget below the text's floor (``CostModel.lowest_mean``:
a text within the local window cannot spend less than dense) is not solved again.

Never: decode, sample or build traces (routing/generation.py and model.py do).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from metaattn_viz.core.experts import K
from metaattn_viz.core.settings import DEFAULT_CONTROLLER, RoutingSettings
from metaattn_viz.routing import budget as budget_mod
from metaattn_viz.routing.controller import ControllerStack
from metaattn_viz.routing.costs import CostModel
from metaattn_viz.routing.kv_cache import GrowableCache
from metaattn_viz.routing.policies import Baseline
from metaattn_viz.routing.session import Session

if TYPE_CHECKING:
    from metaattn_viz.routing.model import RoutedModel

PILOT_TOKENS = 1024  # the global scope's pilot pass reads at most this prefix of a long text
# |realised mean cost - budget| a global-scope pass may leave before lambda is solved again
GLOBAL_COST_TOLERANCE = 0.015
_MAX_RESOLVES = 2  # passes with a solved lambda after the pilot (or the hinted pass)


@dataclass
class PrefillResult:
    logits: torch.Tensor  # [B, T, V]
    records: dict[str, np.ndarray]  # the decisions, arrays [L, B, T, ...]
    lam: list[float | None]  # the lambda per layer the pass ended at
    cache: GrowableCache | None
    session: Session  # its linear states seed decoding; its qk the attention maps
    passes: int = 1  # forward passes over the whole text (a prefix pilot is not one)
    pilot_tokens: int = 0  # tokens of the global scope's pilot pass (0: none)


def pilot_span(n_tokens: int) -> tuple[int, int]:
    """(tokens the global scope's pilot pass reads, the first position lambda is solved on)
    for a text of n_tokens: the whole text, every position, up to ``PILOT_TOKENS`` tokens;
    beyond, a prefix of a quarter of the text within [PILOT_TOKENS / 2, PILOT_TOKENS], solved
    on its later half (module docstring)."""
    if n_tokens <= PILOT_TOKENS:
        return n_tokens, 0
    n = min(PILOT_TOKENS, max(n_tokens // 4, PILOT_TOKENS // 2))
    return n, n // 2


def solves_globally(settings: RoutingSettings) -> bool:
    """Whether these settings need the global scope's search for a shared lambda (a budget
    strictly inside the range, no fixed lambda)."""
    return (
        settings.scope == "global"
        and settings.lam is None
        and settings.budget is not None
        and budget_mod.settings_extreme(settings) is None
    )


def solve_global(
    beta: np.ndarray,
    settings: RoutingSettings,
    point_estimate: bool = False,
    head_dim: int | None = None,
    n_routed: int | None = None,
    first: int = 0,
) -> float:
    """The one lambda that meets the budget over all decisions of concentrations beta
    [..., T, K] (e.g. a pass's records["beta"] [L, B, T, K]: the queries at positions
    first..first+T-1); hedges read the settings' ``hedge_measure`` (``point_estimate``: the
    prior-free controller's probabilities). Under the "flops" cost model (which needs the
    model's ``head_dim``) all of them are one group, and the lambda is carried over to
    routing the positions 0..n_routed-1 (default first + T)."""
    b = torch.from_numpy(beta)
    n_tokens = b.shape[-2]
    b = b.reshape(-1, K)
    m = b / b.sum(-1, keepdim=True)
    assert settings.budget is not None
    unc = budget_mod.hedge_uncertainty(b, settings, point_estimate)
    cost_model = CostModel.of(settings, head_dim)
    costs = None  # the notional costs, as ever
    if not cost_model.notional:
        positions = torch.arange(first, first + n_tokens)
        costs = cost_model.group(positions.repeat(b.shape[0] // n_tokens))
    lam = budget_mod.solve_lambda(m, unc, settings.budget, settings, costs)
    end = first + n_tokens
    return cost_model.carry_lambda(lam, end, end if n_routed is None else n_routed, first)


def pass_records(
    routed: RoutedModel,
    input_ids: torch.Tensor,
    settings: RoutingSettings,
    controller: str | ControllerStack,
    lam: list[float | None] | None = None,
) -> dict[str, np.ndarray]:
    """The decisions of one routed pass over input_ids that keeps no cache and computes no
    logits but the last position's (what a pilot, a table or a measurement reads)."""
    with torch.no_grad(), routed.session(settings, controller, lam=lam) as sess:
        routed.model(input_ids=input_ids.to(routed.device), use_cache=False, logits_to_keep=1)
    records = sess.pop_records()
    assert records is not None  # every routed forward records its decisions
    return records


def pilot_pass(
    routed: RoutedModel, input_ids: torch.Tensor, settings: RoutingSettings, controller: str | ControllerStack
) -> tuple[np.ndarray, int, int]:
    """The global scope's pilot (module docstring): a layer-scope pass over the prefix of the
    text that ``pilot_span`` gives. Returns (the concentrations [L, B, n, K] of the positions
    lambda is solved on, the pilot's tokens, the first of those positions)."""
    n, first = pilot_span(input_ids.shape[1])
    records = pass_records(routed, input_ids[:, :n], settings.with_(scope="layer"), controller)
    return records["beta"][..., first:, :], n, first


def pilot_lambda(
    routed: RoutedModel, input_ids: torch.Tensor, settings: RoutingSettings, controller: str | ControllerStack
) -> float:
    """The one lambda the global scope's pilot solves for this text (what `prefill` routes
    it at first, unless a hint or a calibrated table gives one)."""
    beta, _, first = pilot_pass(routed, input_ids, settings, controller)
    pe = is_point_estimate(routed, controller)
    return solve_global(
        beta, settings, pe, head_dim=routed.head_dim, n_routed=input_ids.shape[1], first=first
    )


def resolved_lambda(
    routed: RoutedModel, input_ids: torch.Tensor, settings: RoutingSettings, controller: str | ControllerStack
) -> float:
    """The lambda the global scope's search settles at for this text: solved again on the
    posteriors of a whole-text pass at its pilot's lambda (``prefill``'s first re-solve). What
    a lambda table (routing/lambda_table.py) holds the mean of (docs/benchmarks.md, "Lambda
    by length")."""
    lam = pilot_lambda(routed, input_ids, settings, controller)
    beta = pass_records(routed, input_ids, settings, controller, lam=[lam] * routed.n_layers)["beta"]
    pe = is_point_estimate(routed, controller)
    return solve_global(beta, settings, pe, head_dim=routed.head_dim)


def table_lambda(
    routed: RoutedModel, settings: RoutingSettings, controller: str | ControllerStack, n_tokens: int
) -> float | None:
    """The controller's calibrated lambda for a text of n_tokens under these settings
    (routing/lambda_table.py), or None where it has no table that covers them."""
    table = routed.controller(controller).lambda_table
    return None if table is None else table.lookup(routed.resolve_linear_map(settings), n_tokens)


def is_point_estimate(routed: RoutedModel, controller: str | ControllerStack) -> bool:
    """Whether the controller gives probabilities (prior-free) rather than concentrations."""
    return routed.controller(controller).point_estimate


def _gap(res: PrefillResult, budget: float) -> float:
    return abs(float(res.records["cost"].mean()) - budget)


def prefill(
    routed: RoutedModel,
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
    """Route a whole text in one forward pass (global scope: the module docstring).
    ``cache_capacity``: tokens the KV cache should hold without regrowing (prompt + tokens
    to decode). ``logits_to_keep``: transformers' convention, 0 = logits at every position,
    n = at the last n only (decoding needs the last; the LM head is a fifth of a short
    model's prefill). The pilot pass never computes more than the last position's."""
    input_ids = input_ids.to(routed.device)

    def one_pass(
        s: RoutingSettings,
        lam: list[float | None] | None = None,
        ids: torch.Tensor = input_ids,
        cache: bool = use_cache,
        keep: int = logits_to_keep,
    ) -> PrefillResult:
        kv = GrowableCache(cache_capacity) if cache else None
        with (
            torch.no_grad(),
            routed.session(
                s,
                controller,
                lam=lam,
                forced_weights=forced_weights,
                capture_qk=capture_qk,
                policy=policy,
                diagnose=diagnose,
            ) as sess,
        ):
            out = routed.model(input_ids=ids, past_key_values=kv, use_cache=cache, logits_to_keep=keep)
        records = sess.pop_records()
        assert records is not None  # every routed forward records its decisions
        return PrefillResult(out.logits, records, list(sess.lam), kv, sess)

    if not solves_globally(settings) or forced_weights is not None or policy is not None:
        return one_pass(settings)
    budget = settings.budget
    assert budget is not None
    n_layers = routed.n_layers
    pilot_tokens = solve_from = 0
    best: tuple[float, PrefillResult] | None = None
    # under "flops" a budget below the text's floor (every decision to its cheapest expert)
    # is met as closely as it can be by the first solved pass: no re-solve can get nearer
    floor = CostModel.of(settings, routed.head_dim).lowest_mean(input_ids.shape[1])
    t = input_ids.shape[1]
    if lam_hint is None:  # a calibrated stand-in for the pilot, where one covers the text
        lam_hint = table_lambda(routed, settings, controller, t)
    if lam_hint is not None:
        res = one_pass(settings, lam=[lam_hint] * n_layers)
        gap = _gap(res, budget)
        if gap <= GLOBAL_COST_TOLERANCE or budget < floor:
            return res
        best, passes, beta = (gap, res), 1, res.records["beta"]
    else:
        beta, pilot_tokens, solve_from = pilot_pass(routed, input_ids, settings, controller)
        passes = int(pilot_tokens == t)  # a whole-text pilot is a pass
    for _ in range(_MAX_RESOLVES):
        lam = solve_global(
            beta,
            settings,
            is_point_estimate(routed, controller),
            head_dim=routed.head_dim,
            n_routed=t,
            first=solve_from,
        )
        solve_from = 0  # a re-solve reads a whole pass
        res = one_pass(settings, lam=[lam] * n_layers)
        beta = res.records["beta"]
        passes += 1
        gap = _gap(res, budget)
        if best is None or gap < best[0]:
            best = (gap, res)
        if gap <= GLOBAL_COST_TOLERANCE or budget < floor:
            break
    assert best is not None
    best[1].passes, best[1].pilot_tokens = passes, pilot_tokens
    return best[1]
