"""The asset graph: raw responses -> statistics and daily trends -> KPIs, one partition per watched item.

Each asset is a thin call into tmapi_assets.pipeline / warehouse. A run covers many partitions at once
(BackfillPolicy.multi_run): the API calls of a run go out concurrently inside the raw step, and the writes are bulk.
"""


from contextlib import contextmanager
from datetime import timedelta

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    Backoff,
    BackfillPolicy,
    Failure,
    Jitter,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    asset,
    multi_asset,
)

from tmapi_assets import config, pipeline
from tmapi_assets.defs.partitions import items_of, watched_items
from tmapi_assets.defs.resources import TmapiApiResource, WarehouseResource
from tmapi_assets.errors import TmapiError, WarehouseLockedError

KEY_PREFIX = "tmapi"
API_POOL = "tmapi_api"
FORCE_TAG = "tmapi/force"  # set to "true" on a run (UI launchpad or `refresh --force`) to skip the freshness check
# "false" on a run: its KPI step leaves the read copy alone (`tmapi-assets refresh` publishes once, after its runs)
PUBLISH_TAG = "tmapi/publish_read_copy"
PARTITIONS_PER_RUN = config.env_int("TMAPI_PARTITIONS_PER_RUN", 200)

backfill_policy = BackfillPolicy.multi_run(max_partitions_per_run=PARTITIONS_PER_RUN)
# Whole-step retries (single API calls are retried inside the client): waits of ~d, 3d, 7d seconds with jitter.
step_retry_policy = RetryPolicy(
    max_retries=3,
    delay=config.env_float("TMAPI_STEP_RETRY_DELAY_S", 10.0),
    backoff=Backoff.EXPONENTIAL,
    jitter=Jitter.PLUS_MINUS,
)

RAW = AssetKey([KEY_PREFIX, "raw_responses"])
ITEM_STATISTICS = AssetKey([KEY_PREFIX, "item_statistics"])
SALES_TREND = AssetKey([KEY_PREFIX, "sales_trend_daily"])
PRICE_TREND = AssetKey([KEY_PREFIX, "price_trend_daily"])
KPIS = AssetKey([KEY_PREFIX, "item_kpis"])


@contextmanager
def retry_only_transient():
    """The step RetryPolicy is for transient faults only: a DuckDB file locked by another process (or an unexpected
    error, which may be one). Our own errors that retrying cannot fix fail the step at once, with their message."""
    try:
        yield
    except WarehouseLockedError:
        raise  # retried by the RetryPolicy, with backoff and jitter
    except TmapiError as exc:
        raise Failure(description=str(exc), allow_retries=False) from exc


def short_list(values, limit: int = 20) -> str:
    values = [str(v) for v in values]
    return ", ".join(values[:limit]) + (f" … (+{len(values) - limit})" if len(values) > limit else "")


@asset(
    key=RAW,
    partitions_def=watched_items,
    backfill_policy=backfill_policy,
    pool=API_POOL,
    # Single calls are retried inside the client (per item); this policy covers whole-step faults such as a
    # DuckDB file locked by another process. Halts (quota, credentials) raise Failure(allow_retries=False).
    retry_policy=step_retry_policy,
    description="Every TMAPI sales-statistics response, verbatim and append-only (table tmapi.raw_responses). "
    "Items fetched successfully within the freshness window are skipped unless the run has tag tmapi/force=true.",
    kinds={"duckdb", "api"},
)
def raw_responses(
    context: AssetExecutionContext, tmapi_api: TmapiApiResource, warehouse: WarehouseResource
) -> MaterializeResult:
    items = items_of(context.partition_keys)
    force = context.run.tags.get(FORCE_TAG, "").lower() in ("1", "true", "yes")
    with retry_only_transient():
        summary = pipeline.fetch_items(
            items,
            settings=tmapi_api.client_settings(),
            warehouse=warehouse.warehouse(),
            run_id=context.run.run_id,
            force=force,
            fresh_within=timedelta(hours=tmapi_api.fresh_within_hours),
        )
    if summary.recovered:
        context.log.warning(f"loaded {summary.recovered} answer(s) spooled by an interrupted earlier run")
    for item, error in list(summary.failed.items())[:50]:
        context.log.warning(error)
    metadata = {
        "items": len(items),
        "landed": len(summary.landed),
        "skipped_fresh": len(summary.skipped_fresh),
        "failed": len(summary.failed),
        "halted": len(summary.halted),
        "api_calls": summary.calls,
        "failed_items": MetadataValue.text(short_list(summary.failed)),
    }
    context.log.info(
        f"{len(summary.landed)} landed, {len(summary.skipped_fresh)} fresh (no call), {len(summary.failed)} failed, "
        f"{len(summary.halted)} not called after a halt; {summary.calls} API calls"
    )
    if summary.halt_error is not None:
        # Retrying cannot help (no balance, bad token, wrong URL): stop here, visibly.
        raise Failure(description=str(summary.halt_error), metadata=metadata, allow_retries=False)
    if summary.failed and not summary.landed and not summary.skipped_fresh:
        # Nothing landed (API down, network out): a red run, not a green one with a failed check. The client already
        # retried each call with backoff; a step retry would only pay again.
        first_error = next(iter(summary.failed.values()))
        raise Failure(description=f"none of the {len(items)} item(s) landed; first error: {first_error}",
                      metadata=metadata, allow_retries=False)
    return MaterializeResult(metadata=metadata)


