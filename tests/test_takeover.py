"""Streams that outlive their worker: takeover after a crash, hand-off on a deploy.

Three single-process ``hypercorn -w 0`` servers on their own ports (the recommended topology:
one process per port, each respawned alone by its manager) share one real redis-server; the
emulator paces the answers. The producing server is SIGKILLed, SIGSTOPped or SIGTERMed for
real. Every reader must end with the exact full answer, once, under contiguous ids.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import pytest
import redis.asyncio as aioredis

from quart_claude import SSEEvent, SSEParser
from quart_claude.testing import Emulator, ErrorReply, RecordedRequest, Reply, ToolUse

from . import binaries
from .helpers import eventually, free_port
from .models import NO_PREFILL_MODEL
from .test_hypercorn_cli import HYPERCORN, wait_ready

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parent.parent
WORDS = 120
ANSWER = " ".join(f"w{i:03d}" for i in range(WORDS))
SHUTDOWN_GRACE = 8.0
#: CLAUDE_STREAM_LEASE of these servers: a lapsed producer is taken over this soon (the
#: shipped 3 s is kept by the SIGKILL test)
LEASE = 0.6


@dataclass
class Server:
    url: str
    port: int
    process: asyncio.subprocess.Process
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


class Servers:
    """Hypercorn processes of one test, each stopped (SIGKILL at worst) at the end."""

    def __init__(self, emulator: Emulator, redis_url: str, directory: Path) -> None:
        self.env = {
            **os.environ,
            "CLAUDE_API_KEY": "sk-test-takeover",
            "CLAUDE_BASE_URL": emulator.url,
            "CLAUDE_STREAM_STORE": redis_url,
            "CLAUDE_HEARTBEAT_INTERVAL": "1",
            "CLAUDE_SHUTDOWN_GRACE": str(SHUTDOWN_GRACE),
            "CLAUDE_RESUME_GRACE": "20",
            "CLAUDE_STREAM_LEASE": str(LEASE),
            "HOST_APP_LOG": "INFO",
        }
        self.directory = directory
        self.all: list[Server] = []

    def with_conversations(self, directory: Path) -> Path:
        """Conversations on, in one SQLite file every worker shares (anonymous, by a cookie
        signed with the same key), and each finished turn written to the log returned."""
        turn_log = directory / "turns.log"
        self.env.update(
            CLAUDE_DATABASE_URL=f"sqlite+aiosqlite:///{directory / 'chat.db'}",
            HOST_APP_SECRET_KEY="a-secret-key-shared-by-the-workers",
            HOST_APP_TURN_LOG=str(turn_log),
        )
        return turn_log

    async def start(self, port: int | None = None) -> Server:
        port = port or free_port()
        log = self.directory / f"hypercorn-{port}-{len(self.all)}.log"
        with log.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                HYPERCORN,
                "-w",
                "0",
                "--graceful-timeout",
                str(int(SHUTDOWN_GRACE) + 2),
                "-b",
                f"127.0.0.1:{port}",
                "tests.host_app:app",
                cwd=ROOT,
                env=self.env,
                stdout=sink,
                stderr=sink,
            )
        server = Server(f"http://127.0.0.1:{port}", port, process, log)
        self.all.append(server)
        await wait_ready(server.url + "/ready", process)
        return server

    async def start_many(self, count: int) -> list[Server]:
        """``count`` servers, started side by side."""
        return list(await asyncio.gather(*(self.start() for _ in range(count))))

    async def stop_all(self) -> None:
        for server in self.all:
            if server.process.returncode is None:
                server.process.send_signal(signal.SIGCONT)
                server.process.kill()
            await server.process.wait()


#: the takeover and hand-off tests run on one redis-server and on a Redis Cluster (a stop
#: from another worker: tests/test_redis.py, on both)
ON_A_CLUSTER_TOO = pytest.mark.parametrize("servers", ["server", "cluster"], indirect=True)


@pytest.fixture
async def servers(
    emulator: Emulator, redis_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Servers]:
    """Hypercorn workers on one redis-server; ``cluster`` (indirect): on a Redis Cluster."""
    if getattr(request, "param", "server") == "cluster":
        redis_url = request.getfixturevalue("redis_cluster").url
    group = Servers(emulator, redis_url, tmp_path)
    try:
        yield group
    finally:
        await group.stop_all()
        for server in group.all:  # shown by pytest when the test failed
            print(f"--- {server.log.name}\n{server.output()[-3000:]}")


@dataclass
class Reading:
    """What one reader received of a stream, across reconnects."""

    ids: list[int] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    served_by: list[str] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "".join(e["text"] for e in self.events if e["type"] == "delta")

    @property
    def last(self) -> dict[str, Any]:
        return self.events[-1] if self.events else {}

    def check_exact(self) -> None:
        assert self.last.get("type") == "done", self.last
        assert self.ids == list(range(len(self.ids))), self.ids  # contiguous, once
        assert self.text == ANSWER


async def read(
    http: httpx2.AsyncClient,
    reading: Reading,
    urls: list[str],
    stream_id: str,
    *,
    post: dict[str, Any] | None = None,
    on_event: asyncio.Event | None = None,
    deltas_before_signal: int = 0,
) -> Reading:
    """Follow ``stream_id`` to its end, first on ``urls[0]`` (POSTing ``post`` when given),
    reconnecting with ``Last-Event-ID`` on the next URL after a cut or a hand-off."""
    attempt = 0
    while reading.last.get("type") not in ("done", "error") and attempt < 30:
        url = urls[min(attempt, len(urls) - 1)]
        attempt += 1
        if post is not None and attempt == 1:
            request = http.stream("POST", url + "/chat/stream", json=post)
        else:
            headers = {"Last-Event-ID": str(reading.ids[-1] if reading.ids else -1)}
            request = http.stream("GET", f"{url}/chat/stream/{stream_id}", headers=headers)
        try:
            async with request as response:
                if response.status_code != 200:
                    await response.aread()
                    raise AssertionError(f"{url}: {response.status_code} {response.text}")
                reading.served_by.append(url)
                stream_id = stream_id or response.headers["x-stream-id"]
                parser = SSEParser()
                async for chunk in response.aiter_bytes():
                    for event in parser.feed(chunk):
                        _took(reading, event)
                        deltas = sum(1 for e in reading.events if e["type"] == "delta")
                        if on_event is not None and deltas >= deltas_before_signal:
                            on_event.set()
        except (httpx2.TransportError, ConnectionResetError):
            await asyncio.sleep(0.2)
    return reading


def _took(reading: Reading, event: SSEEvent) -> None:
    """One event read: kept unless seen before a reconnect; a hand-off raises."""
    payload = event.json()
    if payload.get("resume") is True:
        raise ConnectionResetError("handed off")
    if event.id is not None:
        index = int(event.id)
        if reading.ids and index <= reading.ids[-1]:
            return  # seen before this reconnect
        reading.ids.append(index)
    reading.events.append(payload)


async def post_mid_answer(
    http: httpx2.AsyncClient, urls: list[str], message: str, deltas: int
) -> tuple[Reading, asyncio.Task[Reading]]:
    """POST ``message`` to ``urls[0]`` (reconnecting on the next ones after a cut or a
    hand-off), returned once it has ``deltas`` deltas: what it has read, and its task."""
    reading, mid = Reading(), asyncio.Event()
    post = asyncio.create_task(
        read(
            http,
            reading,
            urls,
            "",
            post={"message": message},
            on_event=mid,
            deltas_before_signal=deltas,
        )
    )
    await asyncio.wait_for(mid.wait(), 30)
    return reading, post


async def follow(
    http: httpx2.AsyncClient, url: str, stream_id: str, reading: Reading | None = None
) -> asyncio.Task[Reading]:
    """A reader of ``stream_id`` on ``url``, returned once it has its first event (so it is
    attached, and a signal sent next finds it reading)."""
    attached = asyncio.Event()
    task = asyncio.create_task(
        read(http, reading or Reading(), [url], stream_id, on_event=attached)
    )
    await asyncio.wait_for(attached.wait(), 20)
    return task


def continuations(emulator: Emulator, prompt: str) -> list[RecordedRequest]:
    """The requests after the first for the stream asked ``prompt``."""
    mine = [r for r in emulator.requests if r.body["messages"][0]["content"] == prompt]
    return mine[1:]


def stream_id_of(reading: Reading) -> str:
    start = reading.events[0]
    assert start["type"] == "start"
    return str(start["stream_id"])


async def open_mid_answer(
    http: httpx2.AsyncClient,
    producer: Server,
    posted_next: list[Server],
    followed_on: list[Server],
    streams: int,
) -> tuple[list[asyncio.Task[Reading]], list[asyncio.Task[Reading]]]:
    """POST ``streams`` questions to ``producer`` (each reader resumes on
    ``posted_next[i % n]`` after a cut), wait until each is mid-answer, and attach a live
    follower to each on ``followed_on[i % n]``: the POST readers and the followers."""
    readings = [Reading() for _ in range(streams)]
    mid_answer = [asyncio.Event() for _ in range(streams)]
    posts = [
        asyncio.create_task(
            read(
                http,
                readings[i],
                [producer.url, posted_next[i % len(posted_next)].url],
                "",
                post={"message": f"question {i}"},
                on_event=mid_answer[i],
                deltas_before_signal=15,
            )
        )
        for i in range(streams)
    ]
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in mid_answer)), 30)
    ids = [stream_id_of(r) for r in readings]
    following = [asyncio.Event() for _ in range(streams)]
    followers = [
        asyncio.create_task(
            read(http, Reading(), [followed_on[i % len(followed_on)].url], ids[i],
                 on_event=following[i])
        )
        for i in range(streams)
    ]  # fmt: skip
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in following)), 30)
    return posts, followers


@ON_A_CLUSTER_TOO
async def test_a_sigkilled_producer_is_taken_over_exactly(
    servers: Servers, emulator: Emulator
) -> None:
    """On the shipped lease (3 s): the one takeover test that waits for it, on one server and
    on a cluster. (A cluster once ran it on the test servers' 0.6 s lease: under make test's
    load a taker's worker stalled past that lease between its claim and its first renewal,
    so a third worker claimed the stream too. That is what a lease means (a producer silent
    for a lease is presumed gone), and the superseded taker stopped, but its continuation
    had been sent: two requests where this test counts one.)"""
    del servers.env["CLAUDE_STREAM_LEASE"]
    a, b, c = await servers.start_many(3)
    # about 5 s an answer; each partial ends in a space, which the continuation says again
    emulator.default = Reply(ANSWER, token_delay=0.04, on_continue="repeat_whitespace")
    streams = 20
    async with httpx2.AsyncClient(timeout=60) as http:
        # after the kill: the POST readers resume on b; followers read live on b and c
        posts, followers = await open_mid_answer(http, a, [b], [b, c], streams)
        killed_at = time.monotonic()
        a.process.kill()
        await a.process.wait()
        assert not any(p.done() for p in followers), "a follower ended before the kill"
        results = await asyncio.wait_for(asyncio.gather(*posts, *followers), 60)
    for reading in results:
        reading.check_exact()
    for index in range(streams):
        again = continuations(emulator, f"question {index}")
        assert len(again) == 1, f"stream {index}: {len(again)} continuation requests"
        assert again[0].received_at > killed_at - 1
    logs = b.output() + c.output()
    assert logs.count("taken over") == streams, "one takeover line per stream"


async def test_an_output_guard_holds_its_windows_across_a_sigkill_takeover(
    servers: Servers, emulator: Emulator, tmp_path: Path
) -> None:
    """Hold mode, the producer SIGKILLed mid-answer: the taker's windows go on where the
    stream's text ends, the guard blocks the window holding ``w090`` once, and no reader
    ever holds a character of it (each window is looked at once, but the one in flight at
    the kill, which is looked at again)."""
    every = 40
    guard_log = tmp_path / "guard.log"
    servers.env.update(
        CLAUDE_OUTPUT_GUARD_MODE="hold",
        CLAUDE_OUTPUT_GUARD_EVERY=str(every),
        HOST_APP_GUARD_WORD="w090",
        HOST_APP_GUARD_LOG=str(guard_log),
    )
    a, b = await servers.start_many(2)
    emulator.default = Reply(ANSWER, token_delay=0.03, on_continue="repeat_whitespace")
    blocked_at = ANSWER.index("w090") // every * every
    async with httpx2.AsyncClient(timeout=60) as http:
        reading, post = await post_mid_answer(http, [a.url, b.url], "guarded", deltas=3)
        a.process.kill()
        await a.process.wait()
        reading = await asyncio.wait_for(post, 60)
    assert reading.last["type"] == "done" and reading.last["stop_reason"] == "blocked"
    assert reading.last["blocked"] == {"reason": "word"}
    assert reading.text == ANSWER[:blocked_at]  # no character of the blocked window
    assert reading.ids == list(range(len(reading.ids)))
    seen = [json.loads(line) for line in guard_log.read_text().splitlines()]
    assert {entry["pid"] for entry in seen} == {a.process.pid, b.process.pid}
    windows = [entry["new"] for entry in seen]
    once = [w for i, w in enumerate(windows) if i == 0 or w != windows[i - 1]]
    assert len(windows) - len(once) <= 1  # the window in flight at the kill, at most
    assert "".join(once) == ANSWER[: blocked_at + every]


async def test_a_takeover_goes_on_with_the_hop_the_stream_was_on(
    servers: Servers, emulator: Emulator
) -> None:
    """The answer fell back before its text, then its producer died: the taker continues on
    the fallback hop, not on the model that failed (no cooldown here to hide a wrong one)."""
    servers.env["CLAUDE_FALLBACKS"] = json.dumps([{"model": NO_PREFILL_MODEL}])
    servers.env["CLAUDE_MAX_RETRIES"] = "0"
    servers.env["CLAUDE_FALLBACK_COOLDOWN"] = "0"
    a, b = await servers.start_many(2)
    emulator.script(ErrorReply(529))
    emulator.default = Reply(ANSWER, token_delay=0.04)
    async with httpx2.AsyncClient(timeout=60) as http:
        posts, followers = await open_mid_answer(http, a, [b], [b], 1)
        a.process.kill()
        await a.process.wait()
        results = await asyncio.wait_for(asyncio.gather(*posts, *followers), 60)
    for reading in results:
        reading.check_exact()
        assert [e["type"] for e in reading.events].count("fallback") == 1
    primary = emulator.requests[0].body["model"]
    assert primary != NO_PREFILL_MODEL
    assert [r.body["model"] for r in emulator.requests] == [
        primary,
        NO_PREFILL_MODEL,
        NO_PREFILL_MODEL,
    ]
    assert results[0].last["model"] == NO_PREFILL_MODEL


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
async def test_a_takeover_continues_a_tool_loop_without_rerunning_finished_tools(
    servers: Servers, emulator: Emulator, tmp_path: Path, signal_name: str
) -> None:
    """The producer dies (or drains) while one of a step's two tools runs: the other worker
    runs only the unfinished one (the finished one's result is in Redis), then the next
    step."""
    tool_log = tmp_path / "tools.log"
    servers.env["HOST_APP_TOOL_LOG"] = str(tool_log)
    a, b = await servers.start_many(2)
    emulator.script(
        Reply(
            "Checking. ",
            tool_calls=[
                ToolUse("fast_lookup", {"key": "k1"}, id="toolu_fast"),
                ToolUse("slow_lookup", {"key": "k2"}, id="toolu_slow"),
            ],
        )
    )
    emulator.default = Reply(ANSWER, token_delay=0.01)
    async with httpx2.AsyncClient(timeout=60) as http:
        reading = Reading()
        post = asyncio.create_task(
            read(http, reading, [a.url, b.url], "", post={"message": "look both up"})
        )
        for _ in range(200):  # until the fast tool's result has been read
            results = [e for e in reading.events if e["type"] == "tool_result"]
            if any(e.get("id") == "toolu_fast" for e in results):
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"no fast result: {reading.events}")
        assert "slow-start k2" in tool_log.read_text()
        a.process.send_signal(getattr(signal, signal_name))  # mid slow_lookup
        await asyncio.wait_for(a.process.wait(), SHUTDOWN_GRACE + 5)
        result = await asyncio.wait_for(post, 60)
    assert result.last.get("type") == "done", result.last
    assert result.ids == list(range(len(result.ids)))
    assert result.text == "Checking. " + ANSWER
    types = [e["type"] for e in result.events]
    assert types.count("tool_call") == 2 and types.count("tool_result") == 2
    runs = [line.rsplit(" ", 1)[0] for line in tool_log.read_text().splitlines()]
    assert runs.count("fast k1") == 1  # finished before the kill: never run again
    assert runs.count("slow-start k2") == 2 and runs.count("slow-done k2") == 1
    assert len(emulator.requests) == 2  # step 1 (before the kill), step 2 (after)
    answered = emulator.requests[1].body["messages"][-1]["content"]
    assert [block["tool_use_id"] for block in answered] == ["toolu_fast", "toolu_slow"]
    assert answered[0]["content"] == "fast value of k1"
    if signal_name == "SIGTERM":
        assert "handed off 1 stream(s)" in a.output()


@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGTERM"])
async def test_a_conversation_turn_taken_over_is_stored_once(
    servers: Servers, emulator: Emulator, tmp_path: Path, signal_name: str
) -> None:
    """Conversations in one SQLite file for both workers, no auth (the anonymous cookie
    follows the reader): the producer dies (or drains) mid-answer; the worker that finishes
    the turn stores it, once, complete, and its hook runs once."""
    turn_log = servers.with_conversations(tmp_path)
    a, b = await servers.start_many(2)
    emulator.default = Reply(ANSWER, token_delay=0.03)
    async with httpx2.AsyncClient(timeout=60) as http:
        _, post = await post_mid_answer(http, [a.url, b.url], "a stored question", 10)
        a.process.send_signal(getattr(signal, signal_name))
        await asyncio.wait_for(a.process.wait(), SHUTDOWN_GRACE + 5)
        result = await asyncio.wait_for(post, 60)
        result.check_exact()
        assert result.served_by == [a.url, b.url]  # finished by the other worker
        cid = result.events[0]["conversation_id"]
        message_id = result.events[0]["assistant_message_id"]

        def stored() -> bool:
            return f"{message_id} complete" in (turn_log.read_text() if turn_log.exists() else "")

        await eventually(stored, within=15)
        read_back = (await http.get(f"{b.url}/conversations/{cid}")).json()
    answer = read_back["messages"][1]
    assert [m["role"] for m in read_back["messages"]] == ["user", "assistant"]
    assert answer["id"] == message_id and answer["status"] == "complete"
    assert "".join(b["text"] for b in answer["content"] if b["type"] == "text") == ANSWER
    assert turn_log.read_text().splitlines() == [f"{message_id} complete"]  # once, anywhere


async def test_takeover_sums_usage_over_every_request(servers: Servers, emulator: Emulator) -> None:
    a, b = await servers.start_many(2)
    emulator.default = Reply(ANSWER, token_delay=0.04, input_tokens=100)
    async with httpx2.AsyncClient(timeout=60) as http:
        _, post = await post_mid_answer(http, [a.url, b.url], "hi", 20)
        a.process.kill()
        result = await asyncio.wait_for(post, 60)
    result.check_exact()
    assert len(emulator.requests) == 2
    assert result.last["usage"]["input_tokens"] == 200  # both requests' input
    assert result.last["usage"]["output_tokens"] >= WORDS  # the first's deltas, the rest's


async def test_a_paused_producer_appends_nothing_after_the_takeover(
    servers: Servers, emulator: Emulator, redis_url: str
) -> None:
    a, b = await servers.start_many(2)
    long_answer = " ".join(f"p{i:03d}" for i in range(400))
    emulator.default = Reply(long_answer, token_delay=0.03)  # 12 s
    async with httpx2.AsyncClient(timeout=60) as http:
        reading, post = await post_mid_answer(http, [a.url], "hi", 10)
        stream_id = stream_id_of(reading)
        follower = await follow(http, b.url, stream_id)
        a.process.send_signal(signal.SIGSTOP)  # a long GC, a stalled host
        await emulator.wait_for_requests(2, within=20)  # b took it over and continued
        await asyncio.sleep(1.0)
        a.process.send_signal(signal.SIGCONT)
        original = emulator.requests[0]
        await asyncio.wait_for(original.ended.wait(), 10)
        assert original.outcome == "disconnected"  # a stopped its upstream request
        followed = await asyncio.wait_for(follower, 60)
        post.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await post
    assert followed.last.get("type") == "done"
    assert followed.ids == list(range(len(followed.ids)))
    assert followed.text == long_answer
    client = aioredis.from_url(redis_url)
    try:
        count = await client.xlen(f"qc:{{{stream_id}}}:ev")
    finally:
        await client.aclose()
    assert count == len(followed.ids)  # nothing else was written
    assert "taken over by another worker; stopping here" in a.output()


@ON_A_CLUSTER_TOO
async def test_sigterm_hands_every_stream_to_the_others(
    servers: Servers, emulator: Emulator
) -> None:
    # a hand-off is claimed at once, whatever the lease; the shipped one keeps a worker that
    # just took ten streams over (and is slow to renew on this loaded machine) their producer
    servers.env["CLAUDE_STREAM_LEASE"] = "3"
    a, b, c = await servers.start_many(3)
    emulator.default = Reply(ANSWER, token_delay=0.04, on_continue="repeat_whitespace")
    streams = 20
    async with httpx2.AsyncClient(timeout=60) as http:
        posts, followers = await open_mid_answer(http, a, [b, c], [c, b], streams)
        started = time.monotonic()
        a.process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(a.process.wait(), SHUTDOWN_GRACE + 5)
        exited_after = time.monotonic() - started
        results = await asyncio.wait_for(asyncio.gather(*posts, *followers), 60)
    assert exited_after < SHUTDOWN_GRACE
    for reading in results:
        reading.check_exact()
    for index in range(streams):
        assert len(continuations(emulator, f"question {index}")) == 1
    assert "handed off 20 stream(s)" in a.output()
    assert (b.output() + c.output()).count("(hand-off)") == streams


async def test_two_crashes_are_survived_and_a_third_is_unavailable(
    servers: Servers, emulator: Emulator
) -> None:
    long_answer = " ".join(f"q{i:03d}" for i in range(600))
    # 30 s: long enough that three crashes, two restarts and a lease each
    # fit inside it on a loaded CI machine (at 12 s, the answer once finished
    # before the third crash)
    emulator.default = Reply(long_answer, token_delay=0.05)
    a, b = await servers.start_many(2)
    async with httpx2.AsyncClient(timeout=60) as http:
        reading, post = await post_mid_answer(http, [a.url], "hi", 5)
        stream_id = stream_id_of(reading)
        survivor = Reading()

        async def progressed(reading: Reading, deltas: int) -> None:
            while sum(1 for e in reading.events if e["type"] == "delta") < deltas:  # noqa: ASYNC110
                await asyncio.sleep(0.05)

        # crash 1: a dies, b's reader claims it
        on_b = await follow(http, b.url, stream_id, survivor)
        a.process.kill()
        await emulator.wait_for_requests(2, within=20)
        await asyncio.wait_for(progressed(survivor, len(survivor.events) + 5), 20)
        # crash 2: b dies, a reader on a restarted a claims it
        a2 = await servers.start(a.port)
        second = Reading()
        on_a2 = await follow(http, a2.url, stream_id, second)
        b.process.kill()
        await emulator.wait_for_requests(3, within=20)
        await asyncio.wait_for(progressed(second, 5), 20)
        # crash 3: a2 dies; the reader on a restarted b may not claim it again
        b2 = await servers.start(b.port)
        third = await follow(http, b2.url, stream_id)
        a2.process.kill()
        ended = await asyncio.wait_for(third, 30)
        for task in (post, on_b, on_a2):
            task.cancel()
        await asyncio.gather(post, on_b, on_a2, return_exceptions=True)
    assert ended.last["type"] == "error" and ended.last["error"] == "unavailable"
    assert ended.last["retryable"] is True
    assert len(emulator.requests) == 3  # two continuations, no third
    assert long_answer.startswith(ended.text)  # what it got was exact


# -- the topology to recommend ---------------------------------------------------------


@pytest.mark.deps  # Hypercorn's worker supervision: a release may change it
async def test_hypercorn_workers_all_stop_when_one_is_killed(tmp_path: Path) -> None:
    """Why deploy/ runs one ``hypercorn -w 0`` per port under a process manager instead of
    ``hypercorn -w N``: Hypercorn 0.18 stops every worker when one dies (its parent treats a
    non-zero exit as a shutdown), so one OOM-kill would end every stream on the host. If a
    release changes this, this test says so and the recommendation can be revisited."""
    port = free_port()
    log = (tmp_path / "workers.log").open("wb")
    parent = await asyncio.create_subprocess_exec(
        HYPERCORN, "-w", "2", "-b", f"127.0.0.1:{port}", "tests.host_app:app",
        cwd=ROOT, stdout=log, stderr=log,
        env={**os.environ, "CLAUDE_API_KEY": "sk-test", "CLAUDE_BASE_URL": "http://127.0.0.1:9"},
    )  # fmt: skip
    try:
        await wait_ready(f"http://127.0.0.1:{port}/health", parent)
        workers = worker_pids(parent.pid)
        for _ in range(100):  # the second may still be starting
            if len(workers) == 2:
                break
            await asyncio.sleep(0.1)
            workers = worker_pids(parent.pid)
        assert len(workers) == 2, workers
        os.kill(workers[0], signal.SIGKILL)
        await asyncio.wait_for(parent.wait(), 15)  # the whole server went away
        with contextlib.suppress(ProcessLookupError):  # ...the other worker too
            for _ in range(100):
                os.kill(workers[1], 0)
                await asyncio.sleep(0.1)
            raise AssertionError("the other worker outlived its parent")
    finally:
        if parent.returncode is None:
            parent.kill()
            await parent.wait()
        log.close()


def worker_pids(parent: int) -> list[int]:
    """The worker processes Hypercorn spawned (multiprocessing's, not its resource tracker)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            command = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and b"spawn_main" in command:
            found.append(int(entry.name))
    return sorted(found)


def test_the_shipped_systemd_unit_verifies(tmp_path: Path) -> None:
    """deploy/systemd/quart-claude@.service, with this machine's paths, passes
    ``systemd-analyze verify`` without a warning."""
    analyze = binaries.need("systemd")
    unit = (ROOT / "deploy" / "systemd" / "quart-claude@.service").read_text()
    unit = unit.replace("/srv/quart-claude/.venv/bin/hypercorn", HYPERCORN)
    unit = unit.replace("User=quart-claude", f"User={getpass.getuser()}")
    instance = tmp_path / "quart-claude@8001.service"
    instance.write_text(unit)
    result = subprocess.run(
        [analyze, "verify", str(instance)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "" and result.stdout.strip() == "", result.stderr
    assert "--workers 0" in unit and "Restart=always" in unit


async def test_identity_and_stop_hold_across_a_takeover(
    servers: Servers, emulator: Emulator
) -> None:
    """The owner is stored with the stream: after a takeover another identity still gets 404,
    the owner's DELETE stops the new producer's upstream request, readers get cancelled."""
    servers.env["CLAUDE_API_TOKENS"] = "token-alice,token-bob"
    alice = {"Authorization": "Bearer token-alice"}
    bob = {"Authorization": "Bearer token-bob"}
    long_answer = " ".join(f"s{i:03d}" for i in range(500))
    emulator.default = Reply(long_answer, token_delay=0.03)
    a, b = await servers.start_many(2)
    async with httpx2.AsyncClient(timeout=60, headers=alice) as http:
        reading, post = await post_mid_answer(http, [a.url], "hi", 5)
        stream_id = stream_id_of(reading)
        follower = await follow(http, b.url, stream_id)
        a.process.kill()
        await emulator.wait_for_requests(2, within=20)  # b continues it
        path = f"{b.url}/chat/stream/{stream_id}"
        assert (await http.get(path, headers=bob)).status_code == 404
        assert (await http.delete(path, headers=bob)).status_code == 404
        stopped = await http.delete(path)
        assert stopped.json() == {"stream_id": stream_id, "status": "cancelled"}
        followed = await asyncio.wait_for(follower, 20)
        post.cancel()
        await asyncio.gather(post, return_exceptions=True)
    assert followed.last["type"] == "done" and followed.last["stop_reason"] == "cancelled"
    assert followed.ids == list(range(len(followed.ids)))
    assert long_answer.startswith(followed.text)
    continuation = emulator.requests[1]
    await asyncio.wait_for(continuation.ended.wait(), 5)
    assert continuation.outcome == "disconnected"


async def test_nobody_pays_for_a_stream_nobody_came_back_for(
    servers: Servers, emulator: Emulator
) -> None:
    """The producer dies with no reader elsewhere; a resume after ``CLAUDE_RESUME_GRACE``
    (plus the lease) is told ``unavailable``, and no continuation is requested."""
    servers.env["CLAUDE_RESUME_GRACE"] = "1"
    emulator.default = Reply(ANSWER, token_delay=0.05)
    a, b = await servers.start_many(2)
    async with httpx2.AsyncClient(timeout=60) as http:
        reading, post = await post_mid_answer(http, [a.url], "hi", 5)
        a.process.kill()
        await asyncio.sleep(LEASE + 1 + 1.5)  # the lease, the grace, and a second of slack
        late = await asyncio.wait_for(read(http, Reading(), [b.url], stream_id_of(reading)), 20)
        post.cancel()
        await asyncio.gather(post, return_exceptions=True)
    assert late.last["type"] == "error" and late.last["error"] == "unavailable"
    assert len(emulator.requests) == 1  # nobody paid for the rest
