"""The graph's names: one dynamic partition per watched (item, spec), the key being WatchedItem.partition_key
('ITEM' or 'ITEM:SPEC'), and the asset keys (named here so that the assets and their checks share one home)."""

from dagster import AssetKey, DynamicPartitionsDefinition

from tmapi_assets.ids import WatchedItem

KEY_PREFIX = "tmapi"
RAW = AssetKey([KEY_PREFIX, "raw_responses"])
ITEM_STATISTICS = AssetKey([KEY_PREFIX, "item_statistics"])
SALES_TREND = AssetKey([KEY_PREFIX, "sales_trend_daily"])
PRICE_TREND = AssetKey([KEY_PREFIX, "price_trend_daily"])
KPIS = AssetKey([KEY_PREFIX, "item_kpis"])

watched_items = DynamicPartitionsDefinition(name="watched_items")


def items_of(partition_keys) -> list[WatchedItem]:
    return [WatchedItem.from_partition_key(key) for key in partition_keys]
