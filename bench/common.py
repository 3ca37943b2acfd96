"""Shared pieces of the benchmarks: scenario workspaces, synthetic item ids, process-tree RSS sampling, warehouse and
Dagster instance figures, the result table, and appending results to docs/benchmarks.md.

All traffic stays on 127.0.0.1 (the sandbox, the Dagster webserver). Every wait is bounded.
"""

from __future__ import annotations

import os
import platform
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin (uv run python -> .venv/bin/python)
TMAPI_CLI = str(BIN / "tmapi-assets")
DAGSTER_CLI = str(BIN / "dagster")
BENCHMARKS_MD = ROOT / "docs" / "benchmarks.md"
TOKEN = "sandbox-token"

# Item ids the sandbox treats specially (sandbox/app.py, sandbox/synthetic.py): never used for synthetic items.
_SPECIAL_SUFFIXES = ("0000", "0001", "0422")


# ------------------------------------------------------------------------------------------------ items, workspaces


def item_keys(n: int, offset: int = 0) -> list[str]:
    """n deterministic 13-digit item ids (partition keys), none of them special for the sandbox."""
    keys = []
    i = offset
    while len(keys) < n:
        item = 1_688_000_000_000 + i * 9_973 + 17
        i += 1
        if str(item).endswith(_SPECIAL_SUFFIXES):
            continue
        keys.append(str(item))
    return keys


def write_watchlist(path: Path, keys: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["item_id,spec_id,note"] + [f"{k},,bench" for k in keys]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


@dataclass
class Workspace:
    """A fresh data dir (DuckDB file, watchlist, Dagster home) and the environment pointing at it."""

    dir: Path
    env: dict[str, str]

    @property
    def home(self) -> Path:
        return self.dir / "dagster_home"

    @property
    def duckdb(self) -> Path:
        return self.dir / "tmapi.duckdb"

    @property
    def watchlist(self) -> Path:
        return self.dir / "watchlist.csv"

    def cleanup(self, keep: bool = False) -> None:
        if not keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def make_workspace(base_url: str, concurrency: int, name: str, extra_env: dict[str, str] | None = None) -> Workspace:
    data = Path(tempfile.mkdtemp(prefix=f"tmapi-bench-{name}-"))
    home = data / "dagster_home"
    home.mkdir(parents=True)
    shutil.copyfile(ROOT / "dagster.yaml", home / "dagster.yaml")
    env = dict(os.environ)
    for var in ("TMAPI_DUCKDB_PATH", "TMAPI_WATCHLIST", "TMAPI_PARTITIONS_PER_RUN", "TMAPI_FRESH_WITHIN_HOURS"):
        env.pop(var, None)  # derived from the data dir / project defaults
    env.update(
        TMAPI_DATA_DIR=str(data),
        DAGSTER_HOME=str(home),
        TMAPI_BASE_URL=base_url,
        TMAPI_API_TOKEN=TOKEN,
        TMAPI_CONCURRENCY=str(concurrency),
        PYTHONUNBUFFERED="1",
        NO_COLOR="1",
    )
    env.update(extra_env or {})
    return Workspace(data, env)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------------------ RSS sampling


def _ppid_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rfind(b")") + 2 :].split()
        if len(rest) > 1:
            children[int(rest[1])].append(int(entry))
    return children


