"""Asset checks, scoped to the partitions of the run that materialised the asset."""


from dagster import AssetCheckExecutionContext, AssetCheckResult, AssetCheckSeverity, MetadataValue, asset_check

from tmapi_assets.defs.assets import ITEM_STATISTICS, PRICE_TREND, RAW
from tmapi_assets.defs.partitions import items_of
from tmapi_assets.defs.resources import TmapiApiResource, WarehouseResource


def _scope(context: AssetCheckExecutionContext):
    return items_of(context.partition_keys) if context.has_partition_key_range or context.has_partition_key else None


@asset_check(asset=RAW, description="Every item of the run has a successful response within the freshness window.")
def raw_items_landed(
    context: AssetCheckExecutionContext, warehouse: WarehouseResource, tmapi_api: TmapiApiResource
) -> AssetCheckResult:
    from datetime import datetime, timedelta, timezone

    items = _scope(context) or []
    since = datetime.now(timezone.utc) - timedelta(hours=max(tmapi_api.fresh_within_hours, 1.0))
    landed = warehouse.warehouse().fetched_since(items, since)
    missing = [str(i) for i in items if i not in landed]
    return AssetCheckResult(
        passed=not missing,
        severity=AssetCheckSeverity.ERROR,
        metadata={"items": len(items), "missing": len(missing), "missing_items": MetadataValue.text(", ".join(missing[:50]))},
        description=None if not missing else "see tmapi.raw_responses for the errors; a re-run fetches only these",
    )


@asset_check(asset=ITEM_STATISTICS, description="Σ of the last 30 daily sales equals sales_quantity_30days "
             "(the API's own figures disagree at times: a warning, not a failure).")
def sum30_matches(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    mismatches = warehouse.warehouse().sum30_mismatches(_scope(context))
    return AssetCheckResult(
        passed=mismatches.empty,
        severity=AssetCheckSeverity.WARN,
        metadata={"mismatched_items": len(mismatches), "sample": MetadataValue.md(mismatches.head(20).to_markdown())
                  if not mismatches.empty else MetadataValue.text("none")},
    )


@asset_check(asset=PRICE_TREND, description="price_min ≤ price_max on every stored day.")
def price_min_not_above_max(context: AssetCheckExecutionContext, warehouse: WarehouseResource) -> AssetCheckResult:
    violations = warehouse.warehouse().price_order_violations(_scope(context))
    return AssetCheckResult(
        passed=violations.empty,
        severity=AssetCheckSeverity.ERROR,
        metadata={"violating_days": len(violations), "sample": MetadataValue.md(violations.head(20).to_markdown())
                  if not violations.empty else MetadataValue.text("none")},
    )
