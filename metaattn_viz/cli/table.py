"""Plain-text views of a trace for the terminal (`metaattn-viz route` without --json).

One line per token: position, the token, a compact route string with one character per
layer, the share of full attention, mean uncertainty and cost. Never imports torch.
"""

from __future__ import annotations

from metaattn_viz.core.experts import EXPERTS, FULL, LETTERS, route_string
from metaattn_viz.core.trace import RoutingTrace


def trace_table(trace: RoutingTrace) -> str:
    unc = trace.uncertainty("total")
    lines = [
        f"model {trace.model}   controller {trace.controller_id}"
        + ("" if trace.controller_trained else "   (UNTRAINED: run `metaattn-viz calibrate`)"),
        f"budget {trace.settings.budget} ({trace.settings.cost_model} costs)   scope "
        f"{trace.settings.scope}   hedge {trace.settings.hedge_policy}   window "
        f"{trace.settings.window}+{trace.settings.n_sink}",
        "routes: one character per layer, "
        + " ".join(f"{c}={e}" for c, e in zip(LETTERS, EXPERTS, strict=True))
        + " (lower case = hedged)",
        "",
        f"{'pos':>5}  {'token':<16} {'routes':<{trace.n_layers}}  full%  unc   cost",
    ]
    for t in range(trace.n_tokens):
        tok = trace.tokens[t].replace("\n", "\\n").replace("\t", "\\t")
        tok = "".join(c if c.isprintable() else "?" for c in tok)[:16]
        marker = " " if t < trace.n_prompt_tokens else "+"
        lines.append(
            f"{t:>4}{marker}  {tok:<16} {route_string(trace.routes[:, t], trace.hedged[:, t])}  "
            f"{100 * trace.weights[:, t, FULL].mean():4.0f}  {unc[:, t].mean():.2f}  "
            f"{trace.cost[:, t].mean():.2f}"
        )
    lines += [
        "",
        f"realised cost {trace.realized_cost:.3f}   attention FLOPs ratio "
        f"{trace.attention_flops_ratio:.3f}   truncated {trace.truncated}",
    ]
    if trace.output_text:
        lines.append(f"output: {trace.output_text}")
    return "\n".join(lines)
