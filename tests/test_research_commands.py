"""The research commands (calibrate, feature-maps, eval, bench, lambda-table) honour what
they are given and say what they were run on: a resumed calibration refuses another data
file or other weights, feature-maps measures on the windows it trained on and --eval-only
writes nothing, bench's --repeats reaches every timed row after a warm-up, eval refuses a
window length or local window it cannot use before any model work, a too-short text names
the remedy the command has, and the eval report names the split it validated on. Tiny
models and stand-ins only."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, CharTokenizer, Reached, cli_refused, routed_tiny, tiny_corpus, tiny_model

from metaattn_viz.cli import main
from metaattn_viz.training import data as data_mod
from metaattn_viz.training.calibrate import CalibrationConfig, calibrate

EXCERPT = ROOT / "tests" / "data" / "wikitext2_excerpt.txt"


def _no_model(monkeypatch):
    from metaattn_viz.routing.model import RoutedModel

    def load(*args, **kwargs):
        raise Reached("the model was loaded")

    monkeypatch.setattr(RoutedModel, "load", staticmethod(load))


# -- calibrate --resume --------------------------------------------------------------------------


def _checkpointed(tmp_path):
    """A finished two-step calibration of a tiny model on the excerpt: (model, config, folder)."""
    r = routed_tiny(seed=1)
    cfg = CalibrationConfig(steps=2, seq_len=64, val_windows=1, checkpoint_every=1)
    out = tmp_path / "run"
    calibrate(r, EXCERPT, cfg, out_dir=out, progress=False, model_slug="t")
    return r, cfg, out


def test_resume_on_another_data_file_is_refused_naming_the_data(tmp_path):
    r, cfg, out = _checkpointed(tmp_path)
    other = tmp_path / "other.txt"
    other.write_text(EXCERPT.read_text().replace(" the ", " a ", 1))  # one word differs
    meta_before = (out / "meta.json").read_text()
    with pytest.raises(ValueError, match=r"checkpoint.pt was made with other data \(sha256") as info:
        calibrate(r, other, cfg, out_dir=out, resume=True, progress=False, model_slug="t")
    assert "\n" not in str(info.value) and "settings" not in str(info.value)
    assert (out / "meta.json").read_text() == meta_before  # nothing saved under the other data's name


def test_resume_on_other_model_weights_is_refused_naming_them(tmp_path):
    _, cfg, out = _checkpointed(tmp_path)
    with pytest.raises(ValueError, match=r"made with other model weights \(fingerprint"):
        calibrate(routed_tiny(seed=2), EXCERPT, cfg, out_dir=out, resume=True, progress=False, model_slug="t")


def test_resume_names_the_settings_that_differ():
    cfg = CalibrationConfig(steps=2, seq_len=64)
    split = SimpleNamespace(sha256="a" * 64, path="d.txt")
    from metaattn_viz.training.calibrate import _check_resumable

    saved = {**vars(cfg), "lr": 0.5}
    ckpt = {"data_sha256": "b" * 64, "weights_fingerprint": "f"}
    with pytest.raises(ValueError, match=r"other settings \(lr\) and other data \(sha256 bbbbbbbbbbbb"):
        _check_resumable(EXCERPT, ckpt, saved, vars(cfg), split, "f")


def test_a_checkpoint_from_before_it_recorded_data_and_weights_resumes_with_a_warning(tmp_path, caplog):
    r, cfg, out = _checkpointed(tmp_path)
    ckpt = torch.load(out / "checkpoint.pt", weights_only=False)
    assert len(ckpt.pop("data_sha256")) == 64 and ckpt.pop("weights_fingerprint")
    ckpt["step"] = 1  # one step left to run
    ckpt["history"] = ckpt["history"][:1]
    torch.save(ckpt, out / "checkpoint.pt")
    steps = []
    with caplog.at_level(logging.WARNING, logger="metaattn_viz.training.calibrate"):
        calibrate(
            r,
            EXCERPT,
            cfg,
            out_dir=out,
            resume=True,
            progress=False,
            model_slug="t",
            on_step=lambda row: steps.append(row["step"]),
        )
    assert steps == [2]
    assert "does not record its data file or model weights" in caplog.text
    again = torch.load(out / "checkpoint.pt", weights_only=False)  # and the new one records both
    assert again["data_sha256"] == data_mod.load_split(EXCERPT).sha256 and again["weights_fingerprint"]


# -- too short: each command names its own remedy -----------------------------------------------


def test_calibrate_too_short_does_not_suggest_a_seq_len_flag_it_lacks(tmp_path, monkeypatch, capsys):
    from metaattn_viz.routing.model import RoutedModel

    short = tmp_path / "short.txt"
    short.write_text(" = A = \n a few words .\n = B = \n and a few more .\n")
    monkeypatch.setattr(RoutedModel, "load", staticmethod(lambda *a, **k: routed_tiny(seed=1)))
    args = ["calibrate", "--data", str(short), "--steps", "1", "--out", str(tmp_path / "c")]
    line = cli_refused(args, capsys)
    assert "the training text is shorter than one window" in line
    assert "--seq-len" not in line and "give a longer file" in line


def test_lambda_table_too_short_names_its_lengths(tmp_path, monkeypatch, capsys):
    from metaattn_viz.routing.model import RoutedModel

    short = tmp_path / "short.txt"
    short.write_text(" = A = \n a few words .\n = B = \n and a few more .\n")
    r = routed_tiny(seed=1)
    r.controller("bayes").trained = True
    monkeypatch.setattr(RoutedModel, "load", staticmethod(lambda *a, **k: r))
    line = cli_refused(
        ["lambda-table", "--data", str(short), "--lengths", "64,128", "--out", str(tmp_path / "t")], capsys
    )
    assert "the calibration text is shorter than one window" in line
    assert "--seq-len" not in line and "shorter --lengths" in line and "128" in line


def test_too_short_keeps_the_seq_len_remedy_where_the_command_has_the_flag():
    with pytest.raises(data_mod.TooShort, match=r"give a longer file or a smaller --seq-len$") as info:
        data_mod.windows(CharTokenizer(), ["tiny"], 64, "validation")
    assert isinstance(info.value, data_mod.DataError)
    said = str(info.value.with_remedy("do this"))
    assert said == "the validation text is shorter than one window (4 tokens < 64); do this"


# -- eval ----------------------------------------------------------------------------------------


def test_eval_refuses_a_one_token_window_before_the_model_loads(monkeypatch, capsys):
    from metaattn_viz.training.evaluate import MIN_SEQ_LEN

    _no_model(monkeypatch)
    line = cli_refused(["eval", "--data", str(EXCERPT), "--seq-len", "1"], capsys)
    assert f"argument --seq-len: must be a whole number >= {MIN_SEQ_LEN}, got 1" in line
    with pytest.raises(Reached):  # the smallest accepted one goes on to the model
        main(["eval", "--data", str(EXCERPT), "--seq-len", str(MIN_SEQ_LEN), "--device", "cpu"])


def test_evaluate_refuses_a_window_length_it_cannot_score():
    r = routed_tiny(seed=3)
    for seq_len in (1, 0, True):
        with pytest.raises(ValueError, match=r"seq_len \(--seq-len\) must be a whole number >= 2"):
            from metaattn_viz.training.evaluate import evaluate

            evaluate(r, EXCERPT, budgets=(1.0,), seq_len=seq_len, baselines=False)


def test_eval_refuses_a_local_window_out_of_range_before_the_model_loads(monkeypatch, capsys):
    _no_model(monkeypatch)
    line = cli_refused(["eval", "--data", str(EXCERPT), "--window", "2000000"], capsys)
    assert "--window: window must be a whole number in [1, 1048576], got 2000000" in line


def test_evaluate_checks_its_settings_before_the_dense_pass(monkeypatch):
    from metaattn_viz.training.evaluate import evaluate

    r = routed_tiny(seed=3)

    def dense_logits(ids):
        raise Reached("the dense pass ran")

    monkeypatch.setattr(r, "dense_logits", dense_logits)
    with pytest.raises(ValueError, match="window must be a whole number"):
        evaluate(r, EXCERPT, budgets=(1.0,), seq_len=64, max_tokens=64, window=2_000_000, baselines=False)


def _articles(n: int) -> str:
    return "".join(f" = Title {i} = \n {f'words of article {i} . ' * 30}\n" for i in range(n))


def test_the_split_says_which_texts_validate(tmp_path):
    path = tmp_path / "d.txt"
    path.write_text(_articles(23))
    assert data_mod.load_split(path).validation_rule() == "articles i % 10 == 9"
    path.write_text(_articles(3))
    assert data_mod.load_split(path).validation_rule() == "the last of its 3 articles"
    path.write_text("one paragraph .\n\nanother one .\n\na third .\n")
    assert data_mod.load_split(path).validation_rule() == "the last of its 3 paragraphs"


def test_eval_rows_and_report_name_the_split_of_a_short_file(tmp_path):
    from metaattn_viz.training.evaluate import evaluate
    from metaattn_viz.training.report import plot_title, tables

    data = tmp_path / "notes.txt"
    data.write_text(_articles(3))
    r = routed_tiny(seed=3)
    rows = evaluate(
        r, data, budgets=(1.0,), seq_len=64, max_tokens=64, controllers=("bayes",), baselines=False
    )
    assert {(row["data_file"], row["validation_rule"]) for row in rows} == {
        ("notes.txt", "the last of its 3 articles")
    }
    block = tables(rows, "metaattn-viz eval --data notes.txt")
    assert "Validation split of the data file (the last of its 3 articles), " in block
    assert "i % 10" not in block.split("<details>")[0]
    assert plot_title(rows) == "Cost vs quality on the validation split of notes.txt (lower-left is better)"
    assert "WikiText" not in plot_title(rows)


def test_the_report_keeps_the_usual_rules_words():
    from metaattn_viz.training.report import tables

    row = {
        "controller": "all-local",
        "budget": 0.3,
        "realized_cost": 0.3,
        "attention_flops_ratio": 0.1,
        "ppl": 60.0,
        "dense_ppl": 50.0,
        "kl_to_dense": 0.1,
        "routing_entropy": None,
        "routing_variety": 0.0,
        "expert_shares": {"full": 0.0, "linear": 0.0, "local": 1.0},
        "tokens": 4080,
        "seq_len": 256,
        "window": 64,
        "n_sink": 4,
        "scope": "global",
    }
    usual = "Validation split of the data file (articles i % 10 == 9), 4080 scored tokens in windows of 256;"
    assert usual in tables([row], "cmd")  # rows from before they carried the rule
    assert usual in tables([{**row, "validation_rule": "articles i % 10 == 9"}], "cmd")


# -- feature-maps --------------------------------------------------------------------------------


def test_feature_maps_measures_on_its_seq_len_and_eval_only_writes_nothing(tmp_path, monkeypatch):
    from metaattn_viz.routing import loading
    from metaattn_viz.training import feature_maps as fmod

    loaded = SimpleNamespace(model=tiny_model(), tokenizer=CharTokenizer(), slug="tiny", name="tiny-llama")
    monkeypatch.setattr(loading, "load", lambda *a, **k: loaded)
    measured = []

    def all_linear_perplexity(model, tokenizer, data, maps, **kwargs):
        measured.append(kwargs)
        return {"dense": 2.0, "all_linear": 3.0, "ratio": 1.5, "seq_len": kwargs.get("seq_len", 256)}

    monkeypatch.setattr(fmod, "all_linear_perplexity", all_linear_perplexity)
    data, out = tiny_corpus(tmp_path), tmp_path / "maps"
    common = ["--data", str(data), "--out", str(out), "--seq-len", "32", "--eval-windows", "2"]
    assert fmod.main([*common, "--steps", "2", "--train-windows", "2", "--val-windows", "1"]) == 0
    assert [m.get("seq_len") for m in measured] == [32, 32]
    meta = json.loads((out / fmod.META_FILE).read_text())
    assert (
        meta["hyperparameters"]["seq_len"] == 32 and meta["all_linear_perplexity"]["learned"]["seq_len"] == 32
    )

    files = {p.name: p.read_bytes() for p in out.iterdir()}
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    measured.clear()
    assert fmod.main([*common[:4], "--seq-len", "48", "--eval-only"]) == 0
    assert [m.get("seq_len") for m in measured] == [48, 48]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files  # nothing rewritten, nothing added
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


# -- bench ---------------------------------------------------------------------------------------


def test_interleaved_warms_each_side_up_before_timing():
    from metaattn_viz.bench.model import _interleaved

    calls = {"dense": 0, "routed": 0}
    timed_first = []

    def side(name):
        def fn():
            calls[name] += 1

        return fn

    def sync():
        timed_first.append(dict(calls))

    _interleaved({"dense": side("dense"), "routed": side("routed")}, 3, sync)
    assert calls == {"dense": 4, "routed": 4}  # one untimed warm-up each, then 3 timed
    # the first timed call starts after both warm-ups
    assert timed_first[1] == {"dense": 1, "routed": 1}


def _stand_in_rows(monkeypatch) -> dict:
    """bench/model.py's rows replaced; what the timed rows were called with."""
    from metaattn_viz.bench import model

    got = {}

    def overhead(routed, plain, **kwargs):
        got["overhead"] = kwargs
        return {}

    def prefill(routed, plain, seq_len, budget, **kwargs):
        got["prefill"] = kwargs
        return {}

    monkeypatch.setattr(model, "plain_copy", lambda routed: None)
    monkeypatch.setattr(model, "routing_overhead", overhead)
    monkeypatch.setattr(model, "prefill_speed", prefill)
    monkeypatch.setattr(model, "decode_speed", lambda *a, **k: {})
    return got


