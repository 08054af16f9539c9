"""Conversations over HTTP (``CLAUDE_DATABASE_URL``): a send that opens a turn in a stored
conversation, and the routes that list, read, rename and erase them.

A send's history is the server's: the branch it continues, rebuilt for the API by
:mod:`.history`. A conversation is its identity's; anyone else's is a 404 identical to a
missing one. One turn at a time: a second send while a turn streams is a 409 carrying that
turn's ``stream_id``, so a second tab follows it instead of racing it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from .budget import BudgetRefused
from .db import (
    Busy,
    Conversations,
    Existing,
    MessageRow,
    NoSuchConversation,
    Opened,
    Send,
    branch_to,
    now_ms,
)
from .guards import Blocked
from .history import api_messages
from .request import ChatRequest, RequestError, SendOptions
from .sse import data_line, frame
from .state import ClaudeState, Unauthorized
from .store import RemoteStream
from .stream import StoreUnavailable, Stream
from .web import (
    HttpRequest,
    Reply,
    Route,
    blocked_reply,
    budget_exceeded,
    identity_of,
    json_error,
    json_reply,
    read_json,
    sse_reply,
    store_unavailable,
    unauthorized,
)

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

__all__ = ["CONVERSATION_ROUTES", "open_turn"]

log = logging.getLogger("quart_claude")

_PAGE = 20
_MAX_PAGE = 100
_TITLE = 200
_STORING_WAIT = 5.0  # seconds a send waits for the turn before it to be stored


def _no_conversation() -> Reply:
    return json_error(404, "not_found", "no such conversation: unknown, deleted, or not yours")


def _database_down() -> Reply:
    log.warning("the conversation database is unavailable", exc_info=True)
    return store_unavailable()


async def open_turn(
    state: ClaudeState,
    chat: ChatRequest,
    options: SendOptions,
    *,
    stream_id: str,
    owner: str | None,
    client: str,
    headers: Any,
    whole: bool,
) -> tuple[Stream, dict[str, str]] | Reply:
    """Open the turn (its history prepended to the request) and start its producer: the
    stream and its headers, or the reply that says why not. ``whole``: the answer is wanted
    as one JSON object (``POST /chat``), which decides how a retried send is answered."""
    conversations = state.conversations
    if conversations is None:
        return store_unavailable()
    send = Send(
        owner=owner or "",
        conversation_id=options.conversation_id,
        content=chat.messages[0]["content"] if chat.messages else None,
        stream_id=stream_id,
        model=chat.model,
        parent_id=options.parent_id,
        parent_given=options.parent_given,
        regenerate=options.regenerate,
        client_message_id=options.client_message_id,
        create=options.create,
    )
    opened = await _opened(state, conversations, send, owner)
    if isinstance(opened, Existing) and await _orphaned(state, opened.answer, owner):
        # its worker died between opening the turn and starting its stream: the turn is
        # closed (an error) and the same message answered again, under a stream of its own
        await _abandon(conversations, opened.ref.conversation_id, opened.answer.stream_id or "")
        log.warning("turn %s: its stream never started; answered again", opened.answer.id)
        again = dataclasses.replace(
            send,
            conversation_id=opened.ref.conversation_id,
            parent_id=opened.ref.user_message_id,
            parent_given=True,
            regenerate=True,
            client_message_id=None,
        )
        opened = await _opened(state, conversations, again, owner)
    if isinstance(opened, Reply):
        return opened
    if isinstance(opened, Existing):
        return await _retried(state, opened, owner, whole)
    ref = opened.ref
    chat = dataclasses.replace(chat, messages=api_messages(opened.branch, chat.model))
    try:
        stream = await state.open_stream(
            stream_id, chat, owner=owner, client=client, headers=headers, turn=ref
        )
    except StoreUnavailable:
        await _abandon(conversations, ref.conversation_id, stream_id)
        return store_unavailable()
    except (BudgetRefused, Blocked) as refused:  # the turn never started: it leaves no trace
        try:
            await conversations.retract(opened, stream_id)
        except Exception:
            log.warning("stream %s: its refused turn could not be taken back", stream_id)
        if isinstance(refused, Blocked):
            return blocked_reply(refused)
        return budget_exceeded(refused.refusal)
    return stream, {"X-Conversation-Id": ref.conversation_id}


async def _opened(
    state: ClaudeState, conversations: Conversations, send: Send, owner: str | None
) -> Opened | Existing | Reply:
    """The turn opened. A turn that has sent its last event but is still being stored is
    waited for (a client may send the moment it reads ``done``); a running one is a 409."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _STORING_WAIT
    while True:
        try:
            return await conversations.open_turn(send)
        except NoSuchConversation:
            return _no_conversation()
        except ValueError as invalid:
            return json_error(400, "invalid_request", str(invalid))
        except Busy as busy:
            where = await _where(state, busy.stream_id, owner)
            if where == "running" or (where == "ending" and loop.time() > deadline):
                return json_error(
                    409,
                    "conversation_busy",
                    "this conversation's turn is still streaming: follow it, or stop it",
                    {"X-Stream-Id": busy.stream_id},
                    stream_id=busy.stream_id,
                )
            if where == "gone":  # its producer is gone for good: free the conversation
                await _abandon(conversations, send.conversation_id or "", busy.stream_id)
            else:
                await asyncio.sleep(0.02)
        except Exception:
            return _database_down()


