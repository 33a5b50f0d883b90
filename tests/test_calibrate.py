"""Calibration (ELBO, prior-free baseline), data checks, and eval end to end on a tiny model."""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import routed_tiny
from scipy import stats

from metaattn_viz.core.settings import COSTS, RoutingSettings
from metaattn_viz.routing.controller import ControllerStack
from metaattn_viz.routing.generation import MAX_SEED
from metaattn_viz.routing.model import TrainRouting, kl_per_token
from metaattn_viz.training import data as data_mod
from metaattn_viz.training.calibrate import CalibrationConfig, calibrate, elbo_terms
from metaattn_viz.training.evaluate import auroc, budget_shares, evaluate, spearman

ROOT = Path(__file__).resolve().parent.parent
EXCERPT = ROOT / "tests" / "data" / "wikitext2_excerpt.txt"


def test_split_is_by_article_and_deterministic():
    a = data_mod.load_split(EXCERPT)
    b = data_mod.load_split(EXCERPT)
    assert a.train == b.train and a.validation == b.validation
    assert a.validation and a.train
    assert not set(a.train) & set(a.validation)
    assert all(x.startswith(" = ") or x.startswith("=") for x in a.train + a.validation)
    # the excerpt has two articles, too few for the 1-in-10 rule: the last one validates
    titles = re.findall(r"^ ?= ([^=].*) = ?$", EXCERPT.read_text(), flags=re.M)
    assert [x.splitlines()[0].strip(" =") for x in a.train + a.validation] == titles
    assert len(a.validation) == 1 and a.validation[0].startswith(f"= {titles[-1]} =")


def test_split_sends_every_tenth_article_to_validation(tmp_path):
    """23 articles with sections: articles 9 and 19 (0-based, file order) validate, and an
    article keeps its sections (`` = = ... = = `` lines do not start an article)."""
    body = "".join(
        f" = Title {i} = \n text of article {i} .\n = = Section = = \n more {i} .\n" for i in range(23)
    )
    path = tmp_path / "wiki.raw"
    path.write_text(body)
    split = data_mod.load_split(path)
    title = re.compile(r"= Title (\d+) =")
    assert [int(title.match(a)[1]) for a in split.validation] == [9, 19]
    assert [int(title.match(a)[1]) for a in split.train] == [i for i in range(23) if i not in (9, 19)]
    assert all("= = Section = =" in a and a.count("= Title") == 1 for a in split.train)


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "not found"),
        (b"", "empty"),
        (b"   \n\n ", "empty"),
        (b"\x00\x01\x02binary\x00", "binary"),
        (b"\xff\xfe\xfa not utf8", "not UTF-8"),
    ],
)
def test_bad_data_files_are_refused_before_training(tmp_path, content, match):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(data_mod.DataError, match=match):
        data_mod.load_split(path)


