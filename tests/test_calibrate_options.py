"""Every calibration setting is checked before any work (training/calibrate.py,
CalibrationConfig): a value out of range is a ValueError naming the setting and its range,
from the notebook's `calibrate` before the data are read, and a usage error (exit 2) from
`metaattn-viz calibrate` before the model loads. And controllers calibrated for another
model are said to be that, not "another copy of these weights" (routing/fingerprint.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from helpers import ROOT, CharTokenizer, Reached, cli_refused, tiny_config, tiny_model

import metaattn_viz as mav
from metaattn_viz.cli import main
from metaattn_viz.routing.fingerprint import architecture, controllers_notice, same_model_name
from metaattn_viz.training.calibrate import CalibrationConfig

EXCERPT = ROOT / "tests" / "data" / "wikitext2_excerpt.txt"
TEXTS = [line for line in EXCERPT.read_text(encoding="utf-8").splitlines() if line.strip()]


@pytest.mark.parametrize(
    "setting, value, message",
    [
        # hidden 0 divided by zero in the controllers' initialisation, checkpoint_every 0 in
        # the training loop after a step; a negative weight decay was refused by torch
        ("hidden", 0, "hidden (the controllers' hidden width) must be a whole number >= 1, got 0"),
        ("hidden", -3, "hidden (the controllers' hidden width) must be a whole number >= 1"),
        ("hidden", True, "hidden (the controllers' hidden width) must be a whole number >= 1, got True"),
        ("hidden", 8.0, "hidden (the controllers' hidden width) must be a whole number >= 1, got 8.0"),
        ("checkpoint_every", 0, "checkpoint_every must be a whole number >= 1, got 0"),
        ("checkpoint_every", -1, "checkpoint_every must be a whole number >= 1"),
        ("weight_decay", -1, "weight_decay must be a finite number >= 0, got -1.0"),
        ("weight_decay", math.nan, "weight_decay must be a finite number >= 0, got nan"),
        ("weight_decay", math.inf, "weight_decay must be a finite number >= 0, got inf"),
        # the local expert's window and sinks: their routing settings' ranges, up front
        ("window", 0, "window must be a whole number in [1, 1048576], got 0"),
        ("n_sink", -1, "n_sink must be a whole number in [0, 1024], got -1"),
        ("window", True, "window must be a whole number in [1, 1048576], got True"),
        # a learning rate of 0 trains nothing, yet the controllers would be labelled trained
        ("lr", 0, "lr must be a finite number > 0, got 0.0"),
        ("lr", True, "lr must be a finite number > 0, got True"),
        ("lr", "0.1", "lr must be a finite number > 0, got '0.1'"),
        ("lr", math.inf, "lr must be a finite number > 0, got inf"),
        ("beta_kl", False, "beta_kl must be a finite number >= 0, got False"),
        ("prior_strength", 0, "prior_strength must be a finite number > 0, got 0.0"),
        ("steps", True, "steps (--steps) must be a whole number >= 1, got True"),
        ("val_windows", 0, "val_windows (--val-windows) must be a whole number >= 1, got 0"),
        ("train_budgets", None, "train_budgets (--train-budgets) must be numbers in [0.15, 1], got None"),
        ("train_budgets", "0.5", "train_budgets (--train-budgets) must be numbers in [0.15, 1], got '0.5'"),
        # a prior that overflows: NaN concentrations passed the prior's floor check
        ("prior_gamma", 400, "prior_gamma (--prior-gamma) 400 and the prior costs"),
        ("prior_strength", 1e308, "give the prior concentrations [inf, inf, inf]"),
        ("prior_costs", (1e-320, 1, 1), "each of which must be a finite number > 0"),
    ],
)
def test_every_setting_is_refused_out_of_range_naming_it(setting, value, message):
    with pytest.raises(ValueError) as info:
        CalibrationConfig(**{setting: value})
    assert message in str(info.value)


def test_the_prior_free_controller_refuses_an_overflowing_prior_too():
    """Its stack computes (and records) the prior as well: NaN there was accepted."""
    with pytest.raises(ValueError, match=r"prior_gamma \(--prior-gamma\) 400"):
        CalibrationConfig(controller="priorfree", prior_gamma=400)
    CalibrationConfig(controller="priorfree", prior_strength=0.3)  # no prior to start at


def test_good_settings_are_kept_as_plain_numbers():
    cfg = CalibrationConfig(
        steps=np.int64(3), lr=np.float32(0.5), weight_decay=1, hidden=4, checkpoint_every=1, window=8.0
    )
    assert (cfg.steps, cfg.lr, cfg.weight_decay, cfg.hidden, cfg.window) == (3, 0.5, 1.0, 4, 8)
    assert all(type(v) in (int, float) for v in (cfg.steps, cfg.lr, cfg.weight_decay, cfg.window))
    json.dumps(cfg.__dict__)  # meta.json records them: numpy scalars would not serialise
    assert CalibrationConfig(features="base").features == ("base",)  # one name, not its letters
    assert CalibrationConfig(train_budgets=0.5).train_budgets == (0.5,)
    assert CalibrationConfig(weight_decay=0.0, beta_kl=0, n_sink=0, prior_gamma=0).n_sink == 0


@pytest.mark.parametrize(
    "option, message",
    [
        (dict(hidden=0), r"hidden \(the controllers' hidden width\) must be a whole number >= 1"),
        (dict(checkpoint_every=0), "checkpoint_every must be a whole number >= 1"),
        (dict(weight_decay=-1), "weight_decay must be a finite number >= 0"),
        (dict(window=0), r"window must be a whole number in \[1, 1048576\]"),
    ],
)
def test_the_notebook_refuses_a_bad_option_before_any_work(option, message, tmp_path):
    routed = mav.load((tiny_model(), CharTokenizer()), name="tiny")
    untrained = routed.controllers["bayes"]
    rows: list[dict] = []
    with pytest.raises(ValueError, match=message):
        mav.calibrate(
            routed,
            tmp_path / "not read.txt",  # refused before the texts are read
            steps=2,
            seq_len=64,
            val_windows=1,
            progress=False,
            on_step=rows.append,
            save=tmp_path / "ctrl",
            **option,
        )
    assert rows == [] and not (tmp_path / "ctrl").exists()
    assert routed.controllers["bayes"] is untrained
    routed.detach()


# -- the CLI: the same checks, a usage error before the model loads -------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    from metaattn_viz.routing import loading

    def load(*args, **kwargs):
        raise Reached("the model was loaded")

    monkeypatch.setattr(loading, "load", load)


def test_the_cli_reaches_the_model_load_with_good_flags(no_model_load, tmp_path):
    with pytest.raises(Reached):
        main(["calibrate", "--data", str(EXCERPT), "--out", str(tmp_path / "c"), "--prior-gamma", "2"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--prior-gamma", "400"], "prior_gamma (--prior-gamma) 400"),
        (["--prior-costs", "1e-320,1,1"], "bring the prior costs (--prior-costs) closer together"),
        (["--steps", "0"], "steps (--steps) must be a whole number >= 1, got 0"),
        (["--seed", "-1"], "seed (--seed) must be a whole number in [0, "),
        (["--beta-kl", "nan"], "beta_kl must be a finite number >= 0, got nan"),
        (["--cost-weight", "-1"], "cost_weight must be a finite number >= 0, got -1.0"),
        (["--aux-weight", "inf"], "aux_weight must be a finite number >= 0, got inf"),
        (["--prior-gamma", "-0.5"], "prior_gamma must be a finite number >= 0, got -0.5"),
        (["--train-budgets", "0.5,2"], "--train-budgets: budget must be a finite number in [0.15, 1]"),
    ],
)
def test_the_cli_refuses_a_bad_flag_as_a_usage_error_before_the_model_loads(
    flags, message, no_model_load, tmp_path, capsys
):
    line = cli_refused(["calibrate", "--data", str(EXCERPT), "--out", str(tmp_path / "c"), *flags], capsys)
    assert line.startswith("metaattn-viz calibrate: error:") and message in line
    assert not (tmp_path / "c").exists()


# -- controllers calibrated for another model --------------------------------------------------------
def test_a_copy_of_a_model_is_told_apart_from_another_model_by_name():
    assert same_model_name("SmolLM2-135M-Instruct", "smollm2-135m-instruct-q8_0")
    assert same_model_name("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct-GGUF")
    assert same_model_name("my-model", "My_Model-Q4_K_M")
    assert same_model_name("tiny", "tiny-bf16")
    assert not same_model_name("my-model", "qwen")
    assert not same_model_name("SmolLM2-135M-Instruct", "SmolLM2-360M-Instruct")


def test_the_notice_names_the_model_the_controllers_were_calibrated_for():
    llama, qwen = tiny_config("llama"), tiny_config("qwen2")
    meta = {"model": "my-model", "weights_fingerprint": "a" * 32, "architecture": architecture(llama)}
    assert architecture(llama)["model_type"] == "llama" and architecture(qwen)["model_type"] == "qwen2"
    untrained = "routing is at best that of controllers untrained for this model"
    # these very weights: nothing to say, whatever the name
    assert controllers_notice(meta, "a" * 32, "renamed", qwen) is None
    # another model by name
    notice = controllers_notice(meta, "b" * 32, "qwen", llama)
    assert notice == f"calibrated for my-model, not these weights (qwen): {untrained}"
    # another model of the same name: its architecture says so
    notice = controllers_notice(meta, "b" * 32, "my-model", qwen)
    assert notice == (
        f"calibrated for my-model (model_type llama), not these weights (model_type qwen2): {untrained}"
    )
    # the same model's other copy (re-quantised, another dtype): the sentence it had
    copy = "calibrated on another copy of these weights: routing may differ from docs/results.md"
    for name in ("my-model", "my-model-Q4_K_M"):
        assert controllers_notice(meta, "b" * 32, name, llama) == copy
    # controllers from before meta.json recorded the architecture: the name alone
    old = {"model": "my-model", "weights_fingerprint": "a" * 32}
    assert "calibrated for my-model" in controllers_notice(old, "b" * 32, "qwen", qwen)
    assert "another copy" in controllers_notice(old, "b" * 32, "my-model", qwen)
    # and from before fingerprints, for this model's name: as before
    assert controllers_notice({"model": "my-model"}, "b" * 32, "my-model", llama) == (
        "these controllers do not record which weights they were calibrated on"
    )


def test_controllers_of_a_llama_loaded_onto_a_qwen2_say_whose_they_are(tmp_path, caplog):
    """They loaded (same shape) with "calibrated on another copy of these weights: routing
    may differ from docs/results.md": wrong for another model, whose routing they never
    learnt, and docs/results.md is about the shipped model."""
    import logging

    routed = mav.load((tiny_model("llama"), CharTokenizer()), name="my-model")
    stack = mav.calibrate(routed, TEXTS, steps=1, seq_len=64, val_windows=1, progress=False, save=tmp_path)
    routed.detach()
    assert stack.meta["architecture"] == architecture(routed.model.config)
    assert json.loads((tmp_path / "bayes" / "meta.json").read_text())["architecture"]["model_type"] == "llama"
    with caplog.at_level(logging.WARNING, logger="metaattn_viz.api"):
        other = mav.load((tiny_model("qwen2", seed=1), CharTokenizer()), name="qwen", controllers=tmp_path)
    assert other.controllers["bayes"].trained  # warned, not refused (docs)
    notice = other.weights_notice("bayes")
    assert notice is not None and notice.startswith("calibrated for my-model (model_type llama), not these")
    assert "docs/results.md" not in notice and "another copy" not in notice
    assert "bayes controllers of qwen: calibrated for my-model" in caplog.text
    other.detach()
