"""The routing log's schema: its tables, their columns, and the migrations that create
them (docs/architecture.md).

Tables (schema version in `schema_version`; older databases are migrated on open):

- `runs`    one row per run: status, kind, model, controller, every RoutingSettings field
            (`window` is stored as `local_window`, `lam` as `fixed_lam`), prompt, output text,
            n_tokens, realized_cost, flops_ratio, wall_ms, timings (JSON), error, owner
            (who made it: a visitor's key from owners.py; NULL for the CLI and old rows),
            linear_map (added by version 3; rows logged before it read 'elu', the only
            linear expert there was), hedge_measure (version 4; earlier rows read
            'total', the only measure there was), and cost_model (version 5; earlier rows
            read 'notional', the only cost model there was).
            Status: `running` while it streams, then `done`, `stopped` (the user stopped
            it), `failed` (an error), or `interrupted` (the process writing it ended or
            closed the log mid-run).
- `tokens`  one row per (run, position): token_id, text, is_prompt, kl_to_dense (the
            quality meter, when the run measured it; written by finish).
- `routes`  one row per (run, layer, position): the chosen expert, hedged, the Dirichlet
            concentrations (conc_full/linear/local), the mixing weights applied
            (weight_full/linear/local), cost, lambda, and the uncertainty measures of
            dirichlet.uncertainties (uncertainty = total, aleatoric, epistemic, vacuity),
            stored so that SQL can ask about them; a replay recomputes them from the trace.
- `experts` the lookup (expert, name, cost, symbol) for joins and route strings.

Each data table has ONE definition, its column list (RUNS_COLUMNS, TOKENS_COLUMNS,
ROUTES_COLUMNS): the DDL of the migrations and the Arrow schemas the writer builds its
tables with are both derived from it. A migration is frozen: never change a column that
has shipped; a later version appends `Column(..., since=N)` and adds
(N, add_columns("runs", RUNS_COLUMNS, N)) to MIGRATIONS, which runs inside the
transaction that records its version. The statuses are versioned the same way
(STATUS_SINCE): DuckDB cannot alter a CHECK constraint, so a version that allows a new
status rebuilds `runs` (`rebuild_table`), and each migration's CHECK lists the statuses
of its own version, so the DDL of a shipped migration never changes.

Declarations only: this module never opens a database, and never imports the model code,
torch or gradio.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

# Every status of a run, with the schema version that allowed it (append only).
STATUS_SINCE = {"running": 1, "done": 1, "interrupted": 1, "failed": 1, "stopped": 2}
STATUSES = tuple(STATUS_SINCE)
FINAL_STATUSES = tuple(s for s in STATUSES if s != "running")
# The log's tables: what the read-only console may read, and what export writes.
LOG_TABLES = ("runs", "tokens", "routes", "experts", "schema_version")
# RoutingSettings field -> runs column (`window` is an SQL keyword; `lam` would be
# confused with the per-decision lambda in `routes`).
SETTINGS_COLUMNS = {
    "budget": "budget",
    "scope": "scope",
    "hedge_policy": "hedge_policy",
    "hedge_threshold": "hedge_threshold",
    "hedge_min_weight": "hedge_min_weight",
    "window": "local_window",
    "n_sink": "n_sink",
    "lam": "fixed_lam",
    "dual_step": "dual_step",
    "backend": "backend",
    "linear_map": "linear_map",
    "hedge_measure": "hedge_measure",
    "cost_model": "cost_model",
}
# dirichlet.uncertainties measure -> routes column.
UNCERTAINTY_COLUMNS = {
    "total": "uncertainty",
    "aleatoric": "aleatoric",
    "epistemic": "epistemic",
    "vacuity": "vacuity",
}

# The DuckDB types the log uses, and the Arrow type the writer hands DuckDB for each.
ARROW_TYPES: dict[str, pa.DataType] = {
    "VARCHAR": pa.string(),
    "TIMESTAMP": pa.timestamp("us"),
    "BOOLEAN": pa.bool_(),
    "TINYINT": pa.int8(),
    "SMALLINT": pa.int16(),
    "INTEGER": pa.int32(),
    "BIGINT": pa.int64(),
    "FLOAT": pa.float32(),
    "DOUBLE": pa.float64(),
}


def statuses_at(version: int) -> tuple[str, ...]:
    """The statuses schema `version` allows."""
    return tuple(s for s, since in STATUS_SINCE.items() if since <= version)


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # a key of ARROW_TYPES
    # e.g. "NOT NULL", "PRIMARY KEY"; "{statuses}" stands for the quoted statuses of the
    # schema version the DDL is written for (statuses_at).
    constraint: str = ""
    since: int = 1  # the schema version that added it (migration 1 creates since=1)

    def sql(self, version: int) -> str:
        """The column's DDL as schema `version` defines it."""
        constraint = self.constraint.replace("{statuses}", ", ".join(f"'{s}'" for s in statuses_at(version)))
        return f"{self.name} {self.type}{' ' + constraint if constraint else ''}"


