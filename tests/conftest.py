from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx2
import pytest
from quart import Quart

from quart_claude import Claude
from quart_claude.testing import Emulator

from .helpers import gunicorn_serving, serving

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
    """The acceptance tests run against both front ends: Quart under Hypercorn (in this
    process) and Flask under Gunicorn's gthread worker (a real server process)."""
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
        return gunicorn_serving(options)

    return factory


@pytest.fixture
async def server(make_app: Callable[..., Quart]) -> AsyncIterator[str]:
    async with serving(make_app()) as url:
        yield url


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(timeout=30) as client:
        yield client


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
        import socket

        self.binary = binary
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
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
    import shutil

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "REDIS TESTS NOT RUN: redis-server is not installed (apt-get install "
            "redis-server); CI installs it and fails on any skip"
        )
    return binary


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
