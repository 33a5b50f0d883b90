"""The engine's parts (requests, generation, analysis, history, host) and the page's
adapters without a browser: a tiny random routed model, a temporary routing log. Generation
streams throttled snapshots and logs complete runs; stop interrupts; the quality meter,
re-route, sweep and inspector agree with independent computations; History reads the log;
bad input is refused in plain words."""

from __future__ import annotations

import json
import math
import os
import sys
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import routed_tiny, synthetic_trace

from metaattn_viz.app import display
from metaattn_viz.app import requests as app_requests
from metaattn_viz.app.deployment import LOCAL_LIMITS, PUBLIC_LIMITS, Deployment
from metaattn_viz.app.engine import Engine
from metaattn_viz.app.errors import AppError
from metaattn_viz.app.exports import Downloads, _digest
from metaattn_viz.app.history import RunHistory, RunsPage
from metaattn_viz.app.requests import parse_request, parse_settings
from metaattn_viz.core.settings import RoutingSettings

PROMPT = "The quick brown fox jumps over the lazy dog. "


@pytest.fixture()
def routed():
    return routed_tiny(spread=3.0)


@pytest.fixture()
def engine(routed, tmp_path):
    e = Engine(routed=routed, db=str(tmp_path / "log.duckdb"))
    yield e
    e.close()


def slowed(routed, delay: float, on_token=None):
    """Make `routed` stream one token every `delay` s (and call on_token(n) after the n-th
    trace), so a test can watch or stop a generation while it runs."""
    original = routed.stream

    def slow_stream(*args, **kwargs):
        for n, trace in enumerate(original(*args, **kwargs), 1):
            if on_token is not None:
                on_token(n)
            time.sleep(delay)
            yield trace

    routed.stream = slow_stream


def _request(prompt=PROMPT, budget=0.5, max_new=12, quality=True, **kw):
    return parse_request(prompt, parse_settings(budget), max_new_tokens=max_new, quality=quality, **kw)


def _consistent(tr):
    T = tr.n_tokens
    assert len(tr.tokens) == T
    for arr in (tr.routes, tr.hedged, tr.cost, tr.lam):
        assert arr.shape == (tr.n_layers, T)
    for arr in (tr.concentration, tr.weights):
        assert arr.shape == (tr.n_layers, T, 3)


# -- parsing ------------------------------------------------------------------------------
def test_clean_prompt_removes_control_characters_and_keeps_every_script():
    mixed = "Grüße\x00 мир\x07 世界 \U0001f408 مرحبا\r\nline\ttab"
    text, notes = app_requests.clean_prompt(mixed)
    assert text == "Grüße мир 世界 \U0001f408 مرحبا\nline\ttab"
    assert notes == ["Removed 2 control characters from the prompt."]
    text, notes = app_requests.clean_prompt("half a pair \ud800 here")
    assert "\ud800" not in text and notes
    assert app_requests.clean_prompt("plain")[1] == []


def test_clean_prompt_removes_bidirectional_controls_and_keeps_right_to_left_text():
    # U+202E would show "abc" as "cba" while the model reads "abc" (Trojan Source)
    text, notes = app_requests.clean_prompt("x = \u202eabc\u202c; \u2067isolated\u2069 \u200fمرحبا")
    assert text == "x = abc; isolated \u200fمرحبا"  # the mark U+200F and Arabic stay
    assert len(notes) == 1 and "Removed 4 bidirectional control characters" in notes[0]
    assert app_requests.trace_text("prompt", "a\u202eb") == "ab"


@pytest.mark.parametrize(
    "bad,message",
    [
        ("", "prompt is empty"),
        ("  \n\t", "prompt is empty"),
        (None, "prompt is empty"),
        ("\x00\x01", "prompt is empty"),
        ("a" * 100_000, "at most 16,000"),
        (42, "must be text"),
    ],
)
def test_clean_prompt_refuses_in_plain_words(bad, message):
    with pytest.raises(AppError, match=message):
        app_requests.clean_prompt(bad)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(budget=5), "Budget must be between 0.15 and 1, got 5"),
        (dict(budget=0.1), "Budget must be between 0.15 and 1"),
        (dict(budget=float("nan")), "Budget must be between"),
        (dict(budget="lots"), "Budget must be a number"),
        (dict(scope="galaxy"), "Budget scope must be one of (global, layer|layer, global)"),
        (dict(hedge_policy="maybe"), "Hedge policy must be one of off, soft, full"),
        (dict(hedge_threshold=1.5), "Hedge threshold must be between 0 and 1"),
        (dict(window=0), "Local window must be between 1 and 4,096"),
        (dict(window=2.5), "Local window must be a whole number"),
        (dict(n_sink=True), "Attention sinks must be a whole number"),
        (dict(hedge_measure="vacuity"), "Hedge measure must be one of total, epistemic"),
        (dict(cost_model="real"), "Cost model must be one of notional, flops"),
    ],
)
def test_parse_settings_names_the_setting_and_its_range(kw, message):
    with pytest.raises(AppError, match=message):
        parse_settings(**kw)


def test_the_page_starts_from_the_projects_default_settings():
    assert parse_settings() == RoutingSettings()


