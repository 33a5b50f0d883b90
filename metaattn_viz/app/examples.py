"""Example runs shipped as precomputed traces, so the page shows routing before any model
has loaded (a replay needs no model).

``assets/example_traces/`` holds one gzipped ``RoutingTrace.to_json`` record per prompt of
``assets/examples.json`` (``<key>.json.gz``), and ``index.json``: the model, the content
hash of each controller kind the traces were made with, the settings, the date and the
commit. One command makes them all: ``metaattn-viz examples`` (``make examples``), which
calls ``generate``. It makes every trace in a staging folder first and moves them in only
when all are made, the index last (``_publish``): an interrupted or failed run leaves the
previous set as it was, never traces of one run under the index of another. An example
is stale when the shipped controllers' content hash is no longer the one its index
records (``stale_reasons``): the fix is to rerun that command.

Reading (``list_examples``, ``load_example``, ``initial_trace``) needs neither torch nor
the model; ``generate`` loads them. Never imports gradio.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from metaattn_viz import paths
from metaattn_viz.core.settings import CONTROLLER_KINDS, DEFAULT_CONTROLLER, RoutingSettings
from metaattn_viz.core.trace import RoutingTrace
from metaattn_viz.routing.loading import slugify

log = logging.getLogger(__name__)

TRACES_DIR = paths.ASSETS_DIR / "example_traces"
PROMPTS_FILE = paths.ASSETS_DIR / "examples.json"
INDEX_NAME = "index.json"
INDEX_FORMAT = 1
MAX_NEW_TOKENS = 24
COMMAND = "metaattn-viz examples"
RERUN = f"rerun {COMMAND} (make examples)"


class ExampleError(ValueError):
    """An example that is not there or cannot be read; the message says which and why."""


@dataclass(frozen=True)
class Example:
    """One shipped example run, as its index lists it."""

    key: str  # file stem, from the label
    label: str
    prompt: str
    chat: bool
    file: str  # "<key>.json.gz", in the traces folder
    model: str
    controller: str
    controller_id: str
    n_tokens: int


def example_key(label: str) -> str:
    """The file stem of an example: its label, lower case, runs of other characters as '-'."""
    key = "".join(c.lower() if c.isalnum() else "-" for c in label.strip())
    key = "-".join(part for part in key.split("-") if part)
    if not key:
        raise ExampleError(f"an example needs a label with letters or digits, got {label!r}")
    return key


def read_prompts(path: Path | None = None) -> list[dict]:
    """The example prompts (label, prompt, chat) of ``assets/examples.json``, checked."""
    path = Path(path) if path is not None else PROMPTS_FILE
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExampleError(f"cannot read the example prompts {path}: {exc}") from None
    if not isinstance(items, list):
        raise ExampleError(f"{path}: expected a list of {{label, prompt, chat}} objects")
    out = []
    for i, item in enumerate(items):
        if not (isinstance(item, dict) and isinstance(item.get("prompt"), str) and item["prompt"].strip()):
            raise ExampleError(f"{path}: item {i} has no prompt")
        label = str(item.get("label") or item["prompt"][:40])
        out.append({"label": label, "prompt": item["prompt"], "chat": bool(item.get("chat", False))})
    keys = [example_key(e["label"]) for e in out]
    if len(set(keys)) != len(keys):
        raise ExampleError(f"{path}: two examples share a label (their files would collide)")
    return out


# -- reading (no model) ---------------------------------------------------------------------
def read_index(folder: Path | None = None) -> dict:
    """The index of the shipped examples; ExampleError if it is missing or unreadable."""
    path = (Path(folder) if folder is not None else TRACES_DIR) / INDEX_NAME
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ExampleError(f"no example traces at {path.parent}: {RERUN}") from None
    except (OSError, ValueError) as exc:
        raise ExampleError(f"cannot read {path}: {exc}; {RERUN}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ExampleError(f"{path} is not an example index of format {INDEX_FORMAT}; {RERUN}")
    return index


def list_examples(folder: Path | None = None) -> list[Example]:
    """The shipped examples in the order of ``assets/examples.json`` (none, with a warning in
    the log, when there is no readable index: the page then just starts empty)."""
    try:
        index = read_index(folder)
    except ExampleError as exc:
        log.warning("%s", exc)
        return []
    return [
        Example(
            key=e["key"],
            label=e["label"],
            prompt=e["prompt"],
            chat=bool(e["chat"]),
            file=e["file"],
            model=index["model"],
            controller=e["controller"],
            controller_id=e["controller_id"],
            n_tokens=int(e["n_tokens"]),
        )
        for e in index["examples"]
    ]


def _find(key_or_label: str, examples: list[Example]) -> Example:
    for e in examples:
        if key_or_label in (e.key, e.label):
            return e
    shipped = ", ".join(repr(e.label) for e in examples) or "none"
    raise ExampleError(f"no example {key_or_label!r} (shipped: {shipped})")


def read_trace(path: Path) -> RoutingTrace:
    """A trace from a gzipped (``.gz``) or plain JSON record written by ``to_json``."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        return RoutingTrace.from_json(json.loads(raw.decode("utf-8")))
    except (OSError, EOFError, gzip.BadGzipFile, UnicodeDecodeError) as exc:
        raise ExampleError(f"cannot read the example trace {path}: {exc}; {RERUN}") from None
    except ValueError as exc:  # bad JSON, or not a full trace record
        raise ExampleError(f"{path} is not a trace record ({exc}); {RERUN}") from None


