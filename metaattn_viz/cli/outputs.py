"""Where a command will write, checked before it does any work: a command that runs for
minutes (an evaluation, a lambda table, a calibration) must not find out at the end that
its `--out` or `--report` cannot be written, and lose what it computed.

`check_output(path, flag, folder)` raises UserError naming the flag when `path` could not
be written: empty, a folder where a file goes (or a file where a folder goes), under
something that is not a folder, or where the nearest folder that exists is not writable.
It leaves nothing behind (a refused command makes no empty folder; the test file it writes
to try a folder is removed at once). Pure checks on the
file system: never imports the model, the log or gradio.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def check_output(path: str | os.PathLike[str] | None, flag: str, folder: bool) -> Path | None:
    """`path` (None: not given, passed through) as a Path, when a file (`folder` False) or a
    folder (`folder` True) can be written there; else UserError saying why, naming `flag`."""
    from metaattn_viz.cli import UserError

    if path is None:
        return None
    if not str(path).strip():
        raise UserError(f"{flag} is empty: give a {'folder' if folder else 'file'} path")
    p = Path(path).expanduser()
    if p.exists():
        if folder and not p.is_dir():
            raise UserError(f"{flag} {p} is a file, not a folder")
        if not folder and p.is_dir():
            raise UserError(f"{flag} {p} is a folder; give a file path")
    # the nearest ancestor that exists must be a folder this process may write in (a path
    # under a file, or in a read-only place, would fail only when the work is done)
    existing = p if p.exists() and folder else p.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag} {p} cannot be made: {existing} is a file, not a folder")
    problem = _unwritable(p if p.exists() else existing)
    if problem:
        raise UserError(f"{flag} {p} cannot be written: {problem}")
    return p


def _unwritable(target: Path) -> str | None:
    """Why nothing can be written at `target` (an existing folder: a file made and removed
    in it at once; an existing file: opened for appending, untouched), or None. Tried, not
    read from permission bits, which say yes to root on a read-only file system."""
    try:
        if target.is_dir():
            with tempfile.TemporaryFile(dir=target):
                pass
        else:
            with open(target, "ab"):
                pass
    except OSError as exc:
        return f"{target}: {exc.strerror or exc}"
    return None