def test_parse_settings_and_request_accept_good_values():
    s = parse_settings(0.3, "global", "soft", 0.7, 32, 2)
    assert s == RoutingSettings(
        budget=0.3, scope="global", hedge_policy="soft", hedge_threshold=0.7, window=32, n_sink=2
    )
    assert parse_settings(None).budget is None
    r = parse_request("hi\x07", s, "priorfree", 3.0, 0.7, 0.9, 5, True, False)
    assert (r.prompt, r.controller, r.max_new_tokens, r.chat, r.quality) == (
        "hi",
        "priorfree",
        3,
        True,
        False,
    )
    assert r.notes
    for kw, msg in [
        (dict(controller="oracle"), "Controller must be one of bayes, priorfree"),
        (dict(max_new_tokens=10**6), "Max new tokens must be between 0 and 256"),
        (dict(temperature=9), "Temperature must be between 0 and 2"),
        (dict(top_p=0), "Top-p must be between"),
        (dict(seed=-1), "Seed must be between 0 and 2,147,483,647, got -1"),
        (dict(chat="maybe"), "Chat template must be true or false, got 'maybe'"),
        (dict(quality=None), "Quality meter must be true or false"),
        (dict(chat=2), "Chat template must be true or false"),
    ]:
        with pytest.raises(AppError, match=msg):
            parse_request("hi", s, **kw)


@pytest.mark.parametrize(
    "sent, read",
    [(True, True), (False, False), (1, True), (0, False), ("false", False), ("False", False)]
    + [(" no ", False), ("0", False), ("off", False), ("true", True), ("YES", True), ("1", True)],
)
def test_yes_and_no_from_an_api_client_are_read_as_meant(sent, read):
    """An API client may send a flag as text: "false" is false (Python's truth of a
    non-empty string would make it true)."""
    r = parse_request("hi", parse_settings(), chat=sent, quality=sent)
    assert (r.chat, r.quality) == (read, read)


def test_text_from_json_checks_what_it_is_given():
    ok = app_requests.text_from_json(
        {"token_ids": [1, 2, 3], "tokens": ["a", "b", "c"], "controller": "priorfree", "n_prompt_tokens": 2},
        256,
    )
    assert ok.token_ids == [1, 2, 3] and ok.controller == "priorfree" and ok.n_prompt_tokens == 2
    for bad, msg in [
        ([], "Expected a trace"),
        ({"routes": []}, "Expected a trace"),
        ({"token_ids": []}, "token_ids must be"),
        ({"token_ids": [1, 999]}, "token_ids must be"),
        ({"token_ids": [1, True]}, "token_ids must be"),
        ({"token_ids": [1] * (app_requests.APP_MAX_CONTEXT + 1)}, "re-routes at most"),
    ]:
        with pytest.raises(AppError, match=msg):
            app_requests.text_from_json(bad, 256)
    # the informative counts read as absent when malformed, never as a crash
    for junk in ("x", [1], -3, True, 2.5, None):
        odd = app_requests.text_from_json(
            {"token_ids": [1, 2, 3], "truncated": junk, "n_prompt_tokens": junk}, 256
        )
        assert (odd.truncated, odd.n_prompt_tokens) == (0, 3), junk
    assert app_requests.text_from_json({"token_ids": [1, 2], "truncated": 7}, 256).truncated == 7


# -- generation ---------------------------------------------------------------------------
def test_generation_streams_throttled_consistent_snapshots_and_logs_the_run(engine):
    job = engine.generations.start(_request(max_new=24))
    t0 = time.monotonic()
    snaps, times = [], []
    for snap in job.updates(interval=0.05):
        snaps.append(snap)
        times.append(time.monotonic() - t0)
        _consistent(snap)
    final = job.result()
    assert job.status == "done" and job.run_id and snaps[-1].n_tokens == final.n_tokens
    assert final.n_tokens == final.n_prompt_tokens + 24
    sizes = [s.n_tokens for s in snaps]
    assert sizes == sorted(sizes) and sizes[0] >= final.n_prompt_tokens
    gaps = np.diff(times[:-1])
    assert (gaps >= 0.04).all(), gaps  # throttled: never faster than the interval
    assert final.kl_to_dense is not None and final.kl_to_dense.shape == (final.n_tokens,)
    assert np.isfinite(final.kl_to_dense).all() and (final.kl_to_dense > -1e-5).all()

    engine.history.flush()
    run = engine.history.run_log.get_run(job.run_id)
    assert run["status"] == "done" and run["kind"] == "generate"
    assert run["n_tokens"] == final.n_tokens
    again = engine.history.replay(job.run_id)
    assert again.tokens == final.tokens and again.token_ids == final.token_ids
    np.testing.assert_array_equal(again.routes, final.routes)
    np.testing.assert_allclose(again.concentration, final.concentration, rtol=1e-6)
    np.testing.assert_allclose(again.kl_to_dense, final.kl_to_dense, rtol=1e-5, atol=1e-7)


