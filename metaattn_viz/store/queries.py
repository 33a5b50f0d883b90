"""Every SQL statement the routing log runs, under a name that says what it answers
(docs/architecture.md); the DDL is in schema.py.

$name parameters only: nothing is formatted into SQL except vetted identifiers (column
names from schema.py, ORDER BY choices from LIST_ORDERS, time buckets from TIME_BUCKETS,
table names from LOG_TABLES) and the export paths (quoted by export.sql_string). Never
executes anything itself.

Every read takes `$owner` (owners.py): NULL reads every run, a key reads that owner's
runs only. The rule is written once, in `_owned` and `_of_owned_run`; a run of another
owner is answered exactly like a run that does not exist.
"""

from __future__ import annotations

from metaattn_viz.store.schema import FINAL_COLUMNS, LOG_TABLES, PROGRESS_COLUMNS

# What list_runs may order by, and the buckets of runs_over_time.
# The columns of RunLog.compare's table, in order (COMPARE_RUNS' final SELECT without its
# two counting columns, which compare moves into the table's attrs)
COMPARE_COLUMNS = (
    "pos",
    "token_a",
    "token_b",
    "same_token",
    "routes_a",
    "routes_b",
    "agreement",
    "cost_a",
    "cost_b",
)
LIST_ORDERS = (
    "created_at",
    "finished_at",
    "n_tokens",
    "budget",
    "realized_cost",
    "flops_ratio",
    "wall_ms",
    "status",
    "model",
    "controller",
)
TIME_BUCKETS = ("hour", "day", "week", "month")


def _set_from(alias: str, columns: tuple[str, ...]) -> str:
    return ", ".join(f"{c} = {alias}.{c}" for c in columns)


def _owned(runs: str = "") -> str:
    """The runs row (of alias `runs`, with its dot) is visible to $owner."""
    return f"($owner::VARCHAR IS NULL OR {runs}owner = $owner::VARCHAR)"


def _of_owned_run(alias: str = "") -> str:
    """The tokens or routes row (of alias `alias`, with its dot) belongs to a run visible
    to $owner."""
    return (
        f"($owner::VARCHAR IS NULL OR {alias}run_id IN "
        "(SELECT run_id FROM runs WHERE owner = $owner::VARCHAR))"
    )


# An export's runs: every run visible to $owner ($run_id NULL), or that one run.
_ONE_RUN = "($run_id::VARCHAR IS NULL OR run_id = $run_id::VARCHAR)"


# The runs list_runs and count_runs answer with: visible to $owner, and matching the
# filters that are not NULL ($text in the prompt or the output, case-insensitive).
_LISTED = f"""{_owned()}
          AND ($status::VARCHAR IS NULL OR status = $status::VARCHAR)
          AND ($model::VARCHAR IS NULL OR model = $model::VARCHAR)
          AND ($controller::VARCHAR IS NULL OR controller = $controller::VARCHAR)
          AND ($text::VARCHAR IS NULL
               OR contains(lower(coalesce(prompt, '')), lower($text::VARCHAR))
               OR contains(lower(coalesce(output_text, '')), lower($text::VARCHAR)))"""


def visible_rows(table: str, owner: str | None) -> tuple[str, dict[str, str]]:
    """(query, parameters) for the rows of log table `table` that `owner` sees: all of
    them for None, else those of owner's runs (the SQL console's copy of the log). Built
    without `owner` when unscoped, so it also reads a table that has no owner column."""
    if table not in LOG_TABLES:
        raise ValueError(f"{table!r} is not a table of the log ({', '.join(LOG_TABLES)})")
    if owner is None or table in ("experts", "schema_version"):  # these hold no runs
        return f"SELECT * FROM {table}", {}
    rule = _owned() if table == "runs" else _of_owned_run()
    return f"SELECT * FROM {table} WHERE {rule}", {"owner": owner}