def load_example(key_or_label: str, folder: Path | None = None) -> RoutingTrace:
    """The trace of a shipped example (by key or label), replayed from its file: no model."""
    folder = Path(folder) if folder is not None else TRACES_DIR
    example = _find(key_or_label, list_examples(folder))
    return read_trace(folder / example.file)


def initial_trace(folder: Path | None = None) -> RoutingTrace | None:
    """What the page shows before its model has loaded: the first shipped example, or None
    when none ships or it cannot be read (logged)."""
    examples = list_examples(folder)
    if not examples:
        return None
    try:
        return load_example(examples[0].key, folder)
    except ExampleError as exc:
        log.warning("%s", exc)
        return None


def shipped_controller_hashes(model: str, controllers_dir: Path | None = None) -> dict[str, str | None]:
    """The content hash each controller kind shipped for `model` records in its meta.json
    (None where no trained controllers ship)."""
    from metaattn_viz.routing.controller import META_FILE

    root = Path(controllers_dir) if controllers_dir is not None else paths.CONTROLLERS_DIR
    out: dict[str, str | None] = {}
    for kind in CONTROLLER_KINDS:
        try:
            meta = json.loads((root / slugify(model) / kind / META_FILE).read_text(encoding="utf-8"))
            out[kind] = str(meta["content_hash"])
        except (OSError, ValueError, KeyError, TypeError):
            out[kind] = None
    return out


def stale_reasons(folder: Path | None = None, controllers_dir: Path | None = None) -> list[str]:
    """Why the shipped examples no longer show what the shipped controllers do (empty when
    they are current): a controller kind's content hash differs from the index's, or a
    trace was made by other controllers than its index says. Each reason says to rerun."""
    index = read_index(folder)
    shipped = shipped_controller_hashes(index["model"], controllers_dir)
    reasons = []
    for kind, recorded in index["controllers"].items():
        if shipped.get(kind) != recorded:
            reasons.append(
                f"the {kind} controllers shipped for {index['model']} have content hash "
                f"{shipped.get(kind)}, the examples were made with {recorded}: {RERUN}"
            )
    for e in list_examples(folder):
        expected = f"{e.controller}-trained-{shipped.get(e.controller)}"
        if e.controller_id != expected:
            reasons.append(f"example {e.label!r} was routed by {e.controller_id}, not {expected}: {RERUN}")
    return reasons


# -- making them (loads the model) ------------------------------------------------------------
def make_example(
    routed,
    item: dict,
    settings: RoutingSettings | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    controller: str = DEFAULT_CONTROLLER,
    quality: bool = True,
) -> RoutingTrace:
    """One example run: the prompt routed and greedily continued by `routed` (a RoutedModel),
    with the quality meter's KL to the dense model (app/analysis.py's own measure) when
    `quality`."""
    trace = routed.route(
        item["prompt"],
        settings or RoutingSettings(),
        max_new_tokens,
        controller=controller,
        chat=item["chat"],
    )
    if quality and trace.n_tokens > 1:
        from metaattn_viz.app.analysis import Analysis
        from metaattn_viz.app.history import RunHistory
        from metaattn_viz.app.host import ModelHost

        history = RunHistory(enabled=False)
        try:
            trace.kl_to_dense = Analysis(ModelHost(routed=routed, threads=False), history).quality(trace)
        finally:
            history.close()
    return trace


STAGING_PREFIX = ".staging-"  # the folder inside the traces folder a run writes into first


