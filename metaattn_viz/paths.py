"""Where things live on disk: the model cache, the data folder, the shipped assets.

Every location can be overridden by an environment variable so that tests, CI and
Spaces can redirect it. Never creates anything at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
ASSETS_DIR = REPO_ROOT / "assets"
CONTROLLERS_DIR = ASSETS_DIR / "controllers"


def _user_dir(env_xdg: str, default_sub: str) -> Path:
    base = os.environ.get(env_xdg)
    return Path(base) if base else Path.home() / default_sub


def cache_dir() -> Path:
    """Converted-model cache: METAATTN_CACHE, else $XDG_CACHE_HOME/metaattn-viz."""
    explicit = os.environ.get("METAATTN_CACHE")
    if explicit:
        return Path(explicit)
    return _user_dir("XDG_CACHE_HOME", ".cache") / "metaattn-viz"


def data_dir() -> Path:
    """Persistent data (the routing log): METAATTN_DATA, /data on a Space with a volume,
    else $XDG_DATA_HOME/metaattn-viz."""
    explicit = os.environ.get("METAATTN_DATA")
    if explicit:
        return Path(explicit)
    if os.environ.get("SPACE_ID") and Path("/data").is_dir() and os.access("/data", os.W_OK):
        return Path("/data/metaattn-viz")
    return _user_dir("XDG_DATA_HOME", ".local/share") / "metaattn-viz"


def default_db_path() -> Path:
    """The routing log: METAATTN_DB, else <data_dir>/routing.duckdb."""
    explicit = os.environ.get("METAATTN_DB")
    return Path(explicit) if explicit else data_dir() / "routing.duckdb"
