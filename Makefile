# Entry points. Every target sets up what it needs first (uv, the locked virtualenv), so each works on a fresh
# clone with only python3 (3.11) and make installed.
UV := scripts/uv
RUN := $(UV) run --frozen --no-sync

.PHONY: setup demo test dev bench clean-data

.venv/.synced: pyproject.toml uv.lock
	$(UV) sync --frozen --compile-bytecode
	@touch $@

setup: .venv/.synced

## The demo: sandbox API -> 20 watched items -> Dagster refresh -> DuckDB -> KPI table.
demo: setup
	$(RUN) tmapi-assets demo

## Every test (unit, sandbox over real HTTP, Dagster end to end).
test: setup
	$(RUN) pytest

## Dagster UI (http://127.0.0.1:3000) with the daemon, against the sandbox unless TMAPI_BASE_URL is set.
dev: setup
	$(RUN) tmapi-assets dev

## Every benchmark of issue 3 (~10 min; not part of `make test`): refresh scenarios, the RSS scan, the warehouse.
bench: setup
	$(UV) sync --frozen --compile-bytecode --extra bench
	$(RUN) python -m bench.run --rss-scan

## Forget everything fetched (warehouse, read copy, spool, halt, Dagster's run history); the watchlist stays.
clean-data:
	rm -rf data/tmapi.duckdb data/tmapi.duckdb.wal data/tmapi_read.duckdb data/spool data/api_slots \
	       data/api_halt.json data/dagster_home
