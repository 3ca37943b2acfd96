"""`tmapi-assets`: the command line. Each command is a thin call into the library or into Dagster.

Dagster is imported lazily (inside commands) so that `watch` and `sandbox` start fast, and so that environment
settings made here (DAGSTER_HOME, TMAPI_BASE_URL for the demo) are in place before the definitions load.
"""

from __future__ import annotations

import atexit
import ctypes
import gc
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import click

# httpx imports its own command line (`python -m httpx`: rich and pygments, ~60 ms of every start of this command)
# whenever click and rich are installed, as they are here (dagster's dependencies). Nothing in this process runs it:
# with the module marked missing, httpx falls back to a stub `httpx.main`, exactly as without those packages.
if "httpx" not in sys.modules:
    sys.modules.setdefault("httpx._main", None)  # type: ignore[assignment]

from tmapi_assets import config  # noqa: E402 (after the line above: config imports httpx)
from tmapi_assets.errors import InvalidInputError, TmapiError  # noqa: E402
from tmapi_assets.ids import WatchedItem  # noqa: E402
from tmapi_assets.watchlist import add_items, read_watchlist, remove_items  # noqa: E402

DEMO_ITEMS = [
    "652702302959",  # the API doc's own example item: its response is served verbatim by the sandbox
    "610947572360", "624282357434", "633451896020", "645123987001", "655873214009",
    "661234509876", "672345610987", "683456721098", "694567832109", "700112233445",
    "711223344556", "722334455667", "733445566778", "744556677889",
    "1000012345678", "1000023456789",  # 13-digit ids
    "652702302959:5b2a1c4d8e9f00112233445566778899",  # one SKU spec of the doc item
    "624282357434:a1b2c3d4e5f60718293a4b5c6d7e8f90",
    "755667788990",
]


def _prepare_dagster_home() -> Path:
    """Instance storage (run history, cursors, dynamic partitions) persists under data/dagster_home, configured by
    the project's top-level dagster.yaml (Dagster reads $DAGSTER_HOME/dagster.yaml, so it is copied there)."""
    home = Path(os.environ.get("DAGSTER_HOME") or (config.data_dir() / "dagster_home")).resolve()
    home.mkdir(parents=True, exist_ok=True)
    source = config.PROJECT_ROOT / "dagster.yaml"
    target = home / "dagster.yaml"
    if source.exists() and (not target.exists() or target.read_bytes() != source.read_bytes()):
        shutil.copyfile(source, target)
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def _parse_items(values: tuple[str, ...]) -> list[WatchedItem]:
    items, problems = [], []
    for value in values:
        try:
            items.append(WatchedItem.from_user_input(value))
        except InvalidInputError as exc:
            problems.append(str(exc))
    if problems:
        raise click.UsageError("\n".join(problems) + "\nNothing was changed and no API call was made.")
    return items


class _Commands(click.Group):
    """Our errors (bad input or settings, a locked DuckDB file, a halted API) end a command with their message and
    exit code 2, not a traceback: each says what to do."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except TmapiError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=_Commands, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Track 1688 item sales and prices from TMAPI into DuckDB, with Dagster."""


# ---------------------------------------------------------------------------------------------------- sandbox
@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False)
@click.pass_context
def sandbox(ctx: click.Context) -> None:
    """Serve a local fake of the TMAPI API: --port P --latency-ms L --concurrency-limit C --fault-rate F ..."""
    from tmapi_assets.sandbox.server import main as sandbox_main

    sys.exit(sandbox_main(list(ctx.args)) or 0)


# ---------------------------------------------------------------------------------------------------- watch
@main.group()
def watch() -> None:
    """Edit the watchlist (data/watchlist.csv, or $TMAPI_WATCHLIST)."""


@watch.command("add", context_settings={"ignore_unknown_options": True})
@click.argument("items", nargs=-1, required=True)
@click.option("--note", default="", help="free text kept in the note column")
def watch_add(items: tuple[str, ...], note: str) -> None:
    """Watch ITEM or ITEM:SPEC (several allowed)."""
    parsed = _parse_items(items)
    added = add_items(config.watchlist_path(), parsed, note)
    for item in parsed:
        click.echo(f"{'added' if item in added else 'already watched'}: {item}")


@watch.command("remove", context_settings={"ignore_unknown_options": True})
@click.argument("items", nargs=-1, required=True)
def watch_remove(items: tuple[str, ...]) -> None:
    """Stop watching items (their stored history stays in DuckDB)."""
    parsed = _parse_items(items)
    removed = remove_items(config.watchlist_path(), parsed)
    for item in parsed:
        click.echo(f"{'removed' if item in removed else 'was not watched'}: {item}")


