"""Every binary file git tracks is covered by an LFS rule of .gitattributes, so that a
`git push` to a Hugging Face Space is not refused (the Hub takes binary files only
through LFS/Xet). Asks git itself (`git check-attr`, through the deploy plan's helpers), not
a copy of the rules."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from metaattn_viz.deploy import plan

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout


def lfs_covered(paths: list[str]) -> dict[str, bool]:
    return plan.lfs_covered(ROOT, paths)


is_binary = plan.is_binary


@pytest.fixture(scope="module")
def tracked() -> list[str]:
    try:
        files = _git("ls-files", "-z").split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [f for f in files if f and (ROOT / f).is_file()]


def test_the_binary_detector_tells_text_from_binary(tmp_path):
    (tmp_path / "a.txt").write_text("plain text, ünïcode ✓\n", encoding="utf-8")
    (tmp_path / "b.bin").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    (tmp_path / "c.dat").write_bytes("latin-1 é".encode("latin-1"))
    assert [is_binary(tmp_path / n) for n in ("a.txt", "b.bin", "c.dat")] == [False, True, True]


def test_the_lfs_rules_cover_the_kinds_of_binary_this_project_makes(tracked):
    probes = [
        "assets/controllers/x/bayes/controller.safetensors",
        "docs/new.png",
        "m.gguf",
        "README.md",
        "metaattn_viz/cli/__init__.py",
    ]
    assert lfs_covered(probes) == {p: p.endswith((".safetensors", ".png", ".gguf")) for p in probes}


def test_every_tracked_binary_file_goes_through_lfs(tracked):
    binaries = [f for f in tracked if is_binary(ROOT / f)]
    assert any(f.endswith(".safetensors") for f in binaries)  # the controller weights are seen
    covered = lfs_covered(binaries)
    missing = sorted(f for f in binaries if not covered.get(f))
    assert not missing, f"binary files without an LFS rule in .gitattributes: {missing}"
