"""The routing log (metaattn_viz/store/): replay, streaming, concurrency, crashes,
locked and corrupt files, schema and migrations, readers, analytics, export. Synthetic
traces (helpers.synthetic_trace) keep it fast; the real-model replay is marked slow."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
from helpers import assert_same_trace, count, grow, stream_run, synthetic_trace, writing_schema_version

from metaattn_viz import store
from metaattn_viz.core.dirichlet import uncertainties
from metaattn_viz.core.settings import FULL, RoutingSettings
from metaattn_viz.store import RunLog, StoreUnavailable, UnknownRun, schema

REPO = Path(__file__).resolve().parent.parent


def full_disk(monkeypatch, when=lambda work: True) -> dict:
    """The writer's rounds fail as on a full disk: the next ``failing["left"]`` rounds that
    ``when`` picks (0 until the test sets it). Returns that counter."""
    from metaattn_viz.store import writer

    write, failing = writer._write, {"left": 0}

    def maybe_full(cur, work):
        if failing["left"] and when(work):
            failing["left"] -= 1
            raise OSError("No space left on device")
        write(cur, work)

    monkeypatch.setattr(writer, "_write", maybe_full)
    return failing


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def db(tmp_path):
    return tmp_path / "log" / "routing.duckdb"  # the folder is created on open


# -- replay -----------------------------------------------------------------------------------
@pytest.mark.parametrize("controller", ["bayes", "priorfree"])
def test_replay_equals_the_trace_in_memory(db, controller):
    full = synthetic_trace(n_layers=5, n_tokens=37, seed=3, controller=controller)
    full.kl_to_dense = np.random.default_rng(0).random(37).astype(np.float32)
    with RunLog(db) as log:
        run_id = stream_run(log, full, chunks=[1, 4, 2] * 20)
        got = log.load_trace(run_id)
    assert got.run_id == run_id
    assert_same_trace(got, full)


def test_replay_of_bulk_write_with_no_budget_and_fixed_lambda(db):
    full = synthetic_trace(n_layers=3, n_tokens=9, seed=4, budget=None)
    full.settings = RoutingSettings(
        budget=None,
        lam=0.25,
        scope="global",
        window=7,
        n_sink=0,
        backend="cpu",
        dual_step=0.5,
        hedge_min_weight=0.2,
    )
    with RunLog(db) as log:
        run_id = log.start_run(full, kind="reroute")  # whole trace at once, as reroute does
        log.finish(run_id, full)
        got = log.load_trace(run_id)
        assert log.get_run(run_id)["kind"] == "reroute"
    assert_same_trace(got, full)


def test_every_settings_field_has_a_column():
    assert set(store.SETTINGS_COLUMNS) == set(RoutingSettings.__dataclass_fields__)


@pytest.mark.parametrize("controller", ["bayes", "priorfree"])
def test_uncertainty_columns_agree_with_dirichlet(db, controller):
    full = synthetic_trace(n_layers=4, n_tokens=25, seed=5, controller=controller)
    with RunLog(db) as log:
        run_id = stream_run(log, full)
        rows = (
            log.fresh_cursor()
            .execute(
                "SELECT layer, pos, uncertainty, aleatoric, epistemic, vacuity FROM routes WHERE run_id = $r",
                {"r": run_id},
            )
            .fetchnumpy()
        )
    ref = uncertainties(
        torch.from_numpy(full.concentration.astype(np.float64)), point_estimate=full.point_estimate
    )  # the independent reference
    at = (rows["layer"].astype(int), rows["pos"].astype(int))
    for measure, column in store.UNCERTAINTY_COLUMNS.items():
        np.testing.assert_allclose(
            rows[column], ref[measure].numpy()[at], rtol=1e-5, atol=1e-6, err_msg=column
        )
    np.testing.assert_allclose(rows["uncertainty"], full.uncertainty("total")[at], rtol=1e-5)


@pytest.mark.slow
def test_replay_real_generation(tmp_path, real_model):
    from metaattn_viz.routing.model import RoutedModel

    settings = RoutingSettings(budget=0.4, hedge_policy="soft")
    # the session's loaded model is shared: detach on the way out (a model is routed once)
    with RoutedModel.from_loaded(real_model) as routed, RunLog(tmp_path / "real.duckdb") as log:
        trace = None
        for i, trace in enumerate(routed.stream("The capital of France is", settings, max_new_tokens=12)):
            if trace.run_id is None:
                log.start_run(trace)
            if i % 3 == 0:
                log.append(trace.run_id, trace)
        log.finish(trace.run_id, trace)
        got = log.load_trace(trace.run_id)
    assert trace.n_tokens > trace.n_prompt_tokens
    assert_same_trace(got, trace)
    np.testing.assert_allclose(got.uncertainty(), trace.uncertainty(), rtol=1e-6)
    assert got.attention_flops_ratio == pytest.approx(trace.attention_flops_ratio)


# -- streaming --------------------------------------------------------------------------------
def test_a_streaming_run_is_running_then_done_with_all_its_rows(db):
    full = synthetic_trace(n_layers=4, n_tokens=30, seed=1)
    with RunLog(db) as log:
        parts = grow(full, 5)
        trace = next(parts)  # the prefill
        run_id = log.start_run(trace)
        log.append(run_id, trace)
        log.flush()
        row = log.get_run(run_id)
        assert row["status"] == "running"
        assert row["n_tokens"] == trace.n_tokens == full.n_prompt_tokens
        assert count(log, "SELECT count(*) FROM routes WHERE run_id = $r", r=run_id) == 4 * trace.n_tokens
        for trace in parts:
            log.append(run_id, trace)
            log.append(run_id, trace)  # twice: nothing is written twice
        assert log.list_runs(status="running")["run_id"].tolist() == [run_id]
        log.finish(run_id, trace)
        row = log.get_run(run_id)
        assert row["status"] == "done" and row["n_tokens"] == 30
        assert row["realized_cost"] == pytest.approx(full.realized_cost, rel=1e-6)
        assert row["flops_ratio"] == pytest.approx(full.attention_flops_ratio, rel=1e-6)
        assert row["wall_ms"] > 0 and row["pid"] == os.getpid()
        assert count(log, "SELECT count(*) FROM routes WHERE run_id = $r", r=run_id) == 4 * 30
        assert count(log, "SELECT count(*) FROM tokens WHERE run_id = $r", r=run_id) == 30
        assert count(log, "SELECT count(*) FROM (SELECT DISTINCT layer, pos FROM routes)") == 120
        assert count(log, "SELECT count(*) FROM tokens WHERE is_prompt") == full.n_prompt_tokens


def test_appends_merged_into_one_commit_leave_the_run_row_as_of_the_last(db, monkeypatch):
    """Several appends queued before one commit are merged into one slice per run: the
    run's row then shows the text, measures and wall time of the last of them, not the first."""
    from types import SimpleNamespace

    from metaattn_viz.store import codec, writer

    monkeypatch.setattr(writer, "COMMIT_WINDOW_S", 600.0)  # only the flush commits
    clock = [1000.0]
    monkeypatch.setattr(writer, "time", SimpleNamespace(monotonic=lambda: clock[0], time=writer.time.time))
    rounds, codec_merge = [], codec.merge_slices

    def merge(slices):  # records what each commit round merges
        rounds.append([(rid, sl.start, sl.end) for rid, sl in slices])
        return codec_merge(slices)

    monkeypatch.setattr(codec, "merge_slices", merge)
    full = synthetic_trace(n_layers=2, n_tokens=20, seed=4)
    with RunLog(db) as log:
        parts = grow(full, 4)
        trace = next(parts)
        run_id = log.start_run(trace)
        log.flush()
        for i, trace in zip(range(3), parts, strict=False):
            clock[0] = 1000.0 + (i + 1) * 1.5  # 1.5 s, 3 s, 4.5 s after the start
            trace.output_text = f"text after {trace.n_tokens} tokens"
            log.append(run_id, trace)
        log.flush()
        p = full.n_prompt_tokens
        n = p + 12
        assert rounds[-1] == [(run_id, 0, p + 4), (run_id, p + 4, p + 8), (run_id, p + 8, n)]  # one round
        row = log.get_run(run_id)
        assert row["status"] == "running" and row["n_tokens"] == n
        assert row["output_text"] == f"text after {n} tokens"
        assert row["wall_ms"] == pytest.approx(4500.0)
        assert row["realized_cost"] == pytest.approx(trace.realized_cost, rel=1e-6)
        assert count(log, "SELECT count(*) FROM routes WHERE run_id = $r", r=run_id) == 2 * n
        log.finish(run_id, trace)