class Q:
    # -- opening: schema version, migrations, recovery --------------------------------------
    TABLES_IN_MAIN = (
        "SELECT table_name FROM duckdb_tables() "
        "WHERE database_name = current_database() AND schema_name = 'main'"
    )
    SCHEMA_VERSION = "SELECT max(version) FROM schema_version"
    RECORD_VERSION = "INSERT INTO schema_version VALUES ($version, now()::TIMESTAMP)"
    MARK_ABANDONED_INTERRUPTED = """
        UPDATE runs SET status = 'interrupted', error = coalesce(error, $error)
        WHERE status = 'running' RETURNING run_id"""
    MARK_OWN_INTERRUPTED = """
        UPDATE runs SET status = 'interrupted', error = coalesce(error, $error),
                        finished_at = now()::TIMESTAMP
        WHERE run_id = $run_id AND status = 'running'"""

    # -- the writer: from the Arrow tables it registers for one transaction -----------------
    INSERT_RUNS = "INSERT INTO runs BY NAME SELECT * FROM _new_runs"
    INSERT_TOKENS = "INSERT INTO tokens BY NAME SELECT * FROM _new_tokens"
    INSERT_ROUTES = "INSERT INTO routes BY NAME SELECT * FROM _new_routes"
    UPDATE_PROGRESS = f"""
        UPDATE runs SET {_set_from("p", PROGRESS_COLUMNS)}
        FROM _progress p WHERE runs.run_id = p.run_id"""
    UPDATE_KL_TO_DENSE = """
        UPDATE tokens SET kl_to_dense = k.kl_to_dense
        FROM _kl k WHERE tokens.run_id = k.run_id AND tokens.pos = k.pos"""
    UPDATE_FINAL = f"""
        UPDATE runs SET {_set_from("f", FINAL_COLUMNS)}
        FROM _final f WHERE runs.run_id = f.run_id"""

    # -- replay -----------------------------------------------------------------------------
    RUN_BY_ID = f"SELECT * FROM runs WHERE run_id = $run_id AND {_owned()}"
    TOKENS_OF_RUN = """
        SELECT pos, token_id, text, kl_to_dense FROM tokens
        WHERE run_id = $run_id AND pos < $n_tokens ORDER BY pos"""
    ROUTES_OF_RUN = """
        SELECT layer, pos, expert, hedged, conc_full, conc_linear, conc_local,
               weight_full, weight_linear, weight_local, cost, lam
        FROM routes WHERE run_id = $run_id AND pos < $n_tokens"""

    # -- browsing and analytics -------------------------------------------------------------
    LIST_RUNS = f"""
        SELECT * FROM runs WHERE {_LISTED}
        ORDER BY {{order}} NULLS LAST, run_id
        LIMIT $limit OFFSET $offset"""
    COUNT_RUNS = f"SELECT count(*) FROM runs WHERE {_LISTED}"
    # Every position of either run; agreement, _decisions and _same_decisions only where
    # both runs have the position, over the layers both have (RunLog.compare sums the
    # last two into its attrs and drops them).
    COMPARE_RUNS = f"""
        WITH per_pos AS (
            SELECT d.run_id, d.pos,
                   string_agg(CASE WHEN d.hedged THEN lower(e.symbol) ELSE e.symbol END, ''
                              ORDER BY d.layer) AS routes,
                   avg(d.cost) AS cost
            FROM routes d JOIN experts e USING (expert)
            WHERE d.run_id IN ($run_a, $run_b) AND {_of_owned_run("d.")}
            GROUP BY d.run_id, d.pos),
        agree AS (
            SELECT a.pos, avg((a.expert = b.expert)::DOUBLE) AS agreement,
                   count(*) AS decisions, count(*) FILTER (WHERE a.expert = b.expert) AS same
            FROM routes a JOIN routes b ON a.layer = b.layer AND a.pos = b.pos
            WHERE a.run_id = $run_a AND b.run_id = $run_b AND {_of_owned_run("a.")}
              AND {_of_owned_run("b.")}
            GROUP BY a.pos),
        positions AS (SELECT DISTINCT pos FROM per_pos)
        SELECT p.pos, ta.text AS token_a, tb.text AS token_b,
               (ta.text IS NOT DISTINCT FROM tb.text) AS same_token,
               ra.routes AS routes_a, rb.routes AS routes_b, g.agreement,
               ra.cost AS cost_a, rb.cost AS cost_b,
               coalesce(g.decisions, 0) AS _decisions, coalesce(g.same, 0) AS _same_decisions
        FROM positions p
        LEFT JOIN per_pos ra ON ra.pos = p.pos AND ra.run_id = $run_a
        LEFT JOIN per_pos rb ON rb.pos = p.pos AND rb.run_id = $run_b
        LEFT JOIN tokens ta ON ta.pos = p.pos AND ta.run_id = $run_a
        LEFT JOIN tokens tb ON tb.pos = p.pos AND tb.run_id = $run_b
        LEFT JOIN agree g ON g.pos = p.pos
        ORDER BY p.pos"""
    FULL_ATTENTION_SHARE_BY_LAYER = f"""
        SELECT layer, count(*) AS decisions,
               avg((expert = 0)::DOUBLE) AS full_share,
               avg(weight_full) AS full_weight,
               avg(hedged::DOUBLE) AS hedged_share,
               avg(cost) AS mean_cost
        FROM routes
        WHERE ($run_id::VARCHAR IS NULL OR run_id = $run_id::VARCHAR) AND {_of_owned_run()}
        GROUP BY layer ORDER BY layer"""
    FULL_ATTENTION_SHARE_BY_BUDGET = f"""
        SELECT r.controller, r.budget, count(DISTINCT r.run_id) AS runs,
               count(*) AS decisions,
               avg((d.expert = 0)::DOUBLE) AS full_share,
               avg(d.weight_full) AS full_weight,
               avg(d.cost) AS realized_cost
        FROM routes d JOIN runs r USING (run_id)
        WHERE {_owned("r.")}
        GROUP BY r.controller, r.budget
        ORDER BY r.controller, r.budget NULLS LAST"""
    TOKENS_MOST_OFTEN_FULL = f"""
        WITH per_token AS (
            SELECT run_id, pos, avg((expert = 0)::DOUBLE) AS full_share
            FROM routes WHERE {_of_owned_run()} GROUP BY run_id, pos)
        SELECT t.text AS token, count(*) AS occurrences, avg(p.full_share) AS full_share
        FROM per_token p JOIN tokens t USING (run_id, pos)
        GROUP BY t.text
        HAVING count(*) >= $min_occurrences
        ORDER BY full_share DESC, occurrences DESC, token
        LIMIT $limit"""
    UNCERTAINTY_VS_BUDGET = f"""
        SELECT r.controller, r.budget, count(*) AS decisions,
               avg(d.uncertainty) AS mean_uncertainty,
               quantile_cont(d.uncertainty, 0.9) AS p90_uncertainty,
               avg(d.epistemic) AS mean_epistemic,
               avg(d.vacuity) AS mean_vacuity,
               avg(d.hedged::DOUBLE) AS hedged_share
        FROM routes d JOIN runs r USING (run_id)
        WHERE {_owned("r.")}
        GROUP BY r.controller, r.budget
        ORDER BY r.controller, r.budget NULLS LAST"""
    RUNS_OVER_TIME = f"""
        SELECT date_trunc('{{bucket}}', created_at) AS period, count(*) AS runs,
               sum(n_tokens) AS tokens,
               count(*) FILTER (WHERE status = 'done') AS done,
               count(*) FILTER (WHERE status = 'stopped') AS stopped,
               count(*) FILTER (WHERE status = 'interrupted') AS interrupted,
               count(*) FILTER (WHERE status = 'failed') AS failed,
               count(*) FILTER (WHERE status = 'running') AS running,
               avg(realized_cost) AS mean_realized_cost
        FROM runs WHERE {_owned()} GROUP BY period ORDER BY period"""

    # -- export: one COPY per table, partitioned by the run's UTC day ------------------------
    EXPORT_RUNS = f"""SELECT *, strftime(created_at, '%Y-%m-%d') AS day FROM runs
                     WHERE {_owned()} AND {_ONE_RUN}"""
    EXPORT_TOKENS = f"""SELECT t.*, strftime(r.created_at, '%Y-%m-%d') AS day
                        FROM tokens t JOIN runs r USING (run_id) WHERE {_owned("r.")} AND {_ONE_RUN}"""
    EXPORT_ROUTES = f"""SELECT d.*, strftime(r.created_at, '%Y-%m-%d') AS day
                        FROM routes d JOIN runs r USING (run_id) WHERE {_owned("r.")} AND {_ONE_RUN}"""
    EXPORT_PARTITIONED = "COPY ({query}) TO {path} (FORMAT {fmt}, PARTITION_BY (day){extra})"
    EXPORT_EXPERTS = "COPY experts TO {path} (FORMAT {fmt}{extra})"
