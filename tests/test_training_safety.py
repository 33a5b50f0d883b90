"""What the training commands (calibrate, feature-maps) do with the work already in their
output folder and with what a user gets wrong: an unfinished run's checkpoint is never
overwritten without --resume; --resume refuses a checkpoint it cannot read or one made on
other weights, and says so when there is none; a window of one token, a text shorter than
a window and a damaged maps file are refused in one line; a perplexity too large for a
float is infinite; and trained weights are readable by whoever may read meta.json beside
them. Tiny models and stand-ins only."""

from __future__ import annotations

import io
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from helpers import ROOT, CharTokenizer, Reached, cli_refused, routed_tiny, tiny_corpus, tiny_model

from metaattn_viz.routing import linear_maps
from metaattn_viz.routing.controller import ControllerStack, config_for_model
from metaattn_viz.training import feature_maps as fmod
from metaattn_viz.training.calibrate import CalibrationConfig, calibrate

EXCERPT = ROOT / "tests" / "data" / "wikitext2_excerpt.txt"
MAPS_CFG = fmod.FeatureMapConfig(steps=2, batch_size=2, seq_len=32, train_windows=2, val_windows=1)
CAL_CFG = CalibrationConfig(steps=3, seq_len=64, val_windows=1, checkpoint_every=1)


class Interrupted(Exception):
    """Raised part-way through a run, as Ctrl-C would."""


def _maps_run(model, data, out, **kwargs):
    return fmod.train(
        model, CharTokenizer(), data, MAPS_CFG, out, model_slug="tiny", progress=False, **kwargs
    )


def _interrupted_maps_run(model, data, out, monkeypatch):
    """A feature-maps run stopped while training layer 1: its checkpoint holds layer 0."""
    real = fmod.train_layer

    def stop_at_layer_1(q, k, scaling, cfg, seed):
        if seed == cfg.seed + 1:
            raise Interrupted
        return real(q, k, scaling, cfg, seed)

    with monkeypatch.context() as m:
        m.setattr(fmod, "train_layer", stop_at_layer_1)
        with pytest.raises(Interrupted):
            _maps_run(model, data, out)
    assert len(torch.load(out / fmod.CHECKPOINT, weights_only=False)["layers"]) == 1


def _interrupted_calibration(out):
    """A calibration stopped after its second step (checkpointed) of three."""

    def stop_after_step_2(row):
        if row["step"] == 2:
            raise Interrupted

    with pytest.raises(Interrupted):
        calibrate(
            routed_tiny(seed=1),
            EXCERPT,
            CAL_CFG,
            out_dir=out,
            progress=False,
            model_slug="t",
            on_step=stop_after_step_2,
        )
    assert torch.load(out / "checkpoint.pt", weights_only=False)["step"] == 2


def _stand_in_model(monkeypatch, model=None):
    """The command's model load returns a tiny model (no download, no bundled model)."""
    from metaattn_viz.routing import loading

    loaded = SimpleNamespace(
        model=model or tiny_model(), tokenizer=CharTokenizer(), slug="tiny", name="tiny-llama"
    )
    monkeypatch.setattr(loading, "load", lambda *a, **k: loaded)


def _no_model_load(monkeypatch):
    from metaattn_viz.routing import loading

    def load(*args, **kwargs):
        raise Reached("the model was loaded")

    monkeypatch.setattr(loading, "load", load)


def _one_line_refusal(capsys, prog=fmod.MODULE_PROG) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


# -- an unfinished run's checkpoint is not overwritten without --resume -----------------------


