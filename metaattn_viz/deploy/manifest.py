"""The Space manifest (`Spacefile`, YAML): read it and check it against its schema.

Everything `metaattn-viz deploy` needs to know about a Space that is not code lives in the
manifest: the default Space name, hardware and visibility, plain variables (never secrets:
one that looks like a secret is refused, `secret_variable_problem`), the storage bucket
mount, which weights the Space loads (the bundled GGUF the controllers were calibrated on,
or the hub's copy), what to upload, and which requirements file and Python version each
hardware gets (docs/deploy.md, "The manifest"). A bad manifest raises `ManifestError`
naming the field, before anything else happens.

Pure reading and checking: never touches the network, never writes, never calls the Hub
(only huggingface_hub's list of hardware names and its repo-id rules, `hub_name_problem`,
are used).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import SpaceHardware
from huggingface_hub.utils import HFValidationError, validate_repo_id

from metaattn_viz.paths import MODEL_ENV, MODEL_REVISION_ENV

HARDWARE = tuple(h.value for h in SpaceHardware)
ZEROGPU = "zero-a10g"
# The Pythons a Space may get: the pinned requirements (numpy 2.4, pandas 3.1, scipy 1.17,
# transformers 5.23, duckdb 2.0, ...) install on 3.11 or newer only.
PYTHONS = ("3.11", "3.12", "3.13")
# ZeroGPU builds only on Python 3.10 or 3.12 (Hub docs, mid-2026): of ours, 3.12.
ZEROGPU_PYTHONS = tuple(p for p in ("3.10", "3.12") if p in PYTHONS)

_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")
# A plain Space variable is readable by anyone who can see the Space; these look like secrets
# and must be Space secrets instead (docs/deploy.md, "The manifest"): a name with one of
# SECRET_WORDS as a word part (split at "_", any case: HF_TOKEN, OPENAI_API_KEY, but not
# MAX_NEW_TOKENS or KEYBOARD_LAYOUT), or a value holding a Hugging Face token (hf_ and at
# least 20 letters and digits in a row; real ones have 34).
SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD", "PASSWD", "KEY", "APIKEY", "CREDENTIALS")
_HF_TOKEN = re.compile(r"(?<![A-Za-z0-9])hf_[A-Za-z0-9]{20,}")

# Which weights the Space loads (docs/deploy.md, "The model on a Space"): the GGUF that the
# controllers were calibrated on, uploaded into the Space, or the hub's safetensors.
BUNDLED_GGUF, HUB = "bundled-gguf", "hub"
WEIGHTS = (BUNDLED_GGUF, HUB)


def hub_name_problem(repo_id: str) -> str | None:
    """Why the Hub would refuse `repo_id` (NAME or OWNER/NAME) as a name, or None where it
    would not: huggingface_hub's own check (`validate_repo_id`, which every HfApi call that
    takes a repo id runs first): letters, digits, '-', '_' and '.', not starting or ending
    with '-' or '.', no '--' or '..', not ending in '.git', at most 96 characters a part."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        return str(exc)
    return None


class ManifestError(ValueError):
    """The manifest does not fit its schema; `field` names the offending field."""

    def __init__(self, field: str, problem: str, source: str = "Spacefile"):
        self.field = field
        super().__init__(f"{source}: field '{field}': {problem}")


@dataclass(frozen=True)
class Storage:
    """A storage bucket mounted into the Space; the app's data folder lives on it."""

    bucket: str  # bucket name in the Space owner's namespace
    mount_path: str  # where the Space sees the bucket, e.g. /data
    env: str  # the variable that points the app at its data folder (METAATTN_DATA)
    subdir: str  # folder under mount_path that env points to ("" = the mount itself)

    @property
    def data_dir(self) -> str:
        return f"{self.mount_path.rstrip('/')}/{self.subdir}" if self.subdir else self.mount_path


