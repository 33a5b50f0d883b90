"""A training run's checkpoint: the file in its output folder (calibrate.py's controllers,
feature_maps.py's maps) from which an interrupted run continues with --resume.

One rule for both commands. A run marks its checkpoint finished once its results are saved
beside it. A run started without --resume in a folder whose checkpoint is not finished is
refused before any work: it would overwrite another run's work, and lose it if it then
failed too. A finished run's checkpoint is replaced (its work is in the saved results,
which the new run replaces anyway), so a documented command reruns on the folder it wrote.
A checkpoint from before runs were marked is finished when its work is complete
(`steps_done`: calibrate's, every step; feature_maps.py judges its own, every layer). Only
metadata is read to judge it, on the CPU: a checkpoint saved on CUDA is judged anywhere.
--resume where there is no checkpoint starts from the beginning with a warning (a scripted
rerun goes on); --resume of a file that is not a readable checkpoint, or of one made with
other settings, another data file or other model weights, is refused.

Every refusal is a CheckpointError (a ValueError): one line naming the file and what to do.
A checkpoint is written to a temporary file renamed into place, so a run killed while
writing leaves the last whole one. It is read with `weights_only` (tensors and plain data):
a file from elsewhere runs no code when read. Never imports the model, gradio or the store.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
FINISHED = "finished"  # the key a checkpoint is marked with once its run's results are saved


class CheckpointError(ValueError):
    """A checkpoint that stops a run; the message names the file and what to do."""


def path_in(folder: Path | str) -> Path:
    return Path(folder) / CHECKPOINT


def steps_done(ckpt: dict) -> bool:
    """Whether a calibrate checkpoint's run did every step of its settings (its work is
    complete), for one from before runs were marked finished."""
    step, config = ckpt.get("step"), ckpt.get("config")
    steps = config.get("steps") if isinstance(config, dict) else None
    return isinstance(step, int) and isinstance(steps, int) and step >= steps


def start(folder: Path | str, resume: bool, complete: Callable[[dict], bool] = steps_done) -> Path | None:
    """The checkpoint a run in `folder` continues from, or None to start from the beginning
    (with a warning when --resume finds none). Without `resume`, a checkpoint that is not
    finished (`refuse_unfinished`, with `complete`) is refused."""
    if not resume:
        refuse_unfinished(folder, complete)
        return None
    path = path_in(folder)
    if not path.exists():
        log.warning("--resume: no checkpoint in %s to resume; starting from the beginning", folder)
        return None
    return path


def refuse_unfinished(folder: Path | str, complete: Callable[[dict], bool] = steps_done) -> None:
    """CheckpointError when `folder` holds a checkpoint of a run that has not finished (or
    one that cannot be read): a run started there would overwrite it. Finished: marked so,
    or, from before runs were marked, its work is complete (`complete`: calibrate's
    `steps_done` unless the command passes its own)."""
    path = path_in(folder)
    if not path.exists():
        return
    ckpt = read(path, map_location="cpu")  # only its metadata: saved on CUDA, judged anywhere
    if not (ckpt.get(FINISHED) or complete(ckpt)):
        raise CheckpointError(
            f"{path} holds the checkpoint of a run that has not finished: pass --resume to continue "
            "it, or remove it (or choose another --out) to start over"
        )


def read(path: Path, required: tuple[str, ...] = (), map_location: Any = None, resume: bool = False) -> dict:
    """The checkpoint at `path` (a dict holding `required`), or CheckpointError: a truncated
    file, or one that is not a checkpoint of this command."""
    prefix = "--resume: " if resume else ""
    try:
        ckpt = torch.load(path, weights_only=True, map_location=map_location)  # tensors and plain data only
    except Exception as exc:  # truncated, a folder, or not a torch file at all
        why = type(exc).__name__
    else:
        if not isinstance(ckpt, dict):
            why = f"it holds a {type(ckpt).__name__}"
        elif missing := [k for k in required if k not in ckpt]:
            why = f"it holds no {', '.join(missing)}"
        else:
            return ckpt
    raise CheckpointError(f"{prefix}{path} is not a readable checkpoint ({why}); remove it to start over")


def write(path: Path, payload: dict) -> None:
    """Save `payload` at `path` through a temporary file renamed into place."""
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def mark_finished(path: Path) -> None:
    """Mark the checkpoint at `path` finished, once its run's results are saved."""
    if path.exists():
        write(path, {**read(path, map_location="cpu"), FINISHED: True})


def check_resumable(path: Path, ckpt: dict, saved: Any, config: dict, split: Any, fingerprint: str) -> None:
    """Refuse (CheckpointError, one line naming what differs) a checkpoint made with other
    settings (`saved`, against this run's `config`), from another data file (`split`: its
    sha256 and path) or on another copy of the model's weights: resuming it would train on a
    mix and record only the second half's data and model in meta.json.

    A checkpoint from before the data and weights were recorded in it cannot be checked on
    those two; it is resumed with a warning rather than refused, since refusing would throw
    away its work when the data are most likely the same (its settings still must match)."""
    differs = []
    saved = saved if isinstance(saved, dict) else {}
    settings = sorted(
        k for k in set(saved) | set(config) if saved.get(k, "(unset)") != config.get(k, "(unset)")
    )
    if settings:
        differs.append(f"settings ({', '.join(settings)})")
    unchecked = []
    if "data_sha256" not in ckpt:
        unchecked.append("data file")
    elif ckpt["data_sha256"] != split.sha256:
        differs.append(f"data (sha256 {ckpt['data_sha256'][:12]}..., {split.path} is {split.sha256[:12]}...)")
    if "weights_fingerprint" not in ckpt:
        unchecked.append("model weights")
    elif ckpt["weights_fingerprint"] != fingerprint:
        differs.append(
            f"model weights (fingerprint {ckpt['weights_fingerprint'][:12]}..., "
            f"these are {fingerprint[:12]}...)"
        )
    if differs:
        raise CheckpointError(
            f"--resume: {path} was made with other {' and other '.join(differs)}; remove it "
            "or rerun with the same ones"
        )
    if unchecked:
        log.warning(
            "--resume: %s does not record its %s (made before checkpoints did); resuming on "
            "the assumption that they are the same; remove it to start over if not",
            path,
            " or ".join(unchecked),
        )