@watch.command("list")
def watch_list() -> None:
    """Show the watchlist and any rows that cannot be used."""
    watchlist = read_watchlist(config.watchlist_path())
    for entry in watchlist.entries:
        click.echo(f"{entry.item}\t{entry.note}".rstrip())
    for problem in watchlist.problems:
        click.echo(problem, err=True)
    click.echo(f"{len(watchlist.entries)} watched item(s) in {config.watchlist_path()}", err=True)


# ---------------------------------------------------------------------------------------------------- refresh
@main.command()
@click.argument("items", nargs=-1)
@click.option("--force", is_flag=True, help="call the API even for items fetched within the freshness window")
@click.option("--quiet", is_flag=True, help="no progress bar")
@click.option("--verbose", is_flag=True, help="Dagster's event log on the console (DEBUG)")
def refresh(items: tuple[str, ...], force: bool, quiet: bool, verbose: bool) -> None:
    """Materialise raw -> trends -> KPIs through Dagster, in-process, for ITEMs (default: the whole watchlist)."""
    code = run_refresh(_parse_items(items) if items else None, force=force, quiet=quiet, verbose=verbose)
    sys.exit(code)


def _fewer_malloc_arenas() -> None:
    """glibc gives threads that contend for malloc arenas of their own (up to 8 per core) and seldom gives their
    memory back: with a refresh's runs overlapping in threads, peak RSS grew with the number of items (10,000 items:
    +58 MB over 2,000). Two arenas keep it flat at no measurable cost in time. MALLOC_ARENA_MAX, if set, wins."""
    if sys.platform.startswith("linux") and "MALLOC_ARENA_MAX" not in os.environ:
        try:
            ctypes.CDLL(None).mallopt(-8, 2)  # M_ARENA_MAX from malloc.h
        except (OSError, AttributeError):
            pass


def run_refresh(items: list[WatchedItem] | None, *, force: bool = False, quiet: bool = False,
                verbose: bool = False) -> int:
    """Run the refresh job over contiguous partition ranges; print a summary; return the exit code."""
    # No cyclic garbage collection while Dagster, SQLAlchemy and the definitions load: its passes over the growing
    # heap of module objects took 0.2-0.5 s of the ~1.5 s before the first API call. runner.refresh turns it back
    # on (and freezes what was loaded) once the runs are about to start.
    collecting = gc.isenabled()
    gc.disable()
    # The runs' event loops share the GIL with the other runs' writes and Dagster bookkeeping: an answered call's
    # loop waited up to the 5 ms default for its turn. 1 ms: calls ~0.5 ms shorter on average under overlapping runs.
    switch_interval = sys.getswitchinterval()
    sys.setswitchinterval(0.001)
    try:
        from tmapi_assets.defs import runner as refresh_runner

        _fewer_malloc_arenas()
        _prepare_dagster_home()
        outcome = refresh_runner.refresh(items, force=force, progress=not quiet,
                                         log_level="DEBUG" if verbose else "CRITICAL")  # the summary says what failed
    except TmapiError as exc:
        click.echo(f"error: {exc}", err=True)
        return 2
    finally:
        sys.setswitchinterval(switch_interval)
        if collecting:
            gc.enable()
    click.echo(outcome.summary_text())
    return 0 if outcome.ok else 1


# ---------------------------------------------------------------------------------------------------- status
@main.command()
def status() -> None:
    """Watchlist, API settings (never the token), any halt, and what the warehouse holds."""
    from tmapi_assets.halt import read_halt
    from tmapi_assets.warehouse import Warehouse

    watchlist = read_watchlist(config.watchlist_path())
    bad_rows = f", {len(watchlist.problems)} bad row(s) skipped" if watchlist.problems else ""
    click.echo(f"watchlist   {config.watchlist_path()}: {len(watchlist.entries)} item(s){bad_rows}")
    token = "set" if os.environ.get("TMAPI_API_TOKEN") else "not set (using the sandbox token)"
    click.echo(f"API         {config.base_url()} (token {token})")
    halt = read_halt()
    click.echo(f"halt        {halt.describe() if halt else 'none: API calls allowed'}")
    path = config.duckdb_path()
    if not path.exists():
        click.echo(f"warehouse   {path}: not created yet (run `tmapi-assets refresh`)")
        return
    try:
        warehouse = Warehouse(path, lock_timeout_s=3)
        counts = warehouse.table_counts()
        [today] = warehouse.records(
            """SELECT count(*) AS calls,
                      count(*) FILTER (WHERE outcome IN ('success', 'no_data')) AS landed_calls,
                      strftime(timezone('Asia/Shanghai',
                                        max(fetched_at) FILTER (WHERE outcome IN ('success', 'no_data'))),
                               '%Y-%m-%d %H:%M:%S') AS last_success
               FROM tmapi.raw_responses
               WHERE CAST(timezone('Asia/Shanghai', fetched_at) AS DATE)
                   = CAST(timezone('Asia/Shanghai', now()) AS DATE)""")
    except TmapiError as exc:
        click.echo(f"warehouse   {path}: {exc}")
        return
    click.echo(f"warehouse   {path}: " + ", ".join(f"{t} {n}" for t, n in counts.items()))
    click.echo(f"today (CN)  {today['calls']} API call(s), {today['landed_calls']} landed; "
               f"last success {today['last_success'] or '-'} (China time)")