def test_updates_hand_over_every_token_when_generation_is_slower_than_the_interval(routed, engine):
    slowed(routed, 0.03)
    job = engine.generations.start(_request(max_new=6, quality=False))
    sizes = [s.n_tokens for s in job.updates(interval=0.001)]
    n_prompt = job.result().n_prompt_tokens
    assert sizes[:7] == list(range(n_prompt, n_prompt + 7))


def test_a_users_stop_is_logged_as_stopped_not_interrupted(routed, engine):
    decoding = threading.Event()  # a few tokens generated after the prompt
    slowed(routed, 0.02, on_token=lambda n: n >= 4 and decoding.set())
    gens = engine.generations
    job = gens.start(_request(max_new=200, quality=False), key="session-1")
    assert gens.running("session-1")
    assert decoding.wait(30), "the generation never got going"
    assert gens.stop("session-1")
    final = job.result(30)
    assert job.status == "stopped"
    assert display.run_status(job, final).startswith("Stopped:")
    assert final.n_prompt_tokens + 3 <= final.n_tokens < final.n_prompt_tokens + 200
    assert not gens.running("session-1") and not gens.stop("session-1")
    engine.history.flush()
    run = engine.history.run_log.get_run(job.run_id)
    assert run["status"] == "stopped" and run["n_tokens"] == final.n_tokens
    assert engine.history.runs(status="stopped")["run_id"].tolist() == [job.run_id]
    df, _ = engine.history.sql(f"SELECT status FROM runs WHERE run_id = '{job.run_id}'")
    assert df["status"].tolist() == ["stopped"]


def test_a_server_closing_mid_run_leaves_it_interrupted(routed, tmp_path):
    """`interrupted` keeps its meaning: the server ended while the run was going."""
    decoding = threading.Event()
    slowed(routed, 0.02, on_token=lambda n: n >= 4 and decoding.set())
    e = Engine(routed=routed, db=str(tmp_path / "log.duckdb"))
    try:
        job = e.generations.start(_request(max_new=200, quality=False), key="s")
        assert decoding.wait(30)
        e.generations.stop_all()
        job.result(30)
        assert job.status == "interrupted"
        e.history.flush()
        assert e.history.run_log.get_run(job.run_id)["status"] == "interrupted"
    finally:
        e.close()


def test_a_closing_server_starts_no_new_generation(routed, tmp_path):
    """After stop_all nothing new starts (it would run into a closed log), and it says why."""
    e = Engine(routed=routed, db=str(tmp_path / "log.duckdb"))
    try:
        e.generations.stop_all()
        with pytest.raises(AppError, match="shutting down"):
            e.generations.start(_request(max_new=2, quality=False), key="s")
        assert not e.generations.running("s")
        assert e.history.runs().empty  # nothing was logged
    finally:
        e.close()


def test_a_new_generation_in_the_same_session_stops_the_old_one(engine):
    first = engine.generations.start(_request(max_new=200, quality=False), key="s")
    second = engine.generations.start(_request(max_new=2, quality=False), key="s")
    first.result(60)
    second.result(60)
    assert first.status == "stopped" and second.status == "done"


def test_a_failing_model_is_reported_and_the_run_marked_failed(routed, engine):
    original = routed.stream

    def broken(*args, **kwargs):
        yield from original(*args, **kwargs)
        raise RuntimeError("kaboom")

    routed.stream = broken
    job = engine.generations.start(_request(max_new=2, quality=False))
    with pytest.raises(RuntimeError, match="kaboom"):
        job.result(60)
    assert job.status == "failed"
    engine.history.flush()
    run = engine.history.run_log.get_run(job.run_id)
    assert run["status"] == "failed" and "kaboom" in run["error"]


def test_engine_without_log_runs_and_says_why(tmp_path):
    e = Engine(routed=routed_tiny(), log_runs=False)
    try:
        tr = e.generations.generate(_request(max_new=2, quality=False))
        assert tr.run_id is None and e.status()["logging"] is False
        with pytest.raises(AppError, match="logging is off"):
            e.history.runs()
    finally:
        e.close()


def test_model_that_cannot_load_is_a_plain_message(tmp_path):
    e = Engine(model=str(tmp_path / "no-such-model"), log_runs=False, threads=False)
    try:
        with pytest.raises(AppError, match="could not be loaded"):
            e.host.routed_model(timeout=60)
        assert e.status()["model_error"]
    finally:
        e.close()


# -- quality, re-route, sweep ---------------------------------------------------------------
def test_quality_replays_the_decisions_and_matches_the_routed_models_own_kl(engine):
    """On a prefill-only trace, KL from the forced-weights shadow equals the KL that
    RoutedModel.reroute measures by routing the text itself."""
    tr = engine.generations.generate(_request(max_new=0, quality=False))
    kl = engine.analysis.quality(tr)
    ref = engine.host.routed_model().reroute(tr, tr.settings, quality=True).kl_to_dense
    np.testing.assert_allclose(kl, ref, rtol=1e-4, atol=1e-6)
    dense = parse_settings(1.0)
    dense_trace = engine.analysis.reroute(tr, dense, log_run=False)
    assert np.abs(engine.analysis.quality(dense_trace)).max() < 1e-5  # budget 1 is dense


