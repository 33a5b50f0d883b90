"""The numbers, the device, the data file and the output folder of `metaattn-viz
feature-maps` (metaattn_viz/training/feature_maps.py) and the numbers of `metaattn-viz
bench` (metaattn_viz/bench/args.py) are refused before any model loads or any row is
timed: exit code 2, one line naming the flag, no traceback. Each refusal is checked against
a stand-in for the expensive step that fails the test if it is reached, and a good command
line is shown to reach it (so the stand-in is the step the refusals come before)."""

from __future__ import annotations

import importlib

import pytest
from helpers import ROOT, Reached, cli_code, cli_refused

from metaattn_viz.cli import main

DATA = str(ROOT / "tests" / "data" / "wikitext2_excerpt.txt")  # the tests read no corpus/
CONFIG = str(ROOT / "assets" / "models" / "smollm2-135m" / "config.json")


# -- feature-maps ----------------------------------------------------------------------------------
@pytest.fixture
def no_model_load(monkeypatch):
    from metaattn_viz.routing import loading

    def load(*args, **kwargs):
        raise Reached("the model was loaded")

    monkeypatch.setattr(loading, "load", load)


def test_feature_maps_reaches_the_model_load_with_a_good_command_line(no_model_load, tmp_path):
    with pytest.raises(Reached):
        main(["feature-maps", "--data", DATA, "--out", str(tmp_path / "maps"), "--steps", "1", "--skip-eval"])
    assert not (tmp_path / "maps").exists()  # checked, not made


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--steps", "0", "--steps must be a whole number >= 1, got 0"),
        ("--batch-size", "-2", "--batch-size must be a whole number >= 1, got -2"),
        ("--seq-len", "0", "--seq-len must be a whole number >= 2"),
        ("--train-windows", "0", "--train-windows must be a whole number >= 1"),
        ("--val-windows", "0", "--val-windows must be a whole number >= 1"),
        ("--eval-windows", "0", "--eval-windows must be a whole number >= 1, got 0"),
        ("--seed", "-1", "--seed must be a whole number in [0, "),
        ("--seed", str(2**64), "--seed must be a whole number in [0, "),
        ("--lr", "nan", "--lr must be a finite number >= 0, got nan"),
        ("--lr", "-0.1", "--lr must be a finite number >= 0"),
        ("--steps", "x", "argument --steps: invalid int value: 'x'"),
    ],
)
def test_feature_maps_refuses_numbers_before_the_model_loads(flag, value, message, no_model_load, capsys):
    line = cli_refused(["feature-maps", "--data", DATA, flag, value], capsys)
    assert line.startswith("metaattn-viz feature-maps: error:") and message in line


def test_feature_maps_refuses_cuda_where_there_is_none_before_the_model_loads(
    no_model_load, monkeypatch, capsys
):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("SPACE_ID", raising=False)  # not ZeroGPU, where CUDA comes later
    line = cli_refused(["feature-maps", "--data", DATA, "--device", "cuda"], capsys)
    assert "asks for CUDA" in line and "--device cpu" in line
    assert "argument --device: device must be one of" in cli_refused(
        ["feature-maps", "--data", DATA, "--device", "gpu"], capsys
    )


def test_feature_maps_refuses_a_missing_data_file_before_the_model_loads(no_model_load, tmp_path, capsys):
    missing = tmp_path / "none.raw"
    assert f"data file not found: {missing}" in cli_refused(["feature-maps", "--data", str(missing)], capsys)


def test_feature_maps_refuses_an_out_it_cannot_write_before_the_model_loads(no_model_load, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    common = ["feature-maps", "--data", DATA, "--steps", "1", "--skip-eval", "--out"]
    assert f"--out {a_file} is a file, not a folder" in cli_refused([*common, str(a_file)], capsys)
    assert f"--out {a_file / 'sub'} cannot be made: {a_file} is a file" in cli_refused(
        [*common, str(a_file / "sub")], capsys
    )
    assert "--out is empty" in cli_refused([*common, " "], capsys)
    assert a_file.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]  # no checkpoint, no folder


def test_feature_maps_help_names_the_command_it_was_reached_by(capsys):
    from metaattn_viz.training import feature_maps

    assert cli_code(["feature-maps", "--help"]) == 0
    assert capsys.readouterr().out.startswith("usage: metaattn-viz feature-maps ")
    with pytest.raises(SystemExit):
        feature_maps.main(["--help"], prog=feature_maps.MODULE_PROG)
    assert capsys.readouterr().out.startswith("usage: python -m metaattn_viz.training.feature_maps ")


# -- bench -------------------------------------------------------------------------------------------
@pytest.fixture
def no_rows(monkeypatch):
    """run_bench (every row, and the model build) replaced; what it was called with."""
    from metaattn_viz.bench import attention

    calls = []

    def run_bench(*args, **kwargs):
        calls.append((args, kwargs))
        raise Reached("the benchmark ran")

    monkeypatch.setattr(attention, "run_bench", run_bench)
    return calls


