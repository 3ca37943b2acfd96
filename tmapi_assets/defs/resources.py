"""Dagster resources: thin wrappers that build the plain-Python client settings and warehouse."""


import os
from contextlib import contextmanager
from typing import Literal

from dagster import ConfigurableResource, EnvVar
from dagster_duckdb import DuckDBResource
from pydantic import Field

from tmapi_assets import config
from tmapi_assets.client import ClientSettings
from tmapi_assets.warehouse import Warehouse


class TmapiApiResource(ConfigurableResource):
    """The TMAPI sales statistics API. The token comes from the env var TMAPI_API_TOKEN and is never logged."""

    base_url: str = Field(default=config.SANDBOX_BASE_URL, description="e.g. http://api.tmapi.top")
    api_token: str = Field(description="TMAPI apiToken; set through EnvVar('TMAPI_API_TOKEN')")
    auth_mode: Literal["query", "header"] = Field(default="query", description="apiToken query param or apikey header")
    timeout_s: float = 60.0
    max_attempts: int = 4
    concurrency: int = Field(default=4, description="API calls in flight per run (the API answers 503 above its cap)")
    fresh_within_hours: float = Field(
        default=20.0, description="an item fetched successfully this recently costs no call unless forced"
    )

    def client_settings(self) -> ClientSettings:
        return ClientSettings(
            base_url=self.base_url,
            api_token=self.api_token,
            auth_mode=self.auth_mode,
            timeout_s=self.timeout_s,
            max_attempts=self.max_attempts,
            concurrency=self.concurrency,
        )


class WarehouseResource(DuckDBResource):
    """DuckDBResource whose connections wait a bounded, configurable time for the file lock (the stock one retries
    ~100 s without saying who holds the file) and whose warehouse() gives the project's SQL layer."""

    lock_timeout_s: float = Field(default=60.0, description="how long a write waits for another process's lock")

    def warehouse(self) -> Warehouse:
        return Warehouse(self.database, lock_timeout_s=self.lock_timeout_s)

    @contextmanager
    def get_connection(self):
        with self.warehouse().connect() as conn:
            yield conn


def default_resources() -> dict[str, object]:
    """Resources from the environment: the sandbox by default, the real API when TMAPI_BASE_URL says so."""
    return {
        "tmapi_api": TmapiApiResource(
            base_url=config.base_url(),
            # EnvVar: Dagster resolves it at run time and stores only the variable's name, never the value.
            api_token=EnvVar("TMAPI_API_TOKEN") if _token_in_env() else config.api_token(),
            auth_mode=config.auth_mode(),  # type: ignore[arg-type]
            concurrency=config.api_concurrency(),
            max_attempts=config.env_int("TMAPI_MAX_ATTEMPTS", 4),
            timeout_s=config.env_float("TMAPI_TIMEOUT_S", 60.0, minimum=0.1),
            fresh_within_hours=config.fresh_within_hours(),
        ),
        "warehouse": WarehouseResource(
            database=str(config.duckdb_path()),
            lock_timeout_s=config.duckdb_lock_timeout_s(),
        ),
    }


def _token_in_env() -> bool:
    return bool(os.environ.get("TMAPI_API_TOKEN"))
