"""The first-party Messages API sent on aiohttp, without the SDK.

The relay reads raw SSE bytes, so for ``api.anthropic.com`` the SDK only ever built a request
and raised on an error status. That costs more than the rest of a stream's setup (half its
CPU under a burst) and, imported, half an idle worker's memory. This module sends the same
request itself: the SDK's authentication (``Authorization: Bearer``), ``anthropic-version``
and ``anthropic-beta``, the body with ``extra_body`` merged in as the SDK merges it, on one
session (one pool, one TLS context). ``tests/test_first_party.py`` checks every header and
the body against the SDK's own request. The cloud providers, whose signing the SDK owns, and
``CLAUDE_HTTP_CLIENT=httpx`` keep the SDK (:mod:`.providers`).
"""

from __future__ import annotations

import asyncio
import contextvars
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import classify_response

if TYPE_CHECKING:
    import aiohttp

__all__ = ["API_VERSION", "DEFAULT_BASE_URL", "FirstPartyClient", "UpstreamResponse"]

#: the ``anthropic-version`` the SDK sends (tests/test_first_party.py compares them)
API_VERSION = "2026-10-21"
DEFAULT_BASE_URL = "https://api.anthropic.com"
#: the most of an error response's body read (it is classified, and cut to 300 characters)
_MAX_ERROR_BODY = 1 << 20
_KEEPALIVE = 5.0  # seconds an idle connection is kept: httpx2's default, which the SDK used
_MAX_TICK = 1.0  # the stall watchdog looks at least this often (seconds)


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """A streamed response that answered 2xx: its request id and its raw body."""

    request_id: str | None
    chunks: AsyncIterator[bytes]


class FirstPartyClient:
    """``POST /v1/messages`` with ``stream: true`` on one aiohttp session, made on the loop
    that first sends (a session belongs to its loop) and closed with the app."""

    def __init__(
        self,
        api_key: str,
        base_url: str | None,
        *,
        timeout: float,
        connect_timeout: float,
        max_connections: int,
        user_agent: str,
    ) -> None:
        self.url = (base_url or DEFAULT_BASE_URL).rstrip("/") + "/v1/messages"
        self._headers = {
            "Accept": "application/json",
            "Content-Type": "application/json",
            "User-Agent": user_agent,
            "Authorization": f"Bearer {api_key}",
            "anthropic-version": API_VERSION,
        }
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        self._max_connections = max_connections
        #: read once: aiohttp's trust_env looks the proxy and .netrc up for every request,
        #: in a thread (two executor hops per stream, the setup's costliest part under a burst)
        self.proxy = proxy_for(self.url)
        self._session: aiohttp.ClientSession | None = None
        self._watchdog = _Watchdog(timeout)

    def _open_session(self) -> aiohttp.ClientSession:
        import aiohttp

        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            keepalive_timeout=_KEEPALIVE,
            # aiohttp's default context (the system's CAs, or SSL_CERT_FILE / _DIR), made
            # once when aiohttp is imported: a context of our own would load the CAs again
            ssl=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # connect per socket as the SDK's transport had it; the wait for a response's
            # head and a body's stalls are :meth:`open`'s, with no timer re-armed per read
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self._connect_timeout, sock_read=None
            ),
        )
        return self._session

    @asynccontextmanager
    async def open(self, params: Mapping[str, Any]) -> AsyncIterator[UpstreamResponse]:
        """The request sent; a non-2xx answer raised as its :class:`UpstreamError`."""
        extra_headers = params.get("extra_headers")
        headers = {**self._headers, **extra_headers} if extra_headers else self._headers
        session = self._session or self._open_session()
        post = session.post(self.url, data=request_body(params), headers=headers, proxy=self.proxy)
        async with _within(self._timeout, "the response's head"):
            response = await post
        async with response:  # released, or closed if the body was not read to its end
            request_id = response.headers.get("request-id")
            if not 200 <= response.status < 300:
                async with _within(self._timeout, "the error's body"):
                    raw = await response.content.read(_MAX_ERROR_BODY)
                raise classify_response(
                    response.status, response.headers, _decoded(raw), request_id
                )
            body = _Body(response)
            self._watchdog.watch(body)
            try:
                yield UpstreamResponse(request_id, body)
            finally:
                self._watchdog.drop(body)

    async def close(self) -> None:
        self._watchdog.stop()
        if self._session is not None:
            await self._session.close()
            self._session = None