@main.command()
def resume() -> None:
    """Clear an API halt (after topping up the balance or fixing the token/URL). Already-landed items are skipped."""
    from tmapi_assets.halt import clear_halt

    record = clear_halt()
    click.echo(f"cleared: {record.describe()}" if record else "no halt was set")


@main.command()
def publish() -> None:
    """Write the read-only copy for BI tools and dbt now (refreshes also do this after each run)."""
    from tmapi_assets.warehouse import Warehouse

    target = config.read_copy_path()
    if target is None:
        raise click.UsageError("TMAPI_READ_COPY_PATH is set to '' (publishing disabled)")
    click.echo(f"published {Warehouse(config.duckdb_path()).publish_read_copy(target)}")


# ---------------------------------------------------------------------------------------------------- reparse
@main.command()
def reparse() -> None:
    """Rebuild statistics, trends and KPIs from tmapi.raw_responses without calling the API."""
    from tmapi_assets import pipeline
    from tmapi_assets.warehouse import Warehouse

    warehouse = Warehouse(config.duckdb_path())
    summary = pipeline.normalise_items(warehouse)
    warehouse.rebuild_item_history()  # (loads keep it up to date; a rebuild recounts it from every stored row)
    kpis = warehouse.refresh_kpis()
    click.echo(
        f"reparsed {summary.items} item(s): {summary.sales_rows} sales rows, {summary.price_rows} price rows "
        f"upserted; {kpis} KPI rows; {len(summary.parse_errors)} parse error(s)"
    )
    for error in summary.parse_errors.values():
        click.echo(error, err=True)
    sys.exit(1 if summary.parse_errors else 0)


# ---------------------------------------------------------------------------------------------------- kpis
@main.command()
def kpis() -> None:
    """Print the KPI table."""
    from tmapi_assets.warehouse import Warehouse

    click.echo(format_kpis(Warehouse(config.duckdb_path())))


def format_kpis(warehouse) -> str:
    frame = warehouse.kpis()
    if frame.empty:
        return "no KPIs yet: run `tmapi-assets refresh`"
    frame["item"] = [WatchedItem(i, s).partition_key for i, s in zip(frame["item_id"], frame["spec_id"])]
    columns = {
        "item": "item[:spec]",
        "last_observed_date": "last day",
        "units_7d": "units 7d",
        "units_30d": "units 30d",
        "orders_30d": "orders 30d",
        "units_per_order_30d": "u/order",
        "latest_price_min": "price min",
        "latest_price_max": "price max",
        "price_change_pct_30d": "Δprice 30d %",
        "zero_sales_days_30d": "0-sale days",
        "sales_quantity_total_raw": "total sold",
    }
    table = frame[list(columns)].rename(columns=columns)
    return table.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.2f}")