NN = "NOT NULL"

RUNS_COLUMNS: tuple[Column, ...] = (
    Column("run_id", "VARCHAR", "PRIMARY KEY"),
    Column("created_at", "TIMESTAMP", NN),  # UTC
    Column("finished_at", "TIMESTAMP"),  # UTC
    Column("status", "VARCHAR", f"{NN} CHECK (status IN ({{statuses}}))"),
    Column("kind", "VARCHAR", NN),
    Column("model", "VARCHAR"),
    Column("controller", "VARCHAR"),
    Column("controller_id", "VARCHAR"),
    Column("controller_trained", "BOOLEAN"),
    Column("budget", "DOUBLE"),
    Column("scope", "VARCHAR"),
    Column("hedge_policy", "VARCHAR"),
    Column("hedge_threshold", "DOUBLE"),
    Column("hedge_min_weight", "DOUBLE"),
    Column("local_window", "INTEGER"),
    Column("n_sink", "INTEGER"),
    Column("fixed_lam", "DOUBLE"),
    Column("dual_step", "DOUBLE"),
    Column("backend", "VARCHAR"),
    Column("n_layers", "SMALLINT", NN),
    Column("head_dim", "SMALLINT"),
    Column("n_tokens", "INTEGER", NN),  # positions committed so far
    Column("n_prompt_tokens", "INTEGER", NN),
    Column("truncated", "INTEGER", NN),
    Column("prompt", "VARCHAR"),
    Column("output_text", "VARCHAR"),
    Column("realized_cost", "DOUBLE"),
    Column("flops_ratio", "DOUBLE"),
    Column("wall_ms", "DOUBLE"),
    Column("timings", "VARCHAR"),  # JSON object
    Column("error", "VARCHAR"),
    Column("pid", "INTEGER"),  # NULL in an owner's run (a visitor of a public deployment)
    Column("host", "VARCHAR"),  # likewise
    Column("owner", "VARCHAR", since=2),  # owners.py; NULL: the CLI, or logged before v2
    # RoutingSettings.linear_map; the default is what every run before v3 used
    Column("linear_map", "VARCHAR", "DEFAULT 'elu'", since=3),
    # RoutingSettings.hedge_measure; every run before v4 hedged on the total uncertainty
    Column("hedge_measure", "VARCHAR", "DEFAULT 'total'", since=4),
    # RoutingSettings.cost_model; every run before v5 spent notional costs
    Column("cost_model", "VARCHAR", "DEFAULT 'notional'", since=5),
    # how the text was generated (RoutingTrace.generation, trace.GENERATION_KEYS); NULL: a
    # text routed as given, or a run logged before v6
    Column("max_new_tokens", "INTEGER", since=6),
    Column("temperature", "DOUBLE", since=6),
    Column("top_p", "DOUBLE", since=6),
    Column("seed", "BIGINT", since=6),
    Column("chat", "BOOLEAN", since=6),
)
TOKENS_COLUMNS: tuple[Column, ...] = (
    Column("run_id", "VARCHAR", NN),
    Column("pos", "INTEGER", NN),
    Column("token_id", "INTEGER", NN),
    Column("text", "VARCHAR", NN),
    Column("is_prompt", "BOOLEAN", NN),
    Column("kl_to_dense", "FLOAT"),  # KL(dense || routed) of the next token, when measured
)
ROUTES_COLUMNS: tuple[Column, ...] = (
    Column("run_id", "VARCHAR", NN),
    Column("layer", "SMALLINT", NN),
    Column("pos", "INTEGER", NN),
    Column("expert", "TINYINT", NN),
    Column("hedged", "BOOLEAN", NN),
    Column("conc_full", "FLOAT", NN),
    Column("conc_linear", "FLOAT", NN),
    Column("conc_local", "FLOAT", NN),
    Column("weight_full", "FLOAT", NN),
    Column("weight_linear", "FLOAT", NN),
    Column("weight_local", "FLOAT", NN),
    Column("cost", "FLOAT", NN),
    Column("lam", "FLOAT", NN),
    Column("uncertainty", "FLOAT", NN),
    Column("aleatoric", "FLOAT", NN),
    Column("epistemic", "FLOAT", NN),
    Column("vacuity", "FLOAT", NN),
)

