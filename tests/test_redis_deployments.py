"""Redis as production runs it (issue 26): a server that requires TLS and an ACL user, whose
password appears in no log line, error or ``/ready``."""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx2
import pytest
from quart import Quart

from quart_claude.testing import Emulator, Reply

from . import binaries
from .helpers import certificates, serving, stream_chat

pytestmark = pytest.mark.server

PASSWORD = "relay-acl-password-0123456789"


@dataclass
class TlsRedis:
    port: int
    ca: Path

    def url(self, password: str = PASSWORD) -> str:
        return f"rediss://relay:{password}@127.0.0.1:{self.port}/0?ssl_ca_certs={self.ca}"


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[TlsRedis]:
    """A redis-server that speaks only TLS, with the default user off and one ACL user."""
    binary = binaries.need("redis")
    ca, cert, key = certificates(tmp_path)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(cert), "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca),
        "--tls-auth-clients", "no", "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
        "--user", "default", "off", "--user", "relay", "on", f">{PASSWORD}", "~*", "&*", "+@all",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the TLS redis-server did not start")
            time.sleep(0.05)
        yield TlsRedis(port, ca)
    finally:
        process.kill()
        process.wait(10)


async def test_a_tls_redis_with_an_acl_user_carries_streams_across_workers(
    tls_redis: TlsRedis,
    make_app: Callable[..., Quart],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    emulator.script(Reply("Over TLS, as one ACL user."))
    options = {"stream_store": tls_redis.url(), "rate_limit": "100/minute"}
    producer, reader = make_app(**options), make_app(**options)
    with caplog.at_level(logging.DEBUG):
        async with serving(producer) as one, serving(reader) as two:
            answer = await stream_chat(http, one + "/chat/stream", {"message": "hi"})
            stream_id = answer.events[0]["stream_id"]
            again = await stream_chat(http, f"{two}/chat/stream/{stream_id}", method="GET")
            ready = await http.get(two + "/ready")
    assert answer.text == "Over TLS, as one ACL user."
    assert again.text == answer.text and again.ids == answer.ids  # read from Redis, elsewhere
    assert ready.status_code == 200
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert PASSWORD not in logged


async def test_a_wrong_password_on_tls_redis_fails_the_start_naming_no_secret(
    tls_redis: TlsRedis, make_app: Callable[..., Quart], caplog: pytest.LogCaptureFixture
) -> None:
    """A misconfigured store fails loudly at startup (before any stream could be lost), and
    neither the error nor a log line holds the password that was tried."""
    wrong = "wrong-acl-password-9876543210"
    app = make_app(stream_store=tls_redis.url(wrong))
    with caplog.at_level(logging.DEBUG), pytest.raises(Exception) as failed:
        await app.startup()
    everything = repr(failed.value) + str(failed.value)
    everything += "\n".join(r.getMessage() for r in caplog.records)
    assert "invalid username-password" in everything.lower() or "auth" in everything.lower()
    assert wrong not in everything and PASSWORD not in everything
