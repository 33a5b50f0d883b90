"""The server's settings read from the environment, each checked by one rule: a whole
number in its range, or a flag. An unset or empty variable takes the default; anything else
that is not a whole number in range is refused with a ValueError naming the variable, its
range and what it held (`serve` prints it as a usage error), never taken silently or shown
as a traceback from deep inside the server.

The variables themselves are read where they are used (app/requests.py, app/host.py,
app/deployment.py); docs/ui.md, "Settings", lists them. Never imports gradio or torch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

ON_WORDS = ("1", "true", "yes", "on")  # what turns a flag on


def whole_from_env(
    name: str,
    default: int,
    lo: int,
    hi: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """The whole number `name` holds (unset or empty: `default`), within [lo, hi]."""
    raw = (os.environ if environ is None else environ).get(name, "").strip()
    if not raw:
        return default
    span = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
    value = int(raw) if re.fullmatch(r"[+-]?[0-9]+", raw) else None  # ASCII digits only
    if value is None or value < lo or (hi is not None and value > hi):
        raise ValueError(f"{name} must be a whole number {span}, got {raw!r}")
    return value


def flag_from_env(name: str, environ: Mapping[str, str] | None = None) -> bool:
    """Whether `name` is set to 1, true, yes or on (any case); unset, empty or anything
    else is off."""
    return (os.environ if environ is None else environ).get(name, "").strip().lower() in ON_WORDS


__all__ = ["flag_from_env", "whole_from_env"]
