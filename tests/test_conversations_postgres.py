"""Conversations in a real PostgreSQL server the test starts itself (issue 23): the shipped
migrations, a tool turn's history sent back exactly, and a database restart mid-turn that
loses nothing (the commit is retried; meanwhile ``/ready`` and a send say 503), with the
database password in no response and no log line."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx2
import pytest
from quart import Quart

from quart_claude import Claude, ConfigError, Turn
from quart_claude.testing import Emulator, Reply, ToolUse

from . import binaries
from .helpers import eventually, orphaned_turn, serving, stream_chat
from .postgres import PASSWORD, PostgresServer

pytestmark = pytest.mark.system

TOKEN = {"Authorization": "Bearer tok-pg-0123456789"}


@pytest.fixture
def postgres() -> Iterator[PostgresServer]:
    server = PostgresServer(binaries.need("postgresql"))
    try:
        server.start()
        yield server
    finally:
        server.close()


def migrate(url: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "quart_claude", "db", "upgrade", "--url", url],
        check=True,
        capture_output=True,
        timeout=60,
    )


def make_app(emulator: Emulator, url: str, turns: list[Turn]) -> Quart:
    app = Quart(__name__)
    claude = Claude(
        app,
        api_key="sk-ant-test-postgres",
        base_url=emulator.url,
        database_url=url,
        api_tokens="tok-pg-0123456789",
        retry_base_delay=0.05,
    )
    claude.on_turn(turns.append)

    @claude.tool
    def order_status(order_id: str) -> str:
        """Look up an order."""
        return f"{order_id}: shipped"

    return app


async def test_migrated_tables_carry_a_tool_turn_back_exactly(
    postgres: PostgresServer, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    turns: list[Turn] = []
    unmigrated = make_app(emulator, postgres.url, turns)
    with pytest.raises(ConfigError, match="db upgrade"):  # the server does not start
        await unmigrated.startup()
    await unmigrated.shutdown()
    migrate(postgres.url)
    migrate(postgres.url)  # again: nothing to do
    emulator.script(
        Reply(
            "Checking.",
            thinking="An order lookup.",
            tool_calls=[ToolUse("order_status", {"order_id": "B-2"})],
        ),
        Reply("Shipped."),
        Reply("Yes, B-2."),
    )
    async with serving(make_app(emulator, postgres.url, turns)) as url:
        first = await stream_chat(
            http, url + "/chat/stream", {"message": "Where is B-2?"}, headers=TOKEN
        )
        cid = first.events[0]["conversation_id"]
        second = await stream_chat(
            http,
            url + "/chat/stream",
            {"message": "Sure?", "conversation_id": cid},
            headers=TOKEN,
        )
        assert second.text == "Yes, B-2."
        await eventually(lambda: len(turns) == 2)  # stored just after its last event
        read = (await http.get(f"{url}/conversations/{cid}", headers=TOKEN)).json()
    assert emulator.requests[2].body["messages"][:3] == emulator.requests[1].body["messages"]
    assert [m["status"] for m in read["messages"]] == ["complete"] * 4
    assert len(turns) == 2


async def test_a_database_restart_mid_turn_loses_nothing(
    postgres: PostgresServer,
    emulator: Emulator,
    http: httpx2.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    migrate(postgres.url)
    turns: list[Turn] = []
    words = "steady " * 20
    emulator.script(Reply(words, token_delay=0.03))
    caplog.set_level(logging.DEBUG)
    async with serving(make_app(emulator, postgres.url, turns)) as url:
        attached = asyncio.Event()
        running = asyncio.create_task(
            stream_chat(
                http, url + "/chat/stream", {"message": "go"}, headers=TOKEN, attached=attached
            )
        )
        await asyncio.wait_for(attached.wait(), 10)
        await asyncio.to_thread(postgres.stop)
        answer = await running
        assert answer.text == words and answer.events[-1]["type"] == "done"  # never cut
        ready = await http.get(url + "/ready")
        assert ready.status_code == 503 and ready.json()["status"] == "database_unavailable"
        refused = await http.post(url + "/chat", json={"message": "now?"}, headers=TOKEN)
        assert refused.status_code == 503 and refused.json()["error"] == "store_unavailable"
        listed = await http.get(url + "/conversations", headers=TOKEN)
        assert listed.status_code == 503
        await asyncio.sleep(0.5)  # the commit is retrying
        assert turns == []
        await asyncio.to_thread(postgres.start)
        await eventually(lambda: len(turns) == 1, within=30)
        cid = answer.events[0]["conversation_id"]
        read = (await http.get(f"{url}/conversations/{cid}", headers=TOKEN)).json()
        assert (await http.get(url + "/ready")).status_code == 200
        bodies: list[Any] = [ready.text, refused.text, listed.text]
    assert read["messages"][1]["status"] == "complete"
    assert read["messages"][1]["content"] == [{"type": "text", "text": words}]
    assert turns[0].status == "complete"
    assert any("storing its turn failed" in r.getMessage() for r in caplog.records)
    seen = "\n".join([*bodies, *(r.getMessage() for r in caplog.records), caplog.text])
    assert PASSWORD not in seen


async def test_budgets_on_postgresql_hold_across_two_apps_at_once(
    postgres: PostgresServer, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """Two apps (each its own engine and pool, as two workers) reserve against one budget in
    the database at once: the ledger's sum never passes the limit (issue 24)."""
    migrate(postgres.url)

    def budgeted() -> Quart:
        app = Quart(__name__)
        Claude(
            app,
            api_key="sk-ant-test-postgres",
            base_url=emulator.url,
            database_url=postgres.url,
            api_tokens="tok-pg-0123456789",
            budget="1500 tokens/day",
            max_tokens=64,
            max_streams_per_client=0,
        )
        return app

    emulator.default = Reply(tokens=[f"w{n} " for n in range(30)], input_tokens=20)
    first, second = budgeted(), budgeted()
    async with serving(first) as one, serving(second) as two:
        answers = await asyncio.gather(
            *(
                stream_chat(http, url + "/chat/stream", {"message": "hi"}, headers=TOKEN)
                for url in [one, two] * 30
            )
        )
        identity = "token:" + hashlib.sha256(b"tok-pg-0123456789").hexdigest()[:16]
        entries = await first.extensions["claude"].ledger.entries(identity)
        usage = (await http.get(two + "/usage", headers=TOKEN)).json()
    assert {a.status for a in answers} == {200, 429}
    spent = sum(e.input_tokens + e.output_tokens for e in entries)
    assert 0 < spent <= 1500
    assert len(entries) == len(emulator.requests)
    assert usage["limits"][0]["used_tokens"] == spent  # the other app sees the same counts
    assert PASSWORD not in str(usage)


async def test_a_turn_whose_worker_died_before_its_stream_started_is_answered_again(
    postgres: PostgresServer, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    """Issue 36 on PostgreSQL: the orphan a worker killed between the turn's row and its
    stream leaves (made here exactly) is closed, and its retried send answered."""
    migrate(postgres.url)
    ref = await orphaned_turn(postgres.url, "tok-pg-0123456789", "c-orphan")
    emulator.script(Reply("answered at last"))
    turns: list[Turn] = []
    async with serving(make_app(emulator, postgres.url, turns)) as url:
        body = {"message": "hello", "client_message_id": "c-orphan"}
        again = await stream_chat(http, url + "/chat/stream", body, headers=TOKEN)
        assert again.status == 200, again.body
        assert again.text == "answered at last"
        await eventually(lambda: len(turns) == 1)
        where = f"{url}/conversations/{ref.conversation_id}"
        read = (await http.get(where, headers=TOKEN)).json()
        orphan_branch = (
            await http.get(where, params={"leaf": ref.message_id}, headers=TOKEN)
        ).json()
    assert read["streaming"] is None
    assert [m["status"] for m in read["messages"]] == ["complete", "complete"]
    assert orphan_branch["messages"][-1]["status"] == "error"