def test_too_short_for_one_window_is_refused(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text(" = A =\n short text\n = B =\n more\n")
    r = routed_tiny()
    with pytest.raises(data_mod.DataError, match="shorter than one window"):
        calibrate(r, path, CalibrationConfig(steps=1, seq_len=64), out_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "controller.safetensors").exists()


def test_calibrate_cli_refuses_missing_file_plainly(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "metaattn_viz", "calibrate", "--data", str(tmp_path / "nope.txt")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert out.returncode == 2 and "data file not found" in out.stderr
    assert "Traceback" not in out.stderr


def test_calibrate_cli_on_cuda_without_one_exits_2_naming_it():
    data = ROOT / "tests" / "data" / "wikitext2_excerpt.txt"
    out = subprocess.run(
        [sys.executable, "-m", "metaattn_viz", "calibrate", "--data", str(data), "--device", "cuda"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    assert out.returncode == 2 and "CUDA" in out.stderr
    assert "Traceback" not in out.stderr


def test_elbo_terms_match_a_hand_computation():
    torch.manual_seed(0)
    r = routed_tiny(seed=4, spread=10.0)
    stack = r.controller("bayes")
    ids = torch.randint(0, 250, (1, 24))
    dense = r.dense_logits(ids)
    cfg = CalibrationConfig(beta_kl=0.3, seq_len=24)
    torch.manual_seed(7)
    terms = elbo_terms(r, stack, ids, dense, cfg, hard=False)

    # by hand: recompute the routed logits with the same Dirichlet samples, then the terms
    torch.manual_seed(7)
    s = RoutingSettings(budget=None, window=cfg.window, n_sink=cfg.n_sink, backend="reference")
    with r.session(s, stack, mode="train", train=TrainRouting()) as sess:
        logits = r.model(input_ids=ids, use_cache=False).logits
    logp = torch.log_softmax(dense[0].double(), -1)
    logq = torch.log_softmax(logits[0].detach().double(), -1)
    task = float((logp.exp() * (logp - logq)).sum(-1).mean())
    kl = 0.0
    for _, beta in sess.beta_graph:
        d = torch.distributions.Dirichlet(beta.detach().double())
        prior = torch.distributions.Dirichlet(stack.alpha0.double().expand_as(beta))
        kl += float(torch.distributions.kl_divergence(d, prior).mean()) / len(sess.beta_graph)
    assert terms["task"].item() == pytest.approx(task, rel=1e-3, abs=1e-6)
    assert terms["kl"].item() == pytest.approx(kl, rel=1e-3)
    assert terms["loss"].item() == pytest.approx(task + 0.3 * kl, rel=1e-4)
    m = torch.stack([b.detach() / b.detach().sum(-1, keepdim=True) for _, b in sess.beta_graph])
    assert terms["cost"].item() == pytest.approx(float((m * torch.tensor(COSTS)).sum(-1).mean()), rel=1e-5)


def test_priorfree_loss_is_task_plus_cost_penalty():
    r = routed_tiny(seed=2)
    ids = torch.randint(0, 250, (1, 20))
    dense = r.dense_logits(ids)
    cfg = CalibrationConfig(controller="priorfree", cost_weight=0.5, seq_len=20)
    terms = elbo_terms(r, r.controller("priorfree"), ids, dense, cfg, hard=False)
    assert terms["kl"].item() == 0.0
    assert terms["loss"].item() == pytest.approx(terms["task"].item() + 0.5 * terms["cost"].item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["bayes", "priorfree"])
def test_calibration_on_a_tiny_model_lowers_the_loss_and_saves(tmp_path, kind):
    r = routed_tiny(seed=1)
    cfg = CalibrationConfig(
        controller=kind,
        steps=30,
        batch_size=2,
        seq_len=64,
        lr=1e-2,
        soft_fraction=1.0,
        val_windows=2,
        checkpoint_every=10,
    )
    hist = []
    meta = calibrate(
        r, EXCERPT, cfg, out_dir=tmp_path, progress=False, model_slug="tiny", on_step=hist.append
    )
    curve = [row["loss"] for row in meta["loss_curve_every_10"]]
    assert [h["step"] for h in hist] == list(range(1, 31)) and curve == [h["loss"] for h in hist[::10]]
    first = sum(h["loss"] for h in hist[:5]) / 5
    last = sum(h["loss"] for h in hist[-5:]) / 5
    assert last < first, (first, last, curve)
    loaded = ControllerStack.load(tmp_path)
    assert loaded.trained and loaded.kind == kind
    # the run read this very file: its meta names the file's own hash, computed here apart
    assert meta["data"]["sha256"] == hashlib.sha256(EXCERPT.read_bytes()).hexdigest()
    assert json.loads((tmp_path / "meta.json").read_text())["data"]["sha256"] == meta["data"]["sha256"]


class Interrupted(Exception):
    """Raised by a step callback to stop a calibration part-way, as Ctrl-C would."""


def test_resume_from_a_damaged_checkpoint_says_which_file(tmp_path):
    r = routed_tiny(seed=1)
    cfg = CalibrationConfig(steps=2, seq_len=64, val_windows=1)
    out = tmp_path / "c"
    out.mkdir()
    for damaged in (b"PK\x03\x04 truncated", b"not a checkpoint"):
        (out / "checkpoint.pt").write_bytes(damaged)
        with pytest.raises(ValueError, match=r"checkpoint.pt is not a readable checkpoint .*remove it"):
            calibrate(r, EXCERPT, cfg, out_dir=out, resume=True, progress=False, model_slug="t")


class _RunsCode:
    """An object whose unpickling calls a function: what a hostile checkpoint would hold."""

    def __reduce__(self):
        return (Path.touch, (Path(os.environ["METAATTN_TEST_PWNED"]),))


def test_resume_of_a_checkpoint_that_would_run_code_is_refused_without_running_it(tmp_path, monkeypatch):
    # a checkpoint is loaded with weights_only: tensors and plain data, never arbitrary objects
    r = routed_tiny(seed=1)
    cfg = CalibrationConfig(steps=2, seq_len=64, val_windows=1)
    out = tmp_path / "c"
    out.mkdir()
    pwned = tmp_path / "pwned"
    monkeypatch.setenv("METAATTN_TEST_PWNED", str(pwned))
    torch.save({"config": {}, "step": _RunsCode()}, out / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"checkpoint.pt is not a readable checkpoint \(UnpicklingError\)"):
        calibrate(r, EXCERPT, cfg, out_dir=out, resume=True, progress=False, model_slug="t")
    assert not pwned.exists()


def test_a_seed_out_of_range_is_refused_before_any_work():
    for seed in (-1, 2**63, 10**20, 1.5, True):
        with pytest.raises(ValueError, match=rf"seed \(--seed\) must be a whole number in \[0, {MAX_SEED}\]"):
            CalibrationConfig(seed=seed)
    assert CalibrationConfig(seed=MAX_SEED).seed == MAX_SEED


def test_resume_continues_from_the_checkpoint_and_ends_as_an_uninterrupted_run(tmp_path):
    r = routed_tiny(seed=1)
    # 6 steps, checkpoints after steps 3 and 6; soft steps 1-3, hard (straight-through) 4-6
    cfg = CalibrationConfig(steps=6, seq_len=64, val_windows=1, checkpoint_every=3)
    full = calibrate(r, EXCERPT, cfg, out_dir=tmp_path / "a", progress=False, model_slug="t")

    def stop_after_step_4(row):
        if row["step"] == 4:
            raise Interrupted

    part = tmp_path / "b"
    with pytest.raises(Interrupted):
        calibrate(r, EXCERPT, cfg, out_dir=part, progress=False, model_slug="t", on_step=stop_after_step_4)
    assert not (part / "controller.safetensors").exists()  # an interrupted run saves no controller
    assert torch.load(part / "checkpoint.pt", weights_only=False)["step"] == 3  # step 4 is lost

    steps_run = []
    resumed = calibrate(
        r,
        EXCERPT,
        cfg,
        out_dir=part,
        resume=True,
        progress=False,
        model_slug="t",
        on_step=lambda row: steps_run.append(row["step"]),
    )
    assert steps_run == [4, 5, 6]  # from the checkpoint, not from the start nor past step 4
    assert resumed["content_hash"] == full["content_hash"]  # bit-identical controller weights
    assert resumed["final_validation_terms"] == full["final_validation_terms"]
    assert resumed["last_train_terms"] == full["last_train_terms"]


def test_resume_with_other_settings_is_refused(tmp_path):
    r = routed_tiny(seed=1)
    cfg = CalibrationConfig(steps=2, seq_len=64, val_windows=1, checkpoint_every=1)
    calibrate(r, EXCERPT, cfg, out_dir=tmp_path, progress=False, model_slug="t")
    other = CalibrationConfig(steps=2, seq_len=64, val_windows=1, checkpoint_every=1, lr=1e-3)
    with pytest.raises(ValueError, match="other settings"):
        calibrate(r, EXCERPT, other, out_dir=tmp_path, resume=True, progress=False, model_slug="t")


def test_budget_shares_meet_the_budget():
    for b in (0.2, 0.25, 0.5, 0.75):
        hi, lo, share = budget_shares(b)
        assert share * COSTS[hi] + (1 - share) * COSTS[lo] == pytest.approx(b)


def test_auroc_against_a_direct_count():
    scores = torch.rand(200, generator=torch.Generator().manual_seed(0)).numpy()
    labels = scores + 0.3 * torch.rand(200, generator=torch.Generator().manual_seed(1)).numpy() > 0.8
    pos, neg = scores[labels], scores[~labels]
    direct = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    assert auroc(scores, labels) == pytest.approx(direct)
    assert auroc(scores, labels.astype(int)) == pytest.approx(direct)  # 0/1 labels: the same (was -0.08)
    # undefined (one class empty; a constant side) is None, so `eval --json` stays strict JSON
    assert auroc(scores, np.zeros(200, bool)) is None and auroc(scores, np.ones(200, bool)) is None
    assert spearman(scores, np.zeros(200)) is None
    assert spearman(scores, 2 * scores) == pytest.approx(1.0)


def _byte_windows(articles: list[str], seq_len: int) -> torch.Tensor:
    """The tiny model's tokens are the text's UTF-8 bytes (no EOS): its windows, built apart
    from data.windows."""
    ids = list(b"".join(a.encode("utf-8") for a in articles))
    n = len(ids) // seq_len
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of the ranks (ties get their mean rank)."""
    return float(np.corrcoef(stats.rankdata(a), stats.rankdata(b))[0, 1])


def test_eval_runs_end_to_end_on_a_tiny_model():
    r = routed_tiny(seed=3, spread=10.0)
    seq_len, window, n_sink = 64, 16, 4
    rows = evaluate(
        r, EXCERPT, budgets=(0.5, 1.0), max_tokens=128, seq_len=seq_len, window=window, n_sink=n_sink
    )
    names = {(row["controller"], row["budget"]) for row in rows}
    assert {
        ("bayes", 0.5),
        ("bayes", 1.0),
        ("bayes", None),
        ("priorfree", None),
        ("all-local", 0.3),
        ("all-linear", 0.15),
        ("random", 0.5),
        ("salience-topk", 0.5),
    } <= names
    for row in rows:
        for key in [
            "controller",
            "budget",
            "realized_cost",
            "ppl",
            "dense_ppl",
            "kl_to_dense",
            "routing_entropy",
            "tokens",
            "attention_flops_ratio",
        ]:
            assert key in row
    row_of = {(row["controller"], row["budget"]): row for row in rows}

    # the dense perplexity, from the unrouted model on windows built here
    val = _byte_windows(data_mod.load_split(EXCERPT).validation, seq_len)[:2]
    with torch.no_grad():
        logits = r.model(input_ids=val, use_cache=False).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).double(), val[:, 1:].reshape(-1)
    )
    assert rows[0]["dense_ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-4)
    assert all(row["tokens"] == val.shape[0] * (seq_len - 1) for row in rows)

    # budget 1: every token gets full attention, i.e. the dense model
    dense_row = row_of[("bayes", 1.0)]
    assert dense_row["ppl"] == pytest.approx(dense_row["dense_ppl"], rel=1e-5)
    assert dense_row["kl_to_dense"] == pytest.approx(0.0, abs=1e-6)
    assert dense_row["attention_flops_ratio"] == pytest.approx(1.0)
    # cheap experts change the output: a KL the dense row does not have
    assert row_of[("all-local", 0.3)]["kl_to_dense"] > 1e-4

    # attention FLOPs of one-expert routing, by hand: the query at position t sees t + 1 keys
    # (full), min(t + 1, window + n_sink) keys (local), or reads a D x D state (linear)
    t1 = np.arange(1, seq_len + 1)
    assert row_of[("all-local", 0.3)]["attention_flops_ratio"] == pytest.approx(
        np.minimum(t1, window + n_sink).sum() / t1.sum()
    )
    assert row_of[("all-linear", 0.15)]["attention_flops_ratio"] == pytest.approx(
        seq_len * r.head_dim / t1.sum()
    )
    assert row_of[("all-local", 0.3)]["realized_cost"] == pytest.approx(COSTS[2])
    for name in ("random", "salience-topk"):
        assert row_of[(name, 0.5)]["realized_cost"] == pytest.approx(0.5, abs=0.02)

    # how informative the uncertainty is, recomputed from the routed passes' own records:
    # total uncertainty = entropy of the posterior mean over log K, against the relative error
    u, err = [], []
    s = RoutingSettings(budget=None, window=window, n_sink=n_sink)
    for i in range(val.shape[0]):
        rec = r.prefill(val[i : i + 1], s, "bayes", use_cache=False, diagnose=True).records
        beta = torch.as_tensor(rec["beta"]).double()  # [L, 1, T, K]
        u.append(
            (torch.distributions.Dirichlet(beta).mean.log().neg() * torch.distributions.Dirichlet(beta).mean)
            .sum(-1)
            .numpy()
            .ravel()
            / math.log(3)
        )
        err.append(np.asarray(rec["rel_error"]).ravel())
    u, err = np.concatenate(u), np.concatenate(err)
    worst = err >= np.quantile(err, 0.9)
    pos, neg = u[worst], u[~worst]
    direct_auroc = ((pos[:, None] > neg[None]).sum() + 0.5 * (pos[:, None] == neg[None]).sum()) / (
        len(pos) * len(neg)
    )
    unc = row_of[("bayes", None)]["uncertainty"]
    assert unc["decisions"] == u.size == r.model.config.num_hidden_layers * val.numel()
    assert unc["spearman_total"] == pytest.approx(_spearman(u, err), abs=1e-6)
    assert unc["auroc_total_worst10"] == pytest.approx(direct_auroc, abs=1e-6)

    _check_hedged_rows(r, row_of, seq_len, window, n_sink)


def _check_hedged_rows(r, row_of, seq_len, window, n_sink):
    """The hedged Bayesian rows spend the budget (escalations included), hedge some
    decisions, and their thresholds are the 0.9 quantile of the measure over all decisions
    of the unhedged controller on the calibration windows, recomputed here with
    SciPy's digamma (epistemic = mutual information / log K) and the entropy of the mean."""
    from scipy.special import digamma

    calib = _byte_windows(data_mod.load_split(EXCERPT).train, seq_len)[:4]
    plain = RoutingSettings(budget=0.5, window=window, n_sink=n_sink)
    total, epi = [], []
    for i in range(calib.shape[0]):
        rec = r.prefill(calib[i : i + 1], plain, "bayes", use_cache=False).records
        beta = np.asarray(rec["beta"], np.float64).reshape(-1, 3)
        s = beta.sum(-1, keepdims=True)
        m = beta / s
        h_mean = -(m * np.log(m)).sum(-1)
        expected_h = -(m * (digamma(beta + 1) - digamma(s + 1))).sum(-1)
        total.append(h_mean / math.log(3))
        epi.append((h_mean - expected_h) / math.log(3))
    for measure, values in (("total", total), ("epistemic", epi)):
        row = row_of[(f"bayes-hedge-{measure}", 0.5)]
        assert row["hedge"]["measure"] == measure and row["hedge"]["policy"] == "full"
        assert row["hedge"]["threshold"] == pytest.approx(np.quantile(np.concatenate(values), 0.9), abs=1e-5)
        assert row["realized_cost"] == pytest.approx(0.5, abs=0.03)  # the budget pays for the hedges
        assert row["hedged_share"] <= 0.25  # about a tenth of the decisions sit above the threshold
        assert row["controller_id"] == row_of[("bayes", 0.5)]["controller_id"]
    assert row_of[("bayes", 0.5)]["hedged_share"] == 0.0
    assert max(row_of[(f"bayes-hedge-{m}", 0.5)]["hedged_share"] for m in ("total", "epistemic")) > 0
    assert ("bayes-hedge-total", 1.0) not in row_of  # budget 1 is the dense model: nothing to hedge


def test_kl_per_token_against_torch():
    g = torch.Generator().manual_seed(0)
    p, q = torch.randn(7, 50, generator=g), torch.randn(7, 50, generator=g)
    want = torch.nn.functional.kl_div(
        torch.log_softmax(q, -1), torch.log_softmax(p, -1), log_target=True, reduction="none"
    ).sum(-1)
    assert torch.allclose(kl_per_token(p, q), want, atol=1e-6)
    assert float(kl_per_token(p, p).abs().max()) <= 1e-6
