"""routing/lambda_table.py: the global scope's calibrated lambda stands in for the pilot pass
of the texts it covers (lengths within its rows, same settings, a budget in its grid), and
nothing else; it is made from the lambdas the search settles at and ignored beside other
weights."""

import json
import logging
import math

import numpy as np
import pytest
import torch
from helpers import routed_tiny

import metaattn_viz.routing.prefill as prefill_mod
from metaattn_viz.cli import main
from metaattn_viz.core.settings import RoutingSettings
from metaattn_viz.routing import lambda_table
from metaattn_viz.routing.lambda_table import LambdaTable, matched


def random_ids(n, seed=0, vocab=250):
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def _table(settings, budgets=(0.2, 0.4), lengths=(1024, 4096), lambdas=((2.0, 1.0), (3.0, 1.0)), hash_="abc"):
    return LambdaTable(hash_, matched(settings), budgets, lengths, lambdas, {"texts": 2})


def test_lookup_interpolates_in_budget_and_log_length_for_its_settings_and_lengths_only():
    s = RoutingSettings(budget=0.3, linear_map="elu")
    t = _table(s)
    assert t.lookup(s, 4096) == pytest.approx(2.0)  # halfway between 3 and 1
    assert t.lookup(s, 1024) == pytest.approx(1.5)  # the shorter row: halfway between 2 and 1
    assert t.lookup(s, 2048) == pytest.approx(1.75)  # halfway in log length
    assert t.lookup(s, 1500) == pytest.approx(1.5 + 0.5 * math.log(1500 / 1024) / math.log(4))
    assert t.lookup(s, 8191) == pytest.approx(2.0)  # past the longest row: that row's
    assert t.lookup(s, 8192) is None  # the cost drifts along a long text: twice the longest, no more
    assert t.lookup(s, 1023) is None  # shorter than the shortest row
    assert t.lookup(s.with_(budget=0.2), 4096) == pytest.approx(3.0)
    assert t.lookup(s.with_(budget=0.4), 4096) == pytest.approx(1.0)
    assert t.lookup(s.with_(budget=0.5), 4096) is None  # outside the grid
    assert t.lookup(s.with_(budget=None), 4096) is None
    assert t.lookup(s.with_(hedge_policy="soft"), 4096) is None  # a setting that moves lambda
    assert t.lookup(s.with_(linear_map="learned"), 4096) is None
    # every other setting that moves the lambda the search settles at
    for other in (
        dict(window=32),
        dict(n_sink=2),
        dict(cost_model="flops"),
        dict(hedge_threshold=0.5),
        dict(hedge_min_weight=0.2),
        dict(hedge_measure="epistemic"),
    ):
        assert t.lookup(s.with_(**other), 4096) is None, other
    assert t.lookup(s.with_(dual_step=3.0, backend="reference"), 4096) == pytest.approx(2.0)
    one = _table(s, lengths=(512,), lambdas=((2.0, 1.0),))
    assert one.lookup(s, 700) == pytest.approx(1.5) and one.lookup(s, 1024) is None


def test_a_table_round_trips_through_json_and_refuses_a_malformed_grid():
    s = RoutingSettings(linear_map="elu")
    t = _table(s, budgets=(0.2, 0.3, 0.5), lambdas=((3.0, 2.0, 1.0), (4.0, 2.5, 1.5)))
    assert LambdaTable.from_json(t.to_json()) == t
    with pytest.raises(ValueError, match="budgets must increase"):
        _table(s, budgets=(0.4, 0.2))
    with pytest.raises(ValueError, match="lengths must increase"):
        _table(s, lengths=(4096, 1024))
    with pytest.raises(ValueError, match="one lambda per budget"):
        _table(s, lambdas=((1.0,), (2.0, 1.0)))
    with pytest.raises(ValueError, match="one row per length"):
        _table(s, lambdas=((2.0, 1.0),))
    with pytest.raises(ValueError, match="at least one"):
        _table(s, lengths=(), lambdas=())
    with pytest.raises(ValueError, match="positive"):
        _table(s, lengths=(0, 4))