def test_reroute_meets_the_new_budget_and_is_logged(engine):
    tr = engine.generations.generate(_request(max_new=8, quality=False))
    low = engine.analysis.reroute(tr, parse_settings(0.2))
    high = engine.analysis.reroute(tr, parse_settings(0.8), controller="priorfree")
    assert low.token_ids == tr.token_ids == high.token_ids
    assert low.realized_cost == pytest.approx(0.2, abs=0.03)
    assert high.realized_cost == pytest.approx(0.8, abs=0.03)
    assert high.controller == "priorfree" and low.timings["reroute_ms"] > 0
    # the run id is on the trace when reroute returns (an API client exports the run by
    # it); it was set by a writer thread, and /reroute usually answered None
    assert low.run_id is not None and high.run_id is not None and low.run_id != high.run_id
    engine.history.flush()
    runs = engine.history.runs()
    kinds = runs["kind"].tolist()
    assert kinds.count("reroute") == 2 and kinds.count("generate") == 1
    assert {low.run_id, high.run_id} <= set(runs["run_id"])
    with pytest.raises(AppError, match="Nothing to re-route"):
        engine.analysis.reroute(app_requests.Text([], []), parse_settings(0.5))


def test_sweep_routes_every_policy_at_every_budget(engine):
    tr = engine.generations.generate(_request(max_new=4, quality=False))
    seen = []
    rows = engine.analysis.sweep(
        tr, parse_settings(0.5), budgets=(0.3, 0.6), progress=lambda f, d: seen.append(f)
    )
    by = {(r["policy"], r["budget"]) for r in rows}
    for policy in ("bayes", "priorfree", "random", "salience"):
        assert {(policy, 0.3), (policy, 0.6)} <= by
    static = {r["label"]: r for r in rows if r["policy"] == "static"}
    assert static["all-linear"]["realized_cost"] == pytest.approx(0.15)
    assert static["all-local"]["realized_cost"] == pytest.approx(0.30)
    for r in rows:
        assert math.isfinite(r["kl_to_dense"]) and r["kl_to_dense"] > -1e-5
        if r["policy"] in ("bayes", "priorfree"):
            assert r["realized_cost"] == pytest.approx(r["budget"], abs=0.05)
    assert rows[-1]["policy"] == "dense" and rows[-1]["kl_to_dense"] == 0.0
    assert seen == sorted(seen) and len(seen) == len(rows) - 1


# -- inspector ----------------------------------------------------------------------------
def test_inspect_at_budget_one_is_the_models_own_softmax_attention(tmp_path):
    """All-full decisions: the pattern bertviz gets equals transformers' eager attention
    probabilities of the same (unrouted) model."""
    routed = routed_tiny()
    e = Engine(routed=routed, log_runs=False)
    try:
        tr = e.generations.generate(
            parse_request(PROMPT, parse_settings(1.0), max_new_tokens=0, quality=False)
        )
        pos = 30
        view = e.analysis.inspect(tr, pos, max_tokens=8)
        assert view.positions == [0, 1, 2, 3, 27, 28, 29, 30]
        routed.model.set_attn_implementation("eager")
        try:
            with torch.no_grad():
                out = routed.model(torch.tensor([tr.token_ids[: pos + 1]]), output_attentions=True)
        finally:
            routed.model.set_attn_implementation("metaattn")
        idx = view.positions
        for layer, att in enumerate(out.attentions):
            ref = att[0][:, idx][:, :, idx].double().numpy()
            np.testing.assert_allclose(view.attention[layer], ref, rtol=1e-4, atol=1e-6)
        # the share of token pos's attention on the shown positions, mean over layers and
        # heads, from the eager probabilities (not all of it: 23 positions are hidden)
        eager_mass = np.mean([float(att[0][:, pos, idx].sum(-1).mean()) for att in out.attentions])
        assert view.shown_mass == pytest.approx(eager_mass, rel=1e-4)
        assert 0 < view.shown_mass < 0.9
    finally:
        e.close()


def test_inspect_refuses_what_it_cannot_show(engine):
    tr = engine.generations.generate(_request(max_new=2, quality=False))
    inspect = engine.analysis.inspect
    with pytest.raises(AppError, match="Token position must be"):
        inspect(tr, tr.n_tokens)
    with pytest.raises(AppError, match="Nothing to inspect"):
        inspect(None, 0)
    tr.model = "another-model"
    with pytest.raises(AppError, match="used the model another-model"):
        inspect(tr, 0)


