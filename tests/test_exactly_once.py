"""Exactly once when a worker pauses or drains at the wrong moment (issue 36), forced
deterministically on real Hypercorn workers sharing one redis-server and one SQLite file:

- a producer SIGSTOPped past its lease while its upstream keeps sending, taken over, then
  continued (SIGCONT) before or after its successor ends: ``on_turn`` runs once, and the
  stored turn is the one every reader saw;
- its own readers, and a follower on a worker that drains, get the hand-off event and finish
  the answer on another worker.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import httpx2
import pytest

from quart_claude import SSEParser
from quart_claude.testing import Emulator, Reply

from .helpers import eventually
from .test_takeover import (
    ANSWER,
    Reading,
    Servers,
    follow,
    post_mid_answer,
    read,
    servers,
    stream_id_of,
)

pytestmark = pytest.mark.system

__all__ = ["servers"]  # the fixture


@pytest.mark.parametrize("first", ["paused", "successor"])
async def test_a_paused_producer_and_its_successor_keep_one_turn(
    servers: Servers, emulator: Emulator, tmp_path: Path, first: str
) -> None:
    """``paused``: the woken producer reads the rest of its answer from its socket buffers
    and ends at once, while its successor is still streaming (before the fix it committed
    its own answer and ran the hook; the successor's hook ran too). ``successor``: it wakes
    only after the successor has ended."""
    turn_log = servers.with_conversations(tmp_path)
    a, b = await servers.start_many(2)
    emulator.script(
        Reply(ANSWER, token_delay=0.01, input_tokens=25),  # all of it sent while a is stopped
        Reply(ANSWER, token_delay=0.05, input_tokens=50),  # the successor's: still streaming
    )
    async with httpx2.AsyncClient(timeout=60) as http:
        reading, post = await post_mid_answer(http, [a.url, b.url], "a question", 10)
        follower = await follow(http, b.url, stream_id_of(reading))
        a.process.send_signal(signal.SIGSTOP)
        await emulator.wait_for_requests(2, within=20)  # b took it over and continued it
        original = emulator.requests[0]
        await asyncio.wait_for(original.ended.wait(), 10)  # a's upstream sent it all
        if first == "successor":
            followed = await asyncio.wait_for(follower, 60)
        a.process.send_signal(signal.SIGCONT)
        if first == "paused":
            followed = await asyncio.wait_for(follower, 60)
        posted = await asyncio.wait_for(post, 60)
        message_id = followed.events[0]["assistant_message_id"]
        cid = followed.events[0]["conversation_id"]

        def logged() -> list[str]:
            return turn_log.read_text().splitlines() if turn_log.exists() else []

        await eventually(lambda: bool(logged()), within=15)
        await asyncio.sleep(1.0)  # a hook that would run twice has had the time to
        read_back = (await http.get(f"{b.url}/conversations/{cid}")).json()
    for seen in (followed, posted):  # the paused producer's reader too: handed off
        seen.check_exact()
    assert posted.served_by == [a.url, b.url]
    assert logged() == [f"{message_id} complete"]  # once, on one worker
    answer = read_back["messages"][1]
    assert answer["id"] == message_id and answer["status"] == "complete"
    assert "".join(x["text"] for x in answer["content"] if x["type"] == "text") == ANSWER
    assert answer["usage"] == followed.last["usage"]  # what every reader saw: the successor's
    assert followed.last["usage"]["input_tokens"] == 25 + 50
    assert "superseded at its end" in a.output() or first == "successor"


async def test_a_follower_on_a_draining_worker_is_handed_off_and_finishes(
    servers: Servers, emulator: Emulator
) -> None:
    """The stream is produced on ``a``; its follower reads on ``b``, which is SIGTERMed:
    the stream goes on, so the follower is told to resume (not to stop), and finishes on
    ``c``."""
    a, b, c = await servers.start_many(3)
    emulator.default = Reply(ANSWER, token_delay=0.04)
    async with httpx2.AsyncClient(timeout=60) as http:
        reading, post = await post_mid_answer(http, [a.url], "hi", 10)
        stream_id = stream_id_of(reading)
        last: list[dict[str, Any]] = []  # every payload b sent the follower, in order
        ids: list[int] = []

        async def follow_on_b() -> None:
            headers = {"Last-Event-ID": "-1"}
            async with http.stream("GET", f"{b.url}/chat/stream/{stream_id}", headers=headers) as r:
                parser = SSEParser()
                async for chunk in r.aiter_bytes():
                    for event in parser.feed(chunk):
                        last.append(event.json())
                        if event.id is not None and "resume" not in last[-1]:
                            ids.append(int(event.id))  # (the hand-off has no id line)

        task = asyncio.create_task(follow_on_b())
        await eventually(lambda: len(last) > 12, within=20)
        b.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(task, 30)  # b ends the response, with the hand-off event
        handed = last[-1]
        assert handed.get("resume") is True and handed.get("stream_id") == stream_id, handed
        assert handed.get("error") == "shutdown" and handed.get("partial") is True
        resumed = Reading(ids=list(ids), events=list(last[:-1]))
        result = await asyncio.wait_for(read(http, resumed, [c.url], stream_id), 60)
        produced = await asyncio.wait_for(post, 60)
    result.check_exact()
    produced.check_exact()
    assert len(emulator.requests) == 1  # a produced it all: nothing was taken over
