"""What the page says in words: the status line, the run status while streaming, the notes
after a re-route, replay, comparison or inspection, and the tables as shown (runs, sweep).

Pure functions of the engine's values (status dicts, traces, jobs, DataFrames) -> strings
or display-ready DataFrames, so the wording is tested without a browser. Never imports
gradio or the model; never decides anything, only says it.
"""

from __future__ import annotations

from metaattn_viz.app import plots

# The columns of the History tab's runs table, in order; long texts are cut to this width.
RUNS_COLUMNS = [
    "run_id",
    "created_at",
    "status",
    "kind",
    "controller",
    "budget",
    "cost_model",
    "scope",
    "hedge_policy",
    "n_tokens",
    "realized_cost",
    "flops_ratio",
    "wall_ms",
    "prompt",
    "output_text",
]
RUNS_TEXT_WIDTH = 80
SWEEP_COLUMNS = ["policy", "budget", "label", "realized_cost", "kl_to_dense", "flops_ratio"]
# How the status line names a run's end (store.STATUSES; "failed" has its own sentence).
RUN_ENDINGS = {"done": "Done", "stopped": "Stopped", "interrupted": "Interrupted"}


def status_markdown(status: dict) -> str:
    """The page header from `Engine.status()`: the model, its controllers, logging."""
    s = status
    if s["model_error"]:
        model = f"**Model unavailable:** {s['model_error']}"
    elif not s["model_ready"]:
        model = "Loading the model\u2026 (the page works; Generate waits for it)"
    else:
        untrained = [k for k, c in s["controllers"].items() if not c["trained"]]
        model = f"Model **{s['model']}** ready"
        if s["load_seconds"]:
            model += f" (loaded in {s['load_seconds']:.1f} s)"
        runtime = s.get("runtime")
        if runtime:
            model += f" on {runtime['device']} ({runtime['dtype']}, {runtime['backend']} kernels)"
            if runtime.get("backend_notice"):  # the Triton kernels do not fit this GPU
                model += f". \u26a0 {runtime['backend_notice']}"
        if untrained:
            model += (
                f". \u26a0 Untrained controllers: {', '.join(untrained)} (routing is "
                "not calibrated; run `metaattn-viz calibrate`)"
            )
        for kind, c in s["controllers"].items():
            if c.get("weights_notice"):
                model += f". \u26a0 {kind} controllers: {c['weights_notice']}"
    if not s["logging"]:
        logging_ = f"Runs not logged: {s['log_problem']}"
    elif s.get("log_file_problem"):  # its file deleted or replaced while open: no write failed
        logging_ = f"Runs are not being logged to `{s['log_path']}`: {s['log_file_problem']}"
    elif s.get("log_problem"):  # open, but the last write failed (a full disk)
        logging_ = f"Runs logged to `{s['log_path']}`, but the last write failed. {s['log_problem']}"
    else:
        logging_ = f"Runs logged to `{s['log_path']}`"
    # a problem may end its own sentence: one period, not two
    line = f"{model}. {logging_.rstrip('.')}. At most {s['max_context']} tokens are routed."
    notes = [n for n in (visibility_note(s), storage_note(s), queue_note(s)) if n]
    return line + "".join(f"\n\n{n}" for n in notes)


def visibility_note(status: dict) -> str | None:
    """Who sees the runs, on a public deployment (None locally: one user)."""
    if not status.get("public") or not status.get("logging"):
        return None
    if status.get("runs_visible_to") == "everyone":
        return (
            "\u26a0 **Shared log:** every run made here, its prompt and its output, is "
            "visible to everyone who opens this page (History, the SQL console, the download)."
        )
    return (
        "Your runs are yours: History, the SQL console and the download show only the "
        "runs made in this browser session."
    )


def storage_note(status: dict) -> str | None:
    """The warning that the log does not last (a Space without mounted storage)."""
    if not status.get("storage_ephemeral") or not status.get("logging"):
        return None
    return (
        "\u26a0 **Runs are lost when this Space restarts:** the routing log is on the "
        "Space's own disk. The operator can mount a storage bucket and set METAATTN_DATA "
        "(docs/deploy.md)."
    )


def queue_note(status: dict) -> str | None:
    """What a full queue looks like, where the queue has a limit (a public deployment)."""
    size = status.get("queue_max_size")
    if not size:
        return None
    return (
        f"This page is shared: when {size} requests are already waiting it answers "
        "\u201cThis application is currently busy. Please try again.\u201d; nothing is "
        "lost, try again in a minute."
    )


