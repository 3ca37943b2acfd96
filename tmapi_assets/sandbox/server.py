"""Running the sandbox: config, blocking serve(), the CLI main(), and two context managers for tests and demos.

* ``serve(config)`` runs uvicorn in the current process until SIGINT/SIGTERM, printing
  ``sandbox listening on http://HOST:PORT`` (flushed) once it accepts connections.
* ``main(argv)`` parses ``--host --port --latency-ms --latency-jitter-ms --concurrency-limit --fault-rate --seed
  --token --exhausted-token --today YYYY-MM-DD --log-level`` and calls serve(); ``python -m tmapi_assets.sandbox``
  runs it.
* ``SandboxProcess(config)``: the sandbox in a child process (``sys.executable -m tmapi_assets.sandbox``).
* ``SandboxThread(config)``: the sandbox in a background thread of this process (own event loop).

Both context managers expose ``base_url``, ``stats()``, ``reset()`` and ``script(item_id, responses, spec_id="")``.
A port of 0 means "any free port"; the real one is in ``base_url`` / ``port``.

The token is never printed or logged: uvicorn's access log (which would print full URLs with ``apiToken``) is off.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, fields
from datetime import date
from typing import Any, Sequence

import uvicorn
from uvicorn._compat import asyncio_run  # asyncio.run with loop_factory on Python 3.11

from tmapi_assets.sandbox.app import create_app

DEFAULT_TOKEN = "sandbox-token"
DEFAULT_EXHAUSTED_TOKEN = "sandbox-exhausted-token"
_LISTENING = re.compile(r"sandbox listening on (http://\S+)")


@dataclass
class SandboxConfig:
    host: str = "127.0.0.1"
    port: int = 8765
    latency_ms: float = 0.0
    latency_jitter_ms: float = 0.0
    concurrency_limit: int = 0
    fault_rate: float = 0.0
    seed: int = 0
    token: str = DEFAULT_TOKEN
    exhausted_token: str = DEFAULT_EXHAUSTED_TOKEN
    today: date | None = None
    log_level: str = "warning"

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.fault_rate) <= 1.0:
            raise ValueError(f"fault_rate must be between 0 and 1, got {self.fault_rate}")
        if self.latency_ms < 0 or self.latency_jitter_ms < 0:
            raise ValueError("latency_ms and latency_jitter_ms must be >= 0")
        if self.concurrency_limit < 0:
            raise ValueError("concurrency_limit must be >= 0 (0 = unlimited)")
        if not self.token:
            raise ValueError("token must not be empty")
        if isinstance(self.today, str):
            self.today = date.fromisoformat(self.today)

    def to_argv(self) -> list[str]:
        """Command-line options that reproduce this config (used by SandboxProcess)."""
        argv = [
            "--host", self.host,
            "--port", str(self.port),
            "--latency-ms", repr(float(self.latency_ms)),
            "--latency-jitter-ms", repr(float(self.latency_jitter_ms)),
            "--concurrency-limit", str(self.concurrency_limit),
            "--fault-rate", repr(float(self.fault_rate)),
            "--seed", str(self.seed),
            "--log-level", self.log_level,
        ]  # fmt: skip
        if self.today is not None:
            argv += ["--today", self.today.isoformat()]
        return argv


def _uvicorn_config(config: SandboxConfig, *, own_logging: bool = True) -> uvicorn.Config:
    """uvicorn settings. own_logging=False (in-process threads): do not reconfigure logging of the host process;
    uvicorn's records then propagate to the root logger like any library's."""
    extra: dict[str, Any] = {} if own_logging else {"log_config": None}
    return uvicorn.Config(
        create_app(config),
        host=config.host,
        port=config.port,
        access_log=False,  # access lines contain the full URL, apiToken included
        log_level=config.log_level,
        lifespan="off",
        limit_concurrency=None,
        backlog=2048,
        timeout_keep_alive=30,
        timeout_graceful_shutdown=3,
        server_header=False,
        date_header=True,
        **extra,
    )


class _Server(uvicorn.Server):
    """uvicorn.Server that stops quietly: no signal re-raised after a graceful stop, stalled requests ended."""

    def handle_exit(self, sig: int, frame: Any) -> None:
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        else:
            self.should_exit = True

    async def shutdown(self, sockets: Any = None) -> None:
        state = getattr(getattr(self.config.loaded_app, "state", None), "sandbox", None)
        if state is None:
            state = getattr(getattr(self.config.app, "state", None), "sandbox", None)
        if state is not None:
            if state.abort is None:
                state.abort = asyncio.Event()
            state.abort.set()
        await super().shutdown(sockets)

    def bound_address(self) -> tuple[str, int]:
        for server in self.servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                return host, port
        raise RuntimeError("sandbox server has no listening socket")


def _display_host(host: str) -> str:
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if ":" in host and not host.startswith("["):
        return f"[{host}]"
    return host


def serve(config: SandboxConfig) -> None:
    """Run the sandbox until SIGINT/SIGTERM (blocking). Prints the listening line once it accepts connections."""
    server = _Server(_uvicorn_config(config))

    async def guarded() -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn exits like this when it cannot bind; it has logged why
            pass

    async def run() -> None:
        task = asyncio.ensure_future(guarded())
        while not server.started:
            if task.done():
                break
            await asyncio.sleep(0.005)
        if server.started:
            host, port = server.bound_address()
            print(f"sandbox listening on http://{_display_host(host)}:{port}", flush=True)
        await task

    try:
        asyncio_run(run(), loop_factory=server.config.get_loop_factory())
    except KeyboardInterrupt:  # a second Ctrl-C while stopping
        pass
    if not server.started:
        raise SystemExit(f"sandbox could not start on {config.host}:{config.port} (see the error above)")


def build_parser() -> argparse.ArgumentParser:
    d = SandboxConfig()
    p = argparse.ArgumentParser(
        prog="tmapi-assets sandbox",
        description="Run a local fake of TMAPI's 1688 sales statistics API (GET /1688/item/statistics/sales).",
    )
    p.add_argument("--host", default=d.host, help=f"interface to bind (default {d.host})")
    p.add_argument("--port", type=int, default=d.port, help=f"port (default {d.port}; 0 = any free port)")
    p.add_argument("--latency-ms", type=float, default=d.latency_ms, help="added latency per API request")
    p.add_argument("--latency-jitter-ms", type=float, default=d.latency_jitter_ms, help="uniform +/- jitter")
    p.add_argument(
        "--concurrency-limit", type=int, default=d.concurrency_limit,
        help="requests in flight above this get HTTP 503 (0 = unlimited)",
    )  # fmt: skip
    p.add_argument("--fault-rate", type=float, default=d.fault_rate, help="share (0..1) of transient faults")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the fault generator")
    p.add_argument(
        "--token", default=None,
        help="accepted API token (default: $TMAPI_SANDBOX_TOKEN or 'sandbox-token')",
    )  # fmt: skip
    p.add_argument(
        "--exhausted-token", default=None,
        help="token answered with HTTP 439 (default: $TMAPI_SANDBOX_EXHAUSTED_TOKEN or 'sandbox-exhausted-token')",
    )  # fmt: skip
    p.add_argument("--today", type=date.fromisoformat, default=None, help="pin today's China date (YYYY-MM-DD)")
    p.add_argument("--log-level", default=d.log_level, choices=["critical", "error", "warning", "info", "debug"])
    return p


def config_from_args(args: argparse.Namespace) -> SandboxConfig:
    return SandboxConfig(
        host=args.host,
        port=args.port,
        latency_ms=args.latency_ms,
        latency_jitter_ms=args.latency_jitter_ms,
        concurrency_limit=args.concurrency_limit,
        fault_rate=args.fault_rate,
        seed=args.seed,
        token=args.token or os.environ.get("TMAPI_SANDBOX_TOKEN") or DEFAULT_TOKEN,
        exhausted_token=args.exhausted_token
        or os.environ.get("TMAPI_SANDBOX_EXHAUSTED_TOKEN")
        or DEFAULT_EXHAUSTED_TOKEN,
        today=args.today,
        log_level=args.log_level,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"sandbox: {exc}", file=sys.stderr)
        return 2
    serve(config)
    return 0


# -- context managers ----------------------------------------------------------------------------------------------


class _Controls:
    """HTTP helpers shared by SandboxProcess and SandboxThread (stdlib urllib: no event loop needed)."""

    base_url: str
    config: SandboxConfig

    @property
    def token(self) -> str:
        return self.config.token

    @property
    def port(self) -> int:
        return int(self.base_url.rsplit(":", 1)[1])

    @property
    def api_url(self) -> str:
        return self.base_url + "/1688/item/statistics/sales"

    def _call(self, method: str, path: str, payload: Any = None, timeout: float = 10.0) -> Any:
        data = None if payload is None else json.dumps(payload).encode("utf-8")
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        if data is not None:
            req.add_header("content-type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"sandbox {method} {path} -> HTTP {exc.code}: {exc.read()[:300]!r}") from None

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/_sandbox/stats")

    def reset(self) -> None:
        self._call("POST", "/_sandbox/reset", {})

    def script(self, item_id: int | str, responses: list[dict[str, Any]], spec_id: str = "") -> dict[str, Any]:
        payload = {"item_id": str(item_id), "spec_id": spec_id, "responses": responses}
        return self._call("POST", "/_sandbox/script", payload)

    def _wait_ready(self, deadline: float, alive: Any = lambda: True) -> None:
        last: Exception | None = None
        while time.monotonic() < deadline:
            if not alive():
                raise RuntimeError("sandbox exited before it answered")
            try:
                self._call("GET", "/_sandbox/stats", timeout=2.0)
                return
            except Exception as exc:  # noqa: BLE001 - not up yet
                last = exc
                time.sleep(0.02)
        raise RuntimeError(f"sandbox at {self.base_url} did not answer /_sandbox/stats in time (last error: {last})")


class SandboxThread(_Controls):
    """The sandbox in a daemon thread of this process (own event loop). Fast to start; for unit tests.

    with SandboxThread(SandboxConfig(port=0, today=date(2025, 7, 24))) as sb:
        httpx.get(sb.api_url, params={"item_id": 652702302959, "apiToken": sb.token})
    """

    def __init__(self, config: SandboxConfig | None = None, *, start_timeout: float = 20.0, **overrides: Any) -> None:
        base = config or SandboxConfig(port=0)
        if overrides:
            base = SandboxConfig(**{**{f.name: getattr(base, f.name) for f in fields(base)}, **overrides})
        self.config = base
        self.start_timeout = start_timeout
        self.base_url = ""
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def start(self) -> "SandboxThread":
        self._server = _Server(_uvicorn_config(self.config, own_logging=False))

        def run() -> None:
            try:
                self._server.run()
            except BaseException as exc:  # noqa: BLE001 - reported by start() (SystemExit when it cannot bind)
                self._error = exc

        self._thread = threading.Thread(target=run, name="tmapi-sandbox", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + self.start_timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"sandbox thread did not start on {self.config.host}:{self.config.port}"
                    + (f": {self._error!r}" if self._error else " (port in use? see log above)")
                )
            time.sleep(0.005)
        host, port = self._server.bound_address()
        self.base_url = f"http://{_display_host(host)}:{port}"
        self._wait_ready(deadline)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)
            if self._thread.is_alive() and self._server is not None:
                self._server.force_exit = True
                self._thread.join(timeout=5)
        self._thread = None

    @property
    def app_state(self) -> Any:
        """The live SandboxState (read-only use from tests; it is mutated by the server thread)."""
        return self._server.config.loaded_app.state.sandbox if self._server else None

    def __enter__(self) -> "SandboxThread":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class SandboxProcess(_Controls):
    """The sandbox in a child process (``python -m tmapi_assets.sandbox``); for demos and end-to-end tests.

    The child is told ``--port`` (0 = it picks a free port) and its "listening" line gives the real address.
    The token goes to the child through the environment, never on its command line.
    """

    def __init__(
        self,
        config: SandboxConfig | None = None,
        *,
        start_timeout: float = 20.0,
        stderr: Any = None,
        **overrides: Any,
    ) -> None:
        base = config or SandboxConfig(port=0)
        if overrides:
            base = SandboxConfig(**{**{f.name: getattr(base, f.name) for f in fields(base)}, **overrides})
        self.config = base
        self.start_timeout = start_timeout
        self.stderr = stderr  # None = inherit
        self.base_url = ""
        self.proc: subprocess.Popen[str] | None = None
        self._last_proc: subprocess.Popen[str] | None = None

    def start(self) -> "SandboxProcess":
        env = dict(os.environ)
        env["TMAPI_SANDBOX_TOKEN"] = self.config.token
        env["TMAPI_SANDBOX_EXHAUSTED_TOKEN"] = self.config.exhausted_token
        env.setdefault("PYTHONUNBUFFERED", "1")
        cmd = [sys.executable, "-m", "tmapi_assets.sandbox", *self.config.to_argv()]
        self.proc = self._last_proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self.stderr, stdin=subprocess.DEVNULL, text=True, env=env
        )
        lines: queue.Queue[str | None] = queue.Queue()

        def pump(stream: Any) -> None:
            for line in stream:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, args=(self.proc.stdout,), name="tmapi-sandbox-stdout", daemon=True).start()
        deadline = time.monotonic() + self.start_timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self.stop()
                raise RuntimeError(f"sandbox process did not report listening within {self.start_timeout:.0f} s")
            try:
                line = lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if line is None:
                code = self.proc.wait(timeout=5)
                raise RuntimeError(f"sandbox process exited with code {code} before listening (see its stderr)")
            match = _LISTENING.search(line)
            if match:
                self.base_url = match.group(1)
                break
        self._wait_ready(deadline, alive=lambda: self.proc is not None and self.proc.poll() is None)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    @property
    def returncode(self) -> int | None:
        return None if self._last_proc is None else self._last_proc.poll()

    def __enter__(self) -> "SandboxProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