@pytest.mark.parametrize(
    "timings, wall_ms",
    [
        ({"prefill_ms": 40.0, "decode_ms": 200.0, "total_ms": 250.5}, 250.5),  # a generation
        ({"reroute_ms": 812.0, "prefill_ms": 800.0}, 812.0),  # a re-route
        ({"prefill_ms": 40.0, "decode_ms": 60.0}, 100.0),  # a generation cut short
        ({"prefill_ms": float("nan")}, None),  # no account: from its start in the log
    ],
)
def test_a_runs_wall_time_is_its_own_not_the_logs(db, timings, wall_ms):
    """A re-route or a `route` run is started in the log once complete, and was logged with
    wall_ms about 1 (its re-route took 650-840 ms); a streamed one left out its prefill."""
    trace = synthetic_trace(n_layers=2, n_tokens=8, seed=3)
    trace.timings = dict(timings)
    with RunLog(db) as log:
        run_id = log.start_run(trace)
        log.finish(run_id, trace)
        row = log.get_run(run_id)
    if wall_ms is None:
        assert 0 < row["wall_ms"] < 5000
    else:
        assert row["wall_ms"] == pytest.approx(wall_ms)


def test_append_refuses_gaps_and_finished_runs(db):
    full = synthetic_trace(n_layers=2, n_tokens=10, seed=2)
    with RunLog(db) as log:
        run_id = log.start_run(full)
        assert log.append(run_id, full, start_pos=0) == 10
        assert log.append(run_id, full, start_pos=3) == 10  # overlap: already queued
        with pytest.raises(ValueError, match="gap"):
            log.append(run_id, full, start_pos=11)
        log.finish(run_id, full, status="failed", error="decoder blew up")
        with pytest.raises(ValueError, match="not streaming"):
            log.append(run_id, full)
        with pytest.raises(ValueError, match="status must be one of"):
            log.finish(log.start_run(full), full, status="great")
        row = log.get_run(run_id)
        assert (row["status"], row["error"]) == ("failed", "decoder blew up")
        with pytest.raises(UnknownRun, match="no run 'nope'"):
            log.load_trace("nope")


def test_handles_on_one_file_share_one_connection_and_read_only_refuses_writes(db):
    a = RunLog(db)
    b = RunLog(db)
    ro = RunLog(db, read_only=True)  # would be refused as a second connection to the file
    queued = a.start_run(synthetic_trace(n_layers=2, n_tokens=6))
    b.flush()  # one writer: b waits for what a queued (else it commits up to 1 s later)
    assert ro.get_run(queued)["status"] == "running"
    run_id = stream_run(a, synthetic_trace(n_layers=2, n_tokens=6))
    a.close()
    assert b.get_run(run_id)["status"] == "done"  # still open through b
    with pytest.raises(StoreUnavailable, match="read-only"):
        ro.start_run(synthetic_trace(n_layers=2, n_tokens=6))
    b.close()
    ro.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        ro.list_runs()


def test_closing_the_log_mid_stream_marks_the_run_interrupted(db):
    full = synthetic_trace(n_layers=3, n_tokens=20, seed=6)
    log = RunLog(db)
    parts = grow(full, 4)
    trace = next(parts)
    run_id = log.start_run(trace)
    log.append(run_id, trace)
    log.close()
    with RunLog(db) as log:
        row = log.get_run(run_id)
        assert row["status"] == "interrupted" and "closed" in row["error"]
        assert row["n_tokens"] == full.n_prompt_tokens
        assert_same_trace(log.load_trace(run_id), full, n_tokens=full.n_prompt_tokens)
        assert log.recovered_runs == []


# -- concurrency ------------------------------------------------------------------------------
def test_eight_threads_stream_100_token_runs_at_once(db):
    L, T = 30, 100
    fulls = [synthetic_trace(n_layers=L, n_tokens=T, seed=10 + i) for i in range(8)]
    run_ids, errors = [None] * 8, []
    barrier = threading.Barrier(8)

    def worker(i):
        try:
            with RunLog(db) as log:  # each thread its own handle: one shared connection
                barrier.wait()
                rng = np.random.default_rng(i)
                run_ids[i] = stream_run(log, fulls[i], chunks=iter(lambda: rng.integers(1, 6), -1))
                log.list_runs(limit=3)  # readers run alongside the writer
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with RunLog(db) as log:
        runs = log.list_runs(limit=100)
        assert sorted(runs["run_id"]) == sorted(run_ids)
        assert set(runs["status"]) == {"done"}
        per_run = log.fresh_cursor().execute("SELECT run_id, count(*) FROM routes GROUP BY run_id").fetchall()
        assert sorted(n for _, n in per_run) == [L * T] * 8
        for i in (0, 7):
            assert_same_trace(log.load_trace(run_ids[i]), fulls[i])


