"""The asset graph: raw responses -> statistics and daily trends -> KPIs, one partition per watched item.

Each asset is a thin call into tmapi_assets.pipeline / warehouse. A run covers many partitions at once
(BackfillPolicy.multi_run): the API calls of a run go out concurrently inside the raw step, and the writes are bulk.
"""


from contextlib import contextmanager
from datetime import timedelta

from dagster import (
    AssetExecutionContext,
    AssetSpec,
    Backoff,
    BackfillPolicy,
    Failure,
    Jitter,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    multi_asset,
)

from tmapi_assets import config, pipeline
from tmapi_assets.defs.checks import (
    PRICE_MIN_NOT_ABOVE_MAX,
    RAW_ITEMS_LANDED,
    SUM30_MATCHES,
    price_min_not_above_max,
    raw_items_landed,
    sum30_matches,
)
from tmapi_assets.defs.partitions import (
    ITEM_STATISTICS,
    KPIS,
    PRICE_TREND,
    RAW,
    SALES_TREND,
    items_of,
    watched_items,
)
from tmapi_assets.defs.resources import TmapiApiResource, WarehouseResource
from tmapi_assets.errors import TmapiError, WarehouseLockedError

API_POOL = "tmapi_api"
FORCE_TAG = "tmapi/force"  # set to "true" on a run (UI launchpad or `refresh --force`) to skip the freshness check
# "false" on a run: its KPIs leave the read copy alone (`tmapi-assets refresh` publishes once, after its runs)
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


@multi_asset(
    specs=[AssetSpec(
        RAW, partitions_def=watched_items, kinds={"duckdb", "api"},
        description="Every TMAPI sales-statistics response, verbatim and append-only (table tmapi.raw_responses). "
        "Items fetched successfully within the freshness window are skipped unless the run has tag tmapi/force=true.",
    )],
    check_specs=[RAW_ITEMS_LANDED],
    can_subset=True,  # the check alone (from the UI) makes no call
    partitions_def=watched_items,
    backfill_policy=backfill_policy,
    pool=API_POOL,
    # Single calls are retried inside the client (per item); this policy covers whole-step faults such as a
    # DuckDB file locked by another process. Halts (quota, credentials) raise Failure(allow_retries=False).
    retry_policy=step_retry_policy,
)
def raw_responses(context: AssetExecutionContext, tmapi_api: TmapiApiResource, warehouse: WarehouseResource):
    items = items_of(context.partition_keys)
    if RAW not in context.selected_asset_keys:
        yield raw_items_landed(items, warehouse, tmapi_api)
        return
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
    yield MaterializeResult(asset_key=RAW, metadata=metadata)
    if RAW_ITEMS_LANDED.key in context.selected_asset_check_keys:
        yield raw_items_landed(items, warehouse, tmapi_api)


@multi_asset(
    specs=[
        AssetSpec(ITEM_STATISTICS, deps=[RAW], partitions_def=watched_items, kinds={"duckdb"},
                  description="Latest observation per item: publish time, 30-day sales, display totals parsed."),
        AssetSpec(SALES_TREND, deps=[RAW], partitions_def=watched_items, kinds={"duckdb"},
                  description="Daily pieces and orders per item, upserted by (item, spec, date): history grows."),
        AssetSpec(PRICE_TREND, deps=[RAW], partitions_def=watched_items, kinds={"duckdb"},
                  description="Daily min/max price (DECIMAL) per item, upserted by (item, spec, date)."),
        AssetSpec(KPIS, deps=[ITEM_STATISTICS, SALES_TREND, PRICE_TREND], partitions_def=watched_items,
                  kinds={"duckdb"},
                  description="Per-item KPIs computed in SQL (tmapi_assets/warehouse/kpis.sql) over all stored history."),
    ],
    check_specs=[SUM30_MATCHES, PRICE_MIN_NOT_ABOVE_MAX],
    can_subset=True,  # each table, the KPIs or a check can be materialised (or run) alone
    partitions_def=watched_items,
    backfill_policy=backfill_policy,
    retry_policy=step_retry_policy,
)
def normalised_tables(context: AssetExecutionContext, warehouse: WarehouseResource):
    """Parse the newest successful stored response of each item (never calls the API), check the tables, then
    recompute the items' KPIs. One step, not three: each step costs a run ~0.1 s of Dagster bookkeeping, and the final
    run of a refresh spends it after its last API call."""
    items = items_of(context.partition_keys)
    selected = context.selected_asset_keys
    tables = [key for key in (ITEM_STATISTICS, SALES_TREND, PRICE_TREND) if key in selected]
    if tables:
        with retry_only_transient():
            summary = pipeline.normalise_items(warehouse.warehouse(), items)
        for error in list(summary.parse_errors.values())[:50]:
            context.log.error(error)
        if summary.missing:
            context.log.warning(f"no successful response stored yet for {len(summary.missing)} items: "
                                f"{short_list(summary.missing)}")
        common = {"items": summary.items, "missing": len(summary.missing), "parse_errors": len(summary.parse_errors)}
        rows = {ITEM_STATISTICS: {"no_data": len(summary.no_data)},
                SALES_TREND: {"rows_upserted": summary.sales_rows}, PRICE_TREND: {"rows_upserted": summary.price_rows}}
        for key in tables:
            yield MaterializeResult(asset_key=key, metadata={**common, **rows[key]})
    checks = context.selected_asset_check_keys
    with retry_only_transient():
        if SUM30_MATCHES.key in checks:
            yield sum30_matches(items, warehouse)
        if PRICE_MIN_NOT_ABOVE_MAX.key in checks:
            yield price_min_not_above_max(items, warehouse)
    if KPIS in selected:
        yield _item_kpis(context, items, warehouse)


def _item_kpis(context: AssetExecutionContext, items, warehouse: WarehouseResource) -> MaterializeResult:
    with retry_only_transient():
        count = warehouse.warehouse().refresh_kpis(items)
        read_copy = config.read_copy_path()
        if context.run.tags.get(PUBLISH_TAG, "").lower() == "false":
            read_copy_state = "published by the CLI refresh after its last run"
        elif read_copy is not None:  # readers use the copy, so they never hold the live file's lock
            warehouse.warehouse().publish_read_copy(read_copy)
            read_copy_state = str(read_copy)
        else:
            read_copy_state = "disabled"
    return MaterializeResult(asset_key=KPIS, metadata={"items": count, "read_copy": read_copy_state})