@multi_asset(
    specs=[
        AssetSpec(ITEM_STATISTICS, deps=[RAW], partitions_def=watched_items, kinds={"duckdb"},
                  description="Latest observation per item: publish time, 30-day sales, display totals parsed."),
        AssetSpec(SALES_TREND, deps=[RAW], partitions_def=watched_items, kinds={"duckdb"},
                  description="Daily pieces and orders per item, upserted by (item, spec, date): history grows."),
        AssetSpec(PRICE_TREND, deps=[RAW], partitions_def=watched_items, kinds={"duckdb"},
                  description="Daily min/max price (DECIMAL) per item, upserted by (item, spec, date)."),
    ],
    partitions_def=watched_items,
    backfill_policy=backfill_policy,
    retry_policy=step_retry_policy,
)
def normalised_tables(context: AssetExecutionContext, warehouse: WarehouseResource):
    """Parse the newest successful stored response of each item (never calls the API)."""
    items = items_of(context.partition_keys)
    with retry_only_transient():
        summary = pipeline.normalise_items(warehouse.warehouse(), items)
    for error in list(summary.parse_errors.values())[:50]:
        context.log.error(error)
    if summary.missing:
        context.log.warning(f"no successful response stored yet for {len(summary.missing)} items: "
                            f"{short_list(summary.missing)}")
    common = {"items": summary.items, "missing": len(summary.missing), "parse_errors": len(summary.parse_errors)}
    yield MaterializeResult(asset_key=ITEM_STATISTICS, metadata={**common, "no_data": len(summary.no_data)})
    yield MaterializeResult(asset_key=SALES_TREND, metadata={**common, "rows_upserted": summary.sales_rows})
    yield MaterializeResult(asset_key=PRICE_TREND, metadata={**common, "rows_upserted": summary.price_rows})


@asset(
    key=KPIS,
    deps=[ITEM_STATISTICS, SALES_TREND, PRICE_TREND],
    partitions_def=watched_items,
    backfill_policy=backfill_policy,
    retry_policy=step_retry_policy,
    description="Per-item KPIs computed in SQL (tmapi_assets/warehouse/kpis.sql) over all stored history.",
    kinds={"duckdb"},
)
def item_kpis(context: AssetExecutionContext, warehouse: WarehouseResource) -> MaterializeResult:
    with retry_only_transient():
        count = warehouse.warehouse().refresh_kpis(items_of(context.partition_keys))
        read_copy = config.read_copy_path()
        if context.run.tags.get(PUBLISH_TAG, "").lower() == "false":
            read_copy_state = "published by the CLI refresh after its last run"
        elif read_copy is not None:  # readers use the copy, so they never hold the live file's lock
            warehouse.warehouse().publish_read_copy(read_copy)
            read_copy_state = str(read_copy)
        else:
            read_copy_state = "disabled"
    return MaterializeResult(metadata={"items": count, "read_copy": read_copy_state})

