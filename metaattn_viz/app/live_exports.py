"""The Live tab's Export and share panel: download the current trace as JSON, the maps as
a standalone HTML page, the run's rows of the routing log as Parquet or CSV; copy a link
that opens the page on the run; and open such a link.

`ExportPanel()` builds the components (inside the Live tab); `wire(engine, live,
downloads, demo)` refreshes them after every event that puts a new trace on the page
(`live.trace_events`: a generation, a re-route, a replay, a new uncertainty measure) and
opens a shared link when the page loads (share.py: the run replayed from the log with
its settings, or the link's settings and prompt alone, with a sentence saying why). A
replayed run's note (`replay_note`, History's Replay's too) names the error the log
records for a run that failed or was interrupted. The files are written by
exports.Downloads; a visitor exports only runs they may read (engine.deployment.reader).
Never holds model or store logic of its own.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import gradio as gr

from metaattn_viz import store
from metaattn_viz.app import display, plots, share
from metaattn_viz.app.deployment import session_of
from metaattn_viz.app.errors import AppError, no_such_run
from metaattn_viz.app.exports import Downloads, run_label
from metaattn_viz.app.ui_errors import user_errors, warn

if TYPE_CHECKING:
    from metaattn_viz.app.engine import Engine
    from metaattn_viz.app.tab_live import LiveTab

log = logging.getLogger(__name__)

FORMAT_NAMES = {"parquet": "Parquet", "csv": "CSV"}
PNG_SVG_NOTE = (
    "PNG and SVG: use each figure's toolbar (the camera saves a PNG, the second camera an "
    "SVG), drawn in your browser as the page shows it."
)


def download_button(label: str, elem_id: str) -> gr.DownloadButton:
    """A download button with nothing to download yet (greyed out)."""
    return gr.DownloadButton(label, value=None, interactive=False, elem_id=elem_id, size="sm", min_width=160)


def download(path) -> gr.DownloadButton:
    """The update that makes a download button hand out `path`."""
    return gr.DownloadButton(value=str(path), interactive=True)


def no_download() -> gr.DownloadButton:
    return gr.DownloadButton(value=None, interactive=False)


def replay_note(history, trace, status: str, owner: str | None) -> str:
    """display.replay_note of a run replayed from the log (History's Replay, a shared
    link), with the `error` its runs row records where it failed or was interrupted:
    RunHistory.replay_with_status hands over the trace and the status; by then the error is
    final, so this second read finds the one the replay's snapshot held. A log that fails
    this read leaves the note without it (the replay itself has succeeded)."""
    error = None
    run_log = history.run_log
    if status in ("failed", "interrupted") and run_log is not None and trace.run_id:
        try:
            error = run_log.get_run(trace.run_id, owner).get("error")
        except Exception as exc:  # the note goes without the error; the run is on the page
            log.warning("no error text for replayed run %s: %s", trace.run_id, exc)
    return display.replay_note(trace, status, error)


def referer(request: gr.Request | None) -> str | None:
    headers = getattr(request, "headers", None) if request is not None else None
    return headers.get("referer") if headers is not None else None


class ExportPanel:
    """The panel's components."""

    def __init__(self):
        with gr.Accordion("Export and share", open=True, elem_id="export-share"):
            self.link = gr.Textbox(
                label="Link to this run (opens this page on it: replayed from the routing log)",
                elem_id="share-link",
                interactive=False,
                buttons=["copy"],
                placeholder="Generate, re-route or replay a run: its link appears here",
            )
            with gr.Row():
                self.trace_json = download_button("Trace (JSON)", "download-trace")
                self.maps_html = download_button("Maps (HTML)", "download-maps")
                self.rows = {  # one button per format of the log's export
                    fmt: download_button(f"Run rows ({FORMAT_NAMES.get(fmt, fmt)})", f"download-rows-{fmt}")
                    for fmt in store.EXPORT_FORMATS
                }
            gr.Markdown(PNG_SVG_NOTE, elem_id="png-svg-note")

    @property
    def outputs(self) -> list:
        return [self.link, self.trace_json, self.maps_html, *self.rows.values()]

    def cleared(self) -> dict:
        return {self.link: "", **{b: no_download() for b in self.outputs[1:]}}

    def wire(self, engine: Engine, live: LiveTab, downloads: Downloads, demo: gr.Blocks) -> None:
        history = engine.history

        @user_errors("preparing the downloads")
        def refresh(data, request: gr.Request):
            trace = data[live.trace]
            if trace is None or trace.n_tokens == 0:
                return self.cleared()
            session = session_of(request)
            busy = False
            if trace.run_id is None:
                try:
                    history.flush(10.0)  # a re-route is logged in the background: wait for its id
                except TimeoutError:  # the log's writer is behind (a slow disk): no rows this time
                    busy = True
            values = {key: data[c] for key, c in live.link_controls.items()}
            out = {
                self.link: share.share_link(referer(request), share.share_query(trace, values)),
                self.trace_json: download(downloads.trace(trace, session)),
                self.maps_html: download(
                    downloads.figure(
                        plots.routing_maps(trace, data[live.measure]), session, "maps", run_label(trace)
                    )
                ),
            }
            for fmt, button in self.rows.items():
                out[button] = no_download()
                if trace.run_id is None or busy:  # not logged, or not yet written: no rows
                    continue
                try:
                    reader = engine.deployment.reader(session)
                    out[button] = download(downloads.rows(history, trace.run_id, fmt, reader, session))
                except AppError as exc:  # the log failed, or the run is not this visitor's
                    log.info("no rows to export for run %s: %s", trace.run_id, exc)
            return out

        inputs = {live.trace, *live.link_controls.values()}
        for event in live.trace_events:
            event.then(refresh, inputs, self.outputs, api_visibility="private", show_progress="hidden")

        @user_errors("opening the shared link")
        def open_link(request: gr.Request):
            query = dict(getattr(request, "query_params", None) or {})
            shared = share.parse_shared(query)
            if shared is None:  # an ordinary visit: nothing changes
                return {live.run_status: gr.skip()}
            trace, why = None, None
            reader = engine.deployment.reader(session_of(request))
            if shared.run_id is not None:
                try:
                    trace, status = history.replay_with_status(shared.run_id, reader)
                except AppError as exc:  # not in this log, another visitor's, no log, unreadable
                    trace, why = None, str(exc)
            # a run that replays sets the model itself (show_run, with its own note where this
            # server does not offer it): the link's model applies only to the settings alone
            values = dict(shared.values)
            if trace is not None:
                values.pop("model", None)
            notes = list(shared.notes)
            out = live.show_linked(values, notes)  # adds a note for each value it moves
            warn(notes)
            if shared.prompt is not None:
                out[live.prompt] = shared.prompt
            measure = shared.values.get("measure", "total")
            if trace is None:  # the settings alone, on empty views (not the page's example run)
                out.update(live.show(plots.empty_trace(), measure))
                out[live.trace] = None
                out[live.run_status] = share.fallback_note(shared.run_id)
                if why not in (None, str(no_such_run(shared.run_id))) and history.run_log is not None:
                    # the log holds the run but cannot replay it (a value this version
                    # rejects), or cannot be read: say that, not that the run is missing
                    out[live.run_status] = (
                        f"{why} The page opened with the link's settings and prompt instead; "
                        "press Generate to run it again."
                    )
                return out
            out.update(live.show_run(trace, measure))  # the run's own settings and prompt win
            out[live.run_status] = "Opened a shared link: " + replay_note(history, trace, status, reader)
            return out

        targets = [*live.run_outputs, *live.link_controls.values(), live.prompt, live.run_status]
        loaded = demo.load(
            open_link,
            None,
            list(dict.fromkeys(targets)),  # each component once
            api_visibility="private",
        )
        loaded.then(refresh, inputs, self.outputs, api_visibility="private", show_progress="hidden")


__all__ = ["ExportPanel", "download", "download_button", "no_download", "replay_note", "PNG_SVG_NOTE"]
