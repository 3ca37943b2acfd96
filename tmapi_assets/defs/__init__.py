"""Dagster definitions of tmapi-assets: `dagster dev -w workspace.yaml` loads `defs` from here."""

import warnings

from dagster import BetaWarning, Definitions, in_process_executor

# BackfillPolicy is marked beta; it is what makes a backfill of N items N/K runs instead of N (see assets.py).
warnings.filterwarnings("ignore", category=BetaWarning)

from tmapi_assets.defs.assets import normalised_tables, raw_responses  # noqa: E402
from tmapi_assets.defs.automation import daily_refresh, refresh_job, watchlist_sensor  # noqa: E402
from tmapi_assets.defs.resources import default_resources  # noqa: E402


def build_definitions() -> Definitions:
    """The definitions with resources read from the environment now (the CLI and tests call this after setting
    TMAPI_BASE_URL / TMAPI_DUCKDB_PATH)."""
    return Definitions(
        assets=[raw_responses, normalised_tables],
        jobs=[refresh_job],
        schedules=[daily_refresh],
        sensors=[watchlist_sensor],
        resources=default_resources(),
        # One process per run, not per step: a step subprocess costs seconds of start-up, and the work inside a
        # step is I/O-bound (API calls) or done by DuckDB.
        executor=in_process_executor,
    )


defs = build_definitions()