# -- crashes ----------------------------------------------------------------------------------
CHILD = textwrap.dedent("""
    import sys, time
    from helpers import grow, synthetic_trace
    from metaattn_viz.store import RunLog
    log = RunLog(sys.argv[1])
    done = synthetic_trace(n_layers=6, n_tokens=20, seed=21)
    log.finish(log.start_run(done), done)
    print("done", done.run_id, flush=True)
    full = synthetic_trace(n_layers=6, n_tokens=400, seed=22)
    for trace in grow(full, 5):
        if trace.run_id is None:
            log.start_run(trace)
            print("run", trace.run_id, flush=True)
        trace.output_text = f"the text after {trace.n_tokens} tokens"  # a stream sets it as it goes
        log.append(trace.run_id, trace)
        log.flush()
        print("committed", trace.n_tokens, flush=True)
        time.sleep(0.01)
    time.sleep(600)  # never finishes: the parent kills it
""")


def test_sigkill_mid_run_marks_it_interrupted_and_keeps_committed_batches(db):
    before = synthetic_trace(n_layers=6, n_tokens=15, seed=20)
    with RunLog(db) as log:
        before_id = stream_run(log, before)
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(db)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])},
    )
    committed, ids = 0, {}
    try:
        for line in child.stdout:
            word, value = line.split()
            if word == "committed":
                committed = int(value)
                if committed >= 60:
                    break
            else:
                ids[word] = value
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL and committed >= 60
    with RunLog(db) as log:
        assert log.recovered_runs == [ids["run"]]
        row = log.get_run(ids["run"])
        assert row["status"] == "interrupted" and "ended" in row["error"]
        n = row["n_tokens"]
        assert n >= committed  # every committed batch is there
        assert count(log, "SELECT count(*) FROM routes WHERE run_id = $r", r=ids["run"]) == 6 * n
        assert count(log, "SELECT count(*) FROM tokens WHERE run_id = $r", r=ids["run"]) == n
        assert_same_trace(log.load_trace(ids["run"]), synthetic_trace(6, 400, seed=22), n)
        # the run's row holds its text and measures as of the last commit: History shows
        # them, and its search finds the text
        replayed = log.load_trace(ids["run"])
        assert row["output_text"] == f"the text after {n} tokens"  # the last commit's
        assert row["realized_cost"] == pytest.approx(replayed.realized_cost, rel=1e-6)
        assert row["flops_ratio"] == pytest.approx(replayed.attention_flops_ratio, rel=1e-6)
        assert row["wall_ms"] > 0
        found = log.list_runs(text=f"after {n} tokens")
        assert ids["run"] in set(found["run_id"])
        # no other run is affected
        assert log.get_run(ids["done"])["status"] == "done"
        assert_same_trace(log.load_trace(ids["done"]), synthetic_trace(6, 20, seed=21))
        assert log.get_run(before_id)["status"] == "done"
        assert_same_trace(log.load_trace(before_id), before)
    with RunLog(db) as log:
        assert log.recovered_runs == []  # recovery happens once


# -- locked and corrupt files -----------------------------------------------------------------
HOLDER = (
    "import sys; from metaattn_viz.store import RunLog; log = RunLog(sys.argv[1]); "
    "print('ready', flush=True); sys.stdin.read()"
)


def test_a_database_locked_by_another_process_gives_a_clear_error(db):
    with RunLog(db) as log:
        stream_run(log, synthetic_trace(n_layers=2, n_tokens=5))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(db)],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        digest = sha(db)
        for read_only in (False, True):
            with pytest.raises(StoreUnavailable) as err:
                RunLog(db, read_only=read_only)
            msg = str(err.value)
            assert str(db) in msg and "another process" in msg
            assert "--db" in msg and ("--no-log" in msg) is not read_only  # reading: no such flag
        log, why = store.open_or_explain(db)  # the app runs on without logging
        assert log is None and "Running without logging" in why
        assert store.open_or_explain(db, enabled=False) == (None, "logging is off (--no-log)")
        assert sha(db) == digest
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    with RunLog(db, read_only=True) as log:  # released: readable again
        assert len(log.list_runs()) == 1


@pytest.mark.parametrize("content", [os.urandom(5000), b"hello, not a database\n" * 300])
def test_a_corrupt_file_gives_a_clear_error_and_is_never_overwritten(tmp_path, content):
    path = tmp_path / "routing.duckdb"
    path.write_bytes(content)
    for read_only in (False, True):
        with pytest.raises(StoreUnavailable) as err:
            RunLog(path, read_only=read_only)
        msg = str(err.value)
        assert str(path) in msg and "not a DuckDB database" in msg and "untouched" in msg
        assert "--db" in msg and ("--no-log" in msg) is not read_only
    assert path.read_bytes() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["routing.duckdb"]  # no WAL either


@pytest.mark.parametrize("kept", [0.1, 0.5])
def test_a_truncated_log_is_explained_on_open_or_read_and_an_export_leaves_nothing(tmp_path, kept):
    """A log cut short (a half-copied file): DuckDB finds the missing blocks on open or at a
    later read; either way a sentence naming the file, never DuckDB's IOException, and the
    file is left as it was. A failed export leaves no folder behind."""
    full = tmp_path / "full.duckdb"
    with RunLog(full) as log:
        for seed in range(3):
            stream_run(log, synthetic_trace(n_layers=4, n_tokens=30, seed=seed))
    data = full.read_bytes()
    cut = tmp_path / "cut.duckdb"
    cut.write_bytes(data[: int(len(data) * kept)])
    digest = sha(cut)
    for read_only in (False, True):
        try:
            log = RunLog(cut, read_only=read_only)
        except StoreUnavailable as exc:
            assert str(cut) in str(exc) and "--db" in str(exc)
            continue
        with log, pytest.raises(StoreUnavailable, match="could not be read .*damaged"):
            log.list_runs()
    assert sha(cut) == digest
    out = tmp_path / "export"
    with pytest.raises(StoreUnavailable) as err:
        store.export(cut, out, "csv")
    assert str(cut) in str(err.value) and not out.exists()
    app_log, why = store.open_or_explain(cut)  # the server starts, logging or saying why not
    if app_log is None:
        assert str(cut) in why and "Running without logging" in why
    else:
        app_log.close()


def test_a_duckdb_file_that_is_not_a_routing_log_is_left_alone(tmp_path):
    path = tmp_path / "other.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute("CREATE TABLE customers AS SELECT 1 AS id")
    digest = sha(path)
    with pytest.raises(StoreUnavailable, match="not a metaattn-viz routing log"):
        RunLog(path)
    assert sha(path) == digest


def test_missing_log_read_only_and_directory_paths_are_explained(tmp_path):
    with pytest.raises(StoreUnavailable, match="no routing log at"):
        RunLog(tmp_path / "missing.duckdb", read_only=True)
    assert not (tmp_path / "missing.duckdb").exists()
    with pytest.raises(StoreUnavailable, match="is a directory"):
        RunLog(tmp_path)
    log, why = store.open_or_explain(tmp_path)  # one sentence, then the next
    assert log is None and why.endswith("with a file path. Running without logging.")