@dataclass(frozen=True)
class SpaceModel:
    """The model the Space runs: its repo on the Hub (always listed under `models:`), and
    which copy of its weights the Space loads."""

    weights: str  # BUNDLED_GGUF or HUB
    gguf_path: str | None  # where the GGUF goes in the Space (relative to the app folder)
    repo: str
    revision: str  # a 40-hex commit of `repo`: the Space never follows a moving branch
    files: tuple[str, ...]  # what `preload_from_hub` downloads when the hub's copy is used


@dataclass(frozen=True)
class Runtime:
    """What one family of hardware installs: a requirements file and a Python version."""

    name: str
    requirements: str  # path relative to the deployed folder
    python_version: str
    hardware: tuple[str, ...]


@dataclass(frozen=True)
class Manifest:
    name: str
    hardware: str
    private: bool
    app_file: str
    variables: dict[str, str]
    storage: Storage | None
    model: SpaceModel
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    runtimes: tuple[Runtime, ...]

    def runtime_for(self, hardware: str) -> Runtime:
        """The runtime whose hardware list names `hardware`; ManifestError if none does."""
        for runtime in self.runtimes:
            if hardware in runtime.hardware:
                return runtime
        listed = sorted(h for r in self.runtimes for h in r.hardware)
        raise ManifestError(
            "runtimes", f"no runtime lists hardware '{hardware}' (listed: {', '.join(listed)})"
        )


# --- schema -------------------------------------------------------------------------------

_TOP = {"name", "hardware", "private", "app_file", "variables", "storage", "model", "upload", "runtimes"}
_TOP_REQUIRED = {"name", "hardware", "model", "upload", "runtimes"}
_STORAGE = {"bucket", "mount_path", "env", "subdir"}
_MODEL = {"weights", "gguf_path", "repo", "revision", "files"}
_UPLOAD = {"include", "exclude"}
_RUNTIME = {"requirements", "python_version", "hardware"}


def load_manifest(path: Path) -> Manifest:
    """Read and check the manifest at `path` (ManifestError names the bad field)."""
    try:
        raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError("(file)", f"{path} does not exist", str(path)) from None
    except IsADirectoryError:
        raise ManifestError("(file)", f"{path} is a folder, not a manifest file", str(path)) from None
    except OSError as exc:  # not a folder on the way, no permission: in words, not [Errno N]
        raise ManifestError("(file)", f"{path} cannot be read ({exc.strerror or exc})", str(path)) from None
    except yaml.YAMLError as exc:
        raise ManifestError("(file)", f"not valid YAML ({exc})", str(path)) from None
    except UnicodeDecodeError as exc:
        raise ManifestError("(file)", f"not UTF-8 text (byte {exc.start})", str(path)) from None
    return parse_manifest(raw, source=str(path))


def parse_manifest(raw: Any, source: str = "Spacefile") -> Manifest:
    """Check an already-parsed manifest (a mapping) and build the Manifest."""
    c = _Checker(source)
    top = c.mapping(raw, "", _TOP, _TOP_REQUIRED)
    hardware = c.choice(top["hardware"], "hardware", HARDWARE)
    storage_raw = top.get("storage")
    storage = None if storage_raw is None else _storage(c, storage_raw)
    manifest = Manifest(
        name=c.hub_name(top["name"], "name", "a Space name"),
        hardware=hardware,
        private=c.boolean(top.get("private", False), "private"),
        app_file=c.string(top.get("app_file", "app.py"), "app_file"),
        variables=_variables(c, top.get("variables") or {}),
        storage=storage,
        model=_model(c, top["model"]),
        include=c.strings(c.mapping(top["upload"], "upload", _UPLOAD, _UPLOAD)["include"], "upload.include"),
        exclude=c.strings(top["upload"]["exclude"], "upload.exclude"),
        runtimes=_runtimes(c, top["runtimes"]),
    )
    if storage is not None and storage.env in manifest.variables:
        raise ManifestError(
            f"variables.{storage.env}",
            f"set by storage.env already (it points at {storage.data_dir})",
            source,
        )
    if manifest.model.weights == BUNDLED_GGUF and MODEL_ENV in manifest.variables:
        raise ManifestError(
            f"variables.{MODEL_ENV}",
            f"set by model.weights: {BUNDLED_GGUF} already (it points at model.gguf_path)",
            source,
        )
    if manifest.model.weights == HUB and MODEL_REVISION_ENV in manifest.variables:
        raise ManifestError(
            f"variables.{MODEL_REVISION_ENV}",
            f"set by model.weights: {HUB} already (it is model.revision)",
            source,
        )
    manifest.runtime_for(hardware)  # the default hardware must have requirements
    return manifest