class _Body:
    """A 2xx response's body, chunk by chunk, counting its reads for the :class:`_Watchdog`.
    aiohttp's own read timeout (``sock_read``) cancels and re-arms a timer on every chunk:
    10 to 15% of a paced relay's CPU."""

    __slots__ = ("_content", "_response", "reads", "seen", "since", "stalled")

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self._content = response.content
        self.reads = 0
        self.seen = 0  # the reads the watchdog saw last
        self.since = 0.0  # when it saw them change
        self.stalled = False

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        try:
            data = await self._content.readany()
        except Exception as error:
            if self.stalled:  # closed by the watchdog: a timeout, as aiohttp's was
                raise _stalled() from error
            raise
        if not data:
            if self.stalled:
                raise _stalled()
            raise StopAsyncIteration
        self.reads += 1
        return data

    def stall(self) -> None:
        self.stalled = True
        self._response.close()


class _Watchdog:
    """One task for every open body of a client: a body that read nothing for ``timeout``
    seconds is closed, and its reader raises a timeout (within a quarter of ``timeout``, or a
    second, past it). It runs only while a body is open."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self.tick = min(timeout / 4, _MAX_TICK)
        self._bodies: set[_Body] = set()
        self._task: asyncio.Task[None] | None = None

    def watch(self, body: _Body) -> None:
        loop = asyncio.get_running_loop()
        body.since = loop.time()
        self._bodies.add(body)
        if self._task is None:  # in a context of its own: not the request's that started it
            self._task = loop.create_task(self._run(), context=contextvars.Context())

    def drop(self, body: _Body) -> None:
        self._bodies.discard(body)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._bodies:
                await asyncio.sleep(self.tick)
                now = loop.time()
                for body in tuple(self._bodies):
                    if body.reads != body.seen:
                        body.seen, body.since = body.reads, now
                    elif now - body.since >= self.timeout and not body.stalled:
                        body.stall()
        finally:
            self._task = None

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


@asynccontextmanager
async def _within(seconds: float, what: str) -> AsyncIterator[None]:
    """A wait bounded as aiohttp's read timeout bounded it, raising what it raised."""
    import aiohttp

    try:
        async with asyncio.timeout(seconds):
            yield
    except TimeoutError as error:
        if isinstance(error, aiohttp.ClientError):
            raise
        raise aiohttp.ServerTimeoutError(f"timeout waiting for {what}") from None


def _stalled() -> Exception:
    import aiohttp

    return aiohttp.ServerTimeoutError("timeout reading the response body")


def request_body(params: Mapping[str, Any]) -> bytes:
    """The JSON body of the SDK's ``create(**params)``: its ``extra_body`` merged over the
    parameters (``extra_headers`` go beside the client's own headers)."""
    body = {k: v for k, v in params.items() if k not in ("extra_body", "extra_headers")}
    body.update(params.get("extra_body") or {})
    encoded = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return encoded.encode()


def proxy_for(url: str) -> str | None:
    """The proxy the environment names for ``url`` (``HTTPS_PROXY``, ``HTTP_PROXY``,
    ``ALL_PROXY``; ``NO_PROXY`` exempts a host), as the SDK's client reads them."""
    import urllib.parse
    import urllib.request  # loaded by aiohttp already; not by importing quart_claude

    parts = urllib.parse.urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if proxy is None or urllib.request.proxy_bypass(parts.hostname or ""):
        return None
    return proxy


def _decoded(raw: bytes) -> object:
    """An error body as the SDK keeps it: its JSON, or else its text."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace").strip()