# -- schema versions --------------------------------------------------------------------------
def test_an_older_log_is_migrated_on_open_and_keeps_its_runs(db, monkeypatch):
    full = synthetic_trace(n_layers=3, n_tokens=8, seed=7)
    with RunLog(db) as log:
        run_id = stream_run(log, full)
    v = store.latest_schema_version()
    monkeypatch.setattr(
        schema,
        "MIGRATIONS",
        schema.MIGRATIONS
        + [(v + 1, ("ALTER TABLE runs ADD COLUMN note VARCHAR", "UPDATE runs SET note = 'migrated'"))],
    )
    with pytest.raises(StoreUnavailable, match="open it once read-write"):
        RunLog(db, read_only=True)
    with RunLog(db) as log:
        assert count(log, "SELECT max(version) FROM schema_version") == v + 1
        assert log.get_run(run_id)["note"] == "migrated"
        assert_same_trace(log.load_trace(run_id), full)


def test_a_log_of_schema_version_1_is_migrated_keeps_its_runs_and_can_say_stopped(db, monkeypatch):
    """A log written by schema version 1 (its CHECK knew four statuses, runs had no
    owner): on open its runs, statuses and replays survive, a run left running is still
    recovered as interrupted, and `stopped` and owners can be written."""
    traces = {
        status: synthetic_trace(n_layers=3, n_tokens=8, seed=50 + i)
        for i, status in enumerate(("done", "failed", "crashed", "closed"))
    }
    with writing_schema_version(monkeypatch, 1):
        log = RunLog(db)
        ids = {}
        for status in ("done", "failed", "crashed"):
            tr = traces[status]
            ids[status] = log.start_run(tr)
            log.finish(ids[status], tr, "done" if status == "crashed" else status)
        tr = traces["closed"]
        ids["closed"] = log.start_run(tr)
        log.append(ids["closed"], tr)
        log.close()  # mid-stream: interrupted
    with duckdb.connect(str(db)) as con:
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 1
        assert "owner" not in {r[0] for r in con.execute("DESCRIBE runs").fetchall()}
        with pytest.raises(duckdb.ConstraintException):  # the version-1 CHECK
            con.execute("UPDATE runs SET status = 'stopped' WHERE run_id = $r", {"r": ids["done"]})
        con.execute(
            "UPDATE runs SET status = 'running' WHERE run_id = $r", {"r": ids["crashed"]}
        )  # as a killed process leaves it
    with RunLog(db) as log:
        assert count(log, "SELECT max(version) FROM schema_version") == store.latest_schema_version()
        assert log.recovered_runs == [ids["crashed"]]
        want = {"done": "done", "failed": "failed", "crashed": "interrupted", "closed": "interrupted"}
        for name, rid in ids.items():
            row = log.get_run(rid)
            assert (row["status"], row["owner"]) == (want[name], None), name
            assert_same_trace(
                log.load_trace(rid), traces[name], None if name in ("done", "failed") else row["n_tokens"]
            )
        tr = synthetic_trace(n_layers=3, n_tokens=5, seed=60)
        rid = log.start_run(tr, owner="user:someone")
        log.finish(rid, tr, "stopped")
        assert (log.get_run(rid)["status"], log.get_run(rid)["owner"]) == ("stopped", "user:someone")
        assert log.list_runs(status="stopped")["run_id"].tolist() == [rid]
        assert log.runs_over_time()["stopped"].sum() == 1
        with pytest.raises(duckdb.ConstraintException):  # the CHECK still guards statuses
            log.fresh_cursor().execute("UPDATE runs SET status = 'paused'")
    with RunLog(db, read_only=True) as log:  # a migrated log opens read-only
        assert_same_trace(log.load_trace(ids["done"]), traces["done"])


def test_a_log_of_schema_version_2_is_migrated_and_its_runs_replay_as_elu(db, monkeypatch):
    """Version 3 adds the runs column linear_map (RoutingSettings.linear_map). Runs logged
    before it used elu + 1, the only linear expert there was: they read 'elu', and replay
    with that setting; new runs keep the map they ran with."""
    traces = [synthetic_trace(n_layers=3, n_tokens=8, seed=70 + i) for i in range(2)]
    with writing_schema_version(monkeypatch, 2):
        with RunLog(db) as log:
            ids = [stream_run(log, tr) for tr in traces]
    with duckdb.connect(str(db)) as con:
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 2
        assert "linear_map" not in {r[0] for r in con.execute("DESCRIBE runs").fetchall()}
    with RunLog(db) as log:
        assert count(log, "SELECT max(version) FROM schema_version") == store.latest_schema_version()
        for rid, tr in zip(ids, traces, strict=True):
            assert log.get_run(rid)["linear_map"] == "elu"
            got = log.load_trace(rid)
            assert got.settings.linear_map == "elu"
            assert_same_trace(got, tr)
        tr = synthetic_trace(n_layers=3, n_tokens=5, seed=72)
        tr.settings = tr.settings.with_(linear_map="learned")
        rid = stream_run(log, tr)
        assert log.load_trace(rid).settings.linear_map == "learned"
        assert log.list_runs()["run_id"].tolist().count(rid) == 1
    with RunLog(db, read_only=True) as log:
        assert log.load_trace(ids[0]).settings.linear_map == "elu"


def test_a_log_of_schema_version_3_is_migrated_and_its_runs_hedged_on_total_uncertainty(db, monkeypatch):
    """Version 4 adds the runs column hedge_measure. Runs logged before it hedged on the
    total uncertainty, the only measure there was: they read 'total' and replay so."""
    traces = [synthetic_trace(n_layers=3, n_tokens=8, seed=80 + i) for i in range(2)]
    with writing_schema_version(monkeypatch, 3):
        with RunLog(db) as log:
            ids = [stream_run(log, tr) for tr in traces]
    with duckdb.connect(str(db)) as con:
        assert con.execute("SELECT max(version) FROM schema_version").fetchone()[0] == 3
        assert "hedge_measure" not in {r[0] for r in con.execute("DESCRIBE runs").fetchall()}
    with RunLog(db) as log:
        assert count(log, "SELECT max(version) FROM schema_version") == store.latest_schema_version()
        for rid, tr in zip(ids, traces, strict=True):
            assert log.get_run(rid)["hedge_measure"] == "total"
            assert_same_trace(log.load_trace(rid), tr)
        tr = synthetic_trace(n_layers=3, n_tokens=5, seed=82)
        tr.settings = tr.settings.with_(hedge_measure="epistemic")
        rid = stream_run(log, tr)
        assert log.load_trace(rid).settings.hedge_measure == "epistemic"


