"""The app's named API endpoints against a real server (`python -m metaattn_viz serve`,
subprocess, 127.0.0.1, free port, temporary routing log), driven by the official
gradio_client: generate and re-route match `route --json` for the same settings;
`/generate` with only a prompt takes the page's defaults (chat template) and generates;
one run's rows and a figure's page export; four clients at once all finish and are logged
completely; bad input gets a clear message and the server keeps serving; a cancelled
call or a dropped connection stops its generation; SIGTERM logs the run in flight as
interrupted. `AppServer` is
shared with test_app_browser.py."""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from helpers import PROMPT, ROOT, AppServer, base_env


def route_json(prompt: str, *args: str, tmp: Path) -> dict:
    """`metaattn-viz route --json --no-log` in a subprocess."""
    out = subprocess.run(
        [sys.executable, "-m", "metaattn_viz", "route", "--prompt", prompt, "--json", "--no-log", *args],
        cwd=ROOT,
        env=base_env(tmp),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with AppServer(tmp_path_factory.mktemp("app-api")) as srv:
        yield srv


@pytest.fixture(scope="module")
def cli_trace(tmp_path_factory):
    """The CLI's trace for PROMPT at budget 0.3, greedy, 8 new tokens (started early, in a
    thread, so it loads the model while the server starts)."""
    tmp = tmp_path_factory.mktemp("cli")
    pool = cf.ThreadPoolExecutor(1)
    fut = pool.submit(route_json, PROMPT, "--budget", "0.3", "--max-new-tokens", "8", tmp=tmp)
    yield fut
    pool.shutdown(wait=True)


def _ask(client, api_name: str, **kw):
    return client.predict(api_name=api_name, **kw)


@pytest.mark.slow
def test_generate_and_reroute_match_the_cli(cli_trace, server):
    client = server.client()
    gen = _ask(
        client,
        "/generate",
        prompt=PROMPT,
        budget=0.3,
        max_new_tokens=8,
        temperature=0.0,
        chat=False,
        quality=True,
    )
    cli = cli_trace.result(timeout=300)
    for key in (
        "tokens",
        "token_ids",
        "n_prompt_tokens",
        "routes",
        "hedged",
        "experts",
        "costs",
        "controller",
        "budget",
        "model",
    ):
        assert gen[key] == cli[key], key
    assert gen["realized_cost"] == pytest.approx(cli["realized_cost"], abs=1e-6)
    assert gen["attention_flops_ratio"] == pytest.approx(cli["attention_flops_ratio"], rel=1e-9)
    assert len(gen["kl_to_dense"]) == len(gen["tokens"])
    assert all(k >= -1e-4 for k in gen["kl_to_dense"])
    assert gen["run_id"]  # logged

    # Re-route the prompt (routed at 0.5 first) to 0.3: one prefill of the same ids, which
    # is what the CLI's stream did for the prompt positions.
    prompt_only = _ask(client, "/generate", prompt=PROMPT, budget=0.5, max_new_tokens=0, chat=False)
    n = cli["n_prompt_tokens"]
    assert prompt_only["token_ids"] == cli["token_ids"][:n]
    again = _ask(client, "/reroute", trace=prompt_only, budget=0.3, quality=True)
    assert again["token_ids"] == prompt_only["token_ids"]
    assert again["routes"] == [row[:n] for row in cli["routes"]]
    assert again["budget"] == 0.3 and prompt_only["budget"] == 0.5
    assert again["routes"] != prompt_only["routes"]
    assert again["realized_cost"] < prompt_only["realized_cost"]
    assert again["kl_to_dense"] is not None and len(again["kl_to_dense"]) == n


@pytest.mark.slow
def test_generate_with_only_a_prompt_generates_and_its_run_exports(server):
    from metaattn_viz.app.requests import GENERATION

    client = server.client()
    out = _ask(client, "/generate", prompt="What is the capital of France?")
    # the page's defaults: the chat template (the instruct model answers), the quality meter
    assert GENERATION.chat
    assert len(out["tokens"]) > out["n_prompt_tokens"], out["notes"]
    assert out["output_text"].strip()
    assert out["kl_to_dense"] is not None and len(out["kl_to_dense"]) == len(out["tokens"])
    assert not any("end-of-text" in n for n in out["notes"])
    # that run's rows, and only that run's, as CSV
    import pandas as pd

    with zipfile.ZipFile(_ask(client, "/export", fmt="csv", run_id=out["run_id"])) as zf:
        tables = {
            t: pd.concat([pd.read_csv(zf.open(n)) for n in zf.namelist() if n.startswith(t + "/")])
            for t in ("runs", "tokens")
        }
    assert tables["runs"]["run_id"].tolist() == [out["run_id"]]
    assert len(tables["tokens"]) == len(out["tokens"])
    page = Path(_ask(client, "/figure", trace=out, measure="vacuity")).read_text(encoding="utf-8")
    assert "vacuity" in page and "<script src=" not in page  # plotly.js inlined


@pytest.mark.slow
def test_bad_input_gets_a_clear_message_and_the_server_keeps_serving(server):
    from gradio_client.exceptions import AppError

    client = server.client()
    cases = [
        (dict(prompt=""), "prompt is empty"),
        (dict(prompt="   \n\t "), "prompt is empty"),
        (dict(prompt="a" * 100_000), "at most 16,000"),
        (dict(prompt="hi", budget=5.0), "Budget must be between 0.15 and 1"),
        (dict(prompt="hi", budget=0.05), "Budget must be between 0.15 and 1"),
        (dict(prompt="hi", window=0), "Local window must be between"),
        (dict(prompt="hi", max_new_tokens=100_000), "Max new tokens must be"),
        (dict(prompt="hi", temperature=-1.0), "Temperature must be"),
        (dict(prompt="hi", controller="oracle"), "Controller must be one of"),
        (dict(prompt="hi", hedge_policy="always"), "Hedge policy must be one of"),
        (dict(prompt="hi", chat="maybe"), "Chat template must be true or false"),
    ]
    for kw, message in cases:
        with pytest.raises(AppError) as err:
            _ask(client, "/generate", **kw)
        assert message in str(err.value), (kw, str(err.value))
        assert "Traceback" not in str(err.value)
    with pytest.raises(AppError, match="Expected a trace"):
        _ask(client, "/reroute", trace={"routes": []}, budget=0.5)
    with pytest.raises(AppError, match="token_ids must be"):
        _ask(client, "/reroute", trace={"token_ids": [-1, 10**9]}, budget=0.5)
    with pytest.raises(AppError, match="refused|not allowed|read-only|only"):
        _ask(client, "/sql", query="DELETE FROM runs")
    with pytest.raises(AppError, match="max_rows must be between 1 and"):
        _ask(client, "/sql", query="SELECT 1", max_rows=0)
    # text where text is expected: a number or a list is refused by name, not an AttributeError
    for endpoint, kw, name in (
        ("/sql", dict(query=123), "query"),
        ("/runs", dict(text=5), "text"),
        ("/runs", dict(order_by=[1]), "order_by"),
        ("/export", dict(run_id=7), "run_id"),
    ):
        with pytest.raises(AppError, match=f"{name} must be text"):
            _ask(client, endpoint, **kw)
    # /runs' filters name their choices in words, and an unknown one is refused, not empty
    for kw, message in (
        (dict(controller="bayesian"), "controller must be one of bayes, priorfree, got 'bayesian'"),
        (dict(status="ok"), "status must be one of running, done, interrupted, failed, stopped"),
        (dict(order_by="-when"), "order_by must be one of created_at, finished_at, n_tokens"),
    ):
        with pytest.raises(AppError) as err:
            _ask(client, "/runs", **kw)
        assert message in str(err.value), err.value

    # a flag sent as text means what it says; a budget out of reach is said, as on the page
    out = _ask(
        client, "/generate", prompt="Hi there", chat="false", max_new_tokens=1, budget=0.2, cost_model="flops"
    )
    assert out["n_prompt_tokens"] == 2  # no chat template around the prompt
    assert any("out of reach" in n for n in out["notes"]), out["notes"]

    # control characters are removed (and said so); mixed scripts and emoji pass through
    mixed = "Le chat\x00 dort\x07. 猫が寝ている。Кошка спит. \U0001f408 مرحبا"
    out = _ask(client, "/generate", prompt=mixed, max_new_tokens=2, budget=0.4)
    assert any("control character" in n for n in out["notes"])
    assert out["prompt"] == mixed.replace("\x00", "").replace("\x07", "")
    assert out["n_prompt_tokens"] > 10 and len(out["routes"][0]) == len(out["tokens"])
    assert server.alive()
    assert server.status()["model_ready"]


@pytest.mark.slow
def test_four_clients_at_once_all_finish_and_are_logged_completely(server):
    prompts = [f"Write one sentence about the number {i}." for i in range(4)]

    def one(prompt):
        return _ask(
            server.client(),
            "/generate",
            prompt=prompt,
            max_new_tokens=6,
            budget=0.5,
            chat=True,
            quality=False,
        )

    with cf.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(one, prompts))
    ids = [r["run_id"] for r in results]
    assert all(ids) and len(set(ids)) == 4
    for r in results:
        assert len(r["tokens"]) > r["n_prompt_tokens"]
        assert len(r["routes"]) == 30 and all(len(row) == len(r["tokens"]) for row in r["routes"])

    quoted = ", ".join(f"'{i}'" for i in ids)
    q = _ask(
        server.client(),
        "/sql",
        query=f"""
        SELECT r.run_id, r.status, r.kind, r.n_tokens, r.n_layers,
               (SELECT count(*) FROM tokens t WHERE t.run_id = r.run_id) AS token_rows,
               (SELECT count(*) FROM routes d WHERE d.run_id = r.run_id) AS route_rows
        FROM runs r WHERE r.run_id IN ({quoted})""",
    )
    rows = [dict(zip(q["columns"], row, strict=True)) for row in q["rows"]]
    assert len(rows) == 4
    by_id = {r["run_id"]: r for r in rows}
    for res in results:
        row = by_id[res["run_id"]]
        assert row["status"] == "done" and row["kind"] == "generate"
        assert row["n_tokens"] == len(res["tokens"]) == row["token_rows"]
        assert row["route_rows"] == row["n_layers"] * row["n_tokens"]
    assert server.alive()


