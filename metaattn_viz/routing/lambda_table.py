"""The global scope's calibrated lambda (docs/method.md, "Global scope by default"): by text
length and budget, the mean over calibration texts of the lambda the global scope's search
settles at (routing/prefill.py, ``resolved_lambda``), for one controller under given
settings: what that search would find, known before the text is read.

Without a table, a text pays a pilot before it is routed: a whole-text pass (texts of up to
1,024 tokens) or one over a prefix, and often a third pass, solved again, when the pilot's
lambda misses the budget (texts of 1,025-4,095 tokens pilot on 512-1,023 tokens, too few:
at 2,048 tokens and B = 0.5 their first pass missed on all nine texts measured). The lambda
the search settles at varies little between texts of one length, and moves with the length
(at most budgets it grows: a text's later positions route dearer at one lambda), so a table
keeps one row per length: ``lengths`` (256 to 4,096 tokens by default, sqrt(2) apart), each
the mean over the first that many tokens of the same calibration texts. ``lookup``
interpolates linearly in the budget and in the log of the length, and covers texts from the
shortest row's length to just under twice the longest's (a longer text drifts further, and
pilots), under settings equal to the table's in every field that moves lambda (``MATCHED``,
the linear map resolved), at a budget within its grid; anything else takes the pilot.
``prefill`` routes a covered text once at the table's lambda, and solves again from that
pass, as ever, only when the realised cost misses.

A table is stored next to the controller it was made for
(``assets/controllers/<model>/<kind>/lambda_table.json``) with that controller's content
hash, and is ignored (with a warning) beside other weights. Made by ``make lambda-table``
(``metaattn-viz lambda-table``, metaattn_viz/cli/lambda_table.py).

Never: route a text itself (``build`` asks routing/prefill.py for each text's lambda).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from metaattn_viz.core.settings import RoutingSettings

if TYPE_CHECKING:
    import torch

    from metaattn_viz.routing.model import RoutedModel

log = logging.getLogger(__name__)

FILE = "lambda_table.json"
# the settings besides the budget that move the lambda the search settles at
MATCHED = (
    "hedge_policy",
    "hedge_threshold",
    "hedge_min_weight",
    "hedge_measure",
    "window",
    "n_sink",
    "linear_map",
    "cost_model",
)
BUDGETS = tuple(round(0.2 + 0.05 * i, 2) for i in range(16))  # 0.2 .. 0.95: the grid made by default
# the rows made by default, sqrt(2) apart (the lambda is not linear in the log of the length
# between rows twice as far apart, docs/benchmarks.md): texts of 256-8,191 tokens
LENGTHS = (256, 362, 512, 724, 1024, 1448, 2048, 2896, 4096)


def matched(settings: RoutingSettings) -> dict:
    """The fields of `settings` a table must share (``MATCHED``)."""
    return {name: getattr(settings, name) for name in MATCHED}


@dataclass(frozen=True)
class LambdaTable:
    controller_hash: str  # the content hash of the controller it was made for
    settings: dict  # ``matched`` of the settings it was made under (linear map resolved)
    budgets: tuple[float, ...]  # increasing
    lengths: tuple[int, ...]  # increasing: the texts' length of each row
    lambdas: tuple[tuple[float, ...], ...]  # one row per length: the mean lambda at each budget
    meta: dict = field(default_factory=dict)  # texts, spread, date, command

    def __post_init__(self):
        if not self.budgets or not self.lengths:
            raise ValueError("a lambda table needs at least one budget and one length")
        rows = self.lambdas
        if len(rows) != len(self.lengths) or any(len(row) != len(self.budgets) for row in rows):
            raise ValueError("a lambda table needs one row per length and one lambda per budget in each")
        for name, grid in (("budgets", self.budgets), ("lengths", self.lengths)):
            if any(b >= c for b, c in zip(grid, grid[1:], strict=False)):
                raise ValueError(f"a lambda table's {name} must increase")
        if self.lengths[0] < 1:
            raise ValueError("a lambda table's lengths must be positive")

    def covers(self, n_tokens: int) -> bool:
        """Whether a text of n_tokens is within the table's lengths: from its shortest row's
        to just under twice its longest's (the cost drifts up along a text at one lambda: at
        8,192 tokens and B = 0.5 the mean of 4,096-token pilots missed the budget more often
        than the text's own pilot, docs/benchmarks.md)."""
        return self.lengths[0] <= n_tokens < 2 * self.lengths[-1]

    def lookup(self, settings: RoutingSettings, n_tokens: int) -> float | None:
        """The lambda for a text of n_tokens under these settings (linear map resolved):
        linear in the budget within each row, then in the log of the length between rows
        (a text longer than the longest row takes that row's); None where the table does not
        cover them (``covers``, another value of a ``MATCHED`` field, no budget, or a budget
        outside the grid)."""
        b = settings.budget
        if b is None or matched(settings) != self.settings or not self.covers(n_tokens):
            return None
        if not self.budgets[0] <= b <= self.budgets[-1]:
            return None
        by_length = [float(np.interp(b, self.budgets, row)) for row in self.lambdas]
        logs = [math.log(n) for n in self.lengths]
        return float(np.interp(math.log(n_tokens), logs, by_length))

    def to_json(self) -> str:
        d = {
            "controller_hash": self.controller_hash,
            "settings": self.settings,
            "budgets": list(self.budgets),
            "lengths": list(self.lengths),
            "lambdas": [list(row) for row in self.lambdas],
            "meta": self.meta,
        }
        return json.dumps(d, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> LambdaTable:
        d = json.loads(text)
        return cls(
            str(d["controller_hash"]),
            dict(d["settings"]),
            tuple(float(b) for b in d["budgets"]),
            tuple(int(n) for n in d["lengths"]),
            tuple(tuple(float(v) for v in row) for row in d["lambdas"]),
            dict(d.get("meta", {})),
        )


def load(folder: Path, controller_hash: str) -> LambdaTable | None:
    """The table stored in a controller's folder, if there is one made for these weights;
    an unreadable table or one made for other weights is ignored, with a warning (the
    pilot pass then stands in, as without a table)."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        table = LambdaTable.from_json(path.read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("%s: unreadable (%s: %s); texts take the pilot pass", path, type(exc).__name__, exc)
        return None
    if table.controller_hash != controller_hash:
        log.warning(
            "%s was made for controller %s, not %s (run `make lambda-table`); texts take the pilot pass",
            path,
            table.controller_hash,
            controller_hash,
        )
        return None
    return table


def build(
    routed: RoutedModel,
    kind: str,
    texts: list[torch.Tensor],
    settings: RoutingSettings,
    budgets: tuple[float, ...] = BUDGETS,
    lengths: tuple[int, ...] = LENGTHS,
    progress=lambda message: None,
) -> LambdaTable:
    """The table of controller `kind` under `settings` (their budget replaced by each of
    `budgets`): for each of `lengths`, at each budget, the mean of the lambdas the search
    settles at (``prefill.resolved_lambda``) on the first that many tokens of each of `texts`
    (token ids [1, T], all at least as long as the longest length)."""
    from metaattn_viz.routing import prefill as prefill_mod

    settings = routed.resolve_linear_map(settings)
    lengths = tuple(sorted(set(lengths)))
    if not texts or not lengths or lengths[0] < 1 or any(ids.shape[1] < lengths[-1] for ids in texts):
        raise ValueError(f"the texts must be at least {lengths[-1] if lengths else 1} tokens long")
    rows: list[tuple[float, ...]] = []
    spread: dict[str, list[list[float]]] = {}  # per length, per budget: the texts' [min, max]
    for n in lengths:
        row: list[float] = []
        spread[str(n)] = []
        for b in budgets:
            s = settings.with_(budget=b)
            at = [prefill_mod.resolved_lambda(routed, ids[:, :n], s, kind) for ids in texts]
            row.append(float(np.mean(at)))
            spread[str(n)].append([round(min(at), 4), round(max(at), 4)])
            progress(f"{n} tokens, budget {b:g}: lambda {row[-1]:.4f} (texts {min(at):.4f} to {max(at):.4f})")
        rows.append(tuple(row))
    meta = {"texts": len(texts), "spread": spread}
    stack = routed.controller(kind)
    return LambdaTable(stack.content_hash(), matched(settings), tuple(budgets), lengths, tuple(rows), meta)