def test_a_log_of_schema_version_5_is_migrated_and_its_runs_say_nothing_of_their_generation(db, monkeypatch):
    """Version 6 adds how a run's text was generated. Runs logged before it did not record
    that: they replay with generation None (a link then takes the page's controls)."""
    traces = [synthetic_trace(n_layers=3, n_tokens=8, seed=95 + i) for i in range(2)]
    with writing_schema_version(monkeypatch, 5):
        with RunLog(db) as log:
            ids = [stream_run(log, tr) for tr in traces]
    with duckdb.connect(str(db)) as con:
        assert "max_new_tokens" not in {r[0] for r in con.execute("DESCRIBE runs").fetchall()}
    with RunLog(db) as log:
        assert count(log, "SELECT max(version) FROM schema_version") == store.latest_schema_version() == 6
        for rid, tr in zip(ids, traces, strict=True):
            assert log.load_trace(rid).generation is None
            assert_same_trace(log.load_trace(rid), tr)


def test_shipped_migrations_never_change():
    """A log migrated by a shipped migration must mean the same as one created by it:
    their DDL is pinned (a new status or column is a new migration)."""
    pinned = {
        1: "20ad15444b5accedc419fa3eba9464ff753d99f6df61d7fff40b19c5ca5a78f8",
        2: "fde22dc1870615c6e832010d977ab9bf9ac205fd9d3121011041a3d1ddb54eee",
        3: "d219176ee1565084c108e259af81b9789a1dafe27fce042e430a9686e99d1baa",
        4: "3c704bdd4fe07098e2d212aef9bf338f2200e9cfd49eee65ce16d8c18312fc4d",
        5: "e65529bb7a7e5afaafa295551244a0aaf4b724c64fb356d2e093e492d8079f30",
        6: "ffad1f8b1f4b9e534ad9b55e2dc74bef744e4f2dbceeb873fbd3a4f2b50928cd",
    }
    for version, statements in store.MIGRATIONS:
        if version in pinned:
            assert hashlib.sha256("\n".join(statements).encode()).hexdigest() == pinned[version], version
    assert set(pinned) <= {v for v, _ in store.MIGRATIONS}


def test_a_stopped_run_is_stopped_and_only_a_dead_writer_is_interrupted(db):
    full = synthetic_trace(n_layers=3, n_tokens=12, seed=61)
    with RunLog(db) as log:
        parts = grow(full, 3)
        trace = next(parts)
        run_id = log.start_run(trace)
        log.append(run_id, trace)
        log.finish(run_id, trace, status="stopped")  # the user's Stop button
        row = log.get_run(run_id)
        assert (row["status"], row["error"]) == ("stopped", None)
        assert row["n_tokens"] == trace.n_tokens
        assert_same_trace(log.load_trace(run_id), full, n_tokens=trace.n_tokens)
        assert log.list_runs(status="interrupted").empty
    assert store.FINAL_STATUSES == ("done", "interrupted", "failed", "stopped")
    assert store.STATUSES == ("running", *store.FINAL_STATUSES)


def test_an_abandoned_run_is_interrupted_and_its_failure_does_not_outlive_it(db, monkeypatch):
    """A failed write (a full disk) fails that run's next append; once its stream gives up
    on it (abandon), the run is marked interrupted with the reason, and flush (every export)
    works again instead of raising that old error for the life of the process."""
    full = synthetic_trace(n_layers=3, n_tokens=12, seed=62)
    failing = full_disk(monkeypatch, when=lambda work: any(w.rows is not None for w in work))
    failing["left"] = 1
    with RunLog(db) as log:
        parts = grow(full, 3)
        trace = next(parts)
        run_id = log.start_run(trace)
        log.flush()  # the run's row is in
        log.append(run_id, next(parts))
        with pytest.raises(store.StoreUnavailable, match="No space left"):
            log.flush()
        with pytest.raises(store.StoreUnavailable, match="No space left"):
            log.append(run_id, next(parts))
        log.abandon(run_id, "a write failed")
        log.flush()  # no longer raises
        row = log.get_run(run_id)
        assert (row["status"], row["error"]) == ("interrupted", "a write failed")
        assert row["n_tokens"] == 0  # start_run writes no positions; the first append failed
        log.abandon(run_id, "again")  # no longer streaming: a no-op
        other = synthetic_trace(n_layers=3, n_tokens=5, seed=63)
        other_id = log.start_run(other)
        log.finish(other_id, other)
        assert log.get_run(other_id)["status"] == "done"
        assert log.export(db.parent / "out", "csv")["runs"] == 2


@pytest.mark.parametrize("fails", ["the finish", "the append before it"])
def test_a_run_whose_end_could_not_be_written_is_interrupted_not_running(db, monkeypatch, fails):
    """A failed last write (a brief full disk) must not leave the run `running` in this
    server's reads until it restarts: the writer marks it interrupted, saying why."""
    from metaattn_viz.store import writer

    full = synthetic_trace(n_layers=3, n_tokens=12, seed=64)
    failing = full_disk(monkeypatch)
    with RunLog(db) as log:
        parts = grow(full, 3)
        trace = next(parts)
        run_id = log.start_run(trace)
        log.flush()
        if fails == "the append before it":
            failing["left"] = 1
            log.append(run_id, next(parts))
            with pytest.raises(store.StoreUnavailable, match="No space left"):
                log.flush()
        else:
            failing["left"] = 1
        with pytest.raises(store.StoreUnavailable, match="No space left"):
            log.finish(run_id, full)
        log.flush()  # the mark is written, and the old error is gone
        row = log.get_run(run_id)
        assert row["status"] == "interrupted"
        assert row["error"] == writer.FINISH_LOST_ERROR
        assert log.list_runs(status="running").empty


def test_a_lone_surrogate_in_a_run_fails_neither_it_nor_the_runs_written_with_it(db):
    """Arrow and DuckDB take only valid UTF-8: a lone surrogate in a prompt, the output or
    an error (what an undecodable byte of a command line becomes) is stored as U+FFFD, so
    it cannot fail the write round and lose every run in it."""
    good = synthetic_trace(n_layers=2, n_tokens=6, seed=65)
    bad = synthetic_trace(n_layers=2, n_tokens=6, seed=66)
    bad.prompt, bad.output_text = "bad \udcff prompt", "out \ud800 put"
    with RunLog(db) as log:
        ids = [log.start_run(t) for t in (good, bad)]  # one round: queued together
        log.finish(ids[1], bad, status="failed", error="ValueError: \udce9t\u00e9")
        log.finish(ids[0], good)
        runs = log.list_runs().set_index("run_id")
        assert set(runs.index) == set(ids)
        row = log.get_run(ids[1])
        assert row["prompt"] == "bad \ufffd prompt" and row["error"] == "ValueError: \ufffdt\u00e9"
        assert log.load_trace(ids[1]).output_text == "out \ufffd put"
        assert log.get_run(ids[0])["status"] == "done"


