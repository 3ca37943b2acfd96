"""Tests of tmapi_assets.redact."""

from __future__ import annotations

import logging

import httpx
import pytest

from tmapi_assets.redact import (
    REDACTED_LOGGERS,
    RedactingFilter,
    install_log_redaction,
    redact_text,
    redact_url,
    register_secret,
)


@pytest.mark.parametrize(
    "url, expected",
    [
        ("http://api.tmapi.top/1688/item/statistics/sales?apiToken=abc&item_id=1",
         "http://api.tmapi.top/1688/item/statistics/sales?apiToken=***&item_id=1"),
        ("http://h/p?item_id=1&APITOKEN=abc", "http://h/p?item_id=1&APITOKEN=***"),
        ("http://h/p?item_id=1&apitoken=a%2Bb%3D&x=2#frag", "http://h/p?item_id=1&apitoken=***&x=2#frag"),
        ("http://h/p?apiToken=a&apiToken=b", "http://h/p?apiToken=***&apiToken=***"),
        ("http://h/p?apiToken=", "http://h/p?apiToken=***"),
        ("http://h/p?notapiToken=keep&item_id=1", "http://h/p?notapiToken=keep&item_id=1"),
        ("http://h/p?item_id=1", "http://h/p?item_id=1"),
        ("http://user:pw@h/p?item_id=1", "http://user:***@h/p?item_id=1"),
    ],
)
def test_redact_url(url: str, expected: str) -> None:
    assert redact_url(url) == expected


def test_redact_url_accepts_httpx_url() -> None:
    url = httpx.URL("http://api.tmapi.top/x", params={"item_id": 1, "apiToken": "zz-unregistered-9"})
    out = redact_url(url)
    assert out == "http://api.tmapi.top/x?item_id=1&apiToken=***"


def test_redact_text_masks_query_tokens_even_unregistered() -> None:
    text = 'HTTP Request: GET http://h/p?item_id=1&apiToken=never-registered-42 "HTTP/1.1 200 OK"'
    assert redact_text(text) == 'HTTP Request: GET http://h/p?item_id=1&apiToken=*** "HTTP/1.1 200 OK"'


def test_registered_secrets_and_their_encoded_forms_are_masked() -> None:
    secret = "s3cr3t/with+chars="
    register_secret(secret)
    register_secret(secret)  # idempotent
    register_secret("")  # ignored
    register_secret(None)
    assert redact_text(f"key {secret} here") == "key *** here"
    assert redact_text("key s3cr3t%2Fwith%2Bchars%3D here") == "key *** here"
    assert redact_text("key s3cr3t%2Fwith%2Bchars%3D here") == "key *** here"
    assert redact_text(ValueError(f"x {secret}")) == "x ***"  # any object: made a str


def test_longer_secret_wins_over_a_contained_one() -> None:
    register_secret("abcd-secret-long-1")
    register_secret("secret-long")
    assert redact_text("abcd-secret-long-1") == "***"


def test_install_is_idempotent_and_covers_httpcore_children() -> None:
    install_log_redaction()
    install_log_redaction()
    for name in REDACTED_LOGGERS:
        filters = [f for f in logging.getLogger(name).filters if isinstance(f, RedactingFilter)]
        assert len(filters) == 1, name
    assert "httpcore.http11" in REDACTED_LOGGERS and "httpcore.connection" in REDACTED_LOGGERS


def test_filter_rewrites_records_before_any_handler(caplog: pytest.LogCaptureFixture) -> None:
    install_log_redaction()
    register_secret("tok-filter-777")
    caplog.set_level(logging.DEBUG)
    logging.getLogger("httpx").info('HTTP Request: %s %s "%s"', "GET", "http://h/?apiToken=tok-filter-777", "200")
    logging.getLogger("httpcore.http11").debug("send_request_headers.started key=%s", "tok-filter-777")
    try:
        raise RuntimeError("boom tok-filter-777")
    except RuntimeError:
        logging.getLogger("httpx").exception("failed")
    assert "tok-filter-777" not in caplog.text
    assert 'HTTP Request: GET http://h/?apiToken=*** "200"' in caplog.text
    assert "boom ***" in caplog.text


def test_filter_survives_a_broken_format_string(caplog: pytest.LogCaptureFixture) -> None:
    install_log_redaction()
    caplog.set_level(logging.DEBUG)
    logging.getLogger("httpx").info("bad %d", "apiToken=zzz")
    assert "apiToken=***" in caplog.text and "zzz" not in caplog.text