def test_load_ignores_a_table_for_other_weights_or_an_unreadable_one(tmp_path, caplog):
    assert lambda_table.load(tmp_path, "abc") is None  # none there
    t = _table(RoutingSettings(linear_map="elu"))
    (tmp_path / lambda_table.FILE).write_text(t.to_json())
    assert lambda_table.load(tmp_path, "abc") == t
    with caplog.at_level(logging.WARNING):
        assert lambda_table.load(tmp_path, "other") is None
        assert "made for controller abc" in caplog.text
        (tmp_path / lambda_table.FILE).write_text("{not json")
        assert lambda_table.load(tmp_path, "abc") is None
        assert "unreadable" in caplog.text
        caplog.clear()
        old = json.loads(t.to_json())  # the one-length format of before: "tokens", no "lengths"
        del old["lengths"]
        (tmp_path / lambda_table.FILE).write_text(json.dumps({**old, "tokens": 4096, "pilot": [1024, 512]}))
        assert lambda_table.load(tmp_path, "abc") is None
        assert "unreadable" in caplog.text


def test_a_shipped_controller_loads_its_table(tmp_path):
    r = routed_tiny(seed=2)
    stack = r.controller("bayes")
    stack.save(tmp_path)
    assert type(stack).load(tmp_path).lambda_table is None
    t = _table(RoutingSettings(linear_map="elu"), hash_=stack.content_hash())
    (tmp_path / lambda_table.FILE).write_text(t.to_json())
    loaded = type(stack).load(tmp_path)
    assert loaded.lambda_table == t
    loaded.save(tmp_path)  # the same weights saved again: a table is only ever read at load
    assert loaded.lambda_table is None


@pytest.mark.parametrize(("kind", "longest"), [("bayes", 4096), ("priorfree", 2048)])
def test_both_shipped_controllers_carry_a_table_made_for_their_weights(kind, longest):
    """The shipped tables load beside the weights they were made for (a table made for other
    weights would be ignored), under the default settings (the linear map as it resolves
    for the bundled model, whose learned maps ship), over 16 budgets and lengths sqrt(2) or
    twice apart."""
    from metaattn_viz.core.settings import DEFAULTS
    from metaattn_viz.routing.controller import ControllerStack, default_folder

    table = ControllerStack.load(default_folder("smollm2-135m-instruct", kind)).lambda_table
    assert table is not None
    assert table.settings == {**matched(DEFAULTS), "linear_map": "learned"}
    assert table.budgets == lambda_table.BUDGETS and table.lengths[0] == 256 and table.lengths[-1] == longest
    assert all(1.4 <= b / a <= 2.0 for a, b in zip(table.lengths, table.lengths[1:], strict=False))
    assert table.covers(256) and table.covers(2 * longest - 1) and not table.covers(2 * longest)


def test_prefill_routes_once_at_the_table_lambda_in_place_of_the_pilot(monkeypatch):
    """Where the table covers the text, no pilot runs: one pass at the table's lambda, the
    same routes as the pilot's pass at that lambda; other settings and lengths still pilot."""
    monkeypatch.setattr(prefill_mod, "PILOT_TOKENS", 32)
    r = routed_tiny(seed=1, spread=30.0)
    ids = random_ids(160, seed=3)
    s = RoutingSettings(budget=0.5, window=8, n_sink=2)
    piloted = r.prefill(ids, s)
    assert piloted.pilot_tokens == 32
    assert abs(float(piloted.records["cost"].mean()) - 0.5) <= prefill_mod.GLOBAL_COST_TOLERANCE
    lam = piloted.lam[0]
    stack = r.controller("bayes")
    table = _table(r.resolve_linear_map(s), (0.4, 0.6), (100,), ((lam, lam),), stack.content_hash())
    monkeypatch.setattr(stack, "lambda_table", table)
    res = r.prefill(ids, s)
    assert (res.pilot_tokens, res.passes) == (0, 1)
    assert np.array_equal(res.records["routes"], piloted.records["routes"])
    assert r.prefill(ids, s.with_(hedge_policy="soft", hedge_threshold=0.5)).pilot_tokens == 32
    assert r.prefill(ids[:, :60], s).pilot_tokens == 16  # shorter than the table's row: its pilot
    assert r.prefill(random_ids(200, seed=3), s).pilot_tokens == 32  # twice the row or longer
    assert r.prefill(ids, s, "priorfree").pilot_tokens == 32  # the other controller has none