def test_a_log_opened_by_a_relative_path_survives_a_change_of_directory(tmp_path, monkeypatch):
    """The registry and the deleted-file check hold the file, not the path as typed: after
    a chdir the log is neither reported deleted nor left open (and closed) in the registry."""
    from metaattn_viz.store import writer

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    log = RunLog("log.duckdb")
    stream_run(log, synthetic_trace(n_layers=2, n_tokens=4, seed=67))
    monkeypatch.chdir(tmp_path / "b")
    assert log.file_problem() is None  # was: "deleted while it was open"
    assert log.path == tmp_path / "a" / "log.duckdb"
    log.close()
    assert str((tmp_path / "a" / "log.duckdb").resolve()) not in writer._REGISTRY
    with RunLog(tmp_path / "a" / "log.duckdb") as again:  # was: "is closed"
        stream_run(again, synthetic_trace(n_layers=2, n_tokens=4, seed=68))
        assert len(again.list_runs()) == 2


def test_a_closed_cursor_is_forgotten_and_an_open_one_closed_with_the_log(db):
    """Every console query and export takes a fresh cursor and closes it: a long-running
    server must not keep them all (about 2 KB each, for its life)."""
    import gc

    with RunLog(db) as log:
        stream_run(log, synthetic_trace(n_layers=2, n_tokens=4, seed=69))
        kept = len(log._db._cursors)
        for _ in range(200):
            cur = log.fresh_cursor()
            cur.execute("SELECT count(*) FROM runs").fetchall()
            cur.close()
        del cur
        gc.collect()
        assert len(log._db._cursors) == kept
        held = log.fresh_cursor()
    with pytest.raises(duckdb.ConnectionException):  # still closed with the log
        held.execute("SELECT 1")


def test_the_writers_arrow_schemas_match_the_tables(db):
    """Each table has one column list: the DDL and the Arrow schemas agree with it."""
    with RunLog(db) as log:
        cur = log.fresh_cursor()
        for table, columns in (
            ("runs", schema.RUNS_COLUMNS),
            ("tokens", schema.TOKENS_COLUMNS),
            ("routes", schema.ROUTES_COLUMNS),
        ):
            described = [(r[0], r[1]) for r in cur.execute(f"DESCRIBE {table}").fetchall()]
            assert described == [(c.name, c.type) for c in columns], table
            arrow = cur.sql(f"SELECT * FROM {table} LIMIT 0").to_arrow_table().schema
            assert schema.arrow_schema(columns) == arrow.remove_metadata(), table
    runs = {f.name: f.type for f in schema.RUNS_ARROW_SCHEMA}
    for part in (schema.FINAL_ARROW_SCHEMA, schema.PROGRESS_ARROW_SCHEMA):
        assert all(runs[f.name] == f.type for f in part)
    assert set(schema.FINAL_COLUMNS) | set(schema.PROGRESS_COLUMNS) <= set(runs)


def test_a_log_from_a_newer_version_is_refused_untouched(db):
    with RunLog(db):
        pass
    with duckdb.connect(str(db)) as con:
        con.execute("INSERT INTO schema_version VALUES (999, now()::TIMESTAMP)")
    digest = sha(db)
    with pytest.raises(StoreUnavailable, match="newer than this metaattn-viz"):
        RunLog(db)
    assert sha(db) == digest


