"""Provenance of trained weights: which commit of this project produced them.

Calibration (controllers) and feature-map training both record it in their `meta.json`,
next to the data file's SHA-256 (training/data.py). Never raises: outside a git checkout
the commit is "unknown".
"""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit() -> str:
    """`git rev-parse HEAD` of the checkout this package runs from, with "+dirty" when the
    working tree has uncommitted changes to tracked files; "unknown" outside a checkout."""
    here = Path(__file__).parent
    try:
        head = _git(here, "rev-parse", "HEAD")
        if not head:
            return "unknown"
        dirty = _git(here, "status", "--porcelain", "--untracked-files=no")
        return head + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], capture_output=True, text=True, cwd=cwd, timeout=10)
    return out.stdout.strip() if out.returncode == 0 else ""