def test_feature_maps_without_resume_refuses_an_unfinished_runs_checkpoint(tmp_path, monkeypatch, capsys):
    model, data, out = tiny_model(), tiny_corpus(tmp_path), tmp_path / "maps"
    _interrupted_maps_run(model, data, out, monkeypatch)
    before = (out / fmod.CHECKPOINT).read_bytes()

    def capture(*args, **kwargs):
        raise Reached("q, k were captured")

    monkeypatch.setattr(fmod, "capture_qk", capture)  # refused before any model work
    with pytest.raises(
        ValueError, match=r"checkpoint.pt holds the checkpoint of a run that has not finished"
    ):
        _maps_run(model, data, out)
    # and the command refuses it before the model loads, in one line naming what to do
    _no_model_load(monkeypatch)
    assert fmod.main(["--data", str(data), "--out", str(out), "--skip-eval"], prog=fmod.MODULE_PROG) == 2
    line = _one_line_refusal(capsys)
    assert "pass --resume to continue it, or remove it (or choose another --out) to start over" in line
    assert (out / fmod.CHECKPOINT).read_bytes() == before  # the first run's work is intact


def test_calibrate_without_resume_refuses_an_unfinished_runs_checkpoint(tmp_path):
    out = tmp_path / "c"
    _interrupted_calibration(out)
    before = (out / "checkpoint.pt").read_bytes()
    steps = []
    with pytest.raises(ValueError, match=r"has not finished: pass --resume to continue it"):
        calibrate(
            routed_tiny(seed=1),
            EXCERPT,
            CalibrationConfig(steps=3, seq_len=64, val_windows=1, checkpoint_every=1, seed=5),
            out_dir=out,
            progress=False,
            model_slug="t",
            on_step=lambda row: steps.append(row["step"]),
        )
    assert steps == [] and (out / "checkpoint.pt").read_bytes() == before
    assert not (out / "controller.safetensors").exists()


def test_calibrate_command_refuses_an_unfinished_runs_checkpoint_before_the_model_loads(
    tmp_path, monkeypatch, capsys
):
    from metaattn_viz.cli import main
    from metaattn_viz.routing.model import RoutedModel

    out = tmp_path / "c"
    _interrupted_calibration(out)

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the checkpoint was checked")

    monkeypatch.setattr(RoutedModel, "load", load)
    assert main(["calibrate", "--data", str(EXCERPT), "--out", str(out)]) == 2
    assert "has not finished: pass --resume to continue it" in capsys.readouterr().err


def test_a_finished_runs_folder_can_be_trained_again_without_resume(tmp_path):
    """The documented commands rerun on the folder they wrote (`make calibrate` after new
    feature maps): a finished run's checkpoint marks it finished, and a new run replaces it."""
    out = tmp_path / "c"
    r = routed_tiny(seed=1)
    first = calibrate(r, EXCERPT, CAL_CFG, out_dir=out, progress=False, model_slug="t")
    assert torch.load(out / "checkpoint.pt", weights_only=False)["finished"] is True
    steps = []
    again = calibrate(
        r,
        EXCERPT,
        CAL_CFG,
        out_dir=out,
        progress=False,
        model_slug="t",
        on_step=lambda row: steps.append(row["step"]),
    )
    assert steps == [1, 2, 3] and again["content_hash"] == first["content_hash"]

    model, data, maps_out = tiny_model(), tiny_corpus(tmp_path), tmp_path / "maps"
    _maps_run(model, data, maps_out)
    assert torch.load(maps_out / fmod.CHECKPOINT, weights_only=False)["finished"] is True
    _maps_run(model, data, maps_out)


def _unmarked(path):
    """The checkpoint at `path` as a run from before runs were marked finished left it."""
    ckpt = torch.load(path, weights_only=False)
    del ckpt["finished"]
    torch.save(ckpt, path)


