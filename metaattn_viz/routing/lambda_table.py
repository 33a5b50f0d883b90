"""The global scope's calibrated lambda for long texts (docs/method.md, "Global scope by
default"): by budget, the mean of the lambdas the pilot pass solves (routing/prefill.py,
``pilot_lambda``) on calibration texts, for one controller under given settings: what that
pilot solves on average, known before the text is read.

A long text pays a pilot pass over a prefix of up to 1,024 tokens before it is routed;
across texts of 4,096 tokens the lambda that pilot solves varies little (2.13-2.23 at
B = 0.3 on nine WikiText windows), and each of them routed at the mean of the other eight's
lambdas met the budget within the tolerance as often as at its own (docs/benchmarks.md). So
where a table covers a text, ``prefill`` routes it once at the table's lambda instead of
piloting, and solves lambda again from that pass, as ever, only when the realised cost
misses the budget.

A table stands in for one pilot: it covers a text whose pilot would read the same span as
the calibration texts' (``pilot``: ``pilot_span``) and that is shorter than twice theirs
(``tokens``: 4,096 to 8,191 tokens for tables made on 4,096), under settings equal to its
own in every field that moves lambda (``MATCHED``, the linear map resolved), at any budget
within its grid (interpolated linearly); anything else takes the pilot. It is stored next
to the controller it was made for (``assets/controllers/<model>/<kind>/lambda_table.json``)
with that controller's content hash, and is ignored (with a warning) beside other weights.
Made by ``make lambda-table`` (``metaattn-viz lambda-table``, metaattn_viz/cli/lambda_table.py).

Never: route a text itself (``build`` asks routing/prefill.py for each pilot's lambda).
"""

from __future__ import annotations

import json
import logging
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
# the settings besides the budget that move the lambda a pilot solves
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


def matched(settings: RoutingSettings) -> dict:
    """The fields of `settings` a table must share (``MATCHED``)."""
    return {name: getattr(settings, name) for name in MATCHED}


@dataclass(frozen=True)
class LambdaTable:
    controller_hash: str  # the content hash of the controller it was made for
    settings: dict  # ``matched`` of the settings it was made under (linear map resolved)
    budgets: tuple[float, ...]  # increasing
    lambdas: tuple[float, ...]  # the mean pilot lambda at each budget
    pilot: tuple[int, int]  # the pilot it stands in for: prefill.pilot_span of its texts
    tokens: int  # the length of its texts: it covers texts up to twice as long (``lookup``)
    meta: dict = field(default_factory=dict)  # texts, spread, date, command

    def __post_init__(self):
        if len(self.budgets) != len(self.lambdas) or not self.budgets:
            raise ValueError("a lambda table needs one lambda per budget")
        if any(b >= c for b, c in zip(self.budgets, self.budgets[1:], strict=False)):
            raise ValueError("a lambda table's budgets must increase")

    def lookup(self, settings: RoutingSettings, n_tokens: int) -> float | None:
        """The lambda for a text of n_tokens under these settings (linear map resolved), or
        None where the table does not cover them: a text whose pilot reads another span or
        that is twice as long as the table's texts or longer (the cost drifts up along a text
        at one lambda: at 8,192 tokens and B = 0.5 the mean of 4,096-token pilots missed the
        budget more often than the text's own pilot), another value of a ``MATCHED`` field,
        no budget, or a budget outside the grid."""
        from metaattn_viz.routing.prefill import pilot_span

        b = settings.budget
        if b is None or matched(settings) != self.settings or pilot_span(n_tokens) != self.pilot:
            return None
        if n_tokens >= 2 * self.tokens:
            return None
        if not self.budgets[0] <= b <= self.budgets[-1]:
            return None
        return float(np.interp(b, self.budgets, self.lambdas))

    def to_json(self) -> str:
        d = {
            "controller_hash": self.controller_hash,
            "settings": self.settings,
            "budgets": list(self.budgets),
            "lambdas": list(self.lambdas),
            "pilot": list(self.pilot),
            "tokens": self.tokens,
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
            tuple(float(v) for v in d["lambdas"]),
            (int(d["pilot"][0]), int(d["pilot"][1])),
            int(d["tokens"]),
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
        log.warning("%s: unreadable (%s: %s); long texts take the pilot pass", path, type(exc).__name__, exc)
        return None
    if table.controller_hash != controller_hash:
        log.warning(
            "%s was made for controller %s, not %s (run `make lambda-table`); long texts take the pilot pass",
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
    progress=lambda message: None,
) -> LambdaTable:
    """The table of controller `kind` under `settings` (their budget is replaced by each of
    `budgets`): at each budget the mean of the lambdas the pilot solves on `texts` (token ids
    [1, T], longer than PILOT_TOKENS, all piloted on the same span)."""
    from metaattn_viz.routing import prefill as prefill_mod

    settings = routed.resolve_linear_map(settings)
    spans = {prefill_mod.pilot_span(ids.shape[1]) for ids in texts}
    if len(spans) != 1 or any(ids.shape[1] <= prefill_mod.PILOT_TOKENS for ids in texts):
        raise ValueError(
            f"the texts must be longer than {prefill_mod.PILOT_TOKENS} tokens and piloted on one span"
        )
    lambdas, spread = [], []
    for b in budgets:
        at = [prefill_mod.pilot_lambda(routed, ids, settings.with_(budget=b), kind) for ids in texts]
        lambdas.append(float(np.mean(at)))
        spread.append([round(min(at), 4), round(max(at), 4)])
        progress(f"budget {b:g}: lambda {lambdas[-1]:.4f} (texts {spread[-1][0]:.4f} to {spread[-1][1]:.4f})")
    meta = {"texts": len(texts), "tokens": [int(ids.shape[1]) for ids in texts], "spread": spread}
    stack = routed.controller(kind)
    tokens = min(int(ids.shape[1]) for ids in texts)
    return LambdaTable(
        stack.content_hash(), matched(settings), tuple(budgets), tuple(lambdas), spans.pop(), tokens, meta
    )
