"""What a visitor downloads: the current trace as JSON, a figure as a standalone HTML page,
a logged run's rows as Parquet or CSV; written as files under one folder that the page
serves.

- `trace_json(trace)`: `RoutingTrace.to_json()` as text (`RoutingTrace.from_json` reads it
  back).
- `figure_html(fig)`: a page that draws the figure with plotly.js inlined (the copy in the
  installed plotly package, as the app serves it), so it opens offline; light palette.
  PNG and SVG are taken in the browser, from each figure's toolbar (plotly_html.py): the
  server has no image renderer (no kaleido, no Chrome on a Space).
- `run_rows(history, run_id, fmt, owner, folder)`: one run's rows of the routing log
  (runs, tokens, routes, and the experts table), as `store.export` writes them, zipped;
  only a run that `owner` may read (deployment.Deployment.reader), else the sentence of a
  run that does not exist.
- `Downloads`: the folder. Each visitor's files sit under a digest of their session, one
  folder per kind of file (a plain name: never a path a request could steer). A new file
  of a kind replaces the visitor's previous ones of that kind once they are PREVIOUS_S old
  (a file being written or fetched by a parallel request is left alone; at most
  PREVIOUS_MAX are kept), and folders of visitors gone for an hour are removed, so the
  folder stays small. `log` is the whole routing log (RunHistory.export) as a file there. The page serves it
  directly (gr.set_static_paths), so files are not copied into Gradio's cache; the paths
  hold random parts, so a file is reachable only through the link its visitor was given.
  A server's own folder is removed when it exits, and, should it be killed first, by the
  next server that starts on the machine (`remove_abandoned`; the rule is Downloads').

Never imports gradio; never holds page layout.
"""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
import zipfile
from pathlib import Path

from metaattn_viz.app.errors import AppError, no_such_run
from metaattn_viz.app.requests import choice
from metaattn_viz.core.trace import RoutingTrace

log = logging.getLogger(__name__)

KEEP_S = 3600.0  # a visitor's folder is removed this long after their last download was made
EXPORT_TIMEOUT_S = 10.0  # how long an export (a run's rows, the whole log) waits for pending writes
PREVIOUS_S = 120.0  # a visitor's earlier file of a kind is kept this long after a newer one
PREVIOUS_MAX = 8  # and at most this many of them (the newest)
_KIND = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")  # a kind of file: a folder name, never a path


def trace_json(trace: RoutingTrace) -> str:
    """The trace's full record as JSON text (RoutingTrace.from_json reads it back)."""
    return json.dumps(trace.to_json(), ensure_ascii=False, allow_nan=False)


def figure_html(fig, filename: str = "metaattn-figure") -> str:
    """A standalone page drawing `fig` (a plotly Figure) with plotly.js inlined: it opens
    offline; its toolbar saves `filename`.png."""
    import plotly.graph_objects as go

    # validated here (the app's figures skip validation, which leaves the named template
    # "none" a string that to_html cannot read)
    return go.Figure(fig.to_dict()).to_html(
        include_plotlyjs=True,
        full_html=True,
        config={
            "displaylogo": False,
            "showSendToCloud": False,  # no button that uploads the chart (the prompt) to Plotly's cloud
            "responsive": True,
            "toImageButtonOptions": {"format": "png", "filename": filename, "scale": 2},
        },
    )


_LABEL_DROPPED = re.compile(r"[^A-Za-z0-9-]+")
LABEL_CHARS = 8  # a run id's prefix names its files (a uuid4's first group)


def run_label(trace: RoutingTrace | None) -> str:
    """A short name for a trace's files: its run's id prefix, or "unlogged". Part of a file
    name, and the run id may be a client's (an API trace): only ASCII letters, digits and
    hyphens are kept, at most LABEL_CHARS; a label with nothing left is "unlogged"."""
    run_id = getattr(trace, "run_id", None)
    label = _LABEL_DROPPED.sub("", run_id)[:LABEL_CHARS] if isinstance(run_id, str) else ""
    return label or "unlogged"


# A wait for the routing log's writer that ran out (TimeoutError, an OSError on Python 3.11:
# caught before one, as it says nothing of the disk)
LOG_BUSY = "The routing log is busy writing runs; try the export again in a moment."


def not_written(exc: OSError) -> AppError:
    """An export's files that could not be written (a full disk), as the store says it
    (ExportNotWritten) or in its words: the log itself is unchanged."""
    from metaattn_viz import store

    if isinstance(exc, store.ExportNotWritten):  # "the export could not be written (...)..."
        text = str(exc)
        return AppError(text[:1].upper() + text[1:])
    reason = exc.strerror or str(exc) or type(exc).__name__
    return AppError(
        f"The export could not be written ({reason}); nothing of it was kept, and the "
        "routing log is unchanged."
    )