async def _where(state: ClaudeState, stream_id: str, owner: str | None) -> str:
    """A busy turn's stream: ``running``, ``ending`` (its last event sent), or ``gone``."""
    try:
        found = await state.find(stream_id, owner)
    except StoreUnavailable:
        return "running"  # cannot tell: never free a turn that may still be running
    if found is None:
        return "gone"
    done = found.done if isinstance(found, RemoteStream) else found.finished
    return "ending" if done else "running"


async def _orphaned(state: ClaudeState, answer: MessageRow, owner: str | None) -> bool:
    """A turn left ``streaming`` by a worker that died before its stream started: no store
    knows its stream a whole lease after it was opened (before that it may yet start)."""
    if answer.status != "streaming" or not answer.stream_id:
        return False
    if now_ms() - answer.created_at < state.config.stream_lease * 1000:
        return False
    return await _where(state, answer.stream_id, owner) == "gone"


async def _abandon(conversations: Conversations, cid: str, stream_id: str) -> None:
    try:
        await conversations.abandon(cid, stream_id)
    except Exception:
        log.warning("stream %s: its turn could not be marked abandoned", stream_id, exc_info=True)


async def _retried(state: ClaudeState, existing: Existing, owner: str | None, whole: bool) -> Reply:
    """A send retried with the same ``client_message_id``: the turn it made, never a second."""
    answer, ref = existing.answer, existing.ref
    headers = {"X-Conversation-Id": ref.conversation_id}
    if whole:
        if answer.status == "streaming":
            return json_error(
                409,
                "conversation_busy",
                "this message's turn is still streaming: follow its stream",
                {"X-Stream-Id": answer.stream_id or ""},
                stream_id=answer.stream_id,
            )
        return json_reply(_whole(answer, ref.conversation_id), headers=headers)
    found = None
    if answer.stream_id:
        try:
            found = await state.find(answer.stream_id, owner)
        except StoreUnavailable:
            return store_unavailable()
    if found is not None:
        events = state.read(found, -1)
        if events is not None:
            return sse_reply(events, found.id, headers)
    if answer.status == "streaming":  # its stream is gone and it never ended: nothing to send
        return json_error(503, "unavailable", "this turn cannot be resumed", {"Retry-After": "1"})
    return sse_reply(_replayed(answer, ref.conversation_id), answer.stream_id or "", headers)


def _whole(answer: MessageRow, cid: str) -> dict[str, Any]:
    view = answer.content.get("view") or []
    return {
        "conversation_id": cid,
        "message_id": answer.id,
        "model": answer.model,
        "text": "".join(b.get("text", "") for b in view if b["type"] == "text"),
        "stop_reason": answer.stop_reason,
        "usage": answer.usage or {},
        "status": answer.status,
    }