# -- history ------------------------------------------------------------------------------
def test_history_lists_filters_compares_queries_and_exports(engine, tmp_path):
    a = engine.generations.generate(_request("Alpha beta gamma.", max_new=3, quality=False))
    b = engine.analysis.reroute(a, parse_settings(0.25))
    history = engine.history
    history.flush()
    runs = history.runs()
    assert len(runs) == 2 and a.run_id in set(runs["run_id"])
    assert runs["kind"].tolist() == ["reroute", "generate"]  # newest first
    assert history.runs(text="alpha")["run_id"].tolist() != []
    assert history.runs(text="no such words").empty
    assert history.runs(status="failed").empty
    with pytest.raises(AppError, match="order_by must be one of"):
        history.runs(order_by="-color")
    rid_b = [r for r in runs["run_id"] if r != a.run_id][0]
    ta, tb, df = history.compare(a.run_id, rid_b)
    assert ta.run_id == a.run_id and len(df) == a.n_tokens
    np.testing.assert_array_equal(tb.routes, b.routes)
    assert 0 <= df.attrs["agreement"] <= 1 and df.attrs["same_tokens"] == 1.0
    with pytest.raises(AppError, match="no run 'nope'"):
        history.replay("nope")
    with pytest.raises(AppError, match="Pick a run"):
        history.replay("  ")
    df, notice = history.sql("SELECT count(*) AS n FROM routes")
    assert int(df["n"][0]) == a.n_layers * a.n_tokens * 2 and "row" in notice
    for bad in ("DELETE FROM runs", "SELECT * FROM read_csv('/etc/passwd')", ""):
        with pytest.raises(AppError):
            history.sql(bad)
    downloads = Downloads(tmp_path / "downloads")
    archive = downloads.log(history, "parquet", None, "s1")
    assert archive.parent.parent == downloads.root / _digest("s1") / "log-parquet"  # served, pruned
    with zipfile.ZipFile(archive) as zf:
        names = zf.namelist()
    assert any(n.startswith("runs/day=") and n.endswith(".parquet") for n in names)
    assert any(n.startswith("routes/day=") for n in names) and "experts.parquet" in names
    assert [p.name for p in archive.parent.iterdir()] == [archive.name]  # only the zip stays
    with pytest.raises(AppError, match="Format must be one of"):
        downloads.log(history, "xlsx", None, "s1")


def test_the_runs_table_shows_the_useful_columns_cut_and_rounded():
    import pandas as pd

    logged = pd.DataFrame(
        {
            "n_layers": [30],
            "output_text": [None],
            "prompt": ["p" * 100],
            "realized_cost": [0.123456],
            "wall_ms": [12.6],
            "run_id": ["r1"],
            "created_at": [pd.Timestamp("2024-05-06 07:08:09.123")],
        }
    )
    shown = display.runs_table(logged)
    assert list(shown.columns) == [
        "run_id",
        "created_at",
        "realized_cost",
        "wall_ms",
        "prompt",
        "output_text",
    ]
    row = shown.iloc[0]
    assert row["prompt"] == "p" * 79 + "\u2026" and row["output_text"] == ""
    assert (row["realized_cost"], row["wall_ms"]) == (0.123, 13.0)
    assert row["created_at"] == "2024-05-06 07:08:09"
    assert logged["prompt"][0] == "p" * 100  # the log's own frame is left as it was


def _logged(history, *traces):
    """Log finished synthetic traces straight into `history`'s log; their run ids."""
    ids = [history.run_log.start_run(t) for t in traces]
    for rid, t in zip(ids, traces, strict=True):
        history.run_log.finish(rid, t, "done")
    history.flush()
    return ids


def test_history_shows_the_runs_a_page_at_a_time_and_says_how_many(tmp_path):
    """Not only the newest RUNS_PAGE runs: runs_page says how many match, pages through
    all of them, and a page past the end (fewer runs match now) is the last one."""
    h = RunHistory(str(tmp_path / "log.duckdb"))
    try:
        traces = [synthetic_trace(n_layers=2, n_tokens=4, seed=s) for s in range(7)]
        traces[6].prompt = "the odd one"
        _logged(h, *traces)
        first = h.runs_page(size=3)
        assert (first.offset, first.total, len(first.runs)) == (0, 7, 3)
        assert first.has_next and not first.has_previous
        pages = [h.runs_page(offset=o, size=3) for o in (0, 3, 6)]
        seen = [r for page in pages for r in page.runs["run_id"]]
        assert seen == h.runs(limit=100)["run_id"].tolist()  # each once, newest first
        assert not pages[-1].has_next and pages[-1].has_previous
        assert h.runs_page(offset=99, size=3).offset == 6  # past the end: the last page
        assert h.runs_page(offset=-3, size=3).offset == 0
        odd = h.runs_page(text="ODD one", offset=6, size=3)  # a filter: its own count
        assert (odd.offset, odd.total, odd.runs["prompt"].tolist()) == (0, 1, ["the odd one"])
        assert h.runs(limit=2, offset=6)["run_id"].tolist() == seen[6:]
    finally:
        h.close()
    note = display.runs_page_note
    assert note(pages[1], "newest first") == (
        "Showing runs 4-6 of 7 (newest first); Previous and Next show the others, 3 at a time."
    )
    assert note(RunsPage(odd.runs, 0, 1), "most tokens") == "All 1 run (most tokens)."
    assert note(RunsPage(odd.runs.iloc[:0], 0, 0), "newest first") == "No runs to show."