def zip_folder(folder: Path, archive: Path) -> Path:
    """Every file under `folder` into the zip `archive` (paths relative to `folder`). A zip
    that cannot be written (a full disk) is removed, and AppError says so (not_written)."""
    try:
        with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    zf.write(path, path.relative_to(folder).as_posix())
    except OSError as exc:
        archive.unlink(missing_ok=True)
        raise not_written(exc) from None
    return archive


def _export_format(fmt) -> str:
    """`fmt` if it is one of the log's export formats, else AppError naming them."""
    from metaattn_viz import store

    return choice("Format", fmt, store.EXPORT_FORMATS)


def run_rows(history, run_id: str, fmt: str, owner: str | None, folder: Path) -> Path:
    """Run `run_id`'s rows (runs, tokens, routes, experts) as `fmt` files partitioned like
    the log's export, zipped into `folder`; AppError for a run `owner` may not read, a
    missing log or a bad format. history: app.history.RunHistory."""
    from metaattn_viz import store

    fmt = _export_format(fmt)
    run_id = (run_id or "").strip()
    if not run_id:
        raise AppError("No run to export: this text is not in the routing log.")
    run_log = history.run_log
    if run_log is None:
        raise AppError(history.log_problem or "The routing log is not available.")
    out = Path(folder) / "rows"
    try:
        try:
            history.flush(EXPORT_TIMEOUT_S)  # the run's last rows, if still being written
            run_log.get_run(run_id, owner=owner)  # visible to this reader?
            store.export(run_log, out, fmt, owner=owner, run_id=run_id)
        except store.UnknownRun:
            raise no_such_run(run_id) from None
        except store.StoreUnavailable as exc:
            raise AppError(str(exc)) from None
        except TimeoutError:  # the flush: the log's writer is behind
            raise AppError(LOG_BUSY) from None
        except OSError as exc:  # ExportNotWritten, or its folder could not be made
            raise not_written(exc) from None
        return zip_folder(out, Path(folder) / f"metaattn-run-{run_id[:8]}-{fmt}.zip")
    finally:
        shutil.rmtree(out, ignore_errors=True)  # the zip holds it (or it failed)


OWN_PREFIX = "metaattn-downloads-"  # a server's own folder: this, its PID, a random part
_OWN = re.compile(re.escape(OWN_PREFIX) + r"[0-9]+-[a-z0-9_]+")
_STAGING_PREFIX = ".metaattn-downloads-new-"  # its name until it is locked


def _own_folder() -> tuple[Path, int]:
    """A new folder of this process's in the temporary directory, and the descriptor that
    holds it locked for as long as the process lives. It is made under a staging name,
    locked, then renamed, so that no other server ever sees it unlocked (a process killed
    in between leaves only the empty staging folder, which holds nothing of a visitor's)."""
    staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX))
    fd = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        root = staging.with_name(f"{OWN_PREFIX}{os.getpid()}-{staging.name[len(_STAGING_PREFIX) :]}")
        os.rename(staging, root)
    except OSError:
        os.close(fd)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return root, fd


def remove_abandoned(parent: Path | str | None = None) -> list[Path]:
    """Remove the folders of downloads that servers of this user left in `parent` (the
    temporary directory) by ending without cleaning up (killed, crashed): those whose
    lock no process holds (see Downloads). Returns them."""
    parent = Path(parent if parent is not None else tempfile.gettempdir())
    try:
        entries = [p for p in parent.iterdir() if _OWN.fullmatch(p.name)]
    except OSError:  # an unreadable temporary directory: nothing to do here
        return []
    removed = []
    for path in entries:
        try:  # a link or a file is never followed or removed; nor is another user's folder
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            if os.fstat(fd).st_uid != os.getuid():
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # its server is still running
                continue
            shutil.rmtree(path, ignore_errors=True)  # under the lock: one remover at a time
            removed.append(path)
        finally:
            os.close(fd)
    return removed


