"""A routing log damaged in place: a block of the database file overwritten (a disk error,
a stray write) fails DuckDB's checksum when a read first reaches it, as a bare
duckdb.Error ("Corrupt database file: computed checksum ... does not match"). Every read,
an export and the CLI say the file may be damaged (StoreUnavailable), never DuckDB's
exception or a traceback; the file is left as it was. (test_store.py covers a log cut short.)"""

from __future__ import annotations

import hashlib

import pytest
from helpers import synthetic_trace

from metaattn_viz import store
from metaattn_viz.store import RunLog, StoreUnavailable

HEADERS = 3 * 4096  # DuckDB's file header and its two database headers
BLOCK = 262144  # DuckDB's block size; each block starts with its checksum


def garbled(data: bytes, block: int) -> bytes:
    """`data` with 64 bytes inside `block` flipped (its checksum no longer matches)."""
    start = HEADERS + block * BLOCK + 200
    return data[:start] + bytes(b ^ 0xFF for b in data[start : start + 64]) + data[start + 64 :]


def read_everything(log: RunLog) -> None:
    for run_id in log.list_runs()["run_id"]:
        log.load_trace(run_id)
    log.count_runs()
    log.full_attention_share_by_layer()


@pytest.fixture(scope="module")
def logged(tmp_path_factory) -> bytes:
    """The bytes of a log of three runs, several blocks long."""
    path = tmp_path_factory.mktemp("logged") / "routing.duckdb"
    with RunLog(path) as log:
        for seed in range(3):
            trace = synthetic_trace(n_layers=3, n_tokens=40, seed=seed)
            log.finish(log.start_run(trace), trace)
    return path.read_bytes()


def test_a_block_that_fails_its_checksum_is_reported_as_damage_by_every_read(logged, tmp_path):
    blocks = (len(logged) - HEADERS) // BLOCK
    assert blocks >= 4
    found_by_a_read = []
    for block in range(blocks):
        path = tmp_path / f"block{block}.duckdb"
        path.write_bytes(garbled(logged, block))
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        try:
            log = RunLog(path, read_only=True)
        except StoreUnavailable as exc:  # a block the open reads (the catalog)
            assert str(path) in str(exc) and "--db" in str(exc)
            continue
        try:
            with log:
                read_everything(log)
        except StoreUnavailable as exc:  # was: duckdb.Error, raised as it came
            msg = str(exc)
            assert msg.startswith(f"routing log {path} could not be read (Error: Corrupt database file")
            assert "the file may be damaged" in msg and "--db" in msg
            found_by_a_read.append(block)
            out = tmp_path / f"export{block}"
            with pytest.raises(StoreUnavailable, match="could not be read .* the file may be damaged"):
                store.export(path, out, "csv")
            assert not out.exists()  # nothing of it kept
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest
    assert found_by_a_read, "no garbled block was found by a read (only by the open, or never)"


def test_export_of_a_log_with_a_garbled_block_is_a_one_line_error(logged, tmp_path, capsys):
    """`metaattn-viz export` printed DuckDB's traceback and exited 1."""
    from metaattn_viz.cli import main

    blocks = (len(logged) - HEADERS) // BLOCK
    for block in range(blocks):
        path = tmp_path / f"block{block}.duckdb"
        path.write_bytes(garbled(logged, block))
        try:
            with RunLog(path, read_only=True) as log:
                read_everything(log)
        except StoreUnavailable as exc:
            if "Corrupt database file" in str(exc) and "could not be read" in str(exc):
                break
    else:
        pytest.fail("no garbled block was found by a read")
    capsys.readouterr()
    out = tmp_path / "export"
    assert main(["export", "--db", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert err.startswith(f"metaattn-viz export: error: routing log {path} could not be read")
    assert not out.exists()
