"""python -m tmapi_assets.sandbox [--port P --latency-ms L ...]: run the sandbox API (see server.main)."""

from tmapi_assets.sandbox.server import main

if __name__ == "__main__":
    raise SystemExit(main())
