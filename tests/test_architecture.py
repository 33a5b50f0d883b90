"""The layout docs/architecture.md describes holds: every path it names exists, imports
point down the layers, no library module is longer than 600 lines, the bottom layers
load without torch, and test files share helpers only through tests/helpers.py."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "metaattn_viz"
DOC = ROOT / "docs" / "architecture.md"
MAX_LINES = 600

# package -> the packages of metaattn_viz it must never import (directly or in a function)
FORBIDDEN = {
    "core": {"routing", "store", "training", "app", "cli", "bench", "deploy"},
    "routing": {"store", "training", "app", "cli", "bench", "deploy"},
    "store": {"routing", "training", "app", "cli", "bench", "deploy"},
    "training": {"store", "app", "cli", "bench", "deploy"},
    "app": {"cli", "bench", "deploy"},
    "deploy": {"routing", "store", "training", "app", "bench"},
}


def library_modules() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if "assets" not in p.parts)


def kernel_modules() -> list[Path]:
    return sorted((ROOT / "kernels").glob("*.py"))


def imported_names(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def named_paths(text: str) -> list[str]:
    """Backticked tokens of the page that name a file or folder of the repository."""
    out = []
    for token in re.findall(r"`([^`\s]+)`", text):
        if "<" in token or token.startswith(("-", ".venv", "/")) or "://" in token:
            continue
        if "/" in token:
            out.append(token.rstrip("/"))
    return out


def test_every_path_the_architecture_page_names_exists():
    paths = named_paths(DOC.read_text(encoding="utf-8"))
    assert len(paths) > 60  # the page really names the layout
    missing = [p for p in paths if not ((ROOT / p).exists() or (PKG / p).exists())]
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_the_path_finder_sees_a_missing_path():
    assert named_paths("see `routing/nope.py` and `kernels/cpu.py`, not `x`") == [
        "routing/nope.py",
        "kernels/cpu.py",
    ]
    assert not (PKG / "routing/nope.py").exists()


def test_every_library_module_is_named_on_the_architecture_page():
    text = DOC.read_text(encoding="utf-8")
    unnamed = []
    for path in library_modules():
        rel = path.relative_to(PKG).as_posix()
        if path.name in ("__init__.py", "__main__.py"):
            continue
        if rel not in text and f"`{rel.rsplit('/', 1)[-1]}`" not in text:
            unnamed.append(rel)
    assert not unnamed, f"modules missing from docs/architecture.md: {unnamed}"


def test_no_library_module_is_longer_than_600_lines():
    """The page says so of both libraries: metaattn_viz and the kernels beneath it."""
    long = {
        p.relative_to(ROOT).as_posix(): n
        for p in library_modules() + kernel_modules()
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, long


def test_test_files_import_shared_helpers_from_helpers_only():
    """CONTRIBUTING.md: test files import shared helpers from tests/helpers.py, never from
    conftest.py or from one another."""
    tests = ROOT / "tests"
    stray = {
        p.name: sorted(n for n in imported_names(p) if n.split(".")[0].startswith(("test_", "conftest")))
        for p in sorted(tests.glob("*.py"))
    }
    assert not {name: found for name, found in stray.items() if found}


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_down(package):
    bad = []
    for path in sorted((PKG / package).rglob("*.py")):
        for name in imported_names(path):
            parts = name.split(".")
            if parts[0] == "metaattn_viz" and len(parts) > 1 and parts[1] in FORBIDDEN[package]:
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_the_kernels_never_import_the_library():
    bad = [
        f"{p.relative_to(ROOT)} imports {n}"
        for p in sorted((ROOT / "kernels").glob("*.py"))
        for n in imported_names(p)
        if n.split(".")[0] == "metaattn_viz"
    ]
    assert not bad, bad


def test_the_bottom_layers_load_without_torch():
    code = (
        "import sys, json\n"
        "import metaattn_viz.core.trace, metaattn_viz.core.dirichlet, metaattn_viz.core.settings\n"
        "import metaattn_viz.store, metaattn_viz.cli\n"
        "print(json.dumps(sorted(m for m in ('torch', 'gradio', 'transformers') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