def test_resolved_lambda_is_the_search_s_first_re_solve(monkeypatch):
    """What a table stores per text is the lambda `prefill` solves on its first whole pass,
    the one after the pilot's lambda (re-solves forced here by a tolerance nothing meets)."""
    monkeypatch.setattr(prefill_mod, "PILOT_TOKENS", 32)
    monkeypatch.setattr(prefill_mod, "GLOBAL_COST_TOLERANCE", -1.0)
    r = routed_tiny(seed=1, spread=30.0)
    ids = random_ids(120, seed=6)
    s = RoutingSettings(budget=0.4, window=8, n_sink=2)
    solved = []
    solve = prefill_mod.solve_global

    def spy(*args, **kwargs):
        solved.append(solve(*args, **kwargs))
        return solved[-1]

    monkeypatch.setattr(prefill_mod, "solve_global", spy)
    r.prefill(ids, s)
    assert len(solved) == 2  # the pilot's lambda, then the re-solve from its pass
    monkeypatch.setattr(prefill_mod, "solve_global", solve)
    assert prefill_mod.pilot_lambda(r, ids, s, "bayes") == pytest.approx(solved[0])
    assert prefill_mod.resolved_lambda(r, ids, s, "bayes") == pytest.approx(solved[1])
    assert solved[1] != pytest.approx(solved[0])  # (so the test tells the two apart)


def test_build_averages_the_settled_lambdas_of_each_length(monkeypatch):
    monkeypatch.setattr(prefill_mod, "PILOT_TOKENS", 32)
    r = routed_tiny(seed=1, spread=30.0)
    s = RoutingSettings(window=8, n_sink=2)
    texts = [random_ids(160, seed=4), random_ids(200, seed=5)]
    t = lambda_table.build(r, "bayes", texts, s, budgets=(0.3, 0.5), lengths=(160, 40))
    assert t.lengths == (40, 160)
    for n, row in zip(t.lengths, t.lambdas, strict=True):
        want = [
            np.mean([prefill_mod.resolved_lambda(r, ids[:, :n], s.with_(budget=b), "bayes") for ids in texts])
            for b in (0.3, 0.5)
        ]
        assert row == pytest.approx(want)
    assert t.controller_hash == r.controller("bayes").content_hash()
    assert t.settings == matched(r.resolve_linear_map(s)) and t.meta["texts"] == 2
    assert set(t.meta["spread"]) == {"40", "160"}
    with pytest.raises(ValueError, match="at least 160 tokens"):
        lambda_table.build(r, "bayes", [random_ids(160), random_ids(40)], s, (0.3,), (40, 160))


@pytest.mark.parametrize(
    "args, message",
    [
        (["--budgets", "1.0"], "end of the range"),
        (["--budgets", "0.3,x"], "--budgets"),
        (["--controllers", "nope"], "--controllers"),
        (["--lengths", "256,x"], "--lengths"),
        (["--lengths", "0,256"], "--lengths"),
        (["--texts", "0"], "--texts"),
    ],
)
def test_the_command_refuses_bad_arguments_before_loading_the_model(args, message, capsys):
    assert main(["lambda-table", *args]) == 2
    assert message in capsys.readouterr().err


