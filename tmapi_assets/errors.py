"""The one error taxonomy of the project, and the one table that maps an API answer to an action.

Plain Python (no Dagster import). Every exception the project raises on purpose is a TmapiError; its text says what
went wrong and what to do, and never contains the API token (see tmapi_assets.redact).
"""

from __future__ import annotations

from enum import Enum


class Action(str, Enum):
    """What the pipeline does with one API answer."""

    SUCCESS = "success"  # store it, parse it
    RETRY = "retry"  # transient: retry this call with backoff (bounded)
    FAIL_ITEM = "fail_item"  # permanent for this item only: keep msg, other items go on
    HALT_RUN = "halt_run"  # quota or credentials: no further call in this run
    CONFIG_ERROR = "config_error"  # wrong base URL / path: no point calling again


class Outcome(str, Enum):
    """Outcome of one HTTP attempt, as stored in tmapi.raw_responses.outcome."""

    SUCCESS = "success"  # code 200 with data
    NO_DATA = "no_data"  # code 200 with data null: the item has no statistics
    TRANSIENT = "transient_error"  # 417/499/500/502/503...
    MALFORMED = "malformed"  # 2xx but body not JSON / not the documented shape
    NETWORK = "network_error"  # no HTTP answer: connect error, timeout, reset
    OVERSIZED = "oversized"  # body over the configured limit; not read further
    ITEM_ERROR = "item_error"  # 422
    QUOTA = "quota_exhausted"  # 439
    AUTH = "auth_error"  # 401/403, gateway "No API key"
    CONFIG = "config_error"  # 404 no route


OUTCOME_ACTION: dict[Outcome, Action] = {
    Outcome.SUCCESS: Action.SUCCESS,
    Outcome.NO_DATA: Action.SUCCESS,
    Outcome.TRANSIENT: Action.RETRY,
    Outcome.MALFORMED: Action.RETRY,
    Outcome.NETWORK: Action.RETRY,
    Outcome.OVERSIZED: Action.FAIL_ITEM,
    Outcome.ITEM_ERROR: Action.FAIL_ITEM,
    Outcome.QUOTA: Action.HALT_RUN,
    Outcome.AUTH: Action.HALT_RUN,
    Outcome.CONFIG: Action.CONFIG_ERROR,
}

# HTTP statuses the API documents as "try again" (417 failed to retrieve, 499 timeout, 500 unexpected,
# 503 concurrency limit) plus the usual gateway/proxy ones.
TRANSIENT_STATUSES = frozenset({408, 417, 425, 429, 499, 500, 502, 503, 504})
QUOTA_CODE = 439
ITEM_ERROR_CODE = 422
AUTH_STATUSES = frozenset({401, 403})


def classify(http_status: int, body_code: int | None, gateway_message: str | None, data_ok: bool) -> Outcome:
    """Map (HTTP status, body `code`, gateway `message`) to an Outcome.  THE table; nothing else decides this.

    body_code: the integer `code` of a JSON body (a string "439" is passed as 439), None when absent.
    gateway_message: the `message` of a bare gateway body {"message": ...}, None when absent.
    data_ok: the body is a JSON object whose `data` is an object or null.
    """
    # Quota first: 439 stops everything whether it comes as the status or inside a 200 body.
    if http_status == QUOTA_CODE or body_code == QUOTA_CODE:
        return Outcome.QUOTA
    if http_status in AUTH_STATUSES or body_code in AUTH_STATUSES:
        return Outcome.AUTH
    if gateway_message is not None and body_code is None:
        lowered = gateway_message.lower()
        if "api key" in lowered or "apikey" in lowered or "unauthori" in lowered or "forbidden" in lowered:
            return Outcome.AUTH
        if "balance" in lowered or "quota" in lowered or "subscription" in lowered:
            return Outcome.QUOTA
        if http_status == 404 or "no route" in lowered:
            return Outcome.CONFIG
    if http_status == ITEM_ERROR_CODE or body_code == ITEM_ERROR_CODE:
        return Outcome.ITEM_ERROR
    if http_status in TRANSIENT_STATUSES or (body_code is not None and body_code in TRANSIENT_STATUSES):
        return Outcome.TRANSIENT
    if http_status == 404:
        # The API itself answering 404 with a body code is about this item; a bare 404 is a wrong URL.
        return Outcome.ITEM_ERROR if body_code is not None else Outcome.CONFIG
    if 300 <= http_status < 400:
        return Outcome.CONFIG  # a redirect (e.g. http -> https): fix TMAPI_BASE_URL; never follow it with the token
    if 200 <= http_status < 300:
        if body_code == 200 and data_ok:
            return Outcome.SUCCESS  # NO_DATA is told apart by the caller, which sees `data`
        return Outcome.MALFORMED
    if 500 <= http_status < 600:
        return Outcome.TRANSIENT
    # Any other 4xx is a request we cannot fix by repeating it.
    return Outcome.ITEM_ERROR


class TmapiError(Exception):
    """Base of every error the project raises on purpose."""


class InvalidInputError(TmapiError, ValueError):
    """A malformed item id, spec id or watchlist row, refused before any API call."""


class ApiError(TmapiError):
    """The API (or the network to it) did not give a usable answer for one item."""

    def __init__(
        self,
        message: str,
        *,
        outcome: Outcome,
        item: str | None = None,
        http_status: int | None = None,
        api_msg: str | None = None,
    ) -> None:
        super().__init__(message)
        self.outcome = outcome
        self.item = item
        self.http_status = http_status
        self.api_msg = api_msg

    @property
    def action(self) -> Action:
        return OUTCOME_ACTION[self.outcome]


class RunHaltedError(ApiError):
    """Quota exhausted or credentials refused: no further API call may be made until an operator acts."""


class WarehouseError(TmapiError):
    """DuckDB problem the operator must know about."""


class WarehouseLockedError(WarehouseError):
    """Another process holds the DuckDB file. Retryable: wait for it to finish, then run again."""