def status_kb(pid: int) -> tuple[int, int] | None:
    """(VmRSS, VmHWM) in kB, or None when the process is gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return None
    rss = hwm = 0
    for line in text.splitlines():
        if line.startswith(b"VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith(b"VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


class TreeSampler:
    """Samples the process tree under a root pid every `interval` s (tree re-scanned every `rescan` s).

    peak_tree_mb: the largest sum of VmRSS over the tree seen in one sample.
    peak_proc_mb: the largest VmHWM (the kernel's own high-water mark) of any single process of the tree.
    """

    def __init__(self, root_pid: int, interval: float = 0.05, rescan: float = 0.25) -> None:
        self.root = root_pid
        self.interval, self.rescan = interval, rescan
        self.peak_tree_kb = 0
        self.hwm_kb: dict[int, int] = {}
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def __enter__(self) -> "TreeSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def _tree(self) -> list[int]:
        children = _ppid_map()
        out, todo = [], [self.root]
        while todo and len(out) < 10_000:
            pid = todo.pop()
            out.append(pid)
            todo.extend(children.get(pid, ()))
        return out

    def _run(self) -> None:
        pids = [self.root]
        last_scan = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            if now - last_scan >= self.rescan:
                pids = self._tree()
                last_scan = now
            total = 0
            for pid in pids:
                st = status_kb(pid)
                if st is None:
                    continue
                rss, hwm = st
                total += rss
                if hwm > self.hwm_kb.get(pid, 0):
                    self.hwm_kb[pid] = hwm
                    if pid not in self.names:
                        try:
                            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
                        except OSError:
                            cmd = "?"
                        self.names[pid] = cmd.strip()[:160]
            self.peak_tree_kb = max(self.peak_tree_kb, total)
            self._stop.wait(self.interval)

    @property
    def peak_tree_mb(self) -> float:
        return self.peak_tree_kb / 1024

    @property
    def peak_proc_mb(self) -> float:
        return max(self.hwm_kb.values(), default=0) / 1024

    def top(self, k: int = 3) -> list[tuple[float, str]]:
        ranked = sorted(self.hwm_kb.items(), key=lambda kv: -kv[1])[:k]
        return [(kb / 1024, self.names.get(pid, "?")) for pid, kb in ranked]


@dataclass
class Measured:
    rc: int | None
    wall_s: float
    peak_tree_mb: float
    peak_proc_mb: float
    stdout: str
    stderr: str
    timed_out: bool = False


def run_measured(cmd: list[str], env: dict[str, str], timeout_s: float, cwd: Path = ROOT) -> Measured:
    """Run cmd (its own session, so a timeout kills its whole group), timing it and sampling its tree's RSS."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        started = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        timed_out = False
        with TreeSampler(proc.pid) as sampler:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                kill_group(proc)
        wall = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        return Measured(proc.returncode, wall, sampler.peak_tree_mb, sampler.peak_proc_mb, out.read(), err.read(),
                        timed_out)


def kill_group(proc: subprocess.Popen, grace_s: float = 20.0) -> None:
    """SIGTERM the process group we started (start_new_session=True), then SIGKILL it if still there."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
    # children of the group may outlive the leader for a moment
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------------------------------ figures


@dataclass
class LedgerFigures:
    rows: int = 0  # raw_responses rows (= paid calls recorded)
    landed: int = 0  # distinct items with a success/no_data row
    landed_twice: int = 0  # items with more than one success/no_data row
    run_ids: int = 0  # distinct run ids in the ledger
    trend_rows: int = 0
    kpi_rows: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)


def ledger_figures(db_path: Path, keys: list[str] | None = None) -> LedgerFigures:
    """Read the warehouse read-only after a scenario (no writer may be running)."""
    import duckdb

    fig = LedgerFigures()
    if not db_path.exists():
        return fig
    conn = duckdb.connect()
    try:
        conn.execute(f"ATTACH '{db_path}' AS wh (READ_ONLY)")
        fig.rows, fig.run_ids = conn.execute(
            "SELECT count(*), count(DISTINCT run_id) FROM wh.tmapi.raw_responses").fetchone()
        fig.landed, fig.landed_twice = conn.execute(
            """SELECT count(*), count(*) FILTER (WHERE n > 1) FROM (
                   SELECT item_id, spec_id, count(*) AS n FROM wh.tmapi.raw_responses
                   WHERE outcome IN ('success', 'no_data') GROUP BY ALL)""").fetchone()
        fig.by_outcome = dict(conn.execute(
            "SELECT outcome, count(*) FROM wh.tmapi.raw_responses GROUP BY ALL ORDER BY 1").fetchall())
        fig.trend_rows = conn.execute("SELECT count(*) FROM wh.tmapi.sales_trend_daily").fetchone()[0]
        fig.kpi_rows = conn.execute("SELECT count(*) FROM wh.tmapi.item_kpis").fetchone()[0]
    finally:
        conn.close()
    return fig


@contextmanager
def open_instance(home: Path):
    """The scenario's Dagster instance. DAGSTER_HOME is set while it is open: the project's event log storage
    (tmapi_assets/dagster_event_log.py) finds its files from it, as in every `dagster`/`tmapi-assets` command."""
    from dagster import DagsterInstance

    saved = os.environ.get("DAGSTER_HOME")
    os.environ["DAGSTER_HOME"] = str(home)
    try:
        with DagsterInstance.from_config(str(home)) as instance:
            yield instance
    finally:
        if saved is None:
            os.environ.pop("DAGSTER_HOME", None)
        else:
            os.environ["DAGSTER_HOME"] = saved


def dagster_runs(home: Path) -> dict[str, int]:
    """Run counts by status in the scenario's Dagster instance."""
    from collections import Counter

    with open_instance(home) as instance:
        return dict(Counter(r.status.value for r in instance.get_runs()))


def dagster_events(home: Path, run_ids: list[str] | None = None) -> dict[str, int]:
    """Event-log entries written by the runs (all runs of the instance when run_ids is None), by event type."""
    from collections import Counter

    counts: Counter[str] = Counter()
    with open_instance(home) as instance:
        ids = run_ids if run_ids is not None else [r.run_id for r in instance.get_runs()]
        for run_id in ids:
            for entry in instance.all_logs(run_id):
                counts[entry.dagster_event.event_type_value if entry.dagster_event else "LOG"] += 1
    return dict(counts)


# ------------------------------------------------------------------------------------------------ results


@dataclass
class Result:
    name: str
    n: int  # N the figures are for
    n_measured: int  # items actually run (< n: extrapolated)
    latency_ms: float
    concurrency: int
    t_s: float | None  # for n items (extrapolated when n_measured < n)
    calls: int | None = None  # measured
    landed: int | None = None  # measured
    runs: int | None = None  # for n items (extrapolated when needed)
    peak_all: int | None = None  # sandbox: max requests in flight, rejected ones included
    peak_admitted: int | None = None  # sandbox: max admitted in flight (never above its cap by construction)
    rejected_503: int | None = None  # sandbox: HTTP 503 answers (cap rejections + 503 faults)
    rss_tree_mb: float | None = None
    rss_proc_mb: float | None = None
    ok: bool = True
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def t_min(self) -> float:
        return self.n * self.latency_ms / 1000.0 / self.concurrency

    @property
    def ratio(self) -> float | None:
        if not self.t_s or self.t_min <= 0:
            return None
        return self.t_min / self.t_s

    @property
    def per_landed(self) -> float | None:
        if not self.landed or self.calls is None:
            return None
        return self.calls / self.landed


COLUMNS = ["scenario", "N", "T s", "T_min s", "T_min/T", "calls", "landed", "calls/landed", "runs",
           "peak conc all/adm", "503s", "RSS tree/proc MB"]


def _f(value: Any, fmt: str = "{:.1f}") -> str:
    if value is None:
        return "-"
    return fmt.format(value) if isinstance(value, float) else str(value)


def row(r: Result) -> list[str]:
    n = str(r.n) if r.n_measured == r.n else f"{r.n_measured}→{r.n}"
    peak = "-" if r.peak_all is None else f"{r.peak_all}/{r.peak_admitted}"
    rss = "-" if r.rss_tree_mb is None else f"{r.rss_tree_mb:.0f}/{r.rss_proc_mb:.0f}"
    return [
        r.name + ("" if r.ok else " (!)"),
        n,
        _f(r.t_s),
        _f(r.t_min),
        _f(r.ratio, "{:.3f}"),
        _f(r.calls),
        _f(r.landed),
        _f(r.per_landed, "{:.3f}"),
        _f(r.runs),
        peak,
        _f(r.rejected_503),
        rss,
    ]


def text_table(results: list[Result]) -> str:
    rows = [COLUMNS] + [row(r) for r in results]
    widths = [max(len(x[i]) for x in rows) for i in range(len(COLUMNS))]
    lines = []
    for k, cells in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: list[Result]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in row(r)) + " |")
    return "\n".join(lines)