async def _replayed(answer: MessageRow, cid: str) -> AsyncIterator[bytes]:
    """A stored turn as the events its stream sent (the stream itself has expired)."""
    start = {
        "type": "start",
        "stream_id": answer.stream_id,
        "model": answer.model,
        "conversation_id": cid,
        "assistant_message_id": answer.id,
        "replayed": True,
    }
    events: list[dict[str, Any]] = [start]
    for block in answer.content.get("view") or []:
        if block["type"] == "text":
            events.append({"type": "delta", "text": block["text"]})
        elif block["type"] == "thinking":
            events.append({"type": "thinking", "text": block["thinking"]})
        elif block["type"] == "tool_call":
            events.append(block)
    events.append({"type": "done", "stop_reason": answer.stop_reason, "usage": answer.usage or {}})
    yield b"".join(frame(data_line(event), index) for index, event in enumerate(events))


# -- the routes ---------------------------------------------------------------------------


async def _owner(state: ClaudeState, req: HttpRequest) -> str | Reply:
    try:
        owner = await identity_of(state, req)
    except Unauthorized as refused:
        return unauthorized(state, refused)
    if state.conversations is None:
        return store_unavailable()
    return owner or ""


async def list_conversations(state: ClaudeState, req: HttpRequest) -> Reply:
    """The identity's conversations, newest first: ``?limit=`` and the ``next`` cursor
    (``?before=``)."""
    owner = await _owner(state, req)
    if isinstance(owner, Reply):
        return owner
    try:
        limit, before = _page_args(req)
    except RequestError as error:
        return json_error(error.status, error.code, error.message)
    assert state.conversations is not None
    try:
        rows = await state.conversations.page(owner, before, limit + 1)
    except Exception:
        return _database_down()
    shown = rows[:limit]
    items = [
        {
            "id": row.id,
            "title": row.title,
            "created_at": row.created_at,
            "updated_at": row.updated_at,
            "streaming": row.active_stream_id,
        }
        for row in shown
    ]
    last = shown[-1] if len(rows) > limit else None
    cursor = f"{last.updated_at}.{last.id}" if last is not None else None
    return json_reply({"conversations": items, "next": cursor})


def _page_args(req: HttpRequest) -> tuple[int, tuple[int, str] | None]:
    raw = req.args.get("limit") or str(_PAGE)
    if not raw.isdigit() or not 1 <= int(raw) <= _MAX_PAGE:
        raise RequestError(400, "invalid_request", f"'limit' must be from 1 to {_MAX_PAGE}")
    before = req.args.get("before")
    if not before:
        return int(raw), None
    stamp, _, cid = before.partition(".")
    if not stamp.isdigit() or not cid:
        raise RequestError(400, "invalid_request", "'before' must be a cursor this route gave")
    return int(raw), (int(stamp), cid)


async def read_conversation(state: ClaudeState, req: HttpRequest) -> Reply:
    """The messages of the current branch (``?leaf=`` another one), as readers see them,
    each with its siblings (the other branches at that point)."""
    owner = await _owner(state, req)
    if isinstance(owner, Reply):
        return owner
    assert state.conversations is not None
    cid = req.path_params["conversation_id"]
    try:
        head, rows = await state.conversations.load(owner, cid)
    except NoSuchConversation:
        return _no_conversation()
    except Exception:
        return _database_down()
    leaf = req.args.get("leaf") or head.leaf_id
    if leaf is not None and leaf not in {row.id for row in rows}:
        return json_error(400, "invalid_request", "'leaf' is not a message of this conversation")
    return json_reply(
        {
            "id": head.id,
            "title": head.title,
            "created_at": head.created_at,
            "updated_at": head.updated_at,
            "streaming": head.active_stream_id,
            "messages": _branch_view(rows, leaf),
        }
    )


