"""Dagster definitions of tmapi-assets: `dagster dev -w workspace.yaml` loads `defs` from here."""

from dagster import Definitions

from tmapi_assets.defs.assets import item_kpis, normalised_tables, raw_responses
from tmapi_assets.defs.automation import daily_refresh, refresh_job, watchlist_sensor
from tmapi_assets.defs.checks import price_min_not_above_max, raw_items_landed, sum30_matches
from tmapi_assets.defs.resources import default_resources

defs = Definitions(
    assets=[raw_responses, normalised_tables, item_kpis],
    asset_checks=[raw_items_landed, sum30_matches, price_min_not_above_max],
    jobs=[refresh_job],
    schedules=[daily_refresh],
    sensors=[watchlist_sensor],
    resources=default_resources(),
)
