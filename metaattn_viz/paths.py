"""Where things live on disk: the model cache, the data folder, the shipped assets.

Every location can be overridden by an environment variable so that tests, CI and
Spaces can redirect it. Never creates anything at import time.
"""

from __future__ import annotations

import os
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent  # the checkout, when running from one
# `pip install .` places the repository's assets/ inside the package (pyproject maps it);
# a checkout (or a Space, where the project is not installed) reads them in place.
ASSETS_DIR = PACKAGE_DIR / "assets" if (PACKAGE_DIR / "assets").is_dir() else REPO_ROOT / "assets"
CONTROLLERS_DIR = ASSETS_DIR / "controllers"
FEATURE_MAPS_DIR = ASSETS_DIR / "feature_maps"
KERNELS_DIR = REPO_ROOT / "kernels"
KERNELS_PACKAGE = "metaattn_kernels"
# Where the model comes from (routing/loading.py reads them; a Space's deploy sets them):
# a local folder, a GGUF file or a hub id; and the hub revision (a commit) a hub id loads.
MODEL_ENV = "METAATTN_MODEL"
DATA_ENV = "METAATTN_DATA"  # the data folder (the routing log); a Space's points into its bucket
DB_ENV = "METAATTN_DB"  # the routing log file itself
MODEL_REVISION_ENV = "METAATTN_MODEL_REVISION"


def _user_dir(env_xdg: str, default_sub: str) -> Path:
    base = os.environ.get(env_xdg)
    return Path(base) if base else Path.home() / default_sub


def cache_dir() -> Path:
    """Converted-model cache: METAATTN_CACHE, else $XDG_CACHE_HOME/metaattn-viz."""
    explicit = os.environ.get("METAATTN_CACHE")
    if explicit:
        return Path(explicit)
    return _user_dir("XDG_CACHE_HOME", ".cache") / "metaattn-viz"


def path_from_env(name: str) -> Path | None:
    """The path variable `name` holds, read by the rule the CLI's --db reads its value with:
    ~ expanded; unset or empty, None (the default); only spaces, a ValueError naming the
    variable (a path of spaces is never meant, and would be made in the working directory)."""
    raw = os.environ.get(name, "")
    if not raw:
        return None
    if not raw.strip():
        raise ValueError(f"{name} is blank ({raw!r}): give a path, or unset it for the default")
    return Path(raw).expanduser()


def data_dir() -> Path:
    """Persistent data (the routing log): METAATTN_DATA, else $XDG_DATA_HOME/metaattn-viz.

    On a Space, METAATTN_DATA points into a mounted storage bucket (`metaattn-viz deploy`
    sets it); Spaces no longer have a `/data` volume of their own.
    """
    return path_from_env(DATA_ENV) or _user_dir("XDG_DATA_HOME", ".local/share") / "metaattn-viz"


def storage_is_ephemeral() -> bool:
    """True on a Space whose routing log has no mounted storage: its runs are lost when the
    Space restarts (the page says so). A Space has no lasting disk of its own, only a
    mounted bucket, so the log's folder must lie under a mount point: a duplicate of a
    Space inherits METAATTN_DATA but may have skipped the bucket."""
    if not os.environ.get("SPACE_ID"):
        return False
    if not (os.environ.get(DATA_ENV) or os.environ.get(DB_ENV)):
        return True
    return not _under_a_mount(default_db_path().parent)


def _under_a_mount(path: Path) -> bool:
    """Whether `path` (or, where it does not exist yet, its nearest folder that does) lies
    under a mount point other than the file system's root."""
    path = path.absolute()
    for folder in (path, *path.parents):
        if folder == Path(folder.anchor):
            return False
        if os.path.ismount(folder):
            return True
    return False


def default_db_path() -> Path:
    """The routing log: METAATTN_DB, else <data_dir>/routing.duckdb (each read by
    `path_from_env`: ~ expanded, blank refused)."""
    return path_from_env(DB_ENV) or data_dir() / "routing.duckdb"


def ensure_kernels_importable() -> None:
    """Make the repository's kernels/ folder importable as `metaattn_kernels`.

    An installed project maps the folder to that name (pyproject's package-dir). A plain
    checkout (a Space, scripts/device_check.sh) is not installed: there the folder is
    registered as a namespace package under our name. It is never importable as the bare
    name `kernels`, which belongs to Hugging Face's kernel-hub library.
    """
    import importlib.machinery
    import importlib.util
    import sys

    if KERNELS_PACKAGE in sys.modules or importlib.util.find_spec(KERNELS_PACKAGE) is not None:
        return
    if not KERNELS_DIR.is_dir():
        raise ImportError(f"{KERNELS_PACKAGE} is not installed and {KERNELS_DIR} does not exist")
    spec = importlib.machinery.ModuleSpec(KERNELS_PACKAGE, None, is_package=True)
    spec.submodule_search_locations = [str(KERNELS_DIR)]
    sys.modules[KERNELS_PACKAGE] = importlib.util.module_from_spec(spec)