def _branch_view(rows: list[MessageRow], leaf: str | None) -> list[dict[str, Any]]:
    """The branch through ``leaf`` (continued by the newest child below it), for readers."""
    children: dict[str | None, list[MessageRow]] = {}
    for row in rows:
        children.setdefault(row.parent_id, []).append(row)
    path = branch_to(rows, leaf)
    while path and children.get(path[-1].id):
        path.append(children[path[-1].id][-1])
    return [_message_view(row, children.get(row.parent_id, [row])) for row in path]


def _message_view(row: MessageRow, siblings: list[MessageRow]) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": row.id,
        "parent_id": row.parent_id,
        "role": row.role,
        "status": row.status,
        "created_at": row.created_at,
        "siblings": [sibling.id for sibling in siblings],
    }
    if row.role == "user":
        view["content"] = row.content
        return view
    view.update(
        content=row.content.get("view") or [],
        model=row.model,
        stop_reason=row.stop_reason,
        usage=row.usage,
    )
    if row.status == "streaming":
        view["stream_id"] = row.stream_id
    return view


async def update_conversation(state: ClaudeState, req: HttpRequest) -> Reply:
    """``{"title": ...}`` renames it; ``{"leaf_id": ...}`` makes that branch the current one."""
    owner = await _owner(state, req)
    if isinstance(owner, Reply):
        return owner
    try:
        body = await read_json(state, req)
        title, leaf = _patch_fields(body)
    except RequestError as error:
        return json_error(error.status, error.code, error.message)
    assert state.conversations is not None
    cid = req.path_params["conversation_id"]
    try:
        if "title" in body:
            await state.conversations.rename(owner, cid, title)
        if leaf is not None:
            _, rows = await state.conversations.load(owner, cid)
            if leaf not in {row.id for row in rows}:
                return json_error(400, "invalid_request", "'leaf_id' is not a message here")
            await state.conversations.switch(owner, cid, leaf)
    except NoSuchConversation:
        return _no_conversation()
    except Exception:
        return _database_down()
    return await read_conversation(state, req)


def _patch_fields(body: Any) -> tuple[str | None, str | None]:
    if not isinstance(body, dict) or not body or set(body) - {"title", "leaf_id"}:
        raise RequestError(400, "invalid_request", "send 'title' and/or 'leaf_id'")
    title = body.get("title")
    if title is not None and (not isinstance(title, str) or len(title) > _TITLE):
        raise RequestError(400, "invalid_request", f"'title' must be a string of at most {_TITLE}")
    leaf = body.get("leaf_id")
    if leaf is not None and not isinstance(leaf, str):
        raise RequestError(400, "invalid_request", "'leaf_id' must be a message id")
    return (title.strip() or None) if isinstance(title, str) else None, leaf


async def delete_conversation(state: ClaudeState, req: HttpRequest) -> Reply:
    """Erase it: every message, every branch; a turn still streaming is stopped first."""
    owner = await _owner(state, req)
    if isinstance(owner, Reply):
        return owner
    assert state.conversations is not None
    cid = req.path_params["conversation_id"]
    try:
        active = await state.conversations.delete(owner, cid)
    except NoSuchConversation:
        return _no_conversation()
    except Exception:
        return _database_down()
    if active is not None:
        try:
            found = await state.find(active, owner)
            if found is not None:
                await state.stop(found)
        except StoreUnavailable:
            log.warning("stream %s of a deleted conversation could not be stopped", active)
    return json_reply({"id": cid, "deleted": True})


CONVERSATION_ROUTES = (
    Route("/conversations", "list_conversations", ("GET",), list_conversations),
    Route("/conversations/<conversation_id>", "read_conversation", ("GET",), read_conversation),
    Route(
        "/conversations/<conversation_id>",
        "update_conversation",
        ("PATCH",),
        update_conversation,
    ),
    Route(
        "/conversations/<conversation_id>",
        "delete_conversation",
        ("DELETE",),
        delete_conversation,
    ),
)
