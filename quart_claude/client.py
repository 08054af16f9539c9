"""A Python client for the stream route that survives dropped connections.

    from quart_claude.client import stream_chat

    async for event in stream_chat("http://127.0.0.1:8000/chat/stream", message="Hi"):
        if event["type"] == "delta":
            print(event["text"], end="", flush=True)

On a network error mid-stream, or when a draining server hands the stream to another one (an
``error`` event with ``"resume": true``, never passed on), it reconnects to
``GET {url}/{stream_id}`` with ``Last-Event-ID``, so the caller sees every event exactly once,
ending with ``done`` or ``error``. :func:`stream_chat_sync` does the same for scripts
without an event loop.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx2

from ._core.sse import SSEParser

__all__ = ["ChatError", "Conversation", "stream_chat", "stream_chat_sync"]

_TIMEOUT = httpx2.Timeout(60.0, connect=10.0)  # reads: well above the 15 s heartbeat


class ChatError(Exception):
    """The server refused the request (a 4xx/5xx JSON error before any event)."""

    def __init__(self, status: int, payload: Any) -> None:
        self.status = status
        self.payload = payload
        message = payload.get("message") if isinstance(payload, dict) else str(payload)
        super().__init__(f"{status}: {message}")


class _Interrupted(Exception):
    """The body ended before ``done`` or ``error``."""


class _Session:
    """What both clients share: the request to make next, and which events were seen."""

    def __init__(self, url: str, body: dict[str, Any], headers: dict[str, str] | None) -> None:
        self.url = url.rstrip("/")
        self.body = body
        self.headers = dict(headers or {})
        self.stream_id: str | None = None
        self.last_id = -1
        self.finished = False
        self.reconnects = 0

    def request(self) -> dict[str, Any]:
        if self.stream_id is None:
            return {"method": "POST", "url": self.url, "json": self.body, "headers": self.headers}
        headers = {**self.headers, "Last-Event-ID": str(self.last_id)}
        return {"method": "GET", "url": f"{self.url}/{self.stream_id}", "headers": headers}

    def opened(self, response: httpx2.Response) -> bool:
        """Check the response; False when there is nothing more to read (204)."""
        if response.status_code == 204:
            self.finished = True
            return False
        if response.status_code != 200:
            try:
                payload: Any = response.json()
            except ValueError:
                payload = response.text
            raise ChatError(response.status_code, payload)
        self.stream_id = self.stream_id or response.headers.get("x-stream-id")
        return True

    def events(self, parser: SSEParser, chunk: bytes) -> Iterator[dict[str, Any]]:
        for event in parser.feed(chunk):
            if event.id is not None and event.id.isdigit():
                index = int(event.id)
                if index <= self.last_id:
                    continue  # already seen before the reconnect
                self.last_id = index
            payload = event.json()
            if payload.get("resume") is True:  # handed off to another server: resume there
                raise _Interrupted
            self.reconnects = 0  # progress: the budget is for drops in a row, not per answer
            if payload.get("type") in ("done", "error"):
                self.finished = True
            yield payload

    def may_retry(self, max_reconnects: int) -> bool:
        if self.stream_id is None or self.reconnects >= max_reconnects:
            return False
        self.reconnects += 1
        return True


async def stream_chat(
    url: str,
    *,
    message: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    http: httpx2.AsyncClient | None = None,
    headers: dict[str, str] | None = None,
    max_reconnects: int = 5,
    reconnect_delay: float = 0.5,
    **fields: Any,
) -> AsyncIterator[dict[str, Any]]:
    """Yield the events of one answer, reconnecting with ``Last-Event-ID`` after drops.

    ``fields`` go into the body as they are (``max_tokens``, ``system``, ``model``).
    """
    body = _body(message, messages, fields)
    async for event in _events(url, body, http, headers, max_reconnects, reconnect_delay):
        yield event


async def _events(
    url: str,
    body: dict[str, Any],
    http: httpx2.AsyncClient | None,
    headers: dict[str, str] | None,
    max_reconnects: int = 5,
    reconnect_delay: float = 0.5,
) -> AsyncIterator[dict[str, Any]]:
    session = _Session(url, body, headers)
    client = http or httpx2.AsyncClient(timeout=_TIMEOUT)
    try:
        while not session.finished:
            try:
                async with client.stream(**session.request()) as response:
                    if response.status_code >= 300:
                        await response.aread()
                    if not session.opened(response):
                        return
                    parser = SSEParser()
                    async for chunk in response.aiter_bytes():  # decoded: gzip proxies
                        for event in session.events(parser, chunk):
                            yield event
                        if session.finished:
                            return
                raise _Interrupted
            except (httpx2.TransportError, _Interrupted):
                if not session.may_retry(max_reconnects):
                    raise
                await asyncio.sleep(reconnect_delay * session.reconnects)
    finally:
        if http is None:
            await client.aclose()


def stream_chat_sync(
    url: str,
    *,
    message: str | None = None,
    messages: list[dict[str, Any]] | None = None,
    http: httpx2.Client | None = None,
    headers: dict[str, str] | None = None,
    max_reconnects: int = 5,
    reconnect_delay: float = 0.5,
    **fields: Any,
) -> Iterator[dict[str, Any]]:
    """The blocking twin of :func:`stream_chat`, for scripts."""
    session = _Session(url, _body(message, messages, fields), headers)
    client = http or httpx2.Client(timeout=_TIMEOUT)
    try:
        while not session.finished:
            try:
                with client.stream(**session.request()) as response:
                    if response.status_code >= 300:
                        response.read()
                    if not session.opened(response):
                        return
                    parser = SSEParser()
                    for chunk in response.iter_bytes():
                        yield from session.events(parser, chunk)
                        if session.finished:
                            return
                raise _Interrupted
            except (httpx2.TransportError, _Interrupted):
                if not session.may_retry(max_reconnects):
                    raise
                time.sleep(reconnect_delay * session.reconnects)
    finally:
        if http is None:
            client.close()


def _body(
    message: str | None, messages: list[dict[str, Any]] | None, fields: dict[str, Any]
) -> dict[str, Any]:
    if (message is None) == (messages is None):
        raise TypeError("pass exactly one of message= or messages=")
    body: dict[str, Any] = {"message": message} if message is not None else {"messages": messages}
    body.update(fields)
    return body


class Conversation:
    """A conversation the server keeps (``CLAUDE_DATABASE_URL``): send its turns, read it
    back, rename or delete it. ``base_url`` is where the blueprint is mounted
    (``http://host:8000`` or ``http://host/ai``)::

        chat = Conversation("http://127.0.0.1:8000", headers={"Authorization": "Bearer ..."})
        async for event in chat.send("Hi"):
            ...
        async for event in chat.send("And then?"):   # the server adds the history
            ...

    Each send carries a fresh ``client_message_id``, so a retry after a dropped POST is the
    same turn, never a second one. Without auth, pass an ``http`` client that keeps the
    server's cookie (an ``httpx2.AsyncClient`` does).
    """

    def __init__(
        self,
        base_url: str,
        conversation_id: str | None = None,
        *,
        http: httpx2.AsyncClient | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.base_url: str = base_url.rstrip("/")
        self.id: str | None = conversation_id
        self.http: httpx2.AsyncClient | None = http
        self.headers: dict[str, str] | None = headers

    async def send(self, message: Any, **fields: Any) -> AsyncIterator[dict[str, Any]]:
        """Stream the answer to ``message`` (text, or content blocks); ``fields`` such as
        ``parent_id`` (an edit) go into the body."""
        async for event in self._stream({"message": message, **fields}):
            yield event

    async def regenerate(self) -> AsyncIterator[dict[str, Any]]:
        """Answer the last user message again (a sibling of the answer it had)."""
        async for event in self._stream({"regenerate": True}):
            yield event

    async def _stream(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        if self.id is not None:
            body["conversation_id"] = self.id
        body.setdefault("client_message_id", secrets.token_hex(12))
        async for event in _events(self.base_url + "/chat/stream", body, self.http, self.headers):
            if event.get("type") == "start" and event.get("conversation_id"):
                self.id = str(event["conversation_id"])
            yield event

    async def read(self) -> dict[str, Any]:
        """The conversation as ``GET /conversations/<id>`` gives it (its current branch)."""
        return await self._call("GET")

    async def rename(self, title: str) -> dict[str, Any]:
        return await self._call("PATCH", {"title": title})

    async def delete(self) -> dict[str, Any]:
        return await self._call("DELETE")

    async def _call(self, method: str, body: Any = None) -> dict[str, Any]:
        if self.id is None:
            raise RuntimeError("the conversation starts with its first send")
        client = self.http or httpx2.AsyncClient(timeout=_TIMEOUT)
        try:
            response = await client.request(
                method, f"{self.base_url}/conversations/{self.id}", json=body, headers=self.headers
            )
        finally:
            if self.http is None:
                await client.aclose()
        payload: dict[str, Any] = response.json()
        if response.status_code >= 300:
            raise ChatError(response.status_code, payload)
        return payload
