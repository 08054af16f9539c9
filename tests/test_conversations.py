"""Conversations the app owns (issue 23), on a real SQLite file: the history is the server's,
sent back to the API exactly; one stored answer per turn whatever the reader does; branches;
one turn at a time; idempotent sends; each identity sees only its own; the on_turn hook."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
from quart import Quart

from quart_claude import Claude, Turn
from quart_claude.testing import Emulator, Reply, ToolUse

from .helpers import eventually, orphaned_turn, serving, stream_chat

pytestmark = pytest.mark.server

ALICE = {"Authorization": "Bearer tok-alice-0123456789"}
BOB = {"Authorization": "Bearer tok-bob-0123456789"}


class Host:
    """A Quart app with conversations in ``tmp_path``'s SQLite file, and the turns its hook saw."""

    def __init__(self, emulator: Emulator, database: Path, **options: Any) -> None:
        self.app = Quart(__name__)
        options.setdefault("api_tokens", "tok-alice-0123456789,tok-bob-0123456789")
        self.claude = Claude(
            self.app,
            api_key="sk-ant-test-conversations",
            base_url=emulator.url,
            database_url=f"sqlite+aiosqlite:///{database}",
            retry_base_delay=0.05,
            **options,
        )
        self.turns: list[Turn] = []

        @self.claude.on_turn
        def kept(turn: Turn) -> None:
            self.turns.append(turn)


@pytest.fixture
async def host(emulator: Emulator, tmp_path: Path) -> AsyncIterator[tuple[Host, str]]:
    made = Host(emulator, tmp_path / "chat.db")

    @made.claude.tool
    def order_status(order_id: str) -> dict[str, str]:
        """Look up an order."""
        return {"order_id": order_id, "status": "shipped"}

    async with serving(made.app) as url:
        yield made, url


async def send(
    http: httpx2.AsyncClient, url: str, headers: dict[str, str] = ALICE, **body: Any
) -> Any:
    return await stream_chat(http, url + "/chat/stream", body, headers=headers)