def _storage(c: _Checker, raw: Any) -> Storage:
    m = c.mapping(raw, "storage", _STORAGE, {"bucket", "mount_path", "env"})
    mount = c.string(m["mount_path"], "storage.mount_path")
    if not mount.startswith("/"):
        raise ManifestError("storage.mount_path", f"must be an absolute path, got {mount!r}", c.source)
    subdir = c.string(m.get("subdir", ""), "storage.subdir", empty=True)
    if subdir.startswith("/") or ".." in subdir.split("/"):
        raise ManifestError("storage.subdir", "must be a relative folder inside the mount", c.source)
    return Storage(
        bucket=c.hub_name(m["bucket"], "storage.bucket", "a bucket name (no owner/)"),
        mount_path=mount,
        env=c.match(m["env"], "storage.env", _ENV_NAME, "an environment variable name"),
        subdir=subdir,
    )


def _model(c: _Checker, raw: Any) -> SpaceModel:
    m = c.mapping(raw, "model", _MODEL, _MODEL - {"gguf_path"})
    weights = c.choice(m["weights"], "model.weights", WEIGHTS)
    gguf_path = None
    if weights == BUNDLED_GGUF:
        if "gguf_path" not in m:
            raise ManifestError("model.gguf_path", f"missing (model.weights is {BUNDLED_GGUF})", c.source)
        gguf_path = c.string(m["gguf_path"], "model.gguf_path")
        # The loader takes a METAATTN_MODEL path as a GGUF only by its suffix, and the Space
        # must find it inside the app folder (its working directory).
        parts = gguf_path.split("/")
        if gguf_path.startswith("/") or ".." in parts or "" in parts or not gguf_path.endswith(".gguf"):
            raise ManifestError(
                "model.gguf_path",
                f"must be a relative path ending in .gguf inside the app folder, got {gguf_path!r}",
                c.source,
            )
    files = c.strings(m["files"], "model.files")
    if not files:
        raise ManifestError("model.files", "must list at least one file", c.source)
    return SpaceModel(
        weights=weights,
        gguf_path=gguf_path,
        repo=c.hub_name(m["repo"], "model.repo", "a repo id OWNER/NAME", owner=True),
        revision=c.match(
            m["revision"],
            "model.revision",
            _COMMIT,
            "a 40-hex commit of the model repo (a branch name moves)",
        ),
        files=files,
    )


def secret_variable_problem(name: str, value: Any) -> str | None:
    """Why a plain variable `name`=`value` looks like a secret (SECRET_WORDS, a Hugging Face
    token in the value), or None. Never quotes the value."""
    words = [w for w in name.upper().split("_") if w in SECRET_WORDS]
    if words:
        return f"its name has the word {words[0]}"
    if isinstance(value, str) and _HF_TOKEN.search(value):
        return "its value holds a Hugging Face token (hf_ and a long run of letters and digits)"
    return None


def _variables(c: _Checker, raw: Any) -> dict[str, str]:
    m = c.mapping(raw, "variables", None, set())
    out = {}
    for key, value in m.items():
        # before any check that could quote the value
        why = secret_variable_problem(key, value)
        if why is not None:
            raise c.fail(
                f"variables.{key}",
                f"looks like a secret ({why}); a plain variable is readable by anyone who "
                "can see the Space: take it out of the Spacefile and set it as a Space secret "
                "(the Space's Settings, Variables and secrets)",
            )
        name = c.match(key, f"variables.{key}", _ENV_NAME, "an environment variable name")
        # A YAML `False` or `1` would reach the Space as "False"/"1" anyway; asking for a
        # quoted string keeps the manifest saying exactly what the Space gets.
        out[name] = c.string(value, f"variables.{key}", empty=True)
    return out


