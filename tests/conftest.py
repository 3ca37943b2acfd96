"""Shared test helpers: the field cases of ../shared/cases, the sandbox API, and a fresh project directory."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tmapi_assets.sandbox import SandboxProcess

TESTS = Path(__file__).resolve().parent
PROJECT_DAGSTER_YAML = TESTS.parent / "dagster.yaml"


def install_dagster_yaml(home: Path) -> Path:
    """A Dagster home configured like the project's (data/dagster_home): the tests run on the same instance
    settings (event log storage, pools, run monitoring) as users do."""
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_bytes(PROJECT_DAGSTER_YAML.read_bytes())
    return home


def hold_lock(path: Path, seconds: float, read_only: bool = False) -> subprocess.Popen:
    """Another process (a BI tool, dbt) holding the DuckDB file open; returns once it holds it."""
    proc = subprocess.Popen(
        [sys.executable, "-c",
         f"import duckdb, time; c = duckdb.connect({str(path)!r}, read_only={read_only}); "
         f"print('ready', flush=True); time.sleep({seconds})"],
        stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def load_field_cases(name: str) -> tuple[list, str | None]:
    """(cases, None) from ../shared/cases/NAME (as CI lays it out) or the copy in tests/cases; ([], why) if neither."""
    shared, local = TESTS.parents[1] / "shared" / "cases" / name, TESTS / "cases" / name
    for path in (shared, local):
        if path.is_file():
            return json.loads(path.read_text(encoding="utf-8"))["cases"], None
    return [], f"{name} not found at {shared} nor {local}"


@pytest.fixture(scope="module")
def sandbox_api():
    """The sandbox API in its own process, over real HTTP, shared by a test module."""
    with SandboxProcess(latency_ms=20, concurrency_limit=8) as api:
        yield api


@pytest.fixture
def project(tmp_path, monkeypatch, sandbox_api):
    """A fresh data dir and Dagster instance, pointed at the sandbox (reset: its counters start at 0)."""
    monkeypatch.setenv("TMAPI_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster_home"))
    monkeypatch.setenv("TMAPI_BASE_URL", sandbox_api.base_url)
    monkeypatch.setenv("TMAPI_API_TOKEN", sandbox_api.token)
    monkeypatch.setenv("TMAPI_DUCKDB_LOCK_TIMEOUT_S", "5")
    install_dagster_yaml(tmp_path / "dagster_home")
    sandbox_api.reset()
    return tmp_path