def run_status(job, snap) -> str:
    """The line under the meters while a generation runs (job: generation.GenerationJob;
    snap: its newest snapshot, or None)."""
    n = snap.n_tokens if snap is not None else 0
    new = n - (snap.n_prompt_tokens if snap is not None else 0)
    tps = snap.timings.get("tokens_per_s") if snap is not None else None
    rate = f", {tps:.1f} tokens/s" if tps else ""
    if job.phase in ("starting", "prefill"):
        return "Routing the prompt\u2026"
    if job.phase == "decoding":
        return f"Generating\u2026 {n} tokens ({new} new{rate})"
    if job.phase == "quality":
        return f"Measuring quality against the dense model\u2026 ({n} tokens)"
    if job.status == "failed":
        return "The generation failed."
    what = RUN_ENDINGS.get(job.status, "Done")
    logged = f"; run `{job.run_id}`" if job.run_id else ""
    line = f"{what}: {n} tokens ({new} generated{rate}){logged}."
    empty = empty_generation_note(snap, job.request.max_new_tokens, job.request.chat)
    if empty and job.status == "done":
        return f"{line} {empty}"
    floor = over_budget_note(snap)
    return f"{line} {floor}" if floor else line


def empty_generation_note(trace, max_new_tokens: int, chat: bool) -> str | None:
    """Why a generation that was asked for tokens has none: the model ended its answer at
    once (end-of-text as the first token). None when tokens were generated, none were
    asked for, or the run was stopped before the first one."""
    if trace is None or max_new_tokens <= 0 or trace.n_tokens > trace.n_prompt_tokens:
        return None
    if trace.timings.get("stopped"):
        return None
    hint = (
        "try another prompt, or a temperature above 0"
        if chat
        else "try the chat template (the model is an instruct model), or another prompt"
    )
    return f"The model ended its answer at once (end-of-text): no tokens were generated; {hint}."


def reroute_note(trace) -> str:
    """After a re-route: how many tokens, at which budget, how long it took (and why the
    cost stays above the budget, where a FLOPs budget is out of reach)."""
    line = (
        f"Re-routed {trace.n_tokens} tokens at budget {trace.settings.budget:.2f} "
        f"({trace.timings['reroute_ms']:.0f} ms)."
    )
    floor = over_budget_note(trace)
    return f"{line} {floor}" if floor else line


def over_budget_note(trace) -> str | None:
    """Why the run spends more than its budget, where it does: under the "flops" cost
    model a budget below what the cheapest routing of its tokens spends cannot be met
    (with that floor); else hedging, which pays for the experts a decision mixes on top of
    the routing the budget chose (hedge_note). None where the budget holds."""
    s = trace.settings if trace is not None else None
    if s is None or s.budget is None or not trace.n_tokens:
        return None
    if s.cost_model != "flops":
        return hedge_note(trace)
    floor = trace.lowest_flops_ratio
    if not s.budget < floor - 0.005:
        return hedge_note(trace)
    return (
        f"Budget {s.budget:.2f} is out of reach in attention FLOPs at this length: the cheapest "
        f"routing of these {trace.n_tokens} tokens spends {floor:.2f} of dense attention (local "
        f"attention saves FLOPs only past its {s.window}-token window, linear past "
        f"{trace.head_dim} tokens)."
    )


HEDGE_OVERSHOOT = 0.01  # a realised cost this far above the budget is worth a sentence


def hedge_note(trace) -> str | None:
    """Hedged decisions cost more than the budget's routing of them (soft: the experts
    mixed; full: full attention as well): where the run spends clearly more than its budget
    and hedged, say so and what to change (None otherwise)."""
    s = trace.settings
    share = float(trace.hedged.mean()) if trace.hedged.size else 0.0
    if s.hedge_policy == "off" or not share or not trace.realized_cost > s.budget + HEDGE_OVERSHOOT:
        return None
    pays = "full attention as well" if s.hedge_policy == "full" else "every expert it mixes"
    return (
        f"Hedging spends {trace.realized_cost:.2f}, above the budget {s.budget:.2f}: "
        f"{share:.0%} of the decisions hedged ({s.hedge_policy} policy, threshold "
        f"{s.hedge_threshold:g}), and a hedged decision pays for {pays}. A higher threshold "
        "hedges fewer decisions."
    )


def budget_words(settings) -> str:
    """A run's budget in a sentence: "budget 0.5", or "no budget" for a run routed without
    one (settings.budget None: each decision the controller's own pick), which read
    "budget None"."""
    return "no budget" if settings.budget is None else f"budget {settings.budget:g}"


# a replayed run that is not whole: what its status says about the tokens it holds (a
# clause of its own: "the run was failed" read as if someone had failed it)
_PARTIAL = {
    "running": "the run is still streaming: these are the tokens logged so far",
    "stopped": "the run was stopped before its end",
    "interrupted": (
        "the run was interrupted (the server went away mid-run): these are the tokens logged until then"
    ),
    "failed": "the run failed: these are the tokens logged before the failure",
}
# an interrupted run whose error says why (its process ended, a write to the log failed):
# the error speaks, not the guess that the server went away
_INTERRUPTED_WHY = "the run was interrupted: these are the tokens logged until then"
ERROR_CHARS = 300  # a logged error is cut to this length in a replay's note