def notes_block(results: list[Result]) -> list[str]:
    out = []
    for r in results:
        for note in r.notes:
            out.append(f"{r.name}: {note}")
    return out


def exact_command(module: str) -> str:
    args = " ".join(shlex.quote(a) for a in sys.argv[1:])
    cmd = f"uv run python -m {module}" + (f" {args}" if args else "")
    if os.environ.get("MAKELEVEL"):
        cmd = f"make bench  # = {cmd}"
    return cmd


def machine_line() -> str:
    try:
        import dagster

        dv = dagster.__version__
    except Exception:  # noqa: BLE001
        dv = "?"
    import duckdb

    return (f"{os.cpu_count()} CPU(s), {platform.machine()}, Python {platform.python_version()}, dagster {dv}, "
            f"duckdb {duckdb.__version__}")


def append_markdown(title: str, command: str, body: str) -> None:
    """Append one dated section to docs/benchmarks.md (append-only; the header is written once by hand)."""
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    section = f"\n## {stamp}: {title}\n\nCommand: `{command}`\n\nMachine: {machine_line()}\n\n{body.rstrip()}\n"
    BENCHMARKS_MD.parent.mkdir(parents=True, exist_ok=True)
    if not BENCHMARKS_MD.exists():
        BENCHMARKS_MD.write_text("# Benchmarks\n", encoding="utf-8")
    with open(BENCHMARKS_MD, "a", encoding="utf-8") as f:
        f.write(section)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