@pytest.mark.parametrize("repeats", [None, 2])
def test_model_rows_take_repeats_or_keep_their_recorded_defaults(repeats, monkeypatch):
    from metaattn_viz.bench import model

    got = _stand_in_rows(monkeypatch)
    model.model_rows(routed=object(), repeats=repeats)
    want = {} if repeats is None else {"repeats": repeats}
    assert got == {"overhead": want, "prefill": want}
    # the defaults that docs/benchmarks.md's model rows were measured with
    assert model.OVERHEAD_REPEATS == 7 and model.PREFILL_REPEATS == 3


@pytest.mark.parametrize("flag, attention, model_repeats", [([], 5, None), (["--repeats", "2"], 2, 2)])
def test_bench_repeats_reaches_the_model_rows(flag, attention, model_repeats, monkeypatch, capsys):
    from metaattn_viz.bench import attention as attention_mod
    from metaattn_viz.bench import model

    seen = {}
    monkeypatch.setattr(
        attention_mod, "attention_rows", lambda *a, repeats, **k: seen.setdefault("attention", repeats) and []
    )

    def model_rows(**kwargs):
        seen["model"] = kwargs.get("repeats", "absent")
        return []

    monkeypatch.setattr(model, "model_rows", model_rows)
    monkeypatch.setattr(model, "rows_model", lambda *a, **k: "the model")  # loaded before any row
    assert main(["bench", "--seq-lens", "16", *flag]) == 0
    assert seen == {"attention": attention, "model": model_repeats}


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such file"),
        (b"not json {", "is not a readable config.json (not JSON)"),
        (b"\x00\x01\xff\xfe binary", "is not a readable config.json"),
        (b'{"hidden_size": 8}', "has no model_type"),
        (b"[1, 2]", "has no model_type"),
    ],
)
def test_bench_checks_the_model_config_before_any_row(content, message, tmp_path, monkeypatch, capsys):
    from metaattn_viz.bench import attention as attention_mod

    def rows(*args, **kwargs):
        raise Reached("a row was timed")

    monkeypatch.setattr(attention_mod, "attention_rows", rows)
    path = tmp_path / "config.json"
    if content is not None:
        path.write_bytes(content)
    line = cli_refused(["bench", "--seq-lens", "16", "--model-config", str(path)], capsys)
    assert line.startswith("metaattn-viz bench: error: argument --model-config:") and message in line


def test_bench_accepts_a_config_or_its_folder(monkeypatch):
    from metaattn_viz.bench import attention as attention_mod

    calls = []
    monkeypatch.setattr(attention_mod, "run_bench", lambda *a, **k: calls.append(k["model_config"]))
    folder = ROOT / "assets" / "models" / "smollm2-135m"
    for given in (folder / "config.json", folder):
        assert main(["bench", "--model-config", str(given)]) == 0
    assert calls == [str(folder / "config.json"), str(folder)]