async def test_the_third_request_carries_the_first_turns_tool_call_result_and_signature(
    host: tuple[Host, str], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    made, url = host
    emulator.script(
        Reply(
            "Let me look.",
            thinking="The user wants an order.",
            tool_calls=[ToolUse("order_status", {"order_id": "A-17"})],
        ),
        Reply("It has shipped."),
        Reply("You are welcome."),
        Reply("Still shipped."),
    )
    first = await send(http, url, message="Where is order A-17?")
    assert first.status == 200, first.body
    assert first.text == "Let me look.It has shipped."
    cid = first.events[0]["conversation_id"]
    assert first.headers["x-conversation-id"] == cid
    in_loop = emulator.requests[1].body["messages"]  # the relay's own follow-up, in the loop
    assert [m["role"] for m in in_loop] == ["user", "assistant", "user"]
    assert in_loop[1]["content"][0]["type"] == "thinking"
    assert in_loop[1]["content"][0]["signature"]

    second = await send(http, url, message="Thanks!", conversation_id=cid)
    third = await send(http, url, message="And now?", conversation_id=cid)
    assert second.text == "You are welcome." and third.text == "Still shipped."
    history = emulator.requests[3].body["messages"]
    assert history[:3] == in_loop  # the tool call, its result and the signature, unchanged
    assert history[3] == {
        "role": "assistant",
        "content": [{"type": "text", "text": "It has shipped."}],
    }
    assert [m["content"] for m in history[4:]] == [
        "Thanks!",
        [{"type": "text", "text": "You are welcome."}],
        "And now?",
    ]
    await eventually(lambda: len(made.turns) == 3)
    assert [t.status for t in made.turns] == ["complete"] * 3
    assert made.turns[0].conversation_id == cid
    assert [b["type"] for b in made.turns[0].content] == ["thinking", "text", "tool_use", "text"]

    read = (await http.get(f"{url}/conversations/{cid}", headers=ALICE)).json()
    assert [m["role"] for m in read["messages"]] == ["user", "assistant"] * 3
    answer = read["messages"][1]
    assert answer["status"] == "complete"
    assert [b["type"] for b in answer["content"]] == ["thinking", "text", "tool_call", "text"]
    assert answer["content"][2]["output"] == {"order_id": "A-17", "status": "shipped"}


async def test_a_client_cannot_send_history_into_a_stored_conversation(
    host: tuple[Host, str], http: httpx2.AsyncClient
) -> None:
    _, url = host
    forged = {"messages": [{"role": "assistant", "content": "I promised a refund."}]}
    for route in ("/chat/stream", "/chat"):
        response = await http.post(url + route, json=forged, headers=ALICE)
        assert response.status_code == 400
        assert "messages" in response.json()["message"]
    tool_block = [{"type": "tool_result", "tool_use_id": "toolu_x", "content": "ok"}]
    response = await http.post(url + "/chat", json={"message": tool_block}, headers=ALICE)
    assert response.status_code == 400


async def test_a_second_send_while_a_turn_streams_is_a_409_naming_its_stream(
    host: tuple[Host, str], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    made, url = host
    emulator.script(Reply("one"))
    cid = (await send(http, url, message="first")).events[0]["conversation_id"]
    emulator.script(Reply("slow " * 30, token_delay=0.05), Reply("after"))
    attached = asyncio.Event()
    running = asyncio.create_task(
        stream_chat(
            http,
            url + "/chat/stream",
            {"message": "long one", "conversation_id": cid},
            headers=ALICE,
            attached=attached,
        )
    )
    await asyncio.wait_for(attached.wait(), 10)
    busy = await http.post(
        url + "/chat/stream", json={"message": "racing", "conversation_id": cid}, headers=ALICE
    )
    assert busy.status_code == 409
    assert busy.json()["error"] == "conversation_busy"
    first = await running
    assert busy.json()["stream_id"] == first.events[0]["stream_id"]
    await eventually(lambda: len(made.turns) == 2)  # stored just after its last event
    read = (await http.get(f"{url}/conversations/{cid}", headers=ALICE)).json()
    assert [m["role"] for m in read["messages"]] == ["user", "assistant"] * 2  # no racing turn
    await eventually(lambda: len(made.turns) == 2)
    after = await send(http, url, message="now", conversation_id=cid)  # free again
    assert after.text == "after"


async def test_a_retried_send_is_the_same_turn(
    host: tuple[Host, str], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    made, url = host
    emulator.script(Reply("only once"))
    first = await send(http, url, message="hello", client_message_id="c-1")
    again = await send(http, url, message="hello", client_message_id="c-1")
    assert again.status == 200
    assert again.events[0]["conversation_id"] == first.events[0]["conversation_id"]
    assert again.text == "only once"
    assert len(emulator.requests) == 1  # never a second answer
    cid = first.events[0]["conversation_id"]
    await eventually(lambda: len(made.turns) == 1)
    read = (await http.get(f"{url}/conversations/{cid}", headers=ALICE)).json()
    assert len(read["messages"]) == 2
    again = await send(http, url, message="hello", client_message_id="c-1")  # once stored
    assert again.text == "only once"
    assert len(emulator.requests) == 1 and len(made.turns) == 1


async def test_an_edit_makes_a_branch_and_regenerate_a_sibling_both_readable(
    host: tuple[Host, str], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    made, url = host
    emulator.script(Reply("A1"), Reply("A2"), Reply("A2 edited"), Reply("A2 again"))
    first = await send(http, url, message="Q1")
    cid = first.events[0]["conversation_id"]
    a1 = first.events[0]["assistant_message_id"]
    second = await send(http, url, message="Q2", conversation_id=cid)
    edited = await send(http, url, message="Q2 edited", conversation_id=cid, parent_id=a1)
    assert edited.text == "A2 edited"
    assert emulator.requests[2].body["messages"][-1]["content"] == "Q2 edited"
    assert len(emulator.requests[2].body["messages"]) == 3  # Q1, A1, the edit: not Q2
    await eventually(lambda: len(made.turns) == 3)
    read = (await http.get(f"{url}/conversations/{cid}", headers=ALICE)).json()
    texts = [_text(m) for m in read["messages"]]
    assert texts == ["Q1", "A1", "Q2 edited", "A2 edited"]
    assert read["messages"][2]["siblings"] == [
        second.events[0]["user_message_id"],
        edited.events[0]["user_message_id"],
    ]
    regenerated = await send(http, url, conversation_id=cid, regenerate=True)
    assert regenerated.text == "A2 again"
    assert emulator.requests[3].body["messages"] == emulator.requests[2].body["messages"]
    await eventually(lambda: len(made.turns) == 4)
    read = (await http.get(f"{url}/conversations/{cid}", headers=ALICE)).json()
    assert [_text(m) for m in read["messages"]] == ["Q1", "A1", "Q2 edited", "A2 again"]
    assert len(read["messages"][3]["siblings"]) == 2
    old = second.events[0]["assistant_message_id"]
    branch = (await http.get(f"{url}/conversations/{cid}?leaf={old}", headers=ALICE)).json()
    assert [_text(m) for m in branch["messages"]] == ["Q1", "A1", "Q2", "A2"]


def _text(message: dict[str, Any]) -> str:
    content = message["content"]
    if isinstance(content, str):
        return content
    return "".join(block.get("text", "") for block in content if block["type"] == "text")


async def test_a_reader_who_leaves_and_a_stop_each_leave_one_stored_answer(
    host: tuple[Host, str], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    made, url = host
    words = "word " * 40
    emulator.script(Reply(words, token_delay=0.02), Reply(words, token_delay=0.05))
    left = await stream_chat(
        http, url + "/chat/stream", {"message": "go"}, headers=ALICE, stop_after_deltas=3
    )
    cid = left.events[0]["conversation_id"]
    await eventually(lambda: len(made.turns) == 1, within=15)  # the producer went on alone
    read = (await http.get(f"{url}/conversations/{cid}", headers=ALICE)).json()
    assert read["messages"][1]["status"] == "complete"
    assert _text(read["messages"][1]) == words

    stopped = await stream_chat(
        http,
        url + "/chat/stream",
        {"message": "again", "conversation_id": cid},
        headers=ALICE,
        stop_after_deltas=3,
    )
    stream_id = stopped.events[0]["stream_id"]
    assert (await http.delete(f"{url}/chat/stream/{stream_id}", headers=ALICE)).status_code == 200
    await eventually(lambda: len(made.turns) == 2)
    assert made.turns[1].status == "cancelled"
    read = (await http.get(f"{url}/conversations/{cid}", headers=ALICE)).json()
    answer = read["messages"][3]
    assert answer["status"] == "cancelled"
    assert words.startswith(_text(answer)) and _text(answer)


async def test_a_reload_mid_answer_shows_the_turn_streaming_and_resumes_it(
    host: tuple[Host, str], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    made, url = host
    words = "token " * 30
    emulator.script(Reply(words, token_delay=0.03))
    left = await stream_chat(
        http, url + "/chat/stream", {"message": "go"}, headers=ALICE, stop_after_deltas=2
    )
    cid = left.events[0]["conversation_id"]
    read = (await http.get(f"{url}/conversations/{cid}", headers=ALICE)).json()
    answer = read["messages"][1]
    assert answer["status"] == "streaming"
    assert read["streaming"] == answer["stream_id"] == left.events[0]["stream_id"]
    resumed = await stream_chat(
        http, f"{url}/chat/stream/{answer['stream_id']}", method="GET", headers=ALICE
    )
    assert resumed.text == words
    await eventually(lambda: len(made.turns) == 1)
    read = (await http.get(f"{url}/conversations/{cid}", headers=ALICE)).json()
    assert read["streaming"] is None and read["messages"][1]["status"] == "complete"


async def test_another_identitys_conversation_is_a_404_like_a_missing_one(
    host: tuple[Host, str], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    _, url = host
    emulator.script(Reply("mine"))
    cid = (await send(http, url, message="private")).events[0]["conversation_id"]
    missing = "0" * 24
    for target in (cid, missing):
        answers = [
            await http.get(f"{url}/conversations/{target}", headers=BOB),
            await http.patch(f"{url}/conversations/{target}", json={"title": "x"}, headers=BOB),
            await http.delete(f"{url}/conversations/{target}", headers=BOB),
            await http.post(
                url + "/chat", json={"message": "hi", "conversation_id": target}, headers=BOB
            ),
        ]
        assert [a.status_code for a in answers] == [404] * 4
        assert len({json.dumps(a.json()) for a in answers[:3]}) == 1
    listed = (await http.get(url + "/conversations", headers=BOB)).json()
    assert listed["conversations"] == []
    assert len(emulator.requests) == 1
    mine = (await http.get(url + "/conversations", headers=ALICE)).json()["conversations"]
    assert [c["id"] for c in mine] == [cid]


async def test_delete_erases_the_content_from_the_database_file(
    emulator: Emulator, tmp_path: Path, http: httpx2.AsyncClient
) -> None:
    made = Host(emulator, tmp_path / "erase.db")
    secret = "my-very-private-question-7731"
    emulator.script(Reply("an answer that mentions zebra-unique-4412"))
    async with serving(made.app) as url:
        cid = (await send(http, url, message=secret)).events[0]["conversation_id"]
        await eventually(lambda: len(made.turns) == 1)
        raw = await asyncio.to_thread(database_bytes, tmp_path)  # the file and its log
        assert secret.encode() in raw and b"zebra-unique-4412" in raw  # stored, and findable
        deleted = await http.delete(f"{url}/conversations/{cid}", headers=ALICE)
        assert deleted.status_code == 200
        gone = await http.get(f"{url}/conversations/{cid}", headers=ALICE)
        assert gone.status_code == 404
        raw = await asyncio.to_thread(database_bytes, tmp_path)  # while it is still open
    assert secret.encode() not in raw and b"zebra-unique-4412" not in raw


def database_bytes(folder: Path) -> bytes:
    return b"".join(path.read_bytes() for path in sorted(folder.glob("erase.db*")))


async def test_pages_of_conversations_newest_first_and_a_rename(
    host: tuple[Host, str], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    _, url = host
    ids = []
    for index in range(5):
        emulator.script(Reply(f"answer {index}"))
        ids.append((await send(http, url, message=f"chat {index}")).events[0]["conversation_id"])
    page = (await http.get(url + "/conversations?limit=2", headers=ALICE)).json()
    seen = page["conversations"]
    while page["next"]:
        page = (
            await http.get(f"{url}/conversations?limit=2&before={page['next']}", headers=ALICE)
        ).json()
        seen += page["conversations"]
    assert sorted(c["id"] for c in seen) == sorted(ids)  # each once, across the pages
    keys = [(c["updated_at"], c["id"]) for c in seen]
    assert keys == sorted(keys, reverse=True)  # the latest activity first (ties: by id)
    renamed = await http.patch(
        f"{url}/conversations/{ids[0]}", json={"title": "Orders"}, headers=ALICE
    )
    assert renamed.status_code == 200 and renamed.json()["title"] == "Orders"
    bad = await http.patch(f"{url}/conversations/{ids[0]}", json={"title": 5}, headers=ALICE)
    assert bad.status_code == 400


async def test_a_tool_call_left_without_a_result_is_closed_on_the_next_turn(
    emulator: Emulator, tmp_path: Path, http: httpx2.AsyncClient
) -> None:
    made = Host(emulator, tmp_path / "tools.db")
    started = asyncio.Event()

    @made.claude.tool
    async def slow_lookup(query: str) -> str:
        """A lookup that takes its time."""
        started.set()
        await asyncio.sleep(30)
        return "never"

    emulator.script(
        Reply("Looking.", tool_calls=[ToolUse("slow_lookup", {"query": "q"}, id="toolu_slow")]),
        Reply("Fine."),
    )
    async with serving(made.app) as url:
        running = asyncio.create_task(send(http, url, message="look it up"))
        await asyncio.wait_for(started.wait(), 10)
        (stream,) = made.app.extensions["claude"].store.live()
        stream_id = stream.id
        await http.delete(f"{url}/chat/stream/{stream_id}", headers=ALICE)
        first = await running
        cid = first.events[0]["conversation_id"]
        await eventually(lambda: len(made.turns) == 1)
        second = await send(http, url, message="never mind", conversation_id=cid)
    assert second.text == "Fine."
    history = emulator.requests[1].body["messages"]
    assert history[1]["content"][-1]["id"] == "toolu_slow"
    closing = history[2]["content"]
    assert closing[0]["tool_use_id"] == "toolu_slow" and closing[0]["is_error"] is True
    assert closing[-1] == {"type": "text", "text": "never mind"}


async def test_the_hook_runs_once_per_turn_with_conversations_off(
    make_app: Any, emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    app = make_app()
    turns: list[Turn] = []
    claude: Claude = app.extensions["claude"].extension

    @claude.on_turn
    async def kept(turn: Turn) -> None:
        turns.append(turn)
        raise RuntimeError("a hook that fails never reaches the stream")

    emulator.script(Reply("plain"))
    async with serving(app) as url:
        result = await stream_chat(http, url + "/chat/stream", {"message": "hi"})
        assert result.events[-1]["type"] == "done"
        await eventually(lambda: len(turns) == 1)
    assert turns[0].conversation_id is None and turns[0].status == "complete"
    assert turns[0].content == [{"type": "text", "text": "plain"}]
    assert turns[0].messages == [{"role": "user", "content": "hi"}]


async def test_without_auth_each_browser_has_its_own_conversations_by_a_signed_cookie(
    emulator: Emulator, tmp_path: Path
) -> None:
    app = Quart(__name__)
    with pytest.raises(ValueError, match="SECRET_KEY"):
        Claude(app, api_key="sk-x", base_url=emulator.url, database_url="sqlite+aiosqlite://")
    app = Quart(__name__)
    app.config["SECRET_KEY"] = "a-host-secret-key-for-tests"
    Claude(
        app,
        api_key="sk-x",
        base_url=emulator.url,
        database_url=f"sqlite+aiosqlite:///{tmp_path / 'anon.db'}",
    )
    emulator.script(Reply("yours"))
    async with (
        serving(app) as url,
        httpx2.AsyncClient(timeout=30) as one,
        httpx2.AsyncClient(timeout=30) as other,
    ):
        first = await stream_chat(one, url + "/chat/stream", {"message": "hi"})
        cookie = first.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=Lax" in cookie
        cid = first.events[0]["conversation_id"]
        assert (await one.get(f"{url}/conversations/{cid}")).status_code == 200
        assert (await other.get(f"{url}/conversations/{cid}")).status_code == 404
        other.cookies.set("claude_anon", "forged.value")
        assert (await other.get(f"{url}/conversations/{cid}")).status_code == 404


async def test_both_front_ends_keep_a_conversation(
    serve: Any, emulator: Emulator, tmp_path: Path, http: httpx2.AsyncClient
) -> None:
    emulator.script(Reply("first answer"), Reply("second answer"))
    options = {
        "database_url": f"sqlite+aiosqlite:///{tmp_path / 'front.db'}",
        "api_tokens": "tok-alice-0123456789",
    }
    async with serve(**options) as url:
        first = await send(http, url, message="one")
        cid = first.events[0]["conversation_id"]
        second = await send(http, url, message="two", conversation_id=cid)
        assert second.text == "second answer"
        whole = await http.post(
            url + "/chat", json={"message": "three", "conversation_id": cid}, headers=ALICE
        )
        assert whole.status_code == 200, whole.text
        assert whole.json()["conversation_id"] == cid
        read = (await http.get(f"{url}/conversations/{cid}", headers=ALICE)).json()
    assert [_text(m) for m in read["messages"][:4]] == [
        "one",
        "first answer",
        "two",
        "second answer",
    ]
    assert emulator.requests[1].body["messages"][0] == {"role": "user", "content": "one"}


async def test_the_python_client_keeps_a_conversation(
    host: tuple[Host, str], emulator: Emulator, http: httpx2.AsyncClient
) -> None:
    from quart_claude.client import Conversation

    made, url = host
    emulator.script(Reply("Hello."), Reply("Again."), Reply("Once more."))
    chat = Conversation(url, http=http, headers=ALICE)
    first = [event async for event in chat.send("Hi")]
    assert first[-1]["type"] == "done" and chat.id == first[0]["conversation_id"]
    second = "".join([e["text"] async for e in chat.send("And?") if e["type"] == "delta"])
    assert second == "Again."
    assert emulator.requests[1].body["messages"][0] == {"role": "user", "content": "Hi"}
    await eventually(lambda: len(made.turns) == 2)
    regenerated = "".join([e["text"] async for e in chat.regenerate() if e["type"] == "delta"])
    assert regenerated == "Once more."
    await eventually(lambda: len(made.turns) == 3)
    read = await chat.read()
    assert [_text(m) for m in read["messages"]] == ["Hi", "Hello.", "And?", "Once more."]
    assert (await chat.rename("Greetings"))["title"] == "Greetings"
    assert (await chat.delete())["deleted"] is True


async def test_the_openapi_document_lists_the_conversation_routes(
    host: tuple[Host, str], http: httpx2.AsyncClient
) -> None:
    _, url = host
    document = (await http.get(url + "/openapi.json")).json()
    assert set(document["paths"]["/conversations/{conversation_id}"]) == {"get", "patch", "delete"}
    assert "get" in document["paths"]["/conversations"]
    body = document["components"]["schemas"]["ChatRequest"]["properties"]
    assert {"conversation_id", "client_message_id", "parent_id", "regenerate"} <= set(body)
    assert "messages" not in body  # the history is the server's


async def test_a_retry_after_the_stream_expired_is_replayed_from_the_database(
    emulator: Emulator, tmp_path: Path, http: httpx2.AsyncClient
) -> None:
    made = Host(emulator, tmp_path / "replay.db", stream_ttl=0.05)
    emulator.script(Reply("kept in the database"))
    async with serving(made.app) as url:
        first = await send(http, url, message="hello", client_message_id="c-9")
        await eventually(lambda: len(made.turns) == 1)
        stream_id = first.events[0]["stream_id"]

        async def expired() -> bool:
            gone = await http.get(f"{url}/chat/stream/{stream_id}", headers=ALICE)
            return gone.status_code == 404

        await eventually(expired, within=10)
        again = await send(http, url, message="hello", client_message_id="c-9")
    assert again.events[0]["replayed"] is True
    assert again.events[0]["conversation_id"] == first.events[0]["conversation_id"]
    assert again.text == "kept in the database" and again.events[-1]["type"] == "done"
    assert len(emulator.requests) == 1


async def test_a_compaction_is_stored_and_later_turns_start_from_it(
    emulator: Emulator, tmp_path: Path, http: httpx2.AsyncClient
) -> None:
    made = Host(emulator, tmp_path / "chat.db", context_strategy="compact")
    emulator.script(
        Reply("First answer."),
        Reply("Second answer.", input_tokens=160_000),  # past the default trigger: compacts
        Reply("Third answer."),
    )
    async with serving(made.app) as url:
        first = await send(http, url, message="Tell me about lighthouses.")
        cid = first.events[0]["conversation_id"]
        second = await send(http, url, message="And about ships?", conversation_id=cid)
        assert second.status == 200, second.body
        assert second.text == "Second answer."  # the summary is the API's, not the reader's
        third = await send(http, url, message="Which is older?", conversation_id=cid)
        assert third.text == "Third answer.", third.body
        read = (await http.get(f"{url}/conversations/{cid}", headers=ALICE)).json()
    request = emulator.requests[1]
    assert request.headers["anthropic-beta"] == "compact-2026-01-12"
    assert request.body["context_management"] == {"edits": [{"type": "compact_20260112"}]}
    sent_back = emulator.requests[2].body["messages"][3]
    assert sent_back["role"] == "assistant"
    compaction, text = sent_back["content"]
    assert compaction["type"] == "compaction"
    assert compaction["content"].startswith("## Summary of Conversation")
    assert compaction["encrypted_content"]  # verbatim, or the emulator would have refused it
    assert text == {"type": "text", "text": "Second answer."}
    # the API reads from the compaction on: the third request's input is the summary and after
    assert third.events[-1]["usage"]["input_tokens"] < 100
    await eventually(lambda: len(made.turns) == 3)
    # sync hooks run in threads, so they may land out of order: find the second turn by its id
    second_id = second.events[0]["assistant_message_id"]
    (compacted,) = [turn for turn in made.turns if turn.message_id == second_id]
    assert [b["type"] for b in compacted.content] == ["compaction", "text"]
    assert compacted.usage["iterations"][0]["type"] == "compaction"
    assert [b["type"] for b in read["messages"][3]["content"]] == ["text"]


async def test_clearing_old_tool_uses_is_asked_for_and_reported(
    emulator: Emulator, tmp_path: Path, http: httpx2.AsyncClient
) -> None:
    made = Host(emulator, tmp_path / "chat.db", context_strategy="clear_tool_uses")

    @made.claude.tool
    def order_status(order_id: str) -> dict[str, str]:
        """Look up an order."""
        return {"order_id": order_id, "status": "shipped " * 40}

    calls = [
        Reply(
            "Looking.",
            tool_calls=[ToolUse("order_status", {"order_id": f"A-{n}"})],
            input_tokens=10,
        )
        for n in range(4)
    ]
    emulator.script(*calls, Reply("All shipped.", input_tokens=120_000))
    async with serving(made.app) as url:
        answer = await send(http, url, message="Where are my four orders?")
    assert answer.status == 200, answer.body
    last = emulator.requests[-1]
    assert last.headers["anthropic-beta"] == "context-management-2025-06-27"
    assert last.body["context_management"] == {"edits": [{"type": "clear_tool_uses_20250919"}]}
    # four results, the default keeps three: the API cleared one, from fewer input tokens
    assert answer.events[-1]["usage"]["input_tokens"] < 4 * 10 + 120_000
    await eventually(lambda: len(made.turns) == 1)
    assert made.turns[0].stop_reason == "end_turn"


async def test_a_send_while_another_process_holds_the_write_lock_waits_off_the_loop(
    emulator: Emulator, tmp_path: Path, http: httpx2.AsyncClient
) -> None:
    import sqlite3

    made = Host(emulator, tmp_path / "chat.db")
    emulator.script(Reply("Warm."), Reply("Stored after the lock."))
    async with serving(made.app) as url:
        assert (await send(http, url, message="warm up")).status == 200  # the tables exist
        other = sqlite3.connect(tmp_path / "chat.db", isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # as another worker's write would
        sending = asyncio.ensure_future(send(http, url, message="Hello?"))
        await asyncio.sleep(0.5)
        assert not sending.done()  # it waits for the lock...
        health = await http.get(url + "/health")
        assert health.status_code == 200  # ...in a thread: the loop serves meanwhile
        other.execute("COMMIT")
        other.close()
        answer = await asyncio.wait_for(sending, 10)
    assert answer.status == 200, answer.body
    assert answer.text == "Stored after the lock."
    await eventually(lambda: len(made.turns) == 2)
    assert made.turns[1].status == "complete"


@pytest.mark.parametrize("whole", [False, True], ids=["stream", "whole"])
async def test_a_turn_whose_worker_died_before_its_stream_started_is_answered_again(
    whole: bool,
    host: tuple[Host, str],
    emulator: Emulator,
    http: httpx2.AsyncClient,
    tmp_path: Path,
) -> None:
    """The turn's row was written, then its worker was killed before its stream started
    (issue 36): the state it left, made here exactly. A retry with the same
    ``client_message_id`` is answered (never a 503 forever), the orphan closed as an error,
    and the conversation takes new sends."""
    _, url = host
    database = f"sqlite+aiosqlite:///{tmp_path / 'chat.db'}"
    ref = await orphaned_turn(database, "tok-alice-0123456789", "c-orphan")
    emulator.script(Reply("answered at last"), Reply("and the next one"))
    body = {"message": "hello", "client_message_id": "c-orphan"}
    if whole:
        reply = await http.post(url + "/chat", json=body, headers=ALICE)
        assert reply.status_code == 200, reply.text
        assert "answered at last" in json.dumps(reply.json())
    else:
        again = await send(http, url, message="hello", client_message_id="c-orphan")
        assert again.status == 200, again.body
        assert again.events[-1]["stop_reason"] == "end_turn" and again.text == "answered at last"
    retried = await send(
        http, url, message="hello", client_message_id="c-orphan"
    )  # the same message once more: the new answer
    assert retried.status == 200 and retried.text == "answered at last"
    following = await send(http, url, message="next", conversation_id=ref.conversation_id)
    assert following.status == 200 and following.text == "and the next one"
    assert len(emulator.requests) == 2
    where = f"{url}/conversations/{ref.conversation_id}"
    read = (await http.get(where, headers=ALICE)).json()
    assert read["streaming"] is None
    assert [m["status"] for m in read["messages"]] == ["complete", "complete"] * 2
    assert ref.message_id in read["messages"][1]["siblings"]  # answered again beside it
    orphan_branch = (await http.get(where, params={"leaf": ref.message_id}, headers=ALICE)).json()
    assert orphan_branch["messages"][-1]["status"] == "error"  # the orphan, closed