def _publish(staging: Path, folder: Path, names: list[str]) -> None:
    """Move `names` (the traces, then the index) from `staging` into `folder`, replacing the
    previous set. The old index goes first: a run stopped in the middle of these renames
    leaves no index (the folder reads as "no example traces: rerun"), never an index that
    describes other traces than those beside it. A trace the old index listed and the new
    one does not (its prompt left assets/examples.json) is removed last; nothing else in
    `folder` is touched."""
    try:
        old = {e.get("file") for e in read_index(folder).get("examples", []) if isinstance(e, dict)}
    except ExampleError:
        old = set()
    (folder / INDEX_NAME).unlink(missing_ok=True)
    for name in names:
        if name != INDEX_NAME:
            os.replace(staging / name, folder / name)
    os.replace(staging / INDEX_NAME, folder / INDEX_NAME)
    for name in old - set(names):
        if isinstance(name, str) and name.endswith(".json.gz") and Path(name).name == name:
            (folder / name).unlink(missing_ok=True)


def generate(
    routed=None,
    out: Path | None = None,
    prompts: Path | None = None,
    settings: RoutingSettings | None = None,
    max_new_tokens: int = MAX_NEW_TOKENS,
    controller: str = DEFAULT_CONTROLLER,
    progress=None,
) -> dict:
    """Route every example prompt with `routed` (default: the bundled model with its shipped
    controllers, on the CPU in float32) and replace the traces and the index in `out`
    (default the shipped folder) once every one is made; the index. Anything else in `out`
    is left alone. Refuses untrained controllers: an example must show what the shipped
    ones do. `progress(message)` is told each example."""
    if routed is None:
        from metaattn_viz.routing.model import RoutedModel

        routed = RoutedModel.load(None, device="cpu", dtype="float32", backend="auto")
    stack = routed.controller(controller)
    if not stack.trained:
        raise ExampleError(
            f"the {controller} controllers of {routed.name} are untrained; examples ship only "
            "for trained controllers (run `metaattn-viz calibrate` first)"
        )
    from metaattn_viz.training.provenance import git_commit

    commit = git_commit()  # before the traces are written: they would make the tree dirty
    settings = settings or RoutingSettings()
    folder = Path(out) if out is not None else TRACES_DIR
    made_folder = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    # inside the folder, not beside it: the same file system (each rename is atomic) and a
    # place check_output found writable even where the folder's parent is not
    staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=folder))
    try:
        index = _make_all(routed, staging, prompts, settings, max_new_tokens, controller, commit, progress)
        _publish(staging, folder, [e["file"] for e in index["examples"]] + [INDEX_NAME])
    except BaseException:  # KeyboardInterrupt too: the previous set stays as it was
        shutil.rmtree(staging, ignore_errors=True)
        if made_folder:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise
    staging.rmdir()
    return index


def _make_all(
    routed,
    staging: Path,
    prompts,
    settings: RoutingSettings,
    max_new_tokens: int,
    controller: str,
    commit,
    progress,
) -> dict:
    """Every example's trace and then the index, written into `staging`; the index."""
    entries = []
    for item in read_prompts(prompts):
        key = example_key(item["label"])
        t0 = time.perf_counter()
        trace = make_example(routed, item, settings, max_new_tokens, controller)
        record = json.dumps(trace.to_json(), ensure_ascii=False, separators=(",", ":"))
        name = f"{key}.json.gz"
        (staging / name).write_bytes(gzip.compress(record.encode("utf-8"), compresslevel=9, mtime=0))
        entries.append(
            {
                **item,
                "key": key,
                "file": name,
                "controller": controller,
                "controller_id": trace.controller_id,
                "n_prompt_tokens": trace.n_prompt_tokens,
                "n_tokens": trace.n_tokens,
                "output_text": trace.output_text,
            }
        )
        if progress is not None:
            progress(f"{item['label']}: {trace.n_tokens} tokens in {time.perf_counter() - t0:.1f} s")
    index = {
        "format": INDEX_FORMAT,
        "command": COMMAND,
        "model": routed.name,
        "weights_fingerprint": routed.weights_fingerprint,
        "controller": controller,
        "controllers": {k: s.content_hash() for k, s in routed.controllers.items() if s.trained},
        "settings": routed.resolve_linear_map(settings).to_dict(),  # as the traces record them
        "max_new_tokens": max_new_tokens,
        "sampling": "greedy",
        "date": datetime.now(UTC).replace(microsecond=0).isoformat(),
        "project_commit": commit,
        "examples": entries,
    }
    (staging / INDEX_NAME).write_bytes(
        (json.dumps(index, indent=1, ensure_ascii=False) + "\n").encode("utf-8")
    )
    return index


__all__ = [
    "COMMAND",
    "Example",
    "ExampleError",
    "MAX_NEW_TOKENS",
    "TRACES_DIR",
    "example_key",
    "generate",
    "initial_trace",
    "list_examples",
    "load_example",
    "make_example",
    "read_index",
    "read_prompts",
    "read_trace",
    "shipped_controller_hashes",
    "stale_reasons",
]