def test_the_comparison_says_what_each_share_counts_and_how_the_runs_differ(tmp_path):
    """A 6-token run of one model against a 9-token run of another with fewer layers: the
    note names both models and lengths and gives each share its count, over the positions
    and the layers both runs have; each map's title names its model and size."""
    a = synthetic_trace(n_layers=5, n_tokens=6, seed=1)
    b = synthetic_trace(n_layers=2, n_tokens=9, seed=2)
    b.model = "other-model"
    h = RunHistory(str(tmp_path / "log.duckdb"))
    try:
        ra, rb = _logged(h, a, b)
        ta, tb, df = h.compare(ra, rb)
        same_a, same_b, same_df = h.compare(ra, ra)
    finally:
        h.close()
    at = df.attrs
    note = display.compare_note(ta, tb, df)
    assert "nan" not in note
    assert f"Run A `{ra}` (synthetic, 5 layers, 6 tokens; bayes, budget 0.5," in note
    assert f"run B `{rb}` (other-model, 2 layers, 9 tokens; bayes, budget 0.5," in note
    assert (
        "Compared over the 6 positions both runs have and the 2 layers both have (layers 0-1) "
        f"only: the same expert in {at['agreement']:.0%} of 12 decisions (6 positions \u00d7 2 "
        "layers), the same token text at 100% of the 6 positions (the two models' tokenizers "
        "may split text differently)." in note
    )
    assert display.compare_title("A", ta, tb) == "A: budget 0.5, bayes, synthetic, 5 layers, 6 tokens"
    assert display.compare_title("B", tb, ta) == "B: budget 0.5, bayes, other-model, 2 layers, 9 tokens"
    # runs alike in model and size: no scope, no differences named
    alike = display.compare_note(same_a, same_b, same_df)
    assert alike.endswith(
        ": the same expert in 100% of 30 decisions (6 positions \u00d7 5 layers), the same token "
        "at 100% of the 6 positions."
    )
    assert f"`{ra}` (bayes, budget 0.5, cost" in alike
    assert display.compare_title("A", same_a, same_b) == "A: budget 0.5, bayes"


# -- the page's adapters -------------------------------------------------------------------
def test_user_errors_turn_failures_into_plain_gradio_errors(caplog):
    import gradio as gr

    from metaattn_viz.app.ui_errors import user_errors

    @user_errors("doing a thing")
    def plain(kind):
        raise AppError("The prompt is empty.") if kind == "user" else KeyError("secret")

    @user_errors("streaming")
    def stream():
        yield 1
        raise AppError("Stopped in plain words.")

    with pytest.raises(gr.Error) as err:
        plain("user")
    assert err.value.message == "The prompt is empty."

    @user_errors("reading a link")
    def hostile():
        raise AppError("Controller must be one of bayes, priorfree, got '<img src=x>'.")

    with pytest.raises(gr.Error) as err:
        hostile()
    assert err.value.message == "Controller must be one of bayes, priorfree, got '&lt;img src=x&gt;'."
    # an API endpoint's client is a program: it reads the sentence as it is (review 65)
    with pytest.raises(gr.Error) as err:
        user_errors("reading a link", page=False)(hostile.__wrapped__)()
    assert err.value.message == "Controller must be one of bayes, priorfree, got '<img src=x>'."
    with pytest.raises(gr.Error) as err:
        plain("bug")
    assert "Something went wrong while doing a thing (KeyError)" in err.value.message
    assert "secret" not in err.value.message
    assert any("doing a thing failed" in r.message for r in caplog.records)
    gen = stream()
    assert next(gen) == 1
    with pytest.raises(gr.Error, match="Stopped in plain words"):
        next(gen)


def test_the_page_builds_with_named_api_endpoints(engine):
    from metaattn_viz.app.ui import build_app, load_examples

    demo = build_app(engine=engine)
    public = {d.api_name for d in demo.fns.values() if d.api_visibility == "public"}
    assert public == {"generate", "reroute", "figure", "status", "sql", "runs", "export"}
    header = display.status_markdown(engine.status())
    assert "ready" in header and f"At most {app_requests.APP_MAX_CONTEXT} tokens" in header
    examples = load_examples()
    assert len(examples) >= 4 and all(e["prompt"].strip() for e in examples)
    assert json.loads((Path(__file__).parent.parent / "assets" / "examples.json").read_text(encoding="utf-8"))


def test_the_runs_endpoint_reaches_past_its_limit_with_an_offset(engine):
    import gradio as gr

    from metaattn_viz.app.ui import build_app

    _logged(engine.history, *(synthetic_trace(n_layers=2, n_tokens=4, seed=s) for s in range(5)))
    runs = next(d.fn for d in build_app(engine=engine).fns.values() if d.api_name == "runs")
    assert runs is not None
    newest_first = engine.history.runs()["run_id"].tolist()
    out = runs(limit=2, offset=3)
    assert [row[out["columns"].index("run_id")] for row in out["rows"]] == newest_first[3:5]
    assert len(runs()["rows"]) == 5  # its defaults as before: the first 200
    with pytest.raises(gr.Error, match="offset must be between 0 and"):
        runs(offset=-1)