class Downloads:
    """The folder of downloadable files, one sub-folder per visitor (see the module).

    Without `root`, a folder of the server's own in the temporary directory, named
    metaattn-downloads-<PID>-<random>, removed when the process exits. A server killed
    first (SIGKILL, a crash, a lost machine) cannot remove it, and its files hold its
    visitors' prompts, so each server that starts removes the folders left so first
    (`remove_abandoned`). The rule for which those are: a server holds its folder locked
    (flock, on the folder itself) from before it has that name until it ends, and the
    kernel lets go of the lock when the process ends, however it ends; a folder whose
    lock can be taken has no server, and is removed under that lock. A running server's
    folder is never removed, whatever its PID (the PID in the name is for a person
    reading the directory: a reused PID, or a server in another PID namespace sharing
    the directory, does not fool the lock). Only this user's real folders of that name
    are looked at: never a link, never another user's folder. A folder whose lock is
    kept by a process the server forked (which inherits it) stays until that ends too."""

    def __init__(self, root: Path | str | None = None, keep_s: float = KEEP_S):
        self._lock_fd: int | None = None
        if root is None:  # a folder of its own, removed when the process ends
            gone = remove_abandoned()
            if gone:
                log.info("removed %d downloads folders left by servers that were killed", len(gone))
            self.root, self._lock_fd = _own_folder()
            atexit.register(self.close)
        else:
            self.root = Path(root)
            self.root.mkdir(parents=True, exist_ok=True)
        self.keep_s = keep_s

    def slot(self, session: str | None, kind: str) -> Path:
        """A new empty folder for `session`'s next file of `kind` (a plain name); the
        previous ones of that kind go once PREVIOUS_S old, or beyond the PREVIOUS_MAX
        newest, and so do the folders of visitors gone for keep_s."""
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise ValueError(f"a kind of download is a plain name, not {kind!r}")
        visitor = self.root / _digest(session or "anonymous")
        kind_dir = visitor / kind
        if kind_dir.exists():
            self._drop_previous(kind_dir)
        self.prune(keep=visitor)
        new = kind_dir / uuid.uuid4().hex
        try:
            new.mkdir(parents=True)
            visitor.touch()  # its age is that of its newest file
        except OSError as exc:  # a full disk: said as a failed export is
            raise not_written(exc) from None
        return new

    @staticmethod
    def _drop_previous(kind_dir: Path) -> None:
        """Remove a kind's earlier folders that are PREVIOUS_S old, or beyond the
        PREVIOUS_MAX newest: a parallel request's folder, still being written or fetched,
        stays."""
        aged = []
        for old in kind_dir.iterdir():
            try:
                aged.append((old.stat().st_mtime, old))
            except OSError:  # removed meanwhile
                continue
        aged.sort(reverse=True)
        cutoff = time.time() - PREVIOUS_S
        for i, (mtime, old) in enumerate(aged):
            if i >= PREVIOUS_MAX or mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)

    def prune(self, keep: Path | None = None) -> None:
        """Remove the folders of visitors whose newest file is older than keep_s."""
        cutoff = time.time() - self.keep_s
        for visitor in self.root.iterdir():
            if visitor == keep:
                continue
            try:
                if visitor.stat().st_mtime < cutoff:
                    shutil.rmtree(visitor, ignore_errors=True)
            except OSError:  # removed meanwhile
                pass

    def write(self, session: str | None, kind: str, name: str, text: str) -> Path:
        """`text` as the file `name`, the visitor's current file of `kind`. A folder or
        file that cannot be written (a full disk) is AppError (not_written), nothing kept."""
        path = self.slot(session, kind) / name
        try:
            path.write_text(text, encoding="utf-8")
        except OSError as exc:  # a full disk: no partial file is kept
            path.unlink(missing_ok=True)
            raise not_written(exc) from None
        return path

    def trace(self, trace: RoutingTrace, session: str | None) -> Path:
        return self.write(session, "trace", f"metaattn-trace-{run_label(trace)}.json", trace_json(trace))

    def figure(self, fig, session: str | None, kind: str, label: str) -> Path:
        """`fig` as a standalone HTML page, the visitor's current `kind` figure."""
        name = f"metaattn-{kind}-{label}"
        return self.write(session, kind, f"{name}.html", figure_html(fig, name))

    def rows(self, history, run_id: str, fmt: str, owner: str | None, session: str | None) -> Path:
        """The run's rows (run_rows), the visitor's current rows file in `fmt`."""
        fmt = _export_format(fmt)  # before any folder is made
        return run_rows(history, run_id, fmt, owner, self.slot(session, f"rows-{fmt}"))

    def log(self, history, fmt: str, owner: str | None, session: str | None) -> Path:
        """The routing log as `owner` may read it (RunHistory.export), the visitor's
        current log file in `fmt`."""
        fmt = _export_format(fmt)
        return history.export(fmt, owner, self.slot(session, f"log-{fmt}"))

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:  # released once the folder is gone
            os.close(fd)


def _digest(session: str) -> str:
    """A visitor's folder name: never the live session id itself (it is in the files' URLs)."""
    return hashlib.sha256(session.encode()).hexdigest()[:24]


__all__ = [
    "Downloads",
    "trace_json",
    "figure_html",
    "run_rows",
    "run_label",
    "not_written",
    "LOG_BUSY",
    "zip_folder",
    "remove_abandoned",
    "KEEP_S",
]