# -- readers and analytics --------------------------------------------------------------------
@pytest.fixture
def filled(db):
    """A log with 6 runs at budgets 0.3 / 0.6, two controllers, one failed."""
    traces = {}
    with RunLog(db) as log:
        for i in range(6):
            tr = synthetic_trace(
                n_layers=4,
                n_tokens=12 + i,
                seed=30 + i,
                controller="bayes" if i % 2 == 0 else "priorfree",
                budget=0.3 if i < 3 else 0.6,
            )
            tr.created_at = dt.datetime(2026, 1, 1 + i // 2, 12, tzinfo=dt.UTC).timestamp()
            if i == 5:
                tr.prompt = "A needle in the haystack"
            rid = log.start_run(tr)
            log.finish(rid, tr, status="failed" if i == 4 else "done")
            traces[rid] = tr
    return db, traces


def test_list_runs_filters_and_orders(filled):
    db, traces = filled
    with RunLog(db, read_only=True) as log:
        runs = log.list_runs()
        assert len(runs) == 6
        assert list(runs["created_at"]) == sorted(runs["created_at"], reverse=True)
        assert len(log.list_runs(status="failed")) == 1
        assert set(log.list_runs(controller="priorfree")["controller"]) == {"priorfree"}
        assert len(log.list_runs(model="synthetic", limit=2)) == 2
        assert log.list_runs(text="NEEDLE")["prompt"].tolist() == ["A needle in the haystack"]
        assert list(log.list_runs(order_by="n_tokens")["n_tokens"]) == list(range(12, 18))
        with pytest.raises(ValueError, match="order_by must be one of"):
            log.list_runs(order_by="prompt; DROP TABLE runs")
        with pytest.raises(ValueError, match="status must be one of"):
            log.list_runs(status="weird")


def test_compare_two_runs_token_by_token(db):
    a = synthetic_trace(n_layers=4, n_tokens=10, seed=40)
    b = synthetic_trace(n_layers=4, n_tokens=10, seed=40)
    b.routes = b.routes.copy()
    b.routes[:2, 3] = (b.routes[:2, 3] + 1) % 3  # two layers disagree at position 3
    b.tokens = list(b.tokens)
    b.tokens[5] = "changed"
    with RunLog(db) as log:
        ra, rb = stream_run(log, a), stream_run(log, b)
        df = log.compare(ra, rb)
        with pytest.raises(UnknownRun):
            log.compare(ra, "missing")
    assert list(df["pos"]) == list(range(10))
    assert df.loc[3, "agreement"] == pytest.approx(0.5)
    assert (df.drop(index=3)["agreement"] == 1.0).all()
    assert df["same_token"].tolist() == [i != 5 for i in range(10)]
    symbols = "FLW"
    want = "".join(
        symbols[e].lower() if h else symbols[e] for e, h in zip(a.routes[:, 0], a.hedged[:, 0], strict=True)
    )
    assert df.loc[0, "routes_a"] == want
    np.testing.assert_allclose(df["cost_a"], a.cost.mean(0), rtol=1e-6)
    assert df.attrs["agreement"] == pytest.approx(1 - 0.5 / 10)


def test_list_runs_pages_through_what_count_runs_counts(filled):
    """count_runs counts what list_runs lists without a limit (with the same filters), and
    pages of list_runs at growing offsets cover every run once, in order."""
    db, traces = filled
    with RunLog(db, read_only=True) as log:
        assert log.count_runs() == 6
        assert log.count_runs(status="failed") == 1
        assert log.count_runs(controller="priorfree", model="synthetic") == 3
        assert log.count_runs(text="NEEDLE") == 1 and log.count_runs(text="no such words") == 0
        whole = log.list_runs(limit=100)["run_id"].tolist()
        pages = [log.list_runs(limit=4, offset=o)["run_id"].tolist() for o in (0, 4, 8)]
        assert pages[0] + pages[1] == whole and len(pages[1]) == 2 and pages[2] == []
        bayes = log.list_runs(controller="bayes")["run_id"].tolist()
        assert log.list_runs(controller="bayes", limit=2, offset=2)["run_id"].tolist() == bayes[2:]
        with pytest.raises(ValueError, match="status must be one of"):
            log.count_runs(status="weird")


def test_runs_page_counts_the_runs_it_lists_when_one_is_logged_between(filled, monkeypatch):
    """A run logged between the count and the page (here: while the page's start is worked
    out) is in neither: the page and its "of N" come from one snapshot. The next page read
    sees it."""
    from metaattn_viz.store import runlog

    db, _ = filled
    real, logged = runlog.page_start, []

    def start_then_log(offset, total, size):
        if not logged:
            with RunLog(db) as writer:
                tr = synthetic_trace(n_layers=4, n_tokens=5, seed=99)
                logged.append(writer.start_run(tr))
                writer.finish(logged[0], tr, status="done")
        return real(offset, total, size)

    monkeypatch.setattr(runlog, "page_start", start_then_log)
    with RunLog(db) as log:
        runs, start, total = log.runs_page(size=50)
        assert (start, total) == (0, 6) and len(runs) == 6 and logged[0] not in set(runs["run_id"])
        runs, start, total = log.runs_page(size=4, offset=99)  # past the end: the last page
        assert (start, total) == (4, 7) and len(runs) == 3
        with pytest.raises(ValueError, match="order_by must be one of"):
            log.runs_page(size=4, order_by="-nonsense")


def test_compare_counts_only_the_positions_and_layers_both_runs_have(db):
    """A 6-token run against a 10-token run of another model with fewer layers: the
    agreement and the same-token share are over the 6 positions and 2 layers both have,
    and attrs hold the counts behind them (not a mean over 6 positions next to a share of
    10)."""
    a = synthetic_trace(n_layers=5, n_tokens=6, seed=41)
    b = synthetic_trace(n_layers=2, n_tokens=10, seed=42)
    b.model = "another-model"
    b.tokens = list(b.tokens)
    b.tokens[1] = "changed"  # a shared position
    b.tokens[8] = "changed too"  # one only b has: not counted
    with RunLog(db) as log:
        df = log.compare(stream_run(log, a), stream_run(log, b))
    same = int((a.routes[:2] == b.routes[:, :6]).sum())
    assert len(df) == 10 and df["agreement"].isna().tolist() == [False] * 6 + [True] * 4
    assert list(df.columns) == list(store.COMPARE_COLUMNS)
    at = df.attrs
    assert (at["positions"], at["layers"], at["decisions"], at["same_decisions"]) == (6, 2, 12, same)
    assert at["agreement"] == pytest.approx(same / 12)
    assert (at["same_token_positions"], at["same_tokens"]) == (5, pytest.approx(5 / 6))
    np.testing.assert_allclose(df["agreement"][:6], (a.routes[:2] == b.routes[:, :6]).mean(0))


def test_analytics_answer_from_the_routes(filled):
    db, traces = filled
    alltr = list(traces.values())
    with RunLog(db, read_only=True) as log:
        by_layer = log.full_attention_share_by_layer()
        routes = np.concatenate([t.routes for t in alltr], 1)  # [L, sum T]
        np.testing.assert_allclose(by_layer["full_share"], (routes == FULL).mean(1))
        assert list(by_layer["decisions"]) == [routes.shape[1]] * 4
        one = next(iter(traces))
        np.testing.assert_allclose(
            log.full_attention_share_by_layer(one)["full_share"], (traces[one].routes == FULL).mean(1)
        )

        by_budget = log.full_attention_share_by_budget()
        assert len(by_budget) == 4  # 2 controllers x 2 budgets
        sel = [t for t in alltr if t.controller == "bayes" and t.settings.budget == 0.3]
        row = by_budget[(by_budget.controller == "bayes") & (by_budget.budget == 0.3)].iloc[0]
        assert row["runs"] == len(sel)
        assert row["full_share"] == pytest.approx(
            np.concatenate([(t.routes == FULL).ravel() for t in sel]).mean()
        )
        assert row["realized_cost"] == pytest.approx(
            np.concatenate([t.cost.ravel() for t in sel]).mean(), rel=1e-6
        )

        unc = log.uncertainty_vs_budget()
        row = unc[(unc.controller == "bayes") & (unc.budget == 0.3)].iloc[0]
        assert row["mean_uncertainty"] == pytest.approx(
            np.concatenate([t.uncertainty("total").ravel() for t in sel]).mean(), rel=1e-5
        )

        top = log.tokens_most_often_full(limit=5, min_occurrences=3)
        shares = {}
        for t in alltr:
            share = (t.routes == FULL).mean(0)
            for text, s in zip(t.tokens, share, strict=True):
                shares.setdefault(text, []).append(s)
        want = sorted(
            ((np.mean(v), len(v), k) for k, v in shares.items() if len(v) >= 3),
            key=lambda x: (-x[0], -x[1], x[2]),
        )[:5]
        assert top["token"].tolist() == [k for _, _, k in want]
        np.testing.assert_allclose(top["full_share"], [s for s, _, _ in want])

        per_day = log.runs_over_time("day")
        assert per_day["runs"].tolist() == [2, 2, 2]
        assert per_day["failed"].tolist() == [0, 0, 1]
        with pytest.raises(ValueError, match="every must be one of"):
            log.runs_over_time("fortnight")


# -- export -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_export_round_trip(filled, tmp_path, fmt):
    db, traces = filled
    out = tmp_path / "export"
    counts = store.export(db, out, fmt)
    n_routes = sum(t.n_layers * t.n_tokens for t in traces.values())
    assert counts == {
        "runs": 6,
        "tokens": sum(t.n_tokens for t in traces.values()),
        "routes": n_routes,
        "experts": 3,
    }
    days = sorted(p.name for p in (out / "routes").iterdir())
    assert days == ["day=2026-01-01", "day=2026-01-02", "day=2026-01-03"]
    reader = "read_parquet" if fmt == "parquet" else "read_csv"
    with duckdb.connect() as con:
        con.execute(f"ATTACH '{db}' AS log (READ_ONLY)")
        for table in ("runs", "tokens", "routes"):
            files = f"'{out / table}/**/*.{fmt}'"
            options = "hive_partitioning = true" + (
                ", allow_quoted_nulls = false" if fmt == "csv" else ""
            )  # "" is not NULL
            exported = f"{reader}({files}, {options})"
            if fmt == "parquet":  # Parquet keeps the types

                def columns(sql):
                    return [r[:2] for r in con.execute(f"DESCRIBE {sql}").fetchall()]

                assert columns(f"SELECT * EXCLUDE (day) FROM {exported}") == columns(f"log.{table}")
            # read back into a table typed like the log's (CSV carries no types)
            con.execute(f"CREATE TABLE {table} AS SELECT * FROM log.{table} LIMIT 0")
            con.execute(f"INSERT INTO {table} BY NAME SELECT * EXCLUDE (day) FROM {exported}")
            for a, b in ((table, f"log.{table}"), (f"log.{table}", table)):
                assert (
                    con.execute(f"SELECT count(*) FROM (FROM {a} EXCEPT ALL FROM {b})").fetchone()[0] == 0
                ), table
        assert (
            con.execute(
                f"SELECT count(DISTINCT day) FROM {reader}('{out}/runs/**/*.{fmt}', hive_partitioning = true)"
            ).fetchone()[0]
            == 3
        )
    with pytest.raises(ValueError, match="already exists"):
        store.export(db, out, fmt)


def test_export_cli(filled, tmp_path, capsys):
    from metaattn_viz.cli import main

    db, _ = filled
    assert main(["export", "--db", str(db), "--out", str(tmp_path / "x")]) == 0
    assert "exported 6 runs" in capsys.readouterr().out
    assert (tmp_path / "x" / "experts.parquet").exists()
    assert main(["export", "--db", str(tmp_path / "none.duckdb"), "--out", str(tmp_path / "y")]) == 2
    assert "no routing log at" in capsys.readouterr().err


def _small_files_only():
    """In the child before it runs: no file may grow past 4 KB (a full disk, for a COPY),
    with the signal that would kill it for trying ignored, so the write fails instead."""
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))


