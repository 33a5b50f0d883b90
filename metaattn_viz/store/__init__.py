"""The routing log: every run's RoutingTrace in an embedded DuckDB database.

One concept per module, imports pointing down the list:
errors (StoreUnavailable, UnknownRun) <- schema (tables, columns, migrations) <- queries
(every SQL statement, named) <- codec (trace <-> Arrow rows) <- opening (connect, migrate,
recover) <- writer (the single writer thread per file) <- runlog (RunLog: write, replay,
list, compare, analytics) <- export (Parquet/CSV); console is the read-only SQL console.

Never imports model code, torch or gradio. The public names are re-exported here.
"""

from metaattn_viz.store.errors import StoreUnavailable, UnknownRun
from metaattn_viz.store.export import EXPORT_FORMATS, export
from metaattn_viz.store.runlog import RunLog, open_or_explain, resolve_db_path
from metaattn_viz.store.schema import (
                                       LOG_TABLES,
                                       MIGRATIONS,
                                       SETTINGS_COLUMNS,
                                       UNCERTAINTY_COLUMNS,
                                       latest_schema_version,
)

__all__ = ["EXPORT_FORMATS", "LOG_TABLES", "MIGRATIONS", "SETTINGS_COLUMNS", "UNCERTAINTY_COLUMNS",
           "RunLog", "StoreUnavailable", "UnknownRun", "export", "latest_schema_version",
           "open_or_explain", "resolve_db_path"]
