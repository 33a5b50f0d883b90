"""A public server keeps its visitors apart (issue 13), tested as visitors reach it: two
gradio_client clients (two sessions) against `serve(public=True)` in a subprocess (the
real model, 127.0.0.1, a temporary routing log).

- A generates; B sees none of A's runs through /sql (not even by id, not in tokens or
  routes), /runs (History's table) or /export; A sees its own everywhere.
- With the operator's shared log (METAATTN_SHARED_LOG=1), B sees A's run, and the queue's
  limit answers a flood with Gradio's "queue is full" instead of queueing without end.
- Hostile SQL through the running server: a 2 GB string and a 10^10-row cross join are
  refused or stopped within the console's time limit plus one second, and the server keeps
  answering.
"""

from __future__ import annotations

import time
import zipfile

import pytest
from helpers import PROMPT, AppServer

from metaattn_viz.app.history import SQL_TIMEOUT_S

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def public_server(tmp_path_factory):
    with AppServer(tmp_path_factory.mktemp("app-public"), public=True) as srv:
        yield srv


def _generate(client, prompt: str = PROMPT, n: int = 2) -> dict:
    return client.predict(prompt=prompt, max_new_tokens=n, budget=0.5, chat=False, api_name="/generate")


def _sql(client, query: str) -> list[dict]:
    out = client.predict(query=query, api_name="/sql")
    return [dict(zip(out["columns"], row, strict=True)) for row in out["rows"]]


def _listed(client) -> list[str]:
    out = client.predict(api_name="/runs")
    return [row[out["columns"].index("run_id")] for row in out["rows"]]


def _exported(client) -> str:
    """Every runs/*.csv of the client's export, concatenated."""
    path = client.predict(fmt="csv", api_name="/export")
    with zipfile.ZipFile(path) as zf:
        return "".join(zf.read(n).decode() for n in zf.namelist() if n.startswith("runs/"))


def test_two_clients_of_a_public_server_see_only_their_own_runs(public_server):
    a, b = public_server.client(), public_server.client()
    status = a.predict(api_name="/status")
    assert status["public"] is True and status["runs_visible_to"] == "owner"
    assert status["queue_max_size"]  # a public server has a bounded queue

    run = _generate(a)["run_id"]
    assert run
    # A sees its own run everywhere
    assert [r["run_id"] for r in _sql(a, "SELECT run_id FROM runs")] == [run]
    assert _listed(a) == [run]
    assert run in _exported(a)
    # B sees nothing of it: not by id, not through the token or route tables
    assert _sql(b, "SELECT run_id FROM runs") == []
    assert _sql(b, f"SELECT * FROM runs WHERE run_id = '{run}'") == []
    counts = _sql(b, "SELECT (SELECT count(*) FROM tokens) AS t, (SELECT count(*) FROM routes) AS r")
    assert counts == [{"t": 0, "r": 0}]
    assert _listed(b) == []
    assert run not in _exported(b)
    # B's own run is B's alone
    run_b = _generate(b, "Another visitor's prompt.")["run_id"]
    assert _listed(b) == [run_b] and _listed(a) == [run]
    assert public_server.alive()


def test_hostile_queries_are_stopped_in_time_and_the_server_keeps_answering(public_server):
    from gradio_client.exceptions import AppError

    client = public_server.client()
    hostile = [
        "SELECT repeat('a', 2000000000)",
        "SELECT count(*) FROM range(100000) a, range(100000) b WHERE a.range + b.range = -1",
    ]
    stopped = f"stopped: the query ran past the {SQL_TIMEOUT_S:g} s time limit"
    for query in hostile:
        t0 = time.monotonic()
        with pytest.raises(AppError) as err:
            _sql(client, query)
        took = time.monotonic() - t0
        assert took < 10 * SQL_TIMEOUT_S, (query, took, str(err.value))  # a hang, not a slow stop
        said = str(err.value)  # stopped at the time limit, or refused for the memory cap
        assert stopped in said or "more memory than the console allows" in said, said
        assert "Traceback" not in str(err.value)
        assert public_server.alive()
        assert _sql(client, "SELECT 41 + 1 AS answer") == [{"answer": 42}]
    assert public_server.status()["model_ready"]


def test_a_shared_log_shows_every_run_and_a_full_queue_says_busy(tmp_path):
    from gradio_client.exceptions import AppError
    from gradio_client.utils import QueueError

    env = {"METAATTN_SHARED_LOG": "1", "METAATTN_QUEUE_SIZE": "1"}
    with AppServer(tmp_path, public=True, env=env) as srv:
        a, b = srv.client(), srv.client()
        assert a.predict(api_name="/status")["runs_visible_to"] == "everyone"
        run = _generate(a)["run_id"]
        assert [r["run_id"] for r in _sql(b, "SELECT run_id FROM runs")] == [run]
        assert _listed(b) == [run] and run in _exported(b)

        # two generations run (the public model limit), one waits (queue size 1): the
        # next is refused at once with "Queue is full! Please try again."
        long = dict(prompt="Chapter one. It was a long and quiet winter, and", max_new_tokens=96)
        jobs = [srv.client().submit(**long, chat=False, api_name="/generate") for _ in range(3)]
        deadline = time.monotonic() + 60
        refused = None
        while refused is None and time.monotonic() < deadline:
            time.sleep(1.0)
            try:
                srv.client().predict(prompt="One more.", max_new_tokens=1, api_name="/generate")
            except (QueueError, AppError) as exc:
                refused = exc
            if all(j.done() for j in jobs):
                break
        assert refused is not None, "the queue never filled"
        assert "Queue is full" in str(refused) and "try again" in str(refused)
        for job in jobs:
            job.result(timeout=300)
        assert srv.alive() and srv.status()["model_ready"]