@pytest.mark.parametrize("name", ["out", 'the "out" folder'])
def test_an_export_that_cannot_write_says_so_and_not_that_the_log_is_damaged(filled, tmp_path, name):
    """A COPY failing on a full disk is the export's problem: the log is fine, and telling
    the user to restore it from a copy could lose their runs (a folder whose name holds a
    quote, where DuckDB's quotes end early, too)."""
    db, _ = filled
    out = tmp_path / name
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "metaattn_viz",
            "export",
            "--db",
            str(db),
            "--out",
            str(out),
            "--format",
            "csv",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=_small_files_only,
    )
    assert done.returncode == 2, done.stderr
    err = done.stderr.strip().splitlines()[-1]
    assert err.startswith(f"metaattn-viz export: error: --out {out}: the export could not be written (")
    assert "File too large" in err and "the routing log is unchanged" in err
    assert "damaged" not in err and "Restore" not in err
    assert not out.exists()  # nothing of it was kept
    assert store.export(db, tmp_path / "again", "csv")["runs"] == 6  # the log reads as before


def test_only_an_error_quoting_a_file_under_the_export_folder_is_the_exports(tmp_path):
    """A read error of the log stays "damaged" even when the export goes into the log's own
    folder (or a folder whose name starts like it): the file DuckDB quotes decides."""
    from metaattn_viz.store.exporting import _about

    log_file = tmp_path / "data" / "routing.duckdb"
    out = tmp_path / "data"
    read = Exception(f'Could not read from file "{log_file}": Input/output error')
    assert not _about(read, out, log_file)  # the log quoted: its own failure
    assert not _about(Exception("IO Error: something. else"), Path("."), log_file)  # no file quoted
    wrote = Exception(f'Could not write file "{tmp_path}/database/runs/x.csv": No space left on device')
    assert not _about(wrote, tmp_path / "data", log_file)  # "data" is a prefix of "database": not under it
    assert _about(wrote, tmp_path / "database", log_file)
    nested = Exception(  # DuckDB's async writer wraps the reason in JSON
        'IO Error: Async write failed: {"exception_type":"IO","exception_message":"Could not write '
        f'file \\"{out}/tokens/data_0.csv\\": File too large","errno":"27"}}'
    )
    assert _about(nested, out, log_file)


def test_an_error_naming_an_export_file_is_the_exports_whatever_the_folder_is_called(tmp_path):
    """Which file DuckDB names decides, found as the paths themselves: a quote in the
    folder's name (which ended what the quoted-path pattern took), a relative --out (named
    as given), a folder named after the log, or a log inside the folder."""
    from metaattn_viz.store.exporting import _about

    log_file = tmp_path / "routing.duckdb"

    def wrote(path) -> Exception:
        return Exception(f'Could not write file "{path}": No space left on device')

    quoted = tmp_path / 'say "hi"'
    assert _about(wrote(quoted / "routes" / "day=2024-01-01" / "data_0.csv"), quoted, log_file)
    assert _about(wrote(quoted / "experts.csv"), quoted, log_file)
    assert _about(wrote("tokens/day=2024-01-01/data_0.csv"), Path("."), log_file)
    after_log = tmp_path / "routing.duckdb.export"
    assert _about(wrote(after_log / "runs" / "data_0.parquet"), after_log, log_file)
    read = Exception(f'Could not read from file "{log_file}": Input/output error')
    assert not _about(read, tmp_path, log_file)  # the log, inside the export folder
    assert not _about(read, quoted, log_file)
    corrupt = Exception("Corrupt database file: computed checksum 1 does not match stored checksum 2")
    assert not _about(corrupt, quoted, log_file)  # no file named: the log's


def test_export_from_an_open_log_in_this_process(db, tmp_path):
    with RunLog(db) as log:
        stream_run(log, synthetic_trace(n_layers=2, n_tokens=4))
        assert log.export(tmp_path / "live")["routes"] == 8


def test_how_a_run_was_generated_survives_the_log(db):
    """Schema 6 keeps a trace's `generation`; a run without one (a bare text, or logged
    before) replays with None."""
    made = synthetic_trace(n_layers=2, n_tokens=8, seed=1)
    made.generation = {
        "max_new_tokens": 5,
        "temperature": 0.0,
        "top_p": 0.95,
        "seed": 2**63 - 1,
        "chat": True,
    }
    bare = synthetic_trace(n_layers=2, n_tokens=8, seed=2)
    with RunLog(db) as log:
        ids = [stream_run(log, t) for t in (made, bare)]
        assert log.load_trace(ids[0]).generation == made.generation
        assert log.load_trace(ids[1]).generation is None
        row = (
            log.fresh_cursor()
            .execute(
                "SELECT max_new_tokens, temperature, top_p, seed, chat FROM runs WHERE run_id = $r",
                {"r": ids[0]},
            )
            .fetchall()
        )
    assert row == [(5, 0.0, 0.95, 2**63 - 1, True)]
