"""Packaging: `pip install .` gives a working package without the checkout, and the
repository's kernels/ folder is never importable as the bare name `kernels` (the name of
Hugging Face's kernel-hub library, which transformers probes)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _python(code: str, cwd: Path, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _project_modules_loaded(code_before: str) -> str:
    return code_before + (
        "\nimport sys, json\n"
        f"roots = ({str(ROOT / 'kernels')!r}, {str(ROOT / 'metaattn_viz')!r})\n"
        "mine = sorted(n for n, m in list(sys.modules.items())\n"
        "              if (getattr(m, '__file__', None) or '').startswith(roots))\n"
        "print(json.dumps(mine))\n"
    )


@pytest.mark.parametrize("cwd", ["repo", "elsewhere"])
def test_bare_name_kernels_never_imports_this_project(cwd, tmp_path):
    where = ROOT if cwd == "repo" else tmp_path
    code = _project_modules_loaded("try:\n    import kernels\nexcept ImportError:\n    pass\n")
    out = _python(code, where)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_our_kernels_import_under_our_name_from_a_plain_checkout(tmp_path):
    """A Space runs app.py from a checkout that is not pip-installed: importing the package
    from the checkout's folder must make `metaattn_kernels` importable."""
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path\n"
        "    if 'editable' not in type(f).__module__.lower()]\n"  # no editable-install finder
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "import metaattn_viz\n"
        "from metaattn_kernels.dispatch import routed_attention\n"
        "import metaattn_kernels.experts as e\n"
        "print(e.__file__)\n"
    )
    out = _python(code, tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(ROOT / "kernels" / "experts.py")


@pytest.mark.slow
def test_the_built_wheel_loads_the_shipped_controllers_without_the_checkout(tmp_path):
    # Build from a copy, so that the build leaves nothing in the checkout.
    src = tmp_path / "src"
    shutil.copytree(
        ROOT,
        src,
        ignore=shutil.ignore_patterns(
            ".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", "device-out", "tests"
        ),
    )
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--quiet",
            "-w",
            str(wheels),
            str(src),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = wheels.glob("metaattn_viz-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.startswith("kernels/")]
    for needed in (
        "metaattn_kernels/dispatch.py",
        "metaattn_viz/py.typed",
        "metaattn_viz/assets/controllers/smollm2-135m-instruct/bayes/meta.json",
        "metaattn_viz/assets/controllers/smollm2-135m-instruct/priorfree/controller.safetensors",
        "metaattn_viz/assets/examples.json",
    ):
        assert needed in names
    deps = [
        line
        for line in zipfile.ZipFile(wheel)
        .read(next(n for n in names if n.endswith("METADATA")))
        .decode()
        .splitlines()
        if line.startswith("Requires-Dist:")
    ]
    assert any(d.startswith("Requires-Dist: torch") for d in deps)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path\n"
        "    if 'editable' not in type(f).__module__.lower()]\n"
        "import json, types\n"
        "import metaattn_viz, metaattn_kernels.dispatch\n"
        "from metaattn_viz.routing.controller import load_for_model\n"
        "cfg = types.SimpleNamespace(hidden_size=576, num_hidden_layers=30,\n"
        "                            num_attention_heads=9, num_key_value_heads=3)\n"
        "sources = [load_for_model(cfg, 'smollm2-135m-instruct', k).source\n"
        "           for k in ('bayes', 'priorfree')]\n"
        "print(json.dumps({'pkg': metaattn_viz.__file__,\n"
        "                  'kernels': metaattn_kernels.dispatch.__file__, 'sources': sources}))\n"
    )
    out = _python(code, tmp_path, pythonpath=str(site))
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["pkg"].startswith(str(site)) and got["kernels"].startswith(str(site))
    for source in got["sources"]:
        assert source.startswith(str(site / "metaattn_viz" / "assets" / "controllers"))