@pytest.mark.slow
def test_a_cancelled_generate_stops_its_generation(server):
    """A client that cancels /generate ends the generation with it (logged "stopped"),
    instead of leaving it running to max_new_tokens outside the queue's limits."""
    client = server.client()
    job = client.submit(
        prompt="Write a long story about a dragon.",
        max_new_tokens=256,
        chat=True,
        quality=False,
        api_name="/generate",
    )
    run_id = _wait_for_a_running_run(client, since=_run_ids(client))
    job.cancel()
    deadline = time.time() + 60
    while time.time() < deadline:
        row = _run_row(client, run_id)
        if row["status"] != "running":
            break
        time.sleep(0.5)
    assert row["status"] == "stopped", row
    assert row["n_tokens"] < row["n_prompt_tokens"] + 256
    assert server.alive()


@pytest.mark.slow
def test_a_dropped_generate_connection_stops_its_generation(server):
    """A client whose event stream closes mid-call (a killed script, a lost network) ends
    the generation with it: Gradio only marks such an event not alive, and /generate looks."""
    import socket

    import httpx

    client = server.client()
    before = _run_ids(client)
    data = ["Write a long story about a dragon.", 0.5, 256, "bayes", 0.0, 1.0, 0, True]
    data += ["global", "off", 0.5, 64, 4, False, "", "total", "notional"]  # every input, in order
    event = httpx.post(server.url + "gradio_api/call/generate", json={"data": data}, timeout=30)
    event_id = event.json()["event_id"]
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # the event stream, raw
        sock.sendall(f"GET /gradio_api/call/generate/{event_id} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        run_id = _wait_for_a_running_run(client, since=before)
    deadline = time.time() + 60
    while time.time() < deadline and (row := _run_row(client, run_id))["status"] == "running":
        time.sleep(0.5)
    assert row["status"] == "stopped", row
    assert row["n_tokens"] < row["n_prompt_tokens"] + 256


def test_a_direct_post_cannot_skip_the_queue(server):
    """Gradio's direct route (POST /gradio_api/run/<name>) ran every call at once, past the
    queue's limits (five generations together on a public server that allows two): it is
    closed, as it is on a Space; clients join the queue (gradio_client does)."""
    import httpx

    data = ["The cat", 0.5, 1, "bayes", 0.0, 1.0, 0, False]
    data += ["global", "off", 0.5, 64, 4, False, "", "total", "notional"]  # every input, in order
    answer = httpx.post(server.url + "gradio_api/run/generate", json={"data": data}, timeout=30)
    assert answer.status_code == 404, answer.text[:300]
    assert "join the queue" in answer.text


@pytest.mark.slow
def test_sigterm_ends_the_run_in_flight_as_interrupted(tmp_path):
    """SIGTERM (a Space or container stopping) closes the server as Ctrl-C does: the run in
    flight is logged "interrupted" with its tokens by the server itself, not left running
    for the next open to find."""
    import duckdb

    with AppServer(tmp_path) as srv:
        client = srv.client()
        client.submit(prompt="Write a long story about a dragon.", max_new_tokens=256, api_name="/generate")
        run_id = _wait_for_a_running_run(client, since=set())
        srv.proc.send_signal(signal.SIGTERM)
        code = srv.proc.wait(60)
        log = srv.log_tail()
    assert code == 128 + signal.SIGTERM, log  # as a shell reports a command SIGTERM ended
    with duckdb.connect(str(srv.db), read_only=True) as con:  # read-only: nothing recovers runs
        status, n_tokens, n_prompt = con.execute(
            "SELECT status, n_tokens, n_prompt_tokens FROM runs WHERE run_id = ?", [run_id]
        ).fetchone()
    assert status == "interrupted" and n_tokens > n_prompt, log
    assert "terminate called" not in log and "Traceback" not in log, log
    assert "nanobind: leaked" not in log, log


@pytest.mark.slow
def test_ctrl_c_ends_the_server_as_it_ends_every_command(tmp_path):
    """Ctrl-C (SIGINT) ends `serve` with `interrupted` and exit 130, as every other command
    (Gradio's wait loop takes the KeyboardInterrupt and returned: serve exited 0)."""
    with AppServer(tmp_path) as srv:
        srv.proc.send_signal(signal.SIGINT)
        code = srv.proc.wait(60)
        log = srv.log_tail()
    assert code == 130 and "interrupted" in log.splitlines(), log
    assert "Traceback" not in log, log
    # the routing log's connection closed and dropped: none alive at the interpreter's end
    assert "nanobind: leaked" not in log, log


def test_a_stop_signal_stops_the_generations_before_gradio_closes():
    """SIGTERM/SIGINT tell the generations to stop at once, then end Gradio's wait loop:
    stopped only in `serve`'s finally, after Gradio's close waited up to 5 s on the open
    streams, a generation decoded on for those seconds."""
    import threading
    from types import SimpleNamespace

    from metaattn_viz.app import server

    calls, lock, done = [], threading.Lock(), threading.Event()

    def stop_all(wait=10.0):
        with lock:  # as Generations.stop_all takes its lock
            calls.append(wait)
        done.set()

    signals: list[int] = []
    handler = server.stop_handler(SimpleNamespace(generations=SimpleNamespace(stop_all=stop_all)), signals)
    with lock:  # the main thread inside stop_all already (a second Ctrl-C while closing)
        with pytest.raises(KeyboardInterrupt):
            handler(signal.SIGTERM, None)  # returns: it does not wait on the lock
    assert done.wait(5) and calls == [0.0]  # told at once, not waited for
    assert signals == [signal.SIGTERM]  # serve returns it: the CLI exits 143


def _run_ids(client) -> set[str]:
    q = _ask(client, "/sql", query="SELECT run_id FROM runs")
    return {row[0] for row in q["rows"]}


def _wait_for_a_running_run(client, since: set[str], timeout: float = 120) -> str:
    """The id of a run not in `since` once it is logged running with a generated token."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        q = _ask(
            client,
            "/sql",
            query="SELECT run_id FROM runs WHERE status = 'running' AND n_tokens > n_prompt_tokens",
        )
        new = [row[0] for row in q["rows"] if row[0] not in since]
        if new:
            return new[0]
        time.sleep(0.3)
    raise AssertionError("no run started")


def _run_row(client, run_id: str) -> dict:
    q = _ask(
        client, "/sql", query=f"SELECT status, n_tokens, n_prompt_tokens FROM runs WHERE run_id = '{run_id}'"
    )
    return dict(zip(q["columns"], q["rows"][0], strict=True))
