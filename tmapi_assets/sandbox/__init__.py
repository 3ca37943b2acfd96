"""A local HTTP server that behaves like TMAPI's 1688 sales statistics API (and the Kong gateway in front of it).

Plain Python + starlette/uvicorn; no Dagster. Real HTTP, so the client, retries, timeouts and concurrency are
exercised for real. See app.py for the request handling order, scripted responses and control endpoints, and
synthetic.py for the deterministic synthetic histories and the special item ids:

* 652702302959 (no spec): the real doc example, byte for byte;
* item id ending in 0000: HTTP 200 with ``"data": null`` (no statistics);
* item id ending in 0001: an item that never sells (all-zero sales trend, totals "0");
* item id ending in 0422: HTTP 422 ``Parameter error: item_id`` (an item the API refuses).

Entry points: ``SandboxConfig``, ``serve(config)``, ``main(argv)``, ``SandboxProcess``, ``SandboxThread``,
``create_app(config)``.
"""

from tmapi_assets.sandbox.app import API_PATH, DOC_EXAMPLE_ITEM, create_app
from tmapi_assets.sandbox.server import (
    DEFAULT_EXHAUSTED_TOKEN,
    DEFAULT_TOKEN,
    SandboxConfig,
    SandboxProcess,
    SandboxThread,
    main,
    serve,
)

__all__ = [
    "API_PATH",
    "DEFAULT_EXHAUSTED_TOKEN",
    "DEFAULT_TOKEN",
    "DOC_EXAMPLE_ITEM",
    "SandboxConfig",
    "SandboxProcess",
    "SandboxThread",
    "create_app",
    "main",
    "serve",
]