# The runs columns that finish writes, and those every committed batch updates.
FINAL_COLUMNS = (
    "status",
    "finished_at",
    "prompt",
    "output_text",
    "realized_cost",
    "flops_ratio",
    "wall_ms",
    "timings",
    "error",
)
PROGRESS_COLUMNS = (
    "n_tokens",
    "n_prompt_tokens",
    "truncated",
    "output_text",
    "realized_cost",
    "flops_ratio",
    "wall_ms",
)


def create_table(name: str, columns: tuple[Column, ...], version: int = 1) -> str:
    """CREATE TABLE for the columns that schema `version` added."""
    body = ",\n  ".join(c.sql(version) for c in columns if c.since == version)
    return f"CREATE TABLE {name} (\n  {body})"


def add_columns(name: str, columns: tuple[Column, ...], version: int) -> tuple[str, ...]:
    """ALTER TABLE ... ADD COLUMN for the columns that schema `version` added to table
    `name`; existing rows take each column's DEFAULT (NULL without one)."""
    return tuple(f"ALTER TABLE {name} ADD COLUMN {c.sql(version)}" for c in columns if c.since == version)


def rebuild_table(name: str, columns: tuple[Column, ...], version: int) -> tuple[str, ...]:
    """The statements that rebuild table `name` as schema `version` defines it (every
    column up to that version, its constraints), keeping its rows; the columns new in
    `version` start NULL. The way to change a constraint, which DuckDB cannot alter."""
    body = ",\n  ".join(c.sql(version) for c in columns if c.since <= version)
    old = f"{name}_before_v{version}"
    return (
        f"ALTER TABLE {name} RENAME TO {old}",
        f"CREATE TABLE {name} (\n  {body})",
        f"INSERT INTO {name} BY NAME SELECT * FROM {old}",
        f"DROP TABLE {old}",
    )


def arrow_schema(columns: tuple[Column, ...], names: tuple[str, ...] | None = None) -> pa.Schema:
    """The Arrow schema of `columns` (or of those named, in that order)."""
    by_name = {c.name: c for c in columns}
    chosen = columns if names is None else tuple(by_name[n] for n in names)
    return pa.schema([(c.name, ARROW_TYPES[c.type]) for c in chosen])


RUNS_ARROW_SCHEMA = arrow_schema(RUNS_COLUMNS)
FINAL_ARROW_SCHEMA = arrow_schema(RUNS_COLUMNS, ("run_id", *FINAL_COLUMNS))
PROGRESS_ARROW_SCHEMA = arrow_schema(RUNS_COLUMNS, ("run_id", *PROGRESS_COLUMNS))

MIGRATIONS: list[tuple[int, tuple[str, ...]]] = [
    (
        1,
        (
            """CREATE TABLE schema_version (
             version    INTEGER NOT NULL,
             applied_at TIMESTAMP NOT NULL)""",
            """CREATE TABLE experts (
             expert TINYINT PRIMARY KEY,
             name   VARCHAR NOT NULL,
             cost   DOUBLE NOT NULL,
             symbol VARCHAR NOT NULL)""",
            """INSERT INTO experts VALUES (0, 'full', 1.00, 'F'), (1, 'linear', 0.15, 'L'),
                                      (2, 'local', 0.30, 'W')""",
            create_table("runs", RUNS_COLUMNS),
            create_table("tokens", TOKENS_COLUMNS),
            create_table("routes", ROUTES_COLUMNS),
        ),
    ),
    # The status `stopped` (a user's stop, apart from `interrupted`) and the run's owner.
    (2, rebuild_table("runs", RUNS_COLUMNS, 2)),
    # The linear expert's feature map of a run (RoutingSettings.linear_map).
    (3, add_columns("runs", RUNS_COLUMNS, 3)),
    # What a hedge reads (RoutingSettings.hedge_measure).
    (4, add_columns("runs", RUNS_COLUMNS, 4)),
    # What a decision costs against the budget (RoutingSettings.cost_model).
    (5, add_columns("runs", RUNS_COLUMNS, 5)),
    # How the text was generated (RoutingTrace.generation).
    (6, add_columns("runs", RUNS_COLUMNS, 6)),
]


def latest_schema_version() -> int:
    return MIGRATIONS[-1][0]