# ---------------------------------------------------------------------------------------------------- demo
@main.command()
@click.option("--keep-sandbox", is_flag=True, help="leave the sandbox running at the end (Ctrl-C to stop)")
def demo(keep_sandbox: bool) -> None:
    """Start the sandbox, watch 20 items (incl. the doc's 652702302959), refresh them, print the KPIs."""
    from tmapi_assets.sandbox.server import SandboxProcess

    with SandboxProcess(latency_ms=150, latency_jitter_ms=100, concurrency_limit=8) as sandbox_api:
        click.echo(f"sandbox API on {sandbox_api.base_url}")
        os.environ["TMAPI_BASE_URL"] = sandbox_api.base_url
        os.environ["TMAPI_API_TOKEN"] = config.SANDBOX_TOKEN
        added = add_items(config.watchlist_path(), [WatchedItem.from_partition_key(k) for k in DEMO_ITEMS],
                          note="demo")
        click.echo(f"watchlist {config.watchlist_path()}: {len(added)} demo item(s) added")
        code = run_refresh(None)
        from tmapi_assets.warehouse import Warehouse

        warehouse = Warehouse(config.duckdb_path())
        click.echo("")
        click.echo(format_kpis(warehouse))
        counts = warehouse.table_counts()
        click.echo("\n" + ", ".join(f"tmapi.{t}: {n} rows" for t, n in counts.items()))
        click.echo(f"DuckDB file: {config.duckdb_path()}  (open the UI with `make dev`)")
        click.echo("(652702302959 is the API documentation's example answer: its history ends on 2025-07-23, and "
                   "its KPI windows count back from that day)")
        if keep_sandbox:
            click.echo("sandbox still running; Ctrl-C to stop")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    sys.exit(code)


# ---------------------------------------------------------------------------------------------------- dev
@main.command()
@click.option("--port", default=3000, show_default=True, help="Dagster UI port")
def dev(port: int) -> None:
    """Start the sandbox (unless TMAPI_BASE_URL points elsewhere) and the Dagster UI with its daemon."""
    import signal
    import subprocess

    import httpx

    home = _prepare_dagster_home()
    children: list[subprocess.Popen] = []
    if "TMAPI_BASE_URL" not in os.environ:
        try:
            httpx.get(f"{config.SANDBOX_BASE_URL}/_sandbox/stats", timeout=1).raise_for_status()
            click.echo(f"using the sandbox already running on {config.SANDBOX_BASE_URL}")
        except httpx.HTTPError:
            children.append(subprocess.Popen(
                [sys.executable, "-m", "tmapi_assets.sandbox", "--port", str(config.SANDBOX_PORT),
                 "--latency-ms", "300", "--latency-jitter-ms", "200", "--concurrency-limit", "8"]))
            time.sleep(1.0)
            if children[0].poll() is not None:
                raise click.ClickException(
                    f"the sandbox could not start on port {config.SANDBOX_PORT} (in use?); stop what uses it, "
                    "or set TMAPI_BASE_URL to an API that is already running")
    token = "set" if os.environ.get("TMAPI_API_TOKEN") else "not set"
    click.echo(f"API: {config.base_url()} (TMAPI_API_TOKEN {token}); DAGSTER_HOME={home}")

    def restore_default_sigint() -> None:  # a child of a non-interactive shell inherits SIGINT as ignored
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    dagster = subprocess.Popen(
        [sys.executable, "-m", "dagster", "dev", "-w", str(config.PROJECT_ROOT / "workspace.yaml"), "-p", str(port)],
        # From DAGSTER_HOME: started in the project folder, Dagster warns that ./dagster.yaml "will not be used",
        # though the project copied that very file into DAGSTER_HOME.
        cwd=home, preexec_fn=restore_default_sigint)
    children.insert(0, dagster)

    stopping = []

    def stop(signum: int, frame: object) -> None:  # SIGTERM or Ctrl-C: let dagster dev stop its own children
        stopping.append(signum)
        if dagster.poll() is None:
            dagster.send_signal(signal.SIGINT)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        return_code = dagster.wait()
    finally:
        for child in children[1:]:
            child.terminate()
            child.wait(timeout=10)
    # dagster dev exits 1 ("Aborted!") when told to stop: a stop we asked for is a clean exit, not a failure.
    sys.exit(0 if stopping or return_code in (0, -signal.SIGINT, 130) else return_code)


def console_main() -> None:
    """The `tmapi-assets` command: main(), then an exit without the interpreter's teardown.

    Freeing Dagster's, SQLAlchemy's and DuckDB's module state at interpreter exit took ~0.7 s after every refresh,
    for nothing: by then every write is committed and closed (DuckDB and sqlite connections are per unit of work,
    spool segments closed, run threads joined). atexit handlers still run, and the output is flushed.
    """
    try:
        main()
        code: object = 0
    except SystemExit as exc:  # how click ends every command (standalone mode)
        code = exc.code
    if code is not None and not isinstance(code, int):
        if sys.stderr is not None:
            print(code, file=sys.stderr)  # sys.exit("message") semantics
        code = 1
    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None when the shell closed it (`>&-`)
                stream.flush()
        except (OSError, ValueError):  # a closed pipe or file: what was written is all there is
            pass
    os._exit(code or 0)


if __name__ == "__main__":
    console_main()
