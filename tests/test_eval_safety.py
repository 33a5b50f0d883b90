"""`eval` finds what would stop it before its minutes of work, and survives what the work
gives: a calibration split too short for one window is refused next to the validation
windows (not after every controller row), a report whose markers are out of order or whose
plot beside it cannot be written is refused before the model loads (and a plot that fails
after the work is named, with the report it follows), and a perplexity beyond float range
is infinite (JSON null, "–" in the report), not an OverflowError. Tiny models only."""

from __future__ import annotations

import json
import re

import pytest
import torch
from helpers import ROOT, Reached, cli_code, cli_refused, routed_tiny

from metaattn_viz.training import data as data_mod
from metaattn_viz.training import report as report_mod
from metaattn_viz.training.evaluate import evaluate

EXCERPT = ROOT / "tests" / "data" / "wikitext2_excerpt.txt"
TINY = ["--seq-len", "32", "--max-tokens", "32", "--budgets", "1.0", "--device", "cpu"]


def _load(monkeypatch, routed=None):
    """`RoutedModel.load` gives `routed`; None: loading at all is a Reached."""
    from metaattn_viz.routing.model import RoutedModel

    def load(*args, **kwargs):
        if routed is None:
            raise Reached("the model was loaded")
        return routed

    monkeypatch.setattr(RoutedModel, "load", staticmethod(load))


# -- a calibration split too short, found before the dense pass ---------------------------------


def _short_training_text(tmp_path):
    """Three articles: the first two (the calibration split) a few tokens, the last (the
    validation split) long enough for windows of 64."""
    path = tmp_path / "short-train.txt"
    long = " ".join(f"word{i} ." for i in range(60))
    path.write_text(f" = A = \n a .\n = B = \n b .\n = C = \n {long}\n")
    return path


def test_a_calibration_split_too_short_is_refused_before_the_dense_pass(tmp_path, monkeypatch):
    data = _short_training_text(tmp_path)
    r = routed_tiny(seed=3)

    def dense_logits(ids):
        raise Reached("the dense pass ran")

    monkeypatch.setattr(r, "dense_logits", dense_logits)
    with pytest.raises(data_mod.TooShort, match="the calibration text is shorter than one window"):
        evaluate(r, data, budgets=(0.5, 1.0), seq_len=64, max_tokens=64, controllers=("bayes",))
    with pytest.raises(Reached):  # without baselines no row reads it
        evaluate(r, data, budgets=(0.5, 1.0), seq_len=64, max_tokens=64, baselines=False)


def test_eval_refuses_a_calibration_split_too_short_and_prints_no_rows(tmp_path, monkeypatch, capsys):
    data = _short_training_text(tmp_path)
    r = routed_tiny(seed=3)

    def dense_logits(ids):
        raise Reached("the dense pass ran")

    monkeypatch.setattr(r, "dense_logits", dense_logits)
    _load(monkeypatch, r)
    args = ["eval", "--data", str(data), "--json", "--seq-len", "64", "--max-tokens", "64"]
    line = cli_refused([*args, "--budgets", "0.5", "--device", "cpu"], capsys)
    assert "the calibration text is shorter than one window" in line and "--seq-len" in line
    assert capsys.readouterr().out == ""


# -- the report's markers ------------------------------------------------------------------------


def test_a_report_with_its_end_marker_before_its_begin_is_refused_before_the_model_loads(
    tmp_path, monkeypatch, capsys
):
    B, E = report_mod.BEGIN, report_mod.END
    path = tmp_path / "results.md"
    path.write_text(f"# Results\n\n{E}\nold numbers\n{B}\n\nprose\n")
    problem = report_mod.report_problem(path)
    assert problem is not None and "END marker before its BEGIN marker" in problem
    _load(monkeypatch)  # refused before it
    line = cli_refused(["eval", "--data", str(EXCERPT), "--report", str(path)], capsys)
    assert f"--report {path} has its END marker before its BEGIN marker" in line
    monkeypatch.setattr(report_mod, "tables", lambda rows, command: f"{B}\nnew\n{E}")
    with pytest.raises(ValueError, match="END marker before its BEGIN"):  # and not an IndexError
        report_mod.write_report([], path, "metaattn-viz eval")
    assert path.read_text() == f"# Results\n\n{E}\nold numbers\n{B}\n\nprose\n"


def test_report_markers_in_order_or_absent_are_fine_and_a_lone_begin_is_not():
    B, E = report_mod.BEGIN, report_mod.END
    for text in ("", "# R\n", f"{B}\nx\n{E}\n", f"{B} x {E} y {B} z {E}", f"{E} x {B} y {E}", f"x {E}"):
        assert report_mod.marker_problem(text) is None, text
    problem = report_mod.marker_problem(f"prose\n{B}\nmore prose\n")
    assert problem is not None and "no END marker after it" in problem


# -- the plot beside the report ------------------------------------------------------------------


def test_a_folder_where_the_plot_goes_is_refused_before_the_model_loads(tmp_path, monkeypatch, capsys):
    (tmp_path / report_mod.PLOT_FILE).mkdir()
    report = tmp_path / "r.md"
    _load(monkeypatch)
    line = cli_refused(["eval", "--data", str(EXCERPT), "--report", str(report)], capsys)
    assert f"{tmp_path / report_mod.PLOT_FILE} is a folder" in line
    assert not report.exists()


def test_a_plot_that_fails_after_the_work_is_named_and_the_report_said_written(tmp_path, monkeypatch, capsys):
    (tmp_path / report_mod.PLOT_FILE).mkdir()  # made a folder while the work ran
    monkeypatch.setattr(report_mod, "report_problem", lambda path: None)
    _load(monkeypatch, routed_tiny(seed=3))
    report = tmp_path / "r.md"
    args = ["eval", "--data", str(EXCERPT), "--no-baselines", "--report", str(report), *TINY]
    line = cli_refused(args, capsys)
    plot = tmp_path / report_mod.PLOT_FILE
    assert f"--report {report} was written, but not its plot {plot}: Is a directory" in line
    assert report_mod.BEGIN in report.read_text()


# -- a perplexity beyond float range -------------------------------------------------------------


def test_perplexity_beyond_float_range_is_infinite():
    from metaattn_viz.training.evaluate import perplexity

    assert perplexity(2.0 * 10, 10) == pytest.approx(7.389056, rel=1e-6)
    assert perplexity(1e6, 1) == float("inf")


def test_eval_gives_an_infinite_perplexity_as_null_not_an_overflow(tmp_path, monkeypatch, capsys):
    r = routed_tiny(seed=3)
    with torch.no_grad():
        r.model.lm_head.weight.mul_(1e5)  # logits in the tens of thousands: exp(mean NLL) overflows
    rows = evaluate(r, EXCERPT, budgets=(1.0,), seq_len=32, max_tokens=32, baselines=False)
    assert {row["ppl"] for row in rows} == {float("inf")} and rows[0]["dense_ppl"] == float("inf")
    block = report_mod.tables(rows, "metaattn-viz eval")
    assert "Dense perplexity **–**" in block  # ppl and ppl / dense undefined:
    assert re.search(r"\n\| bayes \| 1\.00 \| [\d.]+ \| [\d.]+ \| – \| – \| ", block)
    _load(monkeypatch, r)
    assert cli_code(["eval", "--data", str(EXCERPT), "--no-baselines", "--json", *TINY]) == 0
    printed = json.loads(capsys.readouterr().out)  # strict JSON: infinity is null
    assert [row["ppl"] for row in printed] == [None] * len(rows) and printed[0]["dense_ppl"] is None