def test_a_run_finished_before_runs_were_marked_is_trained_again_without_resume(
    tmp_path, monkeypatch, capsys
):
    """A checkpoint with no "finished" key whose work is complete (calibrate: every step;
    feature maps: every layer) is a finished run's: `make calibrate` and `make feature-maps`
    rerun on a checkout that trained before the mark. One that is not complete is refused."""
    from metaattn_viz.cli import main
    from metaattn_viz.routing.model import RoutedModel
    from metaattn_viz.training import checkpoints

    out, r = tmp_path / "c", routed_tiny(seed=1)
    calibrate(r, EXCERPT, CAL_CFG, out_dir=out, progress=False, model_slug="t")
    _unmarked(out / "checkpoint.pt")
    checkpoints.refuse_unfinished(out)  # the command's check before the model loads

    def loaded(*args, **kwargs):
        raise Reached("the model was loaded")

    with monkeypatch.context() as m:
        m.setattr(RoutedModel, "load", loaded)
        with pytest.raises(Reached):
            main(["calibrate", "--data", str(EXCERPT), "--out", str(out)])
    steps = []
    calibrate(
        r,
        EXCERPT,
        CAL_CFG,
        out_dir=out,
        progress=False,
        model_slug="t",
        on_step=lambda row: steps.append(row["step"]),
    )
    assert steps == [1, 2, 3]

    model, data, maps_out = tiny_model(), tiny_corpus(tmp_path), tmp_path / "maps"
    _maps_run(model, data, maps_out)
    _unmarked(maps_out / fmod.CHECKPOINT)
    _stand_in_model(monkeypatch, model)  # the command: checked before the model loads, then trained
    args = ["--data", str(data), "--out", str(maps_out), "--skip-eval"]
    small = ["--steps", "2", "--seq-len", "32", "--train-windows", "2", "--val-windows", "1"]
    assert fmod.main([*args, *small], prog=fmod.MODULE_PROG) == 0
    _unmarked(maps_out / fmod.CHECKPOINT)
    _maps_run(model, data, maps_out)  # the library function, which knows the model's layers
    # an unfinished run in a folder that holds an earlier run's maps is still refused
    _interrupted_maps_run(model, data, maps_out, monkeypatch)
    with pytest.raises(ValueError, match=r"holds the checkpoint of a run that has not finished"):
        _maps_run(model, data, maps_out)
    _no_model_load(monkeypatch)  # the maps saved beside it are not its own: refused before the load
    assert fmod.main([*args, *small], prog=fmod.MODULE_PROG) == 2
    assert "has not finished: pass --resume to continue it" in _one_line_refusal(capsys)