# -- visitors apart (public deployment), storage and queue notices -----------------------
def test_a_public_deployment_keeps_each_visitors_runs_apart(routed, tmp_path):
    public = Deployment(public=True)
    e = Engine(routed=routed, db=str(tmp_path / "log.duckdb"), deployment=public)
    try:
        owner_a, reader_a, reader_b = public.owner("sess-a"), public.reader("sess-a"), public.reader("sess-b")
        assert owner_a == reader_a and reader_a != reader_b
        # the header and /status name the log's file, not where the server keeps it
        assert e.status()["log_path"] == "log.duckdb"
        assert str(tmp_path) not in display.status_markdown(e.status())
        a = e.generations.generate(_request("Alpha beta.", max_new=2, quality=False), owner=owner_a)
        e.analysis.reroute(a, parse_settings(0.3), owner=owner_a)
        h = e.history
        h.flush()
        assert len(h.runs(owner=reader_a)) == 2
        assert h.runs(owner=reader_b).empty
        assert h.replay(a.run_id, reader_a).run_id == a.run_id
        with pytest.raises(AppError, match="no run"):  # the same sentence as a missing run
            h.replay(a.run_id, reader_b)
        with pytest.raises(AppError, match="no run"):
            h.compare(a.run_id, a.run_id, reader_b)
        count = "SELECT (SELECT count(*) FROM runs) AS runs, (SELECT count(*) FROM routes) AS routes"
        assert h.sql(count, owner=reader_a)[0].iloc[0].tolist() == [2, 2 * a.n_layers * a.n_tokens]
        assert h.sql(count, owner=reader_b)[0].iloc[0].tolist() == [0, 0]
        downloads = Downloads(tmp_path / "downloads")
        for reader, n_runs in ((reader_a, 2), (reader_b, 0)):
            with zipfile.ZipFile(downloads.log(h, "csv", reader, "sess")) as zf:
                rows = sum(
                    zf.read(n).decode().count("\n") - 1 for n in zf.namelist() if n.startswith("runs/")
                )
            assert rows == n_runs
        # the operator's shared log: every visitor reads every run; the page says so
        shared = Deployment(public=True, shared_log=True)
        assert shared.owner("sess-b") == public.owner("sess-b") and shared.reader("sess-b") is None
        assert len(h.runs(owner=shared.reader("sess-b"))) == 2
    finally:
        e.close()


def test_the_deployment_comes_from_the_environment(monkeypatch):
    for name in ("SPACE_ID", "METAATTN_SHARED_LOG", "METAATTN_DATA", "METAATTN_DB", "METAATTN_QUEUE_SIZE"):
        monkeypatch.delenv(name, raising=False)
    local = Deployment.detect()
    assert not local.public and not local.scoped and not local.ephemeral_storage
    assert local.owner("s") is None and local.reader("s") is None and local.reader(None) is None
    assert local.limits == LOCAL_LIMITS and local.limits.max_size is None
    assert Deployment.detect(public=True).scoped
    with pytest.raises(AppError, match="no browser session"):  # never widened to every run
        Deployment.detect(public=True).reader(None)
    monkeypatch.setenv("SPACE_ID", "someone/metaattn-viz")
    space = Deployment.detect()
    assert space.public and space.scoped and space.ephemeral_storage
    assert space.limits.max_size == PUBLIC_LIMITS.max_size and space.limits.model < LOCAL_LIMITS.model
    monkeypatch.setenv("METAATTN_DATA", "/data/metaattn-viz")
    monkeypatch.setenv("METAATTN_SHARED_LOG", "1")
    monkeypatch.setenv("METAATTN_QUEUE_SIZE", "7")
    # a duplicate of the Space inherits METAATTN_DATA but may have skipped the bucket: only
    # a folder under a mount point lasts
    assert Deployment.detect().ephemeral_storage
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: str(p) == "/data" or real_ismount(p))
    space = Deployment.detect()
    assert space.public and not space.scoped and not space.ephemeral_storage
    assert space.limits.max_size == 7


def test_the_header_starts_each_sentence_with_a_capital(engine):
    base = engine.status()
    line = display.status_markdown(base)
    assert ". Runs logged to `" in line and ". runs" not in line
    off = {**base, "logging": False, "log_problem": "the log is locked"}
    assert ". Runs not logged: the log is locked." in display.status_markdown(off)


def test_the_header_says_who_sees_the_runs_whether_they_last_and_when_it_is_busy(engine):
    base = engine.status()
    assert base["public"] is False and base["runs_visible_to"] == "everyone"
    local = display.status_markdown(base)
    assert "Your runs" not in local and "visible to everyone" not in local and "lost" not in local
    mine = display.status_markdown(
        {**base, "public": True, "runs_visible_to": "owner", "storage_ephemeral": True, "queue_max_size": 9}
    )
    assert "only the runs made in this browser session" in mine
    assert "Runs are lost when this Space restarts" in mine and "METAATTN_DATA" in mine
    assert "when 9 requests are already waiting" in mine and "currently busy" in mine
    shared = display.status_markdown({**base, "public": True, "runs_visible_to": "everyone"})
    assert "visible to everyone" in shared


def test_the_sql_console_table_starts_with_the_default_querys_columns(engine):
    from metaattn_viz import store
    from metaattn_viz.app.tab_history import DEFAULT_SQL, DEFAULT_SQL_COLUMNS, STATUSES

    engine.generations.generate(_request(max_new=2, quality=False))
    engine.history.flush()
    df, _ = engine.history.sql(DEFAULT_SQL)
    assert list(df.columns) == DEFAULT_SQL_COLUMNS
    assert STATUSES == store.STATUSES and "stopped" in STATUSES


