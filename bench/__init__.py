"""Benchmarks of tmapi-assets (issue 3): `python -m bench.run` (refresh paths) and `python -m bench.warehouse`.

Bench-only code: nothing in tmapi_assets/ imports it. Results go to docs/benchmarks.md (`--record`).
"""