def _saved_on_cuda(monkeypatch, path, ckpt):
    """`ckpt` saved at `path` as `--device cuda` saves it, on a machine without CUDA."""
    import torch.serialization

    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(ckpt, path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_a_checkpoint_saved_on_cuda_is_read_on_a_machine_without_one(tmp_path, monkeypatch):
    from metaattn_viz.training import checkpoints

    out = tmp_path / "c"
    out.mkdir()
    unfinished = {"config": {"steps": 3}, "step": 2, "stack": {"w": torch.zeros(2)}}
    _saved_on_cuda(monkeypatch, out / "checkpoint.pt", unfinished)
    with pytest.raises(RuntimeError, match="CUDA"):  # as torch reads it without a map_location
        torch.load(out / "checkpoint.pt", weights_only=False)
    with pytest.raises(checkpoints.CheckpointError, match="has not finished: pass --resume"):
        checkpoints.refuse_unfinished(out)
    _saved_on_cuda(monkeypatch, out / "checkpoint.pt", {**unfinished, "finished": True})
    checkpoints.refuse_unfinished(out)  # a finished run's: replaced

    model, data, maps_out = tiny_model(), tiny_corpus(tmp_path), tmp_path / "maps"
    _interrupted_maps_run(model, data, maps_out, monkeypatch)
    ckpt = torch.load(maps_out / fmod.CHECKPOINT, weights_only=False)
    _saved_on_cuda(monkeypatch, maps_out / fmod.CHECKPOINT, ckpt)
    meta = _maps_run(model, data, maps_out, resume=True)
    assert len(meta["per_layer"]) == 3


# -- --resume: a checkpoint it can use, or a plain refusal ---------------------------------------


def test_feature_maps_resume_refuses_a_checkpoint_made_on_another_model(tmp_path, monkeypatch):
    data, out = tiny_corpus(tmp_path), tmp_path / "maps"
    _interrupted_maps_run(tiny_model(seed=0), data, out, monkeypatch)
    with pytest.raises(ValueError, match=r"checkpoint.pt was made with other model weights \(fingerprint"):
        _maps_run(tiny_model(seed=1), data, out, resume=True)
    assert not (out / linear_maps.WEIGHTS_FILE).exists() and not (out / linear_maps.META_FILE).exists()
    meta = _maps_run(tiny_model(seed=0), data, out, resume=True)  # the model it was made on resumes it
    assert len(meta["per_layer"]) == 3 and len(meta["weights_fingerprint"]) == 32


def _foreign_checkpoint() -> bytes:
    buf = io.BytesIO()
    torch.save({"x": 1}, buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    "content", [b"PK\x03\x04 truncated", _foreign_checkpoint()], ids=["truncated", "foreign"]
)
def test_feature_maps_resume_of_an_unreadable_checkpoint_is_refused_in_one_line(
    content, tmp_path, monkeypatch, capsys
):
    data, out = tiny_corpus(tmp_path), tmp_path / "maps"
    out.mkdir()
    (out / fmod.CHECKPOINT).write_bytes(content)
    _stand_in_model(monkeypatch)
    args = ["--data", str(data), "--out", str(out), "--resume", "--skip-eval", "--seq-len", "32"]
    assert fmod.main(args, prog=fmod.MODULE_PROG) == 2
    line = _one_line_refusal(capsys)
    assert f"{out / fmod.CHECKPOINT} is not a readable checkpoint (" in line
    assert line.endswith("remove it to start over")


@pytest.mark.parametrize("command", ["calibrate", "feature-maps"])
def test_resume_without_a_checkpoint_says_it_starts_from_the_beginning(command, tmp_path, caplog):
    out = tmp_path / "typo"
    with caplog.at_level(logging.WARNING):
        if command == "calibrate":
            calibrate(
                routed_tiny(seed=1),
                EXCERPT,
                CalibrationConfig(steps=1, seq_len=64, val_windows=1),
                out_dir=out,
                resume=True,
                progress=False,
                model_slug="t",
            )
        else:
            _maps_run(tiny_model(), tiny_corpus(tmp_path), out, resume=True)
    assert f"--resume: no checkpoint in {out} to resume; starting from the beginning" in caplog.text


# -- what a user gets wrong, refused in one line ---------------------------------------------------


def test_feature_maps_refuses_a_one_token_window(tmp_path, monkeypatch, capsys):
    from metaattn_viz.training.evaluate import MIN_SEQ_LEN

    assert MIN_SEQ_LEN == 2
    with pytest.raises(ValueError, match=r"--seq-len must be a whole number >= 2, got 1"):
        fmod.FeatureMapConfig(seq_len=1)
    assert fmod.FeatureMapConfig(seq_len=2).seq_len == 2
    _no_model_load(monkeypatch)
    line = cli_refused(["feature-maps", "--data", str(EXCERPT), "--seq-len", "1"], capsys)
    assert "--seq-len must be a whole number >= 2, got 1" in line
    with pytest.raises(ValueError, match="at least 2 tokens"):  # the library function too
        fmod.perplexity(tiny_model(), torch.zeros(2, 1, dtype=torch.long), all_linear=False)


def test_feature_maps_module_refuses_a_text_shorter_than_a_window_in_one_line(tmp_path, monkeypatch, capsys):
    _stand_in_model(monkeypatch)
    args = ["--data", str(tiny_corpus(tmp_path)), "--out", str(tmp_path / "m"), "--seq-len", "100000"]
    assert fmod.main([*args, "--skip-eval"], prog=fmod.MODULE_PROG) == 2
    line = _one_line_refusal(capsys)
    assert "shorter than one window" in line and "smaller --seq-len" in line


def test_feature_maps_eval_only_refuses_a_damaged_maps_file_naming_it(tmp_path, monkeypatch, capsys):
    out = tmp_path / "maps"
    out.mkdir()
    (out / linear_maps.WEIGHTS_FILE).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match=r"feature_maps.safetensors is not a readable feature-maps file"):
        linear_maps.load(out)
    _stand_in_model(monkeypatch)
    assert fmod.main(["--data", str(EXCERPT), "--out", str(out), "--eval-only"], prog=fmod.MODULE_PROG) == 2
    line = _one_line_refusal(capsys)
    assert f"{out / linear_maps.WEIGHTS_FILE} is not a readable feature-maps file" in line
    # the routed model still runs without them, saying why
    choice = linear_maps.load_for_model(tiny_model().config, "tiny", out, 16)
    assert choice.maps is None and "unreadable" in choice.source


