"""The History tab: the runs in the routing log, filtered and sorted, RUNS_PAGE at a time
(Previous / Next); pick two, replay one into the Live views (no model needed) or compare
them; the read-only SQL console; the log as a download.

`HistoryTab(tab)` builds the components (inside the page's gr.Tab `tab`) and
`wire(engine, live, tabs)` attaches their events; a replay fills the Live tab's views and
controls and switches to it (refused while the tab's generation runs). Callbacks are thin
adapters over `engine.history`, each reading only the runs its visitor may see
(engine.deployment.reader). Never holds model or store logic of its own.
"""

from __future__ import annotations

import gradio as gr
import pandas as pd

from metaattn_viz import store
from metaattn_viz.app import display, plots
from metaattn_viz.app.deployment import session_of
from metaattn_viz.app.engine import Engine
from metaattn_viz.app.exports import Downloads
from metaattn_viz.app.history import RUNS_PAGE
from metaattn_viz.app.live_exports import replay_note
from metaattn_viz.app.live_inspector import FIGURE_MIN_PX
from metaattn_viz.app.live_stream import GENERATION_RUNNING
from metaattn_viz.app.plotly_html import figure_value, plotly_view
from metaattn_viz.app.tab_live import LiveTab
from metaattn_viz.app.ui_errors import user_errors
from metaattn_viz.routing.controller import KINDS

SORTS = {
    "newest first": "-created_at",
    "oldest first": "created_at",
    "most tokens": "-n_tokens",
    "lowest cost": "realized_cost",
    "highest cost": "-realized_cost",
    "budget": "budget",
    "status": "status",
}
STATUSES = store.STATUSES  # the status filter's choices: every status the log records
ANY = "any"  # the filters' "no filter" choice
DEFAULT_SQL = (
    "SELECT layer, avg((expert = 0)::DOUBLE) AS full_share,\n"
    "       avg(uncertainty) AS mean_uncertainty\n"
    "FROM routes GROUP BY layer ORDER BY layer"
)
# The columns DEFAULT_SQL answers with: the console's table shows them before the first
# query, rather than Gradio's placeholder columns "1 2 3" (a test runs the query). They are
# the first value's columns, not the table's `headers`: Gradio labels a table with no
# columns (sql_started's) with its `headers`, which showed them again after a refused query.
DEFAULT_SQL_COLUMNS = ["layer", "full_share", "mean_uncertainty"]
COMPARE_MAP_HEIGHT = 360
# Replay refused while the tab's generation goes on (its first sentence is re-route's and
# the inspector's too)
REPLAY_WHILE_GENERATING = f"{GENERATION_RUNNING}: stop it first, then replay the run."


