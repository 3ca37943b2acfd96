"""Asset checks, scoped to the partitions of the run that materialised the asset.

They are evaluated inside the steps that write what they check (check_specs of the assets in assets.py):
raw_items_landed in the raw step, the other two in the normalising step. As steps of their own, each cost a run
~0.1 s of Dagster bookkeeping (step and check events, resources), and the final run of a refresh waited for them
after its last API call. Each can still be executed alone from the UI (the assets can be subset)."""


from datetime import datetime, timedelta, timezone

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue

from tmapi_assets.defs.partitions import ITEM_STATISTICS, PRICE_TREND, RAW
from tmapi_assets.defs.resources import TmapiApiResource, WarehouseResource

RAW_ITEMS_LANDED = AssetCheckSpec(
    "raw_items_landed", asset=RAW,
    description="Every item of the run has a successful response within the freshness window.")
SUM30_MATCHES = AssetCheckSpec(
    "sum30_matches", asset=ITEM_STATISTICS,
    description="Σ of the last 30 daily sales equals sales_quantity_30days (the API's own figures disagree at times: "
                "a warning, not a failure).")
PRICE_MIN_NOT_ABOVE_MAX = AssetCheckSpec(
    "price_min_not_above_max", asset=PRICE_TREND, description="price_min ≤ price_max on every stored day.")


def raw_items_landed(items, warehouse: WarehouseResource, tmapi_api: TmapiApiResource) -> AssetCheckResult:
    since = datetime.now(timezone.utc) - timedelta(hours=max(tmapi_api.fresh_within_hours, 1.0))
    landed = warehouse.warehouse().fetched_since(items, since)
    missing = [str(i) for i in items if i not in landed]
    return AssetCheckResult(
        check_name=RAW_ITEMS_LANDED.name, asset_key=RAW_ITEMS_LANDED.asset_key,
        passed=not missing,
        severity=AssetCheckSeverity.ERROR,
        metadata={"items": len(items), "missing": len(missing), "missing_items": MetadataValue.text(", ".join(missing[:50]))},
        description=None if not missing else "see tmapi.raw_responses for the errors; a re-run fetches only these",
    )


def sum30_matches(scope, warehouse: WarehouseResource) -> AssetCheckResult:
    mismatches = warehouse.warehouse().sum30_mismatches(scope)
    return AssetCheckResult(
        check_name=SUM30_MATCHES.name, asset_key=SUM30_MATCHES.asset_key,
        passed=mismatches.empty,
        severity=AssetCheckSeverity.WARN,
        metadata={"mismatched_items": len(mismatches), "sample": MetadataValue.md(mismatches.head(20).to_markdown())
                  if not mismatches.empty else MetadataValue.text("none")},
    )


def price_min_not_above_max(scope, warehouse: WarehouseResource) -> AssetCheckResult:
    violations = warehouse.warehouse().price_order_violations(scope)
    return AssetCheckResult(
        check_name=PRICE_MIN_NOT_ABOVE_MAX.name, asset_key=PRICE_MIN_NOT_ABOVE_MAX.asset_key,
        passed=violations.empty,
        severity=AssetCheckSeverity.ERROR,
        metadata={"violating_days": len(violations), "sample": MetadataValue.md(violations.head(20).to_markdown())
                  if not violations.empty else MetadataValue.text("none")},
    )