def replay_note(trace, status: str = "done", error: str | None = None) -> str:
    """The line of a replayed run; `status` (the log's) says when it holds only part of a
    run, and `error` (the log's `error` of a run that failed or was interrupted) why it
    ended, in a code span (an exception's text is no Markdown)."""
    error = " ".join((error or "").split())
    partial = _PARTIAL.get(status)
    if status == "interrupted" and error:
        partial = _INTERRUPTED_WHY
    line = (
        f"Replayed run `{trace.run_id}` from the routing log: {trace.n_tokens} tokens, "
        f"{trace.controller} controller, {budget_words(trace.settings)}"
        + (f"; {partial}." if partial else ".")
    )
    if not partial or not error:
        return line
    if len(error) > ERROR_CHARS:
        error = error[: ERROR_CHARS - 1] + "\u2026"
    error = error.replace("`", "'")  # a backtick would end the code span
    return f"{line} The log says why: `{error}`."


def compare_note(a, b, df) -> str:
    """Two runs and how much they agree (df: the log's comparison; its attrs hold the
    counts behind each share). Each share names its count and the positions and layers it
    covers: where the runs differ in length or layer count, only those both have."""
    at = df.attrs
    head = f"Run A {_compared_run(a, b)} against run B {_compared_run(b, a)}"
    positions, layers = at["positions"], at["layers"]
    if not positions:
        return f"{head}: they have no position in common to compare."
    only = []
    if positions < len(df):
        only.append(f"the {positions:,} positions both runs have")
    if a.n_layers != b.n_layers:
        only.append(f"the {layers} layers both have (layers 0-{layers - 1})")
    lead = f". Compared over {' and '.join(only)} only: " if only else ": "
    # two models' tokenizers may cut a text apart differently: a position is then not the
    # same piece of text, and only the tokens' text is compared
    token = "token" if a.model == b.model else "token text"
    caveat = "" if a.model == b.model else " (the two models' tokenizers may split text differently)"
    return (
        f"{head}{lead}the same expert in {at['agreement']:.0%} of {at['decisions']:,} decisions "
        f"({positions:,} positions \u00d7 {layers} layers), the same {token} at "
        f"{at['same_tokens']:.0%} of the {positions:,} positions{caveat}."
    )


# A cost model in the comparison's note (core.settings.COST_MODELS): a budget and a cost
# count notional costs or a share of dense attention FLOPs, so two runs' costs compare
# only under the same one.
COST_MODEL_WORDS = {"notional": "notional costs", "flops": "costs in attention FLOPs"}


def _differences(trace, other) -> list[str]:
    """What sets `trace` apart from the run it is compared with: its model, layer count,
    length and cost model, where they differ."""
    out = []
    if trace.model != other.model:
        out.append(str(trace.model))
    if trace.n_layers != other.n_layers:
        out.append(f"{trace.n_layers} layers")
    if trace.n_tokens != other.n_tokens:
        out.append(f"{trace.n_tokens} tokens")
    cost_model = trace.settings.cost_model
    if cost_model != other.settings.cost_model:
        out.append(COST_MODEL_WORDS.get(cost_model, f"cost model {cost_model}"))
    return out


def _compared_run(trace, other) -> str:
    """One run in the comparison's note: its id, what sets it apart, its routing."""
    differs = ", ".join(_differences(trace, other))
    return (
        f"`{trace.run_id}` ({differs + '; ' if differs else ''}{trace.controller}, "
        f"{budget_words(trace.settings)}, cost {trace.realized_cost:.3f})"
    )


def compare_title(label: str, trace, other=None) -> str:
    """The title of one run's map in the comparison; with `other` (the run it is compared
    with), also its model, layer count, length and cost model where they differ from the
    other's."""
    differs = _differences(trace, other) if other is not None else []
    return ", ".join([f"{label}: {budget_words(trace.settings)}", trace.controller, *differs])


def inspect_note(trace, pos: int, view) -> str:
    """What the bertviz views show of token `pos` (view: attention_maps.AttentionView)."""
    label = plots.token_label(pos, trace.tokens[pos], 30)
    return (
        f"Token **{label}**. bertviz shows {len(view.positions)} of its "
        f"{pos + 1} visible positions (the attention sinks and the last ones), holding "
        f"{100 * view.shown_mass:.0f}% of its attention on average over layers and "
        "heads; each head's row mixes the experts by the weights the router applied."
    )