def test_the_header_and_status_say_where_it_runs_and_which_weights_the_controllers_fit(engine):
    status = engine.status()
    assert status["runtime"] == {"device": "cpu", "dtype": "float32", "backend": "cpu", "linear_map": "elu"}
    # the tiny test model is handed over, not loaded: no fingerprint, no notice
    assert all(c["weights_notice"] is None for c in status["controllers"].values())
    header = display.status_markdown(status)
    assert "on cpu (float32, cpu kernels)" in header and "another copy" not in header
    bayes = {**status["controllers"]["bayes"], "trained": True}
    bayes["weights_notice"] = "calibrated on another copy of these weights: routing may differ"
    header = display.status_markdown({**status, "controllers": {**status["controllers"], "bayes": bayes}})
    assert "bayes controllers: calibrated on another copy of these weights" in header
    t4 = {"device": "cuda:0", "dtype": "bfloat16", "backend": "cpu", "linear_map": "elu"}
    t4["backend_notice"] = "the Triton kernels do not fit this GPU (...): attention runs on the PyTorch path"
    header = display.status_markdown({**status, "runtime": t4})
    assert "on cuda:0 (bfloat16, cpu kernels). \u26a0 the Triton kernels do not fit this GPU" in header


def test_a_failed_log_write_drops_the_runs_id_and_the_status_recovers(tmp_path, monkeypatch):
    """A write that fails (a full disk) stops logging that run: its trace no longer carries
    a run id that the log does not hold whole (no link or export for it), and the status says
    why; once a write succeeds again, the status no longer does."""
    from helpers import synthetic_trace

    from metaattn_viz import store
    from metaattn_viz.app.history import RunRecorder

    e = Engine(routed=routed_tiny(), db=str(tmp_path / "log.duckdb"))
    history = e.history
    try:
        trace = synthetic_trace(n_layers=2, n_tokens=6)
        recorder = RunRecorder(history, "generate")
        assert recorder.start(trace) is None and trace.run_id == recorder.run_id is not None
        run_id = recorder.run_id

        def full_disk(*args, **kwargs):
            raise store.StoreUnavailable("could not write to routing log: No space left on device")

        monkeypatch.setattr(history.run_log, "append", full_disk)
        recorder._last = 0.0  # due for a batch
        note = recorder.update(trace)
        assert note is not None and "No space left on device" in note
        assert trace.run_id is None and recorder.run_id is None
        assert recorder.finish(trace, "done", None) is None  # nothing more is tried for it
        history.run_log.flush()  # the log gave up on it too: interrupted, not left running
        assert history.run_log.get_run(run_id)["status"] == "interrupted"
        status = e.status()
        assert status["logging"] and "No space left" in status["log_problem"]
        assert "the last write failed" in display.status_markdown(status)
        monkeypatch.undo()
        again = synthetic_trace(n_layers=2, n_tokens=6, seed=1)
        later = RunRecorder(history, "generate")
        assert later.start(again) is None and later.finish(again, "done", None) is None
        assert history.log_problem is None and e.status()["log_problem"] is None
        assert "last write failed" not in display.status_markdown(e.status())
        assert history.replay(again.run_id).run_id == again.run_id
    finally:
        e.close()


def test_a_replay_note_says_when_the_run_holds_only_part_of_it():
    from helpers import synthetic_trace

    trace = synthetic_trace(n_layers=2, n_tokens=6)
    trace.run_id = "r1"
    assert "the run was" not in display.replay_note(trace, "done")
    for status, words in (
        ("running", "still streaming"),
        ("stopped", "stopped before its end"),
        ("interrupted", "interrupted"),
        ("failed", "failed"),
    ):
        assert words in display.replay_note(trace, status)


@pytest.mark.skipif(sys.platform == "win32", reason="Windows refuses to delete an open file")
def test_a_log_file_deleted_while_open_is_reported_and_not_written_to(tmp_path):
    """Deleting the log's file under a running server: DuckDB would keep writing into the
    deleted file (gone at the next restart); instead the status says so and runs are not
    logged (their traces carry no run id), and a replaced file is reported the same way."""
    from helpers import synthetic_trace

    from metaattn_viz.app.history import RunRecorder

    db = tmp_path / "log.duckdb"
    e = Engine(routed=routed_tiny(), db=str(db))
    try:
        assert e.status()["log_problem"] is None
        for f in tmp_path.glob("log.duckdb*"):
            f.unlink()
        problem = e.status()["log_problem"]
        assert problem and "file was deleted while it was open" in problem
        assert "deleted" in display.status_markdown(e.status())
        trace = synthetic_trace(n_layers=2, n_tokens=6)
        recorder = RunRecorder(e.history, "generate")
        assert "deleted" in recorder.start(trace) and trace.run_id is None
        db.write_bytes(b"")  # another file at the same path
        assert "file was replaced" in e.status()["log_problem"]
    finally:
        e.close()
