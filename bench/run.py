"""The refresh benchmark (issue 3): `python -m bench.run [--n 1000] [--latency-ms 200] [--concurrency 8] ...`.

Each scenario gets a fresh sandbox (`SandboxProcess(latency_ms=L, concurrency_limit=C, fault_rate=F)`) and a fresh
data dir (TMAPI_DATA_DIR, DAGSTER_HOME with the project's dagster.yaml, TMAPI_BASE_URL, TMAPI_API_TOKEN,
TMAPI_CONCURRENCY=C), registers N synthetic items in the watchlist CSV, runs one way of fetching them, and reports:
T (wall s), T_min = N·L/C, T_min/T, paid calls (the sandbox's requests_total), items landed (a success row in
tmapi.raw_responses), calls per landed item, Dagster runs launched, peak API concurrency seen by the sandbox (all
requests in flight / admitted ones) and peak RSS (sum over the process tree / largest single process).

Scenarios (default: all but rss-scan, then `python -m bench.warehouse`):
  refresh                `tmapi-assets refresh --quiet` (in-process Dagster runs), then again (must cost 0 calls)
  refresh-faults         the same with --fault-rate 0.1
  backfill               `dagster dev` + a UI-style backfill (GraphQL launchPartitionBackfill) of all N partitions
  backfill-3             the same with 3 backfills over 3 thirds of the keys launched at once
  baseline-serial        one blocking httpx.get at a time (TMAPI's own examples), on a subset, extrapolated
  dagster-per-partition  `dagster asset materialize --partition KEY` once per partition, on a subset, extrapolated
  dlt                    dlt's RESTClient at its defaults, one .get() per item, on a subset, extrapolated
  pipeline-direct        the project's fetch_items -> normalise_items -> refresh_kpis without Dagster (all N items),
                         at --fault-rate and at 0.1: what the client and warehouse cost without Dagster around them
  rss-scan               refresh at N=2,000 and N=10,000 with a small latency: does peak RSS grow with N?
  warehouse              `python -m bench.warehouse` (normalise + upsert vs bulk insert; KPIs vs a GROUP BY)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.common import (
    open_instance,
    DAGSTER_CLI,
    ROOT,
    TMAPI_CLI,
    TOKEN,
    Result,
    TreeSampler,
    append_markdown,
    dagster_events,
    dagster_runs,
    exact_command,
    free_port,
    item_keys,
    kill_group,
    ledger_figures,
    log,
    make_workspace,
    markdown_table,
    notes_block,
    run_measured,
    text_table,
    write_watchlist,
)
from tmapi_assets.sandbox import SandboxProcess

ALL = ["refresh", "refresh-faults", "backfill", "backfill-3", "baseline-serial", "dagster-per-partition", "dlt",
       "pipeline-direct", "rss-scan", "warehouse"]
DEFAULT = [s for s in ALL if s != "rss-scan"]
ASSETS = [["tmapi", "raw_responses"], ["tmapi", "item_statistics"], ["tmapi", "sales_trend_daily"],
          ["tmapi", "price_trend_daily"], ["tmapi", "item_kpis"]]
PARTITIONS = "watched_items"
_SUMMARY = re.compile(r"refresh: (\d+) item\(s\) in (\d+) Dagster run\(s\), ([\d.]+) s")


def _sandbox(args: argparse.Namespace, fault_rate: float, latency_ms: float | None = None) -> SandboxProcess:
    sb = SandboxProcess(port=0, latency_ms=args.latency_ms if latency_ms is None else latency_ms,
                        concurrency_limit=args.concurrency, fault_rate=fault_rate, seed=args.seed,
                        stderr=subprocess.DEVNULL)
    return sb.start()


def _sandbox_fields(stats: dict) -> dict:
    return {
        "calls": stats["requests_total"],
        "peak_all": stats["peak_in_flight_all"],
        "peak_admitted": stats["peak_in_flight"],
        "rejected_503": stats["by_status"].get("503", 0),
    }


def _add_partitions(home: Path, keys: list[str]) -> None:
    with open_instance(home) as instance:
        instance.add_dynamic_partitions(PARTITIONS, keys)


def _timeout(n: int, latency_ms: float, c: int) -> float:
    return max(600.0, 40 * n * latency_ms / 1000 / c + 0.6 * n)  # generous: today ~0.3 s per item


# ------------------------------------------------------------------------------------------------ refresh


def scenario_refresh(args, name: str, n: int, fault_rate: float, latency_ms: float, second: bool) -> list[Result]:
    c = args.concurrency
    log(f"{name}: N={n}, L={latency_ms} ms, C={c}, fault rate {fault_rate}")
    sb = _sandbox(args, fault_rate, latency_ms)
    ws = make_workspace(sb.base_url, c, name)
    results = []
    try:
        keys = item_keys(n)
        write_watchlist(ws.watchlist, keys)
        sb.reset()
        m = run_measured([TMAPI_CLI, "refresh", "--quiet"], ws.env, _timeout(n, latency_ms, c))
        stats = sb.stats()
        led = ledger_figures(ws.duckdb)
        runs = dagster_runs(ws.home)
        r = Result(name, n, n, latency_ms, c, m.wall_s, landed=led.landed, runs=sum(runs.values()),
                   rss_tree_mb=m.peak_tree_mb, rss_proc_mb=m.peak_proc_mb, **_sandbox_fields(stats))
        r.ok = m.rc == 0 and led.landed == n and led.landed_twice == 0 and not m.timed_out
        match = _SUMMARY.search(m.stdout)
        if match:
            r.extra["in_process_s"] = float(match.group(3))
            r.notes.append(f"time inside the command (after Python/Dagster start-up) {match.group(3)} s; "
                           f"wall {m.wall_s:.1f} s")
        events = dagster_events(ws.home)
        r.extra["events"] = sum(events.values())
        r.notes.append(f"Dagster event-log entries written: {sum(events.values())} "
                       f"({sum(events.values()) / max(n, 1):.1f} per item; "
                       + ", ".join(f"{k} {v}" for k, v in sorted(events.items(), key=lambda kv: -kv[1])[:4]) + ")")
        r.notes.append(f"exit code {m.rc}{' (TIMED OUT)' if m.timed_out else ''}; runs by status {runs}; "
                       f"ledger outcomes {led.by_outcome}; items landed more than once {led.landed_twice}; "
                       f"sandbox statuses {stats['by_status']}")
        if m.rc != 0:
            r.notes.append("stderr tail: " + " | ".join(m.stderr.strip().splitlines()[-5:]))
            r.notes.append("stdout tail: " + " | ".join(m.stdout.strip().splitlines()[-8:]))
        results.append(r)
        log(f"{name}: T={m.wall_s:.1f} s, calls={stats['requests_total']}, landed={led.landed}, rc={m.rc}")
        if second:
            sb.reset()
            m2 = run_measured([TMAPI_CLI, "refresh", "--quiet"], ws.env, _timeout(n, latency_ms, c))
            stats2 = sb.stats()
            led2 = ledger_figures(ws.duckdb)
            runs2 = dagster_runs(ws.home)
            r2 = Result(f"{name} (2nd, in window)", n, n, 0.0, c, m2.wall_s, landed=led2.landed,
                        runs=sum(runs2.values()) - sum(runs.values()), rss_tree_mb=m2.peak_tree_mb,
                        rss_proc_mb=m2.peak_proc_mb, **_sandbox_fields(stats2))
            r2.ok = m2.rc == 0 and stats2["requests_total"] == 0
            r2.notes.append(f"second refresh right after the first: API calls {stats2['requests_total']} (target 0); "
                            f"T_min shown as 0 (no call is needed); exit code {m2.rc}")
            results.append(r2)
            log(f"{name} 2nd: T={m2.wall_s:.1f} s, calls={stats2['requests_total']}")
    finally:
        sb.stop()
        ws.cleanup(args.keep)
    return results


# ------------------------------------------------------------------------------------------------ backfill (UI path)

_LAUNCH = """
mutation($backfillParams: LaunchBackfillParams!) {
  launchPartitionBackfill(backfillParams: $backfillParams) {
    __typename
    ... on LaunchBackfillSuccess { backfillId launchedRunIds }
    ... on PythonError { message stack }
    ... on Error { message }
  }
}"""

_WORKSPACE = """
{ workspaceOrError { __typename ... on Workspace { locationEntries { name loadStatus
    locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def _graphql(port: int, query: str, variables: dict | None = None, timeout: float = 60.0) -> dict:
    r = httpx.post(f"http://127.0.0.1:{port}/graphql", json={"query": query, "variables": variables or {}},
                   timeout=timeout)
    r.raise_for_status()
    body = r.json()
    if body.get("errors"):
        raise RuntimeError(f"GraphQL errors: {body['errors']}")
    return body["data"]


def _wait_dagster_ready(port: int, proc: subprocess.Popen, bound_s: float = 240.0) -> None:
    deadline = time.monotonic() + bound_s
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"dagster dev exited with code {proc.returncode}")
        try:
            data = _graphql(port, _WORKSPACE, timeout=10)
            entries = data["workspaceOrError"].get("locationEntries") or []
            if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                bad = [e for e in entries if e["locationOrLoadError"]["__typename"] != "RepositoryLocation"]
                if bad:
                    raise RuntimeError(f"code location failed to load: {bad}")
                return
            last = entries
        except (httpx.HTTPError, KeyError, TypeError) as exc:
            last = exc
        time.sleep(0.5)
    raise RuntimeError(f"dagster dev not ready within {bound_s:.0f} s (last: {last})")


def scenario_backfill(args, name: str, parts: int) -> list[Result]:
    from dagster import RunsFilter

    n, c, latency = args.n, args.concurrency, args.latency_ms
    log(f"{name}: N={n} in {parts} backfill(s) through `dagster dev` + GraphQL")
    sb = _sandbox(args, args.fault_rate)
    ws = make_workspace(sb.base_url, c, name)
    port = free_port()
    keys = item_keys(n)
    write_watchlist(ws.watchlist, keys)  # watchlist == partitions: the watchlist sensor has nothing to do
    _add_partitions(ws.home, keys)
    dev_log = open(ws.dir / "dagster_dev.log", "w")
    proc = subprocess.Popen(
        [DAGSTER_CLI, "dev", "-w", str(ROOT / "workspace.yaml"), "-p", str(port), "-h", "127.0.0.1"],
        cwd=ROOT, env=ws.env, stdout=dev_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    sampler = TreeSampler(proc.pid).__enter__()
    results: list[Result] = []
    try:
        t_start = time.time()
        _wait_dagster_ready(port, proc)
        log(f"{name}: dagster dev ready in {time.time() - t_start:.1f} s on port {port}")
        sb.reset()
        size = -(-n // parts)
        chunks = [keys[i : i + size] for i in range(0, n, size)]
        t0 = time.time()
        backfill_ids = []
        for chunk in chunks:
            data = _graphql(port, _LAUNCH, {"backfillParams": {
                "partitionNames": chunk,
                "assetSelection": [{"path": p} for p in ASSETS],
                "fromFailure": False,
                "tags": [],
            }})["launchPartitionBackfill"]
            if data["__typename"] != "LaunchBackfillSuccess":
                raise RuntimeError(f"launchPartitionBackfill: {data}")
            backfill_ids.append(data["backfillId"])
        log(f"{name}: launched backfill(s) {backfill_ids}; waiting for the daemon and the runs")
        deadline = time.monotonic() + _timeout(n, latency, c) + 300
        records = []
        statuses: dict[str, str] = {}
        with open_instance(ws.home) as instance:
            while True:
                records = []
                done = True
                for bid in backfill_ids:
                    bf = instance.get_backfill(bid)
                    statuses[bid] = bf.status.value
                    if bf.status.value in ("REQUESTED", "CANCELING", "FAILING"):
                        done = False
                    records += instance.get_run_records(RunsFilter(tags={"dagster/backfill": bid}))
                if any(not rec.dagster_run.is_finished for rec in records):
                    done = False
                if done:
                    break
                if time.monotonic() > deadline:
                    statuses["TIMEOUT"] = "yes"
                    break
                time.sleep(1.0)
        t_done = time.time()
        stats = sb.stats()
    finally:
        kill_group(proc)
        sampler.stop()
        dev_log.close()
        sb.stop()
    try:
        led = ledger_figures(ws.duckdb)
        by_status: dict[str, int] = {}
        for rec in records:
            by_status[rec.dagster_run.status.value] = by_status.get(rec.dagster_run.status.value, 0) + 1
        ends = [rec.end_time for rec in records if rec.end_time]
        starts = [rec.start_time for rec in records if rec.start_time]
        creates = [rec.create_timestamp.timestamp() for rec in records]
        last_end = max(ends) if ends else t_done
        fields = _sandbox_fields(stats)
        common = dict(landed=led.landed, runs=len(records), rss_tree_mb=sampler.peak_tree_mb,
                      rss_proc_mb=sampler.peak_proc_mb, **fields)
        r = Result(name, n, n, latency, c, last_end - t0, **common)
        r.ok = led.landed == n and led.landed_twice == 0 and "TIMEOUT" not in statuses and fields["peak_all"] <= c
        first_create = min(creates) if creates else t0
        first_start = min(starts) if starts else t0
        r.notes.append(
            f"T from the GraphQL launch to the last run's end; first run created {first_create - t0:.1f} s and "
            f"started {first_start - t0:.1f} s after the launch (backfill daemon loop); backfill status {statuses}; "
            f"runs by status {by_status}; ledger outcomes {led.by_outcome}; items landed more than once "
            f"{led.landed_twice}; sandbox statuses {stats['by_status']}")
        events = dagster_events(ws.home, [rec.dagster_run.run_id for rec in records])
        r.notes.append(f"Dagster event-log entries written by the backfill's runs: {sum(events.values())} "
                       f"({sum(events.values()) / max(n, 1):.1f} per item; "
                       + ", ".join(f"{k} {v}" for k, v in sorted(events.items(), key=lambda kv: -kv[1])[:4]) + ")")
        top = "; ".join(f"{mb:.0f} MB {cmd[:90]}" for mb, cmd in sampler.top(3))
        r.notes.append(f"RSS is the whole `dagster dev` tree (webserver, daemon, code server, run workers); top: {top}")
        r2 = Result(f"{name} (excl. daemon wait)", n, n, latency, c, last_end - first_create, **common)
        r2.ok = r.ok
        r2.notes.append("same backfill, T from the first run's creation to the last run's end")
        results += [r, r2]
        log(f"{name}: T={r.t_s:.1f} s ({r2.t_s:.1f} s without the daemon wait), runs={len(records)}, "
            f"calls={fields['calls']}, landed={led.landed}, peak={fields['peak_all']}")
    finally:
        ws.cleanup(args.keep)
    return results


# ------------------------------------------------------------------------------------------------ per partition


def scenario_per_partition(args) -> list[Result]:
    n, c, k = args.n, args.concurrency, min(args.subset_partitions, args.n)
    log(f"dagster-per-partition: {k} partitions, one `dagster asset materialize` each, extrapolated to {n}")
    sb = _sandbox(args, args.fault_rate)
    ws = make_workspace(sb.base_url, c, "per-partition")
    try:
        keys = item_keys(k)
        write_watchlist(ws.watchlist, keys)
        _add_partitions(ws.home, keys)
        sb.reset()
        walls, tree, proc_mb, rcs = [], 0.0, 0.0, []
        for key in keys:
            m = run_measured([DAGSTER_CLI, "asset", "materialize", "-m", "tmapi_assets.defs",
                              "--select", args.per_partition_select, "--partition", key],
                             ws.env, 600)
            walls.append(m.wall_s)
            tree, proc_mb = max(tree, m.peak_tree_mb), max(proc_mb, m.peak_proc_mb)
            rcs.append(m.rc)
            if m.rc != 0:
                log(f"dagster-per-partition: {key} failed: {m.stderr.strip().splitlines()[-3:]}")
        stats = sb.stats()
        led = ledger_figures(ws.duckdb)
        runs = dagster_runs(ws.home)
        per = sum(walls) / len(walls)
        r = Result("dagster-per-partition", n, k, args.latency_ms, c, per * n, landed=led.landed, runs=n,
                   rss_tree_mb=tree, rss_proc_mb=proc_mb, **_sandbox_fields(stats))
        r.ok = all(rc == 0 for rc in rcs) and led.landed == k
        r.notes.append(f"`dagster asset materialize --select '{args.per_partition_select}' --partition KEY` x {k}: "
                       f"{', '.join(f'{w:.1f}' for w in walls)} s; mean {per:.2f} s per partition x {n} partitions "
                       f"(one run each, serial); measured runs {runs}")
        log(f"dagster-per-partition: mean {per:.2f} s per partition -> {per * n:.0f} s for {n}")
        return [r]
    finally:
        sb.stop()
        ws.cleanup(args.keep)


# ------------------------------------------------------------------------------------------------ client baselines


def scenario_worker(args, kind: str, name: str, k: int) -> list[Result]:
    n, c = args.n, args.concurrency
    k = min(k, n)
    log(f"{name}: {k} items one at a time ({kind}), extrapolated to {n}")
    sb = _sandbox(args, args.fault_rate)
    try:
        with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
            f.write("\n".join(item_keys(k)) + "\n")
            keys_file = f.name
        sb.reset()
        m = run_measured([sys.executable, "-m", "bench.workers", kind, "--base-url", sb.base_url, "--token", TOKEN,
                          "--keys-file", keys_file], dict(os.environ), 60 + 40 * k * max(
                              args.latency_ms, 50) / 1000)
        Path(keys_file).unlink(missing_ok=True)
        stats = sb.stats()
        lines = [ln for ln in m.stdout.strip().splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"{name} worker printed no result (rc {m.rc}): {m.stderr[-800:]}")
        out = json.loads(lines[-1])
        if "skipped" in out:
            print(f"SKIP {name}: {out['skipped']}", flush=True)
            return []
        r = Result(name, n, k, args.latency_ms, c, out["wall_s"] * n / k, landed=out["landed"], runs=0,
                   rss_tree_mb=m.peak_tree_mb, rss_proc_mb=m.peak_proc_mb, **_sandbox_fields(stats))
        r.ok = out["landed"] == k
        r.notes.append(f"{k} items in {out['wall_s']:.1f} s (loop only; process wall {m.wall_s:.1f} s), x {n}/{k}; "
                       f"errors {out.get('errors')}; sandbox statuses {stats['by_status']}"
                       + (f"; dlt {out['version']}" if out.get("version") else ""))
        log(f"{name}: {out['wall_s']:.1f} s for {k} -> {r.t_s:.0f} s for {n}")
        return [r]
    finally:
        sb.stop()


def scenario_pipeline_direct(args, name: str, fault_rate: float) -> list[Result]:
    n, c = args.n, args.concurrency
    log(f"{name}: the project's pipeline without Dagster, N={n}, fault rate {fault_rate}")
    sb = _sandbox(args, fault_rate)
    ws = make_workspace(sb.base_url, c, name)
    try:
        keys_file = ws.dir / "keys.txt"
        keys_file.write_text("\n".join(item_keys(n)) + "\n", encoding="utf-8")
        sb.reset()
        m = run_measured([sys.executable, "-m", "bench.workers", "pipeline", "--base-url", sb.base_url, "--token",
                          TOKEN, "--keys-file", str(keys_file), "--concurrency", str(c), "--duckdb",
                          str(ws.duckdb)], ws.env, _timeout(n, args.latency_ms, c))
        stats = sb.stats()
        lines = [ln for ln in m.stdout.strip().splitlines() if ln.startswith("{")]
        if not lines:
            raise RuntimeError(f"{name} worker printed no result (rc {m.rc}): {m.stderr[-800:]}")
        out = json.loads(lines[-1])
        led = ledger_figures(ws.duckdb)
        r = Result(name, n, n, args.latency_ms, c, out["wall_s"], landed=led.landed, runs=0,
                   rss_tree_mb=m.peak_tree_mb, rss_proc_mb=m.peak_proc_mb, **_sandbox_fields(stats))
        r.ok = led.landed == n and led.landed_twice == 0
        r.notes.append(f"no Dagster: fetch_items {out['fetch_s']:.1f} s (T_min/T of the fetch alone "
                       f"{r.t_min / out['fetch_s']:.3f}), normalise_items {out['normalise_s']:.2f} s, refresh_kpis "
                       f"{out['kpis_s']:.2f} s; process wall {m.wall_s:.1f} s; sandbox statuses {stats['by_status']}")
        log(f"{name}: T={out['wall_s']:.1f} s (fetch {out['fetch_s']:.1f} s), calls={stats['requests_total']}, "
            f"landed={led.landed}")
        return [r]
    finally:
        sb.stop()
        ws.cleanup(args.keep)


# ------------------------------------------------------------------------------------------------ main


def _targets(results: list[Result], args) -> list[str]:
    out = []
    c = args.concurrency

    def get(name: str) -> Result | None:
        return next((r for r in results if r.name == name), None)

    def check(label: str, ok: bool | None, detail: str) -> None:
        out.append(f"{'PASS' if ok else ('n/a ' if ok is None else 'FAIL')}  {label}: {detail}")

    r = get("refresh")
    if r:
        check("refresh T_min/T >= 0.90", (r.ratio or 0) >= 0.90, f"{(r.ratio or 0):.3f} (T {r.t_s:.1f} s, "
              f"T_min {r.t_min:.1f} s)")
        check("refresh calls per landed item = 1.00", r.per_landed is not None and round(r.per_landed, 2) == 1.0
              and r.landed == r.n, f"{r.calls} calls, {r.landed}/{r.n} landed")
    r = get("refresh (2nd, in window)")
    if r:
        check("second refresh within the window: 0 calls", r.calls == 0, f"{r.calls} calls")
    r = get("refresh-faults")
    if r:
        check("fault rate 0.1: every item lands", r.landed == r.n, f"{r.landed}/{r.n}")
        check("fault rate 0.1: calls per landed item <= 1.12", r.per_landed is not None and r.per_landed <= 1.12,
              f"{(r.per_landed or 0):.3f}")
        # Not a target (issue 3 asks of this scenario that every item lands at <= 1.12 calls each): shown so a
        # change in what faults cost is seen. The retried calls alone take ~12 % more call time than T_min assumes.
        out.append(f"info  fault rate 0.1: T_min/T (not a target): {(r.ratio or 0):.3f}")
    peaks = [(r.name, r.peak_all) for r in results if r.peak_all is not None]
    if peaks:
        worst = max(peaks, key=lambda p: p[1])
        check(f"peak API concurrency <= C={c} in every scenario", worst[1] <= c,
              ", ".join(f"{n_}: {p}" for n_, p in peaks))
    r = get("backfill-3")
    if r:
        check("3 backfills in flight: peak API concurrency <= C", r.peak_all <= c, f"{r.peak_all}")
    scan = sorted((r for r in results if r.name.startswith("rss-scan")), key=lambda r: r.n)
    if scan:
        big = scan[-1]
        check(f"peak RSS of a {big.n}-item refresh <= 400 MB", big.rss_proc_mb <= 400,
              f"{big.rss_proc_mb:.0f} MB (largest process), {big.rss_tree_mb:.0f} MB (tree)")
        if len(scan) > 1:
            small = scan[0]
            growth = big.rss_proc_mb - small.rss_proc_mb
            check("peak RSS not growing with N", growth <= 0.1 * small.rss_proc_mb,
                  f"{small.n}: {small.rss_proc_mb:.0f} MB -> {big.n}: {big.rss_proc_mb:.0f} MB ({growth:+.0f} MB)")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=None, help="items (default 1000; 200 with --quick)")
    p.add_argument("--latency-ms", type=float, default=200.0, help="sandbox latency per call (default 200)")
    p.add_argument("--concurrency", type=int, default=8, help="sandbox cap C = TMAPI_CONCURRENCY (default 8)")
    p.add_argument("--fault-rate", type=float, default=0.0,
                   help="sandbox fault rate of every scenario except refresh-faults (always 0.1)")
    p.add_argument("--seed", type=int, default=0, help="sandbox fault seed")
    p.add_argument("--quick", action="store_true", help="N=200, small subsets, small warehouse bench")
    p.add_argument("--only", default="", help=f"comma-separated scenarios among {','.join(ALL)}")
    p.add_argument("--rss-scan", action="store_true", help="also run rss-scan (refresh at --rss-ns)")
    p.add_argument("--rss-ns", default="2000,10000", help="N values of rss-scan (default 2000,10000)")
    p.add_argument("--rss-latency-ms", type=float, default=5.0, help="sandbox latency of rss-scan (default 5)")
    p.add_argument("--subset-serial", type=int, default=50)
    p.add_argument("--subset-dlt", type=int, default=50)
    p.add_argument("--subset-partitions", type=int, default=3)
    p.add_argument("--per-partition-select", default="tmapi/raw_responses*",
                   help="asset selection of dagster-per-partition (default: raw and everything downstream)")
    p.add_argument("--record", action="store_true", help="append the results to docs/benchmarks.md")
    p.add_argument("--keep", action="store_true", help="keep the scenarios' temp data dirs")
    args = p.parse_args(argv)
    if args.n is None:
        args.n = 200 if args.quick else 1000
    if args.quick:
        args.subset_serial, args.subset_dlt, args.subset_partitions = 10, 10, 2
    scenarios = [s.strip() for s in args.only.split(",") if s.strip()] or list(DEFAULT)
    if args.rss_scan and "rss-scan" not in scenarios:
        scenarios.append("rss-scan")
    unknown = [s for s in scenarios if s not in ALL]
    if unknown:
        p.error(f"unknown scenario(s) {unknown}; choose among {ALL}")
    scenarios = [s for s in ALL if s in scenarios]  # fixed order, warehouse last

    started = time.monotonic()
    results: list[Result] = []
    failures: list[str] = []
    warehouse_md = ""
    for name in scenarios:
        try:
            if name == "refresh":
                results += scenario_refresh(args, "refresh", args.n, args.fault_rate, args.latency_ms, second=True)
            elif name == "refresh-faults":
                results += scenario_refresh(args, "refresh-faults", args.n, 0.1, args.latency_ms, second=False)
            elif name == "backfill":
                results += scenario_backfill(args, "backfill", 1)
            elif name == "backfill-3":
                results += scenario_backfill(args, "backfill-3", 3)
            elif name == "baseline-serial":
                results += scenario_worker(args, "serial", "baseline-serial", args.subset_serial)
            elif name == "dagster-per-partition":
                results += scenario_per_partition(args)
            elif name == "dlt":
                results += scenario_worker(args, "dlt", "dlt", args.subset_dlt)
            elif name == "pipeline-direct":
                results += scenario_pipeline_direct(args, "pipeline-direct", args.fault_rate)
                results += scenario_pipeline_direct(args, "pipeline-direct-faults", 0.1)
            elif name == "rss-scan":
                for n in [int(x) for x in args.rss_ns.split(",") if x.strip()]:
                    results += scenario_refresh(args, f"rss-scan N={n}", n, 0.0, args.rss_latency_ms, second=False)
            elif name == "warehouse":
                warehouse_md = _run_warehouse(args)
        except Exception as exc:  # noqa: BLE001 - one broken scenario must not hide the others' figures
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
            log(f"{name} FAILED: {exc}")
        if results:
            print("\n" + text_table(results) + "\n", flush=True)

    elapsed = time.monotonic() - started
    print("=" * 100)
    print(f"tmapi-assets refresh benchmark: N={args.n}, L={args.latency_ms:g} ms, C={args.concurrency}, "
          f"fault rate {args.fault_rate:g} (refresh-faults: 0.1)"
          + (f"; rss-scan: N={args.rss_ns}, L={args.rss_latency_ms:g} ms" if "rss-scan" in scenarios else "")
          + f"; {elapsed / 60:.1f} min\n")
    if results:
        print(text_table(results))
        print()
        for note in notes_block(results):
            print("- " + note)
    targets = _targets(results, args)
    if targets:
        print("\nTargets (issue 3):")
        for t in targets:
            print("  " + t)
    for f in failures:
        print(f"SCENARIO FAILED {f}")
    if warehouse_md:
        print("\n" + warehouse_md)
    if args.record:
        body = [f"N={args.n}, L={args.latency_ms:g} ms, C={args.concurrency}, fault rate {args.fault_rate:g} "
                f"(refresh-faults: 0.1)"
                + (f"; rss-scan: N={args.rss_ns}, L={args.rss_latency_ms:g} ms" if "rss-scan" in scenarios else "")
                + f"; scenarios: {', '.join(scenarios)}; took {elapsed / 60:.1f} min.", ""]
        if results:
            body += [markdown_table(results), ""] + [f"- {n_}" for n_ in notes_block(results)] + [""]
        if targets:
            body += ["Targets:", ""] + [f"- `{t}`" for t in targets] + [""]
        body += [f"- SCENARIO FAILED {f}" for f in failures]
        if warehouse_md:
            body += ["", warehouse_md]
        append_markdown("refresh benchmark (bench.run)", exact_command("bench.run"), "\n".join(body))
        log(f"results appended to {ROOT / 'docs' / 'benchmarks.md'}")
    return 1 if failures else 0


def _run_warehouse(args) -> str:
    log("warehouse: python -m bench.warehouse" + (" --quick" if args.quick else ""))
    with tempfile.NamedTemporaryFile(suffix=".md", delete=False) as f:
        md_path = f.name
    cmd = [sys.executable, "-m", "bench.warehouse", "--markdown-out", md_path] + (["--quick"] if args.quick else [])
    proc = subprocess.run(cmd, cwd=ROOT, timeout=1500)
    text = Path(md_path).read_text(encoding="utf-8") if Path(md_path).exists() else ""
    Path(md_path).unlink(missing_ok=True)
    if proc.returncode != 0:
        raise RuntimeError(f"bench.warehouse exited with code {proc.returncode}")
    return text


if __name__ == "__main__":
    sys.exit(main())