def test_the_command_writes_a_table_beside_the_controller_it_names(tmp_path, capsys):
    """The bundled model, one short calibration window (the first, which holds the benchmark
    text, left out), two lengths and one budget: a table for the shipped Bayesian weights,
    which its controller then loads."""
    from metaattn_viz.paths import REPO_ROOT
    from metaattn_viz.routing.controller import ControllerStack, default_folder

    text = (REPO_ROOT / "tests" / "data" / "wikitext2_excerpt.txt").read_text()
    data = tmp_path / "text.raw"
    data.write_text(text * 3)
    out = tmp_path / "tables"
    args = ["--data", str(data), "--lengths", "600,200", "--texts", "1", "--budgets", "0.3"]
    args += ["--out", str(out)]
    assert main(["lambda-table", *args]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["tables"] == {"bayes": str(out / lambda_table.FILE)} and summary["lengths"] == [200, 600]
    table = LambdaTable.from_json((out / lambda_table.FILE).read_text())
    shipped = ControllerStack.load(default_folder("smollm2-135m-instruct", "bayes"))
    assert table.controller_hash == shipped.content_hash()
    assert table.budgets == (0.3,) and table.lengths == (200, 600) and len(table.lambdas) == 2
    assert table.meta["split"] == "calibration, windows 1-1 of 600 tokens"
    assert table.meta["command"] == (
        "metaattn-viz lambda-table --controllers bayes --texts 1 --lengths 200,600 --budgets 0.3 "
        f"--data {data}"
    )
    assert lambda_table.load(out, shipped.content_hash()) == table


def test_several_controllers_with_one_out_get_a_subfolder_each(tmp_path, capsys):
    """`--out` with two controllers: a table each, in OUT/<kind>/ (they shared one file, the
    second overwriting the first)."""
    from metaattn_viz.paths import REPO_ROOT
    from metaattn_viz.routing.controller import ControllerStack, default_folder

    data = tmp_path / "text.raw"
    data.write_text((REPO_ROOT / "tests" / "data" / "wikitext2_excerpt.txt").read_text())
    out = tmp_path / "tables"
    args = ["--data", str(data), "--lengths", "32", "--texts", "1", "--budgets", "0.5", "--out", str(out)]
    assert main(["lambda-table", "--controllers", "bayes,priorfree", *args]) == 0
    tables = json.loads(capsys.readouterr().out)["tables"]
    assert tables == {k: str(out / k / lambda_table.FILE) for k in ("bayes", "priorfree")}
    for kind in tables:
        table = LambdaTable.from_json((out / kind / lambda_table.FILE).read_text())
        shipped = ControllerStack.load(default_folder("smollm2-135m-instruct", kind))
        assert table.controller_hash == shipped.content_hash(), kind


def test_every_controller_s_folder_is_checked_before_any_work(tmp_path, capsys, monkeypatch):
    """`--out OUT` with two controllers where OUT/priorfree is a file: refused before the
    model loads (the Bayesian table was written, the prior-free one computed, then a
    FileExistsError), and nothing is made; so is a table file that is a folder."""
    from helpers import Reached, cli_refused

    from metaattn_viz.routing.model import RoutedModel

    def load(*args, **kwargs):
        raise Reached("the model was loaded")

    monkeypatch.setattr(RoutedModel, "load", staticmethod(load))
    out = tmp_path / "tables"
    out.mkdir()
    (out / "priorfree").write_text("x")
    line = cli_refused(["lambda-table", "--controllers", "bayes,priorfree", "--out", str(out)], capsys)
    assert f"--out {out / 'priorfree'} is a file, not a folder" in line
    assert sorted(p.name for p in out.iterdir()) == ["priorfree"]
    (out / "priorfree").unlink()
    (out / "priorfree" / lambda_table.FILE).mkdir(parents=True)
    line = cli_refused(["lambda-table", "--controllers", "bayes,priorfree", "--out", str(out)], capsys)
    assert f"{out / 'priorfree' / lambda_table.FILE} is a folder" in line


def test_the_controllers_own_folders_are_checked_before_the_tables(tmp_path, capsys, monkeypatch):
    from helpers import cli_refused

    import metaattn_viz.routing.controller as controller_mod
    from metaattn_viz.routing.model import RoutedModel

    r = routed_tiny(seed=1)
    for kind in ("bayes", "priorfree"):
        r.controller(kind).trained = True
    monkeypatch.setattr(RoutedModel, "load", staticmethod(lambda *a, **k: r))
    monkeypatch.setattr(controller_mod, "default_folder", lambda slug, kind: tmp_path / slug / kind)

    def build(*args, **kwargs):
        raise AssertionError("a table was built")

    monkeypatch.setattr(lambda_table, "build", build)
    (tmp_path / r.slug).mkdir()
    (tmp_path / r.slug / "priorfree").write_text("x")
    line = cli_refused(["lambda-table", "--controllers", "bayes,priorfree", "--lengths", "32"], capsys)
    assert f"the controller's folder {tmp_path / r.slug / 'priorfree'} is a file, not a folder" in line
