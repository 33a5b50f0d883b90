"""What a deploy would do: the files and their sizes, the front matter, the requirements.

`build_plan` turns the manifest, a checkout and the command's choices (Space, hardware,
visibility) into a `DeployPlan`: every file that goes up with its size and whether it goes
through LFS/Xet, the README front matter and requirements.txt generated for the hardware,
the variables and the storage mount (docs/deploy.md, "What a deploy uploads"). A plan with
`problems` must not be deployed: the Hub refuses a plain binary file over about 1 MB.

Reads the checkout and asks git (`git ls-files`, `git check-attr`); never touches the
network and never writes outside the staging folder that `stage` is given.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub.utils import filter_repo_objects

from metaattn_viz.deploy.manifest import Manifest, ModelPreload, Storage

README = "README.md"
REQUIREMENTS = "requirements.txt"
GENERATED = (README, REQUIREMENTS)
# The Hub refuses a push of a binary file over about 1 MB that is not stored through LFS/Xet.
PLAIN_BINARY_LIMIT = 1_000_000
_FRONT = re.compile(r"\A---\n(.*?)\n---\n", re.DOTALL)
_PIN = re.compile(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([^\s;#]+)")


@dataclass(frozen=True)
class PlannedFile:
    path: str  # path in the Space repo (and in the checkout)
    size: int
    binary: bool
    lfs: bool  # an LFS rule of .gitattributes covers it (git check-attr filter)
    generated: bool  # written by the plan for the hardware instead of the checkout's copy


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
    problems: tuple[str, ...] = field(default=())

    @property
    def owner(self) -> str:
        return self.space.split("/", 1)[0]

    @property
    def bucket_id(self) -> str | None:
        return f"{self.owner}/{self.storage.bucket}" if self.storage else None

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> dict[str, Any]:
        """The plan as plain JSON (`deploy --dry-run --json`)."""
        return {
            "space": self.space,
            "private": self.private,
            "hardware": self.hardware,
            "runtime": self.runtime,
            "python_version": self.python_version,
            "requirements": self.requirements_source,
            "files": [asdict(f) for f in self.files],
            "total_bytes": self.total_bytes,
            "variables": self.variables,
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
            lines.append("storage    none: runs logged on the Space are lost when it restarts")
        else:
            lines.append(
                f"storage    bucket {self.bucket_id} mounted at {self.storage.mount_path}; "
                f"{self.storage.env}={self.storage.data_dir}"
            )
        lines.append("variables  " + (", ".join(f"{k}={v}" for k, v in self.variables.items()) or "none"))
        lines.append(f"\nfiles ({len(self.files)}, {_human(self.total_bytes)}):")
        for f in self.files:
            how = "LFS/Xet" if f.lfs else ("binary" if f.binary else "text")
            note = "  generated for this hardware" if f.generated else ""
            lines.append(f"  {f.path:<{width}}  {f.size:>10,d} B  {how}{note}")
        lines.append("\nREADME front matter:")
        lines.append(_dump_front_matter(self.front_matter).rstrip())
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
            else:
                shutil.copy2(root / f.path, target)


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
    front = front_matter(
        front,
        manifest.model,
        app_file=manifest.app_file,
        python_version=runtime.python_version,
        hardware=hardware,
        gradio_version=pins(requirements_text).get("gradio"),
    )
    readme_text = "---\n" + _dump_front_matter(front) + "---\n" + body

    variables = dict(manifest.variables)
    if manifest.storage is not None:
        variables[manifest.storage.env] = manifest.storage.data_dir

    candidates = sorted(set(_checkout_files(root)) | set(GENERATED))
    chosen = list(
        filter_repo_objects(
            candidates, allow_patterns=list(manifest.include), ignore_patterns=list(manifest.exclude)
        )
    )
    problems = [
        f"upload.include/exclude leave out the generated {name}" for name in GENERATED if name not in chosen
    ]
    sizes = {README: len(readme_text.encode()), REQUIREMENTS: len(requirements_text.encode())}
    real = [p for p in chosen if p not in GENERATED]
    lfs = lfs_covered(root, real)
    files = []
    for path in chosen:
        if path in GENERATED:
            files.append(PlannedFile(path, sizes[path], False, False, True))
            continue
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
        include=manifest.include,
        exclude=manifest.exclude,
        readme_text=readme_text,
        requirements_text=requirements_text,
        problems=tuple(problems),
    )


def front_matter(
    base: dict[str, Any],
    model: ModelPreload,
    *,
    app_file: str,
    python_version: str,
    hardware: str,
    gradio_version: str | None,
) -> dict[str, Any]:
    """The Space's README front matter: the checkout's, with what the hardware decides.

    sdk_version follows the gradio pin of the requirements the Space installs, so the
    two cannot disagree; python_version follows the hardware (ZeroGPU takes 3.10/3.12).
    """
    out = dict(base)
    out["sdk"] = "gradio"
    if gradio_version:
        out["sdk_version"] = gradio_version
    out["python_version"] = python_version
    out["app_file"] = app_file
    out["suggested_hardware"] = hardware
    out["models"] = [model.repo]
    out["preload_from_hub"] = [f"{model.repo} {','.join(model.files)} {model.revision}"]
    return out


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
    """Files of the checkout that exist: tracked, plus untracked ones git does not ignore."""
    out = _git(root, "ls-files", "-z", "--cached", "--others", "--exclude-standard")
    return [p for p in dict.fromkeys(out.split("\0")) if p and (root / p).is_file()]


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


def _human(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
