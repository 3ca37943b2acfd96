"""Client baselines run in their own process (so RSS and imports are theirs): `python -m bench.workers KIND ...`.

serial: one blocking httpx.get at a time, no retries: what TMAPI's own code examples do.
dlt:    dlt's REST client (dlt.sources.helpers.rest_client.RESTClient) at its defaults, one .get() per item.
pipeline: the project's own plain-Python path without Dagster: pipeline.fetch_items (the async client at
        TMAPI_CONCURRENCY) -> pipeline.normalise_items -> Warehouse.refresh_kpis, into --duckdb. It shows how much
        of a refresh's time is the client and the warehouse, and how much is Dagster around them.

Prints one JSON line {"kind", "items", "landed", "wall_s", ...} on stdout at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

PATH = "/1688/item/statistics/sales"


def _landed(status: int, content: bytes) -> bool:
    if status != 200:
        return False
    try:
        body = json.loads(content)
    except ValueError:
        return False
    return isinstance(body, dict) and str(body.get("code")) == "200"


def serial(base_url: str, token: str, keys: list[str]) -> dict:
    import httpx

    landed = errors = 0
    started = time.perf_counter()
    for key in keys:
        try:
            r = httpx.get(base_url + PATH, params={"item_id": key, "apiToken": token}, timeout=60)
            landed += _landed(r.status_code, r.content)
        except httpx.HTTPError:
            errors += 1
    return {"landed": landed, "errors": errors, "wall_s": time.perf_counter() - started}


def dlt_client(base_url: str, token: str, keys: list[str]) -> dict:
    try:
        import dlt  # noqa: F401
        from dlt.sources.helpers.rest_client import RESTClient
    except ImportError as exc:
        return {"skipped": f"dlt is not importable ({exc}); install it with `uv sync --extra bench`"}
    import dlt as _dlt

    client = RESTClient(base_url=base_url)  # defaults: its own requests session with dlt's retry policy
    landed = errors = 0
    started = time.perf_counter()
    for key in keys:
        try:
            r = client.get(PATH, params={"item_id": key, "apiToken": token})
            landed += _landed(r.status_code, r.content)
        except Exception:  # noqa: BLE001 - dlt raises its own retry/HTTP errors after giving up
            errors += 1
    return {"landed": landed, "errors": errors, "wall_s": time.perf_counter() - started,
            "version": _dlt.__version__}


def project_pipeline(base_url: str, token: str, keys: list[str], concurrency: int, duckdb_path: str) -> dict:
    from tmapi_assets import pipeline
    from tmapi_assets.client import ClientSettings
    from tmapi_assets.ids import WatchedItem
    from tmapi_assets.warehouse import Warehouse

    warehouse = Warehouse(duckdb_path)
    warehouse.ensure_schema()
    items = [WatchedItem.from_partition_key(k) for k in keys]
    settings = ClientSettings(base_url=base_url, api_token=token, concurrency=concurrency)
    started = time.perf_counter()
    summary = pipeline.fetch_items(items, settings=settings, warehouse=warehouse, run_id="bench-pipeline")
    fetched = time.perf_counter()
    pipeline.normalise_items(warehouse, items)
    normalised = time.perf_counter()
    warehouse.refresh_kpis(items)
    done = time.perf_counter()
    return {"landed": len(summary.landed), "errors": len(summary.failed) + len(summary.halted),
            "wall_s": done - started, "fetch_s": fetched - started, "normalise_s": normalised - fetched,
            "kpis_s": done - normalised}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("kind", choices=["serial", "dlt", "pipeline"])
    p.add_argument("--base-url", required=True)
    p.add_argument("--token", default="sandbox-token")
    p.add_argument("--keys-file", required=True)
    p.add_argument("--concurrency", type=int, default=8, help="pipeline: client concurrency")
    p.add_argument("--duckdb", default=None, help="pipeline: the DuckDB file to write")
    a = p.parse_args(argv)
    with open(a.keys_file, encoding="utf-8") as f:
        keys = [line.strip() for line in f if line.strip()]
    if a.kind == "pipeline":
        result = project_pipeline(a.base_url.rstrip("/"), a.token, keys, a.concurrency, a.duckdb)
    else:
        result = (serial if a.kind == "serial" else dlt_client)(a.base_url.rstrip("/"), a.token, keys)
    result.update(kind=a.kind, items=len(keys))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
