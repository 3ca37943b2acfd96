"""Item/spec id validation, partition keys, and the watchlist file."""

import pytest

from tmapi_assets.errors import InvalidInputError
from tmapi_assets.ids import WatchedItem
from tmapi_assets.watchlist import add_items, parse_watchlist, read_watchlist, remove_items


@pytest.mark.parametrize(
    "key, item_id, spec_id",
    [
        ("652702302959", 652702302959, ""),
        ("1000012345678", 1000012345678, ""),  # 13 digits
        ("652702302959:5b2a1c4d8e9f00112233445566778899", 652702302959, "5b2a1c4d8e9f00112233445566778899"),
        (" 652702302959 ", 652702302959, ""),
    ],
)
def test_partition_key_round_trip(key, item_id, spec_id):
    item = WatchedItem.from_partition_key(key)
    assert (item.item_id, item.spec_id) == (item_id, spec_id)
    assert WatchedItem.from_partition_key(item.partition_key) == item
    assert item.partition_key == key.strip()


@pytest.mark.parametrize(
    "bad",
    ["", "abc", "-652702302959", "0652702302959", "12345678901234567890", "9223372036854775808", "1.5", "65270230295 9",
     "652702302959:", "652702302959:a,b", "652702302959:a|b", "652702302959:[x]", "652702302959:a...b",
     "652702302959:has space", "652702302959:规格", "652702302959:" + "a" * 65, "１２３"],
)
def test_invalid_ids_are_refused_with_a_message(bad):
    with pytest.raises(InvalidInputError) as info:
        WatchedItem.from_partition_key(bad)
    assert "valid" in str(info.value) or "empty" in str(info.value) or "nothing after" in str(info.value)


def test_watched_item_revalidates_when_built_by_hand():
    with pytest.raises(InvalidInputError):
        WatchedItem("12a")
    with pytest.raises(InvalidInputError):
        WatchedItem(1, "bad spec")


def test_watchlist_tolerates_bom_blank_lines_duplicates_and_reports_bad_rows():
    text = "\ufeffitem_id,spec_id,note\n652702302959,,doc item\n\n  \n652702302959,,dup\nabc,,bad\n" \
           "624282357434,a1b2,sku\n# comment\n610947572360:ff00\n-5,,neg\n"
    watchlist = parse_watchlist(text, source="w.csv")
    assert [str(i) for i in watchlist.items] == ["652702302959", "624282357434:a1b2", "610947572360:ff00"]
    assert watchlist.entries[0].note == "doc item"
    assert len(watchlist.problems) == 2
    assert watchlist.problems[0].startswith("w.csv line 6:") and "'abc'" in watchlist.problems[0]
    assert watchlist.problems[1].startswith("w.csv line 10:")


def test_watchlist_add_remove_round_trip(tmp_path):
    path = tmp_path / "watchlist.csv"
    assert read_watchlist(path).items == []
    a, b = WatchedItem(652702302959), WatchedItem(624282357434, "a1b2")
    assert add_items(path, [a, b, a], note="n") == [a, b]
    assert add_items(path, [a]) == []
    assert read_watchlist(path).items == [a, b]
    assert remove_items(path, [a]) == [a]
    assert read_watchlist(path).items == [b]
    assert path.read_text().splitlines()[0] == "item_id,spec_id,note"


def test_watchlist_rows_are_lines_and_bad_lines_are_named(tmp_path):
    path = tmp_path / "watchlist.csv"
    path.write_bytes(
        b"# my items\n"
        b"item_id,spec_id,note\n"  # a header after a comment
        b'652702302959,,"unclosed quote\n'  # must not swallow the next row
        b"624282357434,,ok\n"
        b"610947572360,,\xc9\xcc\xc6\xb7\n"  # GBK, not UTF-8
        b"700112233445;;semicolons\n"
        b"700112233446,,fine\r\n")
    watchlist = read_watchlist(path)
    assert [str(i) for i in watchlist.items] == ["652702302959", "624282357434", "700112233446"]
    assert watchlist.entries[0].note == "unclosed quote"
    assert len(watchlist.problems) == 2
    assert watchlist.problems[0].startswith(f"{path} line 5: not UTF-8") and "CSV UTF-8" in watchlist.problems[0]
    assert watchlist.problems[1].startswith(f"{path} line 6:") and "not ';'" in watchlist.problems[1]


def test_watchlist_saved_by_excel_as_utf16_is_read(tmp_path):
    path = tmp_path / "watchlist.csv"
    path.write_bytes("item_id,spec_id,note\r\n652702302959,,商品\r\n".encode("utf-16"))
    watchlist = read_watchlist(path)
    assert [str(i) for i in watchlist.items] == ["652702302959"] and watchlist.entries[0].note == "商品"
    assert watchlist.problems == []


def test_watch_add_and_remove_keep_comments_bad_rows_and_permissions(tmp_path):
    path = tmp_path / "watchlist.csv"
    original = b"item_id,spec_id,note\n# keep me\nabc,,fix me later\n652702302959,,doc\n\xff\xfe-not-utf8\n"
    path.write_bytes(original)
    path.chmod(0o644)
    added = add_items(path, [WatchedItem(624282357434), WatchedItem(652702302959)], note="two\nlines")
    assert added == [WatchedItem(624282357434)]
    assert path.read_bytes() == original + b"624282357434,,two lines\n"
    assert path.stat().st_mode & 0o777 == 0o644
    assert remove_items(path, [WatchedItem(652702302959)]) == [WatchedItem(652702302959)]
    assert path.read_bytes() == original.replace(b"652702302959,,doc\n", b"") + b"624282357434,,two lines\n"
    assert len(read_watchlist(path).problems) == 2  # still there for the user to fix