def test_bench_reaches_its_rows_with_the_smallest_good_numbers(no_rows):
    with pytest.raises(Reached):
        main(
            ["bench", "--seq-lens", "16", "--repeats", "1", "--budget", "0.15"]
            + ["--prefill-len", "1", "--long-context", "17", "--model-config", CONFIG]
        )
    (args, kwargs), *_ = no_rows
    assert args[1:4] == (0.15, False, 1)  # budget, json, repeats
    assert kwargs["prefill_len"] == 1 and kwargs["long_context"] == 17


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--threads", "-1", "argument --threads: must be a whole number >= 1, got -1"),
        ("--threads", "0", "argument --threads: must be a whole number >= 1, got 0"),
        ("--repeats", "0", "argument --repeats: must be a whole number >= 1, got 0"),
        ("--prefill-len", "0", "argument --prefill-len: must be a whole number >= 1, got 0"),
        ("--long-context", "0", "argument --long-context: must be a whole number >= 17, got 0"),
        ("--long-context", "16", "argument --long-context: must be a whole number >= 17, got 16"),
        ("--budget", "nan", "argument --budget: must be a number in [0.15, 1], got 'nan'"),
        ("--budget", "inf", "argument --budget: must be a number in [0.15, 1]"),
        ("--budget", "0.1", "argument --budget: must be a number in [0.15, 1], got '0.1'"),
        ("--budget", "x", "argument --budget: must be a number in [0.15, 1], got 'x'"),
    ],
)
def test_bench_refuses_numbers_before_any_row(flag, value, message, no_rows, capsys):
    line = cli_refused(
        ["bench", "--no-model", "--seq-lens", "16", "--model-config", CONFIG, flag, value], capsys
    )
    assert line.startswith("metaattn-viz bench: error:") and message in line
    assert no_rows == []


def test_the_long_context_floor_leaves_the_long_decode_row_a_prompt(monkeypatch):
    """bench/model.py decodes LONG_DECODE_NEW_TOKENS after a prompt of --long-context minus
    them: at the floor the prompt is one token, not a slice from the excerpt's end."""
    from metaattn_viz.bench import model
    from metaattn_viz.bench.args import LONG_DECODE_NEW_TOKENS

    decodes = []
    monkeypatch.setattr(model, "plain_copy", lambda routed: None)
    monkeypatch.setattr(model, "routing_overhead", lambda *a, **k: {})
    monkeypatch.setattr(model, "prefill_speed", lambda *a, **k: {})
    monkeypatch.setattr(
        model, "decode_speed", lambda r, p, context, b, new_tokens: decodes.append((context, new_tokens))
    )
    model.model_rows(routed=object(), long_context=LONG_DECODE_NEW_TOKENS + 1)
    context, new_tokens = decodes[-1]
    assert context == LONG_DECODE_NEW_TOKENS + 1 and context - new_tokens == 1


@pytest.mark.parametrize("name", ["attention", "compile_check", "gpu_check", "store", "ui"])
def test_a_measuring_commands_help_says_what_it_does_in_whole_sentences(name, capsys):
    """The description is the module docstring's first paragraph, never its first line cut
    mid-sentence."""
    module = importlib.import_module(f"metaattn_viz.bench.{name}")
    with pytest.raises(SystemExit) as ended:
        module.main(["--help"])
    assert ended.value.code == 0
    help_text = capsys.readouterr().out
    description = " ".join(help_text.split("\n\n")[1].split())
    assert description == " ".join(module.__doc__.split("\n\n")[0].split())
    assert description.endswith((".", ")", ":")), description


# -- route -------------------------------------------------------------------------------------------
def test_route_reaches_the_model_load_with_a_good_command_line(no_model_load):
    with pytest.raises(Reached):
        main(["route", "--prompt", "hi", "--max-new-tokens", "4096", "--sinks", "0", "--no-log"])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--max-new-tokens", "5000"], "--max-new-tokens must be a whole number in [0, 4096], got 5000"),
        (["--sinks", "2000"], "--sinks: n_sink must be a whole number in [0, 1024], got 2000"),
        (["--window", "0"], "--window: window must be a whole number in [1, 1048576], got 0"),
        (["--hedge-threshold", "2"], "--hedge-threshold: hedge_threshold must be a finite number in [0, 1]"),
        (["--budget", "7"], "--budget: budget must be a finite number in [0.15, 1], got 7"),
    ],
)
def test_route_refuses_its_numbers_by_flag_before_the_model_loads(flags, message, no_model_load, capsys):
    """A bad number used to be refused by its Python name (`n_sink`), and --max-new-tokens
    over the generation's limit only after the model had loaded."""
    from metaattn_viz.routing.generation import MAX_NEW_TOKENS

    assert message in cli_refused(["route", "--prompt", "hi", "--no-log", *flags], capsys)
    assert cli_code(["route", "--help"]) == 0
    assert f"at most {MAX_NEW_TOKENS}" in capsys.readouterr().out  # the help's limit is the code's


def test_an_empty_model_and_a_one_token_window_are_refused_before_any_work(no_model_load, capsys):
    """`--model ""` quietly meant the bundled model (the notebook's load("") is refused), and
    a calibration's seq_len 1 trained on no next-token prediction at all."""
    from metaattn_viz.training.calibrate import CalibrationConfig

    assert "argument --model: is empty" in cli_refused(["route", "--prompt", "hi", "--model", " "], capsys)
    with pytest.raises(ValueError, match=r"seq_len \(--seq-len\) must be a whole number >= 2, got 1"):
        CalibrationConfig(seq_len=1)


def test_feature_maps_refuses_a_checkpoint_missing_weights_in_one_line(monkeypatch, capsys):
    from metaattn_viz.routing import loading

    def incomplete(*args, **kwargs):
        raise loading.IncompleteCheckpoint("checkpoint base/ lacks weights the model needs: lm_head.weight")

    monkeypatch.setattr(loading, "load", incomplete)
    line = cli_refused(["feature-maps", "--data", DATA, "--eval-only"], capsys)
    assert "lacks weights the model needs: lm_head.weight" in line
