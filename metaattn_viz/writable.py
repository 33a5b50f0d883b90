"""Where a command will write, checked before it does any work: a command that runs for
minutes (an evaluation, a lambda table, a calibration, feature maps) must not find out at
the end that its `--out` or `--report` cannot be written, and lose what it computed.

`output_problem(path, flag, folder)` says why `path` could not be written, naming the flag:
empty, a folder where a file goes (or a file where a folder goes), a named pipe, a device or
a socket (`special_file`: opening a named pipe to try it would wait for ever for a reader,
and every writer here replaces or appends to a regular file, which /dev/null is not), under
something that is not a folder, or where the nearest folder that exists is not writable. It
leaves nothing behind (it makes no folder; the test file it writes to try a folder is
removed at once). Pure checks on the file system, importable from every layer
(cli/outputs.py turns a problem into the CLI's UserError; training/feature_maps.py refuses
with it; store/opening.py refuses a routing log with `special_file`).
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


def output_problem(path: str | os.PathLike[str], flag: str, folder: bool) -> str | None:
    """Why a file (`folder` False) or a folder (`folder` True) cannot be written at `path`,
    as a sentence naming `flag`; None when it can."""
    if not str(path).strip():
        return f"{flag} is empty: give a {'folder' if folder else 'file'} path"
    p = Path(path).expanduser()
    if p.exists():
        special = special_file(p)
        if special is not None:  # opened below to try it, a named pipe would wait for a reader
            return f"{flag} {p} is {special}, not a {'folder' if folder else 'regular file'}"
        if folder and not p.is_dir():
            return f"{flag} {p} is a file, not a folder"
        if not folder and p.is_dir():
            return f"{flag} {p} is a folder; give a file path"
    # the nearest ancestor that exists must be a folder this process may write in (a path
    # under a file, or in a read-only place, would fail only when the work is done)
    existing = p if p.exists() and folder else p.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        return f"{flag} {p} cannot be made: {existing} is a file, not a folder"
    problem = _unwritable(p if p.exists() else existing)
    if problem:
        return f"{flag} {p} cannot be written: {problem}"
    return None


def special_file(path: str | os.PathLike[str]) -> str | None:
    """What is at `path` when it is neither a regular file nor a folder (links followed), in
    words ("a named pipe (FIFO)", "a character device", ...); None when it is one of those,
    or nothing is there. Only looked at (stat): opening a named pipe waits for its reader."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    for test, what in (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    ):
        if test(mode):
            return what
    return "a special file"


def _unwritable(target: Path) -> str | None:
    """Why nothing can be written at `target` (an existing folder: a file made and removed
    in it at once; an existing file: opened for appending, untouched), or None. Tried, not
    read from permission bits, which say yes to root on a read-only file system."""
    folder = target.is_dir()
    try:
        if folder:
            with tempfile.TemporaryFile(dir=target):
                pass
        else:
            with open(target, "ab"):
                pass
    except OSError as exc:
        # the system's reason in brackets: for /proc it is "No such file or directory"
        where = f"no file can be made in {target}" if folder else f"{target} cannot be opened for writing"
        return f"{where} ({exc.strerror or exc})"
    return None


__all__ = ["output_problem", "special_file"]
