from __future__ import annotations

import contextlib
import gc
import os
import subprocess
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx2
import pytest
from quart import Quart

from quart_claude import Claude
from quart_claude.testing import Emulator

from . import binaries
from .helpers import serving, wsgi_serving
from .redis_cluster import RedisClusterServers

# The example app's demo mode keeps its SQLite database and SECRET_KEY in an instance folder:
# for the suite (and the servers it starts), a temporary one, never the checkout's.
os.environ.setdefault("EXAMPLE_INSTANCE_PATH", tempfile.mkdtemp(prefix="qc-example-"))

API_KEY = "sk-test-emulator-key-0123456789"
# The suite runs against either upstream transport (CI runs both).
HTTP_CLIENT = os.environ.get("QUART_CLAUDE_TEST_HTTP_CLIENT", "auto")


@pytest.fixture(autouse=True)
def clean_environ(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No CLAUDE_* / ANTHROPIC_* variable of the developer's shell leaks into a test."""
    for name in list(os.environ):
        if name.startswith(("CLAUDE_", "ANTHROPIC_")):
            monkeypatch.delenv(name)
    yield


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with Emulator() as emu:
        yield emu


@pytest.fixture
def make_app(emulator: Emulator) -> Callable[..., Quart]:
    def factory(**options: Any) -> Quart:
        app = Quart(__name__)
        options.setdefault("api_key", API_KEY)
        options.setdefault("base_url", emulator.url)
        options.setdefault("retry_base_delay", 0.05)
        options.setdefault("retry_max_delay", 2.0)
        options.setdefault("http_client", HTTP_CLIENT)
        Claude(app, **options)
        return app

    return factory


@pytest.fixture(params=["quart", "flask"])
def front_end(request: pytest.FixtureRequest) -> str:
    """The acceptance tests run against both front ends: Quart under Hypercorn and Flask on a
    threaded WSGI server, both in this process (Gunicorn itself: test_flask.py)."""
    return str(request.param)


@pytest.fixture
def serve(
    front_end: str, make_app: Callable[..., Quart], emulator: Emulator
) -> Callable[..., contextlib.AbstractAsyncContextManager[str]]:
    """``async with serve(**options) as url``: the front end's server with those options."""

    def factory(**options: Any) -> contextlib.AbstractAsyncContextManager[str]:
        if front_end == "quart":
            return serving(make_app(**options))
        options.setdefault("api_key", API_KEY)
        options.setdefault("base_url", emulator.url)
        options.setdefault("retry_base_delay", 0.05)
        options.setdefault("retry_max_delay", 2.0)
        options.setdefault("http_client", HTTP_CLIENT)
        return wsgi_serving(options)

    return factory


@pytest.fixture
async def server(make_app: Callable[..., Quart]) -> AsyncIterator[str]:
    async with serving(make_app()) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=30) as client:
        yield client


TIERS = ("core", "server", "system")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test has exactly one tier (CONTRIBUTING.md says which), so ``-m "core or
    server"`` selects by tier. The system tier goes first: its long real-time tests start
    while the workers still have the short ones to share out."""
    rank = {}
    for item in items:
        tiers = {marker.name for marker in item.iter_markers() if marker.name in TIERS}
        if len(tiers) != 1:
            raise pytest.UsageError(
                f"{item.nodeid} has tier marks {sorted(tiers)}: give it (or its module) exactly "
                "one of core, server, system (CONTRIBUTING.md says which)"
            )
        rank[item.nodeid] = -TIERS.index(tiers.pop())
    items.sort(key=lambda item: rank[item.nodeid])  # stable: a module's tests stay together


def pytest_collection_finish(session: pytest.Session) -> None:
    """What is alive now (the modules, the collected tests) lives for the session: frozen,
    the collector skips it, so a full collection after each test costs about 2 ms, not 170."""
    gc.freeze()


@pytest.fixture(autouse=True)
def _collect_its_garbage() -> Iterator[None]:
    """Collect the test's garbage once its other fixtures (its event loop too) are gone,
    before pytest gathers unraisable exceptions: a socket or stream a test left open is
    reported against that test, under its warning filters, not against whichever test on
    the same worker the collector happens to run in next."""
    yield
    gc.collect()


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    """Gather the groups that did not run; :func:`pytest_unconfigure` prints them last."""
    reasons = [_skip_reason(report) for report in terminalreporter.stats.get("skipped", [])]
    config.stash[_NOT_RUN] = binaries.summary(reasons)


def pytest_unconfigure(config: pytest.Config) -> None:
    """The run's last lines: what did not run, and what installs it."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    lines = config.stash.get(_NOT_RUN, [])
    if reporter is not None and lines:
        for line in lines:
            reporter.write_line(line, yellow=True, bold=True)


_NOT_RUN = pytest.StashKey[list[str]]()


def _skip_reason(report: Any) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """In CI (QUART_CLAUDE_REQUIRE_ALL=1) a skipped test fails the run."""
    if os.environ.get("QUART_CLAUDE_REQUIRE_ALL") != "1":
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None:
        return
    skipped = reporter.stats.get("skipped", [])
    if skipped:
        reporter.write_line(
            f"FAILED: {len(skipped)} test(s) skipped; CI must run them all", red=True
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


class RedisServer:
    """A real redis-server on a loopback port, without persistence, that a test may restart
    (losing everything, as a Redis without persistence does)."""

    def __init__(self, binary: str) -> None:
        from .helpers import free_port

        self.binary = binary
        self.port: int = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        import socket
        import time

        port = str(self.port)
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


def _redis_binary() -> str:
    return binaries.need("redis")


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A real redis-server on a free loopback port, for the whole session."""
    server = RedisServer(_redis_binary())
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may stop and restart."""
    server = RedisServer(_redis_binary())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisClusterServers]:
    """A Redis Cluster of this test worker's own (3 primaries, 3 replicas), for the session;
    a test may reshard it (its layout is then another, as a cluster's is)."""
    cluster = RedisClusterServers(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
