"""One dynamic partition per watched (item, spec); the key is WatchedItem.partition_key ('ITEM' or 'ITEM:SPEC')."""

from dagster import DynamicPartitionsDefinition

from tmapi_assets.ids import WatchedItem

watched_items = DynamicPartitionsDefinition(name="watched_items")


def items_of(partition_keys) -> list[WatchedItem]:
    return [WatchedItem.from_partition_key(key) for key in partition_keys]