def _runtimes(c: _Checker, raw: Any) -> tuple[Runtime, ...]:
    m = c.mapping(raw, "runtimes", None, set())
    if not m:
        raise ManifestError("runtimes", "must name at least one runtime", c.source)
    seen: dict[str, str] = {}
    runtimes = []
    for name, body in m.items():
        where = f"runtimes.{name}"
        r = c.mapping(body, where, _RUNTIME, _RUNTIME)
        hardware = c.strings(r["hardware"], f"{where}.hardware")
        for h in hardware:
            c.choice(h, f"{where}.hardware", HARDWARE)
            if h in seen:
                raise ManifestError(
                    f"{where}.hardware", f"'{h}' is listed by runtimes.{seen[h]} already", c.source
                )
            seen[h] = name
        # a string first (an unquoted 3.12 is a YAML float: "quote it"), then ZeroGPU's rule
        c.string(r["python_version"], f"{where}.python_version")
        if ZEROGPU in hardware and r["python_version"] not in ZEROGPU_PYTHONS:
            raise ManifestError(
                f"{where}.python_version",
                f"ZeroGPU builds only on Python 3.10 or 3.12, and this project's pinned "
                f"requirements need 3.11 or newer: use {' or '.join(ZEROGPU_PYTHONS)}",
                c.source,
            )
        python = c.choice(r["python_version"], f"{where}.python_version", PYTHONS)
        runtimes.append(
            Runtime(str(name), c.string(r["requirements"], f"{where}.requirements"), python, hardware)
        )
    return tuple(runtimes)


class _Checker:
    """Type checks that raise ManifestError with the field's dotted name."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, problem: str) -> ManifestError:
        return ManifestError(field or "(top level)", problem, self.source)

    def mapping(
        self, value: Any, field: str, allowed: set[str] | None, required: set[str]
    ) -> Mapping[str, Any]:
        if not isinstance(value, Mapping):
            raise self.fail(field, f"must be a mapping, got {type(value).__name__}")
        prefix = f"{field}." if field else ""
        for key in value:
            if not isinstance(key, str):
                raise self.fail(f"{prefix}{key}", "keys must be strings")
            if allowed is not None and key not in allowed:
                raise self.fail(f"{prefix}{key}", f"unknown field (known: {', '.join(sorted(allowed))})")
        for key in sorted(required):
            if key not in value:
                raise self.fail(f"{prefix}{key}", "missing")
        return value

    def string(self, value: Any, field: str, empty: bool = False) -> str:
        if not isinstance(value, str):
            raise self.fail(field, f"must be a string, got {type(value).__name__} {value!r} (quote it)")
        if not empty and not value.strip():
            raise self.fail(field, "must not be empty")
        return value

    def boolean(self, value: Any, field: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(field, f"must be true or false, got {value!r}")
        return value

    def strings(self, value: Any, field: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(field, f"must be a list, got {type(value).__name__}")
        return tuple(self.string(v, f"{field}[{i}]") for i, v in enumerate(value))

    def choice(self, value: Any, field: str, options: tuple[str, ...]) -> str:
        text = self.string(value, field)
        if text not in options:
            raise self.fail(field, f"unknown value {text!r} (one of: {', '.join(options)})")
        return text

    def hub_name(self, value: Any, field: str, what: str, owner: bool = False) -> str:
        """A name the Hub accepts (`hub_name_problem`): OWNER/NAME where `owner`, else NAME."""
        text = self.string(value, field)
        problem = hub_name_problem(text)
        if problem is None and text.count("/") != (1 if owner else 0):
            problem = "expected OWNER/NAME" if owner else "expected a name without OWNER/"
        if problem is not None:
            raise self.fail(field, f"{text!r} is not {what}: {problem}")
        return text

    def match(self, value: Any, field: str, pattern: re.Pattern[str], what: str) -> str:
        text = self.string(value, field)
        if not pattern.match(text):
            raise self.fail(field, f"{text!r} is not {what}")
        return text