def runs_table(df):
    """The runs table as shown: the useful columns, long texts cut, numbers rounded."""
    df = df[[c for c in RUNS_COLUMNS if c in df.columns]].copy()
    cut = RUNS_TEXT_WIDTH
    for c in ("prompt", "output_text"):
        if c in df.columns:
            df[c] = df[c].fillna("").map(lambda s: s if len(s) <= cut else s[: cut - 1] + "\u2026")
    for c in ("realized_cost", "flops_ratio"):
        if c in df.columns:
            df[c] = df[c].round(3)
    if "wall_ms" in df.columns:
        df["wall_ms"] = df["wall_ms"].round(0)
    if "created_at" in df.columns:
        df["created_at"] = df["created_at"].astype(str).str.slice(0, 19)
    return df


def runs_page_note(page, order: str) -> str:
    """The line under the runs table: which of the runs that match it shows, in which
    order (`order`: the sort's name, "newest first"); page: history.RunsPage."""
    n, total = len(page.runs), page.total
    if not total:
        return "No runs to show."
    if n >= total and not page.offset:
        return f"All {total:,} run{'s' if total != 1 else ''} ({order})."
    first, last = page.offset + 1, page.offset + n
    return (
        f"Showing runs {first:,}-{last:,} of {total:,} ({order}); Previous and Next show the "
        f"others, {page.size:,} at a time."
    )


def sql_table(df):
    """The console's answer as the page's table shows it: a STRUCT, MAP or LIST cell as
    DuckDB prints it ({'layer': 1, 'n': 2}, {0=10, 1=20}, [x, y]), which a browser table
    would show as "[object Object]" or flatten; the API (/sql) keeps them as JSON. Columns
    are taken by position, as a query may name two alike (SELECT 1 AS a, 2 AS a; a join's
    run_id): each is shown."""
    nested = [
        i for i in range(df.shape[1]) if df.iloc[:, i].map(lambda v: isinstance(v, (dict, list, tuple))).any()
    ]
    if not nested:
        return df
    out = df.copy()
    for i in nested:
        out.isetitem(i, out.iloc[:, i].map(lambda v: v if v is None else _duckdb_text(v)))
    return out


# A string inside a nested value that DuckDB's ::VARCHAR puts in quotes (as DuckDB 2.0 does):
# one holding any of these, empty, "null" in any case, or with whitespace at either end.
_QUOTED_CHARS = frozenset("'\\,[]{}():=\"")
_EDGE_SPACE = " \t\n\r\v\f"


def _quoted(text: str) -> str:
    """`text` in quotes, as DuckDB writes a quoted nested string (\\ and \\' escaped)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _nested_string(text: str) -> str:
    """A string inside a LIST, STRUCT or MAP as DuckDB's ::VARCHAR writes it: bare, or
    quoted where it would otherwise read as something else."""
    if (
        not text
        or text[0] in _EDGE_SPACE
        or text[-1] in _EDGE_SPACE
        or text.lower() == "null"
        or not _QUOTED_CHARS.isdisjoint(text)
    ):
        return _quoted(text)
    return text


def _duckdb_text(v) -> str:
    """A value inside a nested cell, as DuckDB's ::VARCHAR writes it."""
    if v is None:
        return "NULL"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return _nested_string(v)
    if isinstance(v, dict):  # a STRUCT: its field names always quoted
        return "{" + ", ".join(f"{_quoted(str(k))}: {_duckdb_text(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list) and v and all(isinstance(x, tuple) and len(x) == 2 for x in v):  # a MAP
        return "{" + ", ".join(f"{_duckdb_text(k)}={_duckdb_text(x)}" for k, x in v) + "}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_duckdb_text(x) for x in v) + "]"
    return str(v)


def sweep_table(rows: list[dict]):
    """The sweep's rows (Analysis.sweep) as the table under the Pareto plot."""
    import pandas as pd

    return pd.DataFrame(rows)[SWEEP_COLUMNS].round(4)


def example_note(trace) -> str:
    """The status line under a shipped example run shown before any run of the visitor's
    (app/examples.py); empty when there is none."""
    if trace is None or not trace.n_tokens:
        return ""
    prompt = " ".join(trace.prompt.split())
    prompt = prompt if len(prompt) <= 60 else prompt[:57] + "\u2026"
    return (
        f"An example run, precomputed with {trace.model} and its {trace.controller} controllers "
        f"(prompt: \u201c{prompt}\u201d): generate to route your own prompt."
    )


__all__ = [
    "sql_table",
    "status_markdown",
    "visibility_note",
    "storage_note",
    "queue_note",
    "run_status",
    "empty_generation_note",
    "reroute_note",
    "budget_words",
    "replay_note",
    "compare_note",
    "compare_title",
    "inspect_note",
    "runs_table",
    "runs_page_note",
    "sweep_table",
    "RUNS_COLUMNS",
    "RUN_ENDINGS",
]