def test_a_perplexity_too_large_for_a_float_is_infinite():
    def certain_of_the_wrong_token(input_ids, use_cache=False):
        logits = torch.zeros(*input_ids.shape, 8)
        logits[..., 0] = -1e30  # the text's token (0) is all but impossible
        return SimpleNamespace(logits=logits)

    ids = torch.zeros(2, 6, dtype=torch.long)
    assert fmod.perplexity(certain_of_the_wrong_token, ids, all_linear=False) == float("inf")


def test_feature_maps_writes_an_infinite_perplexity_as_null_in_strict_json(tmp_path, monkeypatch, capsys):
    """An infinite perplexity (a model certain of the wrong tokens) and the ratio of two
    (NaN) are null in the printed result and in meta.json, as eval --json writes them."""
    import json

    def strict(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.mul_(1e5)
    _stand_in_model(monkeypatch, model)
    data, out = tiny_corpus(tmp_path), tmp_path / "maps"
    args = ["--data", str(data), "--out", str(out), "--steps", "2", "--seq-len", "32"]
    assert fmod.main([*args, "--train-windows", "2", "--val-windows", "1", "--eval-windows", "1"]) == 0
    printed = capsys.readouterr().out
    result = json.loads(printed[printed.index("{") :], parse_constant=strict)
    meta = json.loads((out / linear_maps.META_FILE).read_text(), parse_constant=strict)
    assert meta["all_linear_perplexity"] == result
    assert result["elu+1"]["dense"] is None and result["elu+1"]["ratio"] is None
    assert result["learned"]["tokens"] == 32


# -- trained weights are as readable as their meta.json --------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027])
def test_saved_weights_get_the_mode_a_new_file_gets(mask, tmp_path):
    """safetensors' save_file makes its file 0600: a service running as another user could
    read meta.json and not the weights beside it."""
    from metaattn_kernels.feature_maps import FeatureMap

    stack = ControllerStack(config_for_model(tiny_model().config, "bayes"))
    fm = FeatureMap(torch.zeros(2, 4, 2), torch.zeros(2, 2), torch.zeros(1, 4, 2), torch.zeros(1, 2))
    old = os.umask(mask)
    try:
        for folder, name in (
            (tmp_path / "c", "controller.safetensors"),
            (tmp_path / "m", linear_maps.WEIGHTS_FILE),
        ):
            folder.mkdir()
            leftover = folder / (name + ".tmp")  # a killed write's file, private
            leftover.write_bytes(b"")
            leftover.chmod(0o600)
            if name == linear_maps.WEIGHTS_FILE:
                linear_maps.save([fm], folder, {"kind": "hedgehog"})
            else:
                stack.save(folder, {})
            assert (folder / name).stat().st_mode & 0o777 == 0o666 & ~mask, name
            assert (folder / "meta.json").stat().st_mode & 0o777 == 0o666 & ~mask
    finally:
        os.umask(old)
