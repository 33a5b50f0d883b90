"""The routing log: DuckDB schema, the single writer, RunLog (replay, analytics), export,
and the read-only SQL console.

Never imports model code or gradio. The public names are re-exported here.
"""

from metaattn_viz.store.runlog import (EXPORT_FORMATS, LOG_TABLES, MIGRATIONS, SETTINGS_COLUMNS,
                                       UNCERTAINTY_COLUMNS, RunLog, StoreUnavailable, UnknownRun,
                                       export, latest_schema_version, open_or_explain,
                                       resolve_db_path)

__all__ = ["EXPORT_FORMATS", "LOG_TABLES", "MIGRATIONS", "SETTINGS_COLUMNS", "UNCERTAINTY_COLUMNS",
           "RunLog", "StoreUnavailable", "UnknownRun", "export", "latest_schema_version",
           "open_or_explain", "resolve_db_path"]
