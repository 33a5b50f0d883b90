"""`metaattn-viz deploy`: the subcommand's arguments and its handler.

`add_deploy_parser(subparsers)` registers the subcommand on the CLI's parser;
`run_deploy(args)` reads the manifest, builds the plan, prints it (`--dry-run`, `--json`)
or carries it out on the Hub. Exit codes: 0 done, 1 the plan has problems or a Hub call
failed (refused, or the Hub unreachable), 2 a user error (bad manifest or arguments, no
token). Errors print one line, never a traceback (docs/deploy.md).

A thin adapter: decisions live in plan.py, Hub calls in hub.py; both (and so
huggingface_hub) are imported only when the command runs, so that registering it keeps
`metaattn-viz --help` fast. `--dry-run` never resolves a token and never touches the network.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from metaattn_viz import paths

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2
MANIFEST = "Spacefile"
UNKNOWN_OWNER = "<you>"


def add_deploy_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register `deploy` on an argparse subparsers object; the handler is `run_deploy`."""
    p = subparsers.add_parser(
        "deploy",
        help="deploy the app to a Hugging Face Space (manifest: Spacefile)",
        description="Create or update a Hugging Face Space from this checkout, as the Spacefile "
        "describes. Token: HF_TOKEN or `hf auth login`. See docs/deploy.md.",
    )
    p.add_argument(
        "--space",
        default=None,
        metavar="OWNER/NAME",
        help="the Space (default: your user name / the Spacefile's name)",
    )
    p.add_argument(
        "--private",
        action="store_true",
        default=None,
        help="create the Space private (default: the Spacefile's `private`)",
    )
    p.add_argument(
        "--hardware",
        default=None,
        metavar="HARDWARE",
        help="Space hardware, one of huggingface_hub's SpaceHardware names, e.g. "
        "cpu-basic, t4-small, zero-a10g (default: the Spacefile's). A new Gradio Space on "
        "cpu-basic needs a paid Hub plan; a free account can create zero-a10g (ZeroGPU) ones",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan (files, sizes, LFS, hardware, variables, front matter); "
        "offline, no token needed",
    )
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    p.add_argument("--manifest", default=None, help="the manifest (default: Spacefile in --root)")
    p.add_argument("--root", default=None, help="the checkout to deploy (default: this one)")
    p.set_defaults(handler=run_deploy)
    return p


def run_deploy(
    args: argparse.Namespace,
    *,
    make_api: Callable[[str], Any] | None = None,
    environ: Mapping[str, str] | None = None,
    out: Callable[[str], None] = print,
) -> int:
    """Handle `deploy`. Tests hand in `make_api` (token -> an HfApi-like object) and
    `environ`; the token is resolved the same way either way."""
    from metaattn_viz.deploy import hub
    from metaattn_viz.deploy.manifest import HARDWARE, load_manifest
    from metaattn_viz.deploy.plan import build_plan

    make_api = make_api or hub.make_api
    try:
        root = _root(args.root)
        if args.hardware is not None and args.hardware not in HARDWARE:
            raise ValueError(f"--hardware {args.hardware!r}: unknown (one of: {', '.join(HARDWARE)})")
        manifest = load_manifest(_manifest_path(args.manifest, root))
        owner, name = _split_space(args.space, manifest.name)
        api = None if args.dry_run else make_api(hub.resolve_token(environ))
        if owner is None and api is not None:
            owner = hub.whoami(api)
        plan = build_plan(
            manifest,
            root,
            space=f"{owner or UNKNOWN_OWNER}/{name}",
            hardware=args.hardware,
            private=args.private,
        )
    except hub.HubFailure as exc:  # whoami: the Hub, not the user
        return _fail(exc, EXIT_PROBLEMS)
    except (ValueError, OSError, RuntimeError) as exc:  # ManifestError, MissingToken among them
        return _fail(exc, EXIT_USAGE)

    if args.dry_run:
        out(json.dumps(plan.to_json(), indent=2) if args.json else plan.render())
        return EXIT_PROBLEMS if plan.problems else EXIT_OK
    if plan.problems:
        out(plan.render())
        return _fail(RuntimeError("the plan has problems (above); nothing was uploaded"), EXIT_PROBLEMS)
    try:
        url = hub.push(plan, api, root)
    except Exception as exc:  # the Hub's errors, or no Hub: one line, not a traceback
        return _fail(hub.failure(exc), EXIT_PROBLEMS)
    result = {"space": plan.space, "url": url, "hardware": plan.hardware, "files": len(plan.files)}
    out(
        json.dumps(result)
        if args.json
        else f"deployed {len(plan.files)} files to {url} on {plan.hardware}; the Space builds now"
    )
    return EXIT_OK


def _root(root: str | None) -> Path:
    """The checkout to deploy: --root, checked to be a folder (a ValueError naming the flag
    and the path), else this one."""
    if root is None:
        return paths.REPO_ROOT.resolve()
    if not root.strip():
        raise ValueError("--root is empty: give the folder of the checkout to deploy")
    folder = Path(root).expanduser()
    if not folder.exists():
        raise ValueError(f"--root {root}: no such folder")
    if not folder.is_dir():
        raise ValueError(f"--root {root}: not a folder (give the checkout to deploy, with its {MANIFEST})")
    return folder.resolve()


def _manifest_path(manifest: str | None, root: Path) -> Path:
    """--manifest, checked not to be blank or a folder (a ValueError naming the flag and the
    path), else the Spacefile in the checkout."""
    if manifest is None:
        return root / MANIFEST
    if not manifest.strip():
        raise ValueError(f"--manifest is empty: give a manifest file, or leave it out for the {MANIFEST}")
    path = Path(manifest).expanduser()
    if path.is_dir():
        raise ValueError(f"--manifest {manifest}: a folder, not a manifest file (such as {path / MANIFEST})")
    return path


def _split_space(space: str | None, default_name: str) -> tuple[str | None, str]:
    """(owner or None, name) from --space: OWNER/NAME, NAME, or nothing. A name the Hub
    would refuse (or a blank one) is a user error here, before the dry run or any Hub call
    (exit 2)."""
    if space is None:
        return None, default_name
    if not space.strip():
        raise ValueError("--space is empty: give OWNER/NAME or NAME, or leave it out for the default")
    from metaattn_viz.deploy.manifest import hub_name_problem

    owner, slash, name = space.rpartition("/")
    if slash and (not owner or not name or "/" in owner):
        raise ValueError(f"--space {space!r}: expected OWNER/NAME")
    problem = hub_name_problem(space)
    if problem is not None:
        raise ValueError(f"--space {space!r}: not a name the Hub accepts ({problem})")
    return (owner or None), name


def _fail(exc: BaseException, code: int) -> int:
    # one line, as every subcommand's errors (cli/__init__.py: "metaattn-viz CMD: error: ...")
    print(f"metaattn-viz deploy: error: {exc}", file=sys.stderr)
    return code
