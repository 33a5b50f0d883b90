"""`check_output`: the CLI's side of metaattn_viz/writable.py. An `--out` or `--report`
that cannot be written is a UserError naming the flag, raised before any work."""

from __future__ import annotations

import os
from pathlib import Path

from metaattn_viz.writable import output_problem


def check_output(path: str | os.PathLike[str] | None, flag: str, folder: bool) -> Path | None:
    """`path` (None: not given, passed through) as a Path, when a file (`folder` False) or a
    folder (`folder` True) can be written there; else UserError saying why, naming `flag`."""
    from metaattn_viz.cli import UserError

    if path is None:
        return None
    problem = output_problem(path, flag, folder)
    if problem is not None:
        raise UserError(problem)
    return Path(path).expanduser()