class HistoryTab:
    """The History tab's components and events."""

    def __init__(self, tab: gr.Tab):
        self.tab = tab
        empty = plots.empty_trace()
        gr.Markdown(
            "Every generation and re-route is in the routing log (DuckDB). Click a row "
            "to pick it as run A (the previous pick becomes run B); replay it into the "
            "Live views without the model, or compare A and B."
        )
        with gr.Row(equal_height=True):
            self.text = gr.Textbox(label="Search prompt and output", scale=3)
            self.status = gr.Dropdown([ANY, *STATUSES], value=ANY, label="Status")
            self.controller = gr.Dropdown([ANY, *KINDS], value=ANY, label="Controller")
            self.sort = gr.Dropdown(list(SORTS), value="newest first", label="Sort")
            self.refresh = gr.Button("Refresh", elem_id="history-refresh")
        self.runs = gr.Dataframe(
            headers=display.RUNS_COLUMNS,
            interactive=False,
            elem_id="runs",
            max_height=360,
            wrap=False,
        )
        # RUNS_PAGE runs at a time: the line says which of how many, the buttons page
        self.offset = gr.State(0)  # the shown page's first run, among those that match
        with gr.Row():  # on a phone the line takes a row of its own, the buttons the next
            with gr.Column(scale=1, min_width=320):
                self.runs_note = gr.Markdown("", elem_id="runs-note")
            self.previous = gr.Button(
                f"Previous {RUNS_PAGE}",
                size="sm",
                scale=0,
                min_width=130,
                interactive=False,
                elem_id="runs-previous",
            )
            self.next = gr.Button(
                f"Next {RUNS_PAGE}", size="sm", scale=0, min_width=130, interactive=False, elem_id="runs-next"
            )
        with gr.Row(equal_height=True):
            self.run_a = gr.Textbox(label="Run A", elem_id="run-a", scale=3)
            self.run_b = gr.Textbox(label="Run B", elem_id="run-b", scale=3)
            self.replay = gr.Button("Replay run A", variant="primary", elem_id="replay")
            self.compare = gr.Button("Compare A and B", elem_id="compare")
        self.compare_note = gr.Markdown("", elem_id="compare-note")
        with gr.Row():  # side by side on a wide screen, one above the other on a phone
            with gr.Column(min_width=FIGURE_MIN_PX):
                self.cmp_a = plotly_view(
                    plots.expert_map(empty, height=COMPARE_MAP_HEIGHT), "compare-a", COMPARE_MAP_HEIGHT
                )
            with gr.Column(min_width=FIGURE_MIN_PX):
                self.cmp_b = plotly_view(
                    plots.expert_map(empty, height=COMPARE_MAP_HEIGHT), "compare-b", COMPARE_MAP_HEIGHT
                )
        self.cmp_table = gr.Dataframe(
            headers=list(store.COMPARE_COLUMNS),
            interactive=False,
            elem_id="compare-table",
            label="Token by token (F full, L linear, W local window; lower case = hedged)",
            max_height=360,
        )
        with gr.Accordion("Read-only SQL console (tables: runs, tokens, routes, experts)", open=False):
            self.sql = gr.Code(DEFAULT_SQL, language="sql", label="Query", elem_id="sql")
            self.sql_run = gr.Button("Run query", elem_id="sql-run")
            self.sql_note = gr.Markdown("", elem_id="sql-note")
            self.sql_result = gr.Dataframe(
                pd.DataFrame(columns=DEFAULT_SQL_COLUMNS),
                headers=[],  # a table without columns is shown without any (not "1 2 3")
                column_count=0,
                interactive=False,
                max_height=360,
                wrap=False,
                elem_id="sql-result",
            )
        with gr.Accordion("Download the routing log", open=False):
            with gr.Row(equal_height=True):
                self.export_fmt = gr.Radio(
                    list(store.EXPORT_FORMATS),
                    value=store.EXPORT_FORMATS[0],
                    label="Format (partitioned by day, zipped)",
                )
                self.export = gr.Button("Prepare download", elem_id="export")
            self.export_file = gr.File(label="Routing log", interactive=False, elem_id="export-file")

    def wire(self, engine: Engine, live: LiveTab, tabs: gr.Tabs, downloads: Downloads) -> None:
        history = engine.history

        def reader(request: gr.Request | None) -> str | None:
            return engine.deployment.reader(session_of(request))

        @user_errors("listing runs")
        def show_runs(text, status, controller, sort, offset, request):
            """The page of runs from `offset` on (history.runs_page moves it back to the
            last page where fewer match), its line, and the buttons it allows."""
            page = history.runs_page(
                text,
                None if status == ANY else status,
                None if controller == ANY else controller,
                SORTS.get(sort, "-created_at"),
                offset=int(offset or 0),
                owner=reader(request),
            )
            order = sort if sort in SORTS else "newest first"
            return (
                display.runs_table(page.runs),
                display.runs_page_note(page, order),
                page.offset,
                gr.Button(interactive=page.has_previous),
                gr.Button(interactive=page.has_next),
            )

        filters = [self.text, self.status, self.controller, self.sort]
        shown = [self.runs, self.runs_note, self.offset, self.previous, self.next]

        def first_runs(text, status, controller, sort, request: gr.Request):
            return show_runs(text, status, controller, sort, 0, request)

        def same_runs(text, status, controller, sort, offset, request: gr.Request):
            return show_runs(text, status, controller, sort, offset, request)

        def previous_runs(text, status, controller, sort, offset, request: gr.Request):
            return show_runs(text, status, controller, sort, offset - RUNS_PAGE, request)

        def next_runs(text, status, controller, sort, offset, request: gr.Request):
            return show_runs(text, status, controller, sort, offset + RUNS_PAGE, request)

        # a new filter or order starts at the first page; Refresh and coming back to the
        # tab keep the page shown
        gr.on(
            [self.text.submit, self.status.input, self.controller.input, self.sort.input],
            first_runs,
            filters,
            shown,
            api_visibility="private",
        )
        gr.on(
            [self.refresh.click, self.tab.select],
            same_runs,
            [*filters, self.offset],
            shown,
            api_visibility="private",
        )
        self.previous.click(previous_runs, [*filters, self.offset], shown, api_visibility="private")
        self.next.click(next_runs, [*filters, self.offset], shown, api_visibility="private")

        def pick_run(run_a, evt: gr.SelectData):
            row = evt.row_value or []
            run_id = str(row[0]) if row else ""
            if not run_id or run_id == run_a:
                return gr.skip(), gr.skip()
            return run_id, run_a or gr.skip()

        self.runs.select(
            pick_run, [self.run_a], [self.run_a, self.run_b], api_visibility="private", queue=False
        )

        @user_errors("replaying the run")
        def replay(run_id, measure, request: gr.Request):
            # The stream of a running generation would draw over the replayed run, and the
            # page end on the generated run under the replayed run's prompt and controls:
            # refused, the page left as it is (as live_reroute refuses a re-route), until
            # the stream's last frame is out (the job ends before it)
            if live.streams.going_on(session_of(request), engine.generations):
                gr.Warning(REPLAY_WHILE_GENERATING)
                return gr.skip()
            owner = reader(request)
            trace, status = history.replay_with_status(run_id, owner)
            return {
                **live.show_run(trace, measure),
                live.run_status: replay_note(history, trace, status, owner),
                tabs: gr.Tabs(selected="live"),
            }

        replayed = self.replay.click(
            replay,
            [self.run_a, live.measure],
            [*live.run_outputs, live.run_status, tabs],
            api_visibility="private",
        )
        live.trace_events.append(replayed)
        live.follow(replayed)  # the inspector and the sweep follow the replayed run

        @user_errors("comparing runs")
        def compare(run_a, run_b, request: gr.Request):
            a, b, df = history.compare(run_a, run_b, reader(request))
            fa = plots.expert_map(a, COMPARE_MAP_HEIGHT, display.compare_title("A", a, b))
            fb = plots.expert_map(b, COMPARE_MAP_HEIGHT, display.compare_title("B", b, a))
            return display.compare_note(a, b, df), figure_value(fa), figure_value(fb), df.round(3)

        compared = [self.compare_note, self.cmp_a, self.cmp_b, self.cmp_table]
        blank = figure_value(plots.expert_map(plots.empty_trace(), height=COMPARE_MAP_HEIGHT))

        def compare_started():
            """The previous comparison goes before a new one runs (as sql_started's answer
            does), so that a failed compare (its message is the error toast: run B empty or
            unknown) leaves no note, maps or table of the earlier runs standing under its
            "Error" badge as if they were this comparison's."""
            return "", blank, blank, pd.DataFrame(columns=list(store.COMPARE_COLUMNS))

        self.compare.click(compare_started, None, compared, api_visibility="private", queue=False).then(
            compare, [self.run_a, self.run_b], compared, api_visibility="private"
        )

        @user_errors("running the query")
        def run_sql(query, request: gr.Request):
            df, notice = history.sql(query, owner=reader(request))
            return display.sql_table(df), notice

        def sql_started():
            """The earlier answer and its note go before a query runs, so that a refused or
            failed query (its message is the error toast) leaves neither standing as if it
            were this query's (nor a "running" note that never ends): a table with no
            columns, shown without any (the default query's stood over it)."""
            return pd.DataFrame(), ""

        self.sql_run.click(
            sql_started, None, [self.sql_result, self.sql_note], api_visibility="private", queue=False
        ).then(
            run_sql,
            self.sql,
            [self.sql_result, self.sql_note],
            api_visibility="private",
            concurrency_id="sql",
            concurrency_limit=engine.deployment.limits.sql,
        )

        # (named apart from api.py's /export: a callback's name is its endpoint's name)
        @user_errors("exporting the routing log")
        def history_export(fmt, request: gr.Request):
            return str(downloads.log(history, fmt, reader(request), session_of(request)))

        self.export.click(history_export, self.export_fmt, self.export_file, api_visibility="private")


__all__ = ["HistoryTab", "SORTS", "DEFAULT_SQL", "DEFAULT_SQL_COLUMNS", "STATUSES"]
