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

import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import classify_response

if TYPE_CHECKING:
    import aiohttp

__all__ = ["API_VERSION", "DEFAULT_BASE_URL", "FirstPartyClient", "Opened"]

#: the ``anthropic-version`` the SDK sends (tests/test_first_party.py compares them)
API_VERSION = "2026-10-21"
DEFAULT_BASE_URL = "https://api.anthropic.com"
#: the most of an error response's body read (it is classified, and cut to 300 characters)
_MAX_ERROR_BODY = 1 << 20
_KEEPALIVE = 5.0  # seconds an idle connection is kept: httpx2's default, which the SDK used


@dataclass(frozen=True, slots=True)
class Opened:
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
        self._timeouts = (timeout, connect_timeout)
        self._max_connections = max_connections
        #: read once: aiohttp's trust_env looks the proxy and .netrc up for every request,
        #: in a thread (two executor hops per stream, the setup's costliest part under a burst)
        self.proxy = proxy_for(self.url)
        self._session: aiohttp.ClientSession | None = None

    def _open_session(self) -> aiohttp.ClientSession:
        import aiohttp

        timeout, connect = self._timeouts
        connector = aiohttp.TCPConnector(
            limit=self._max_connections,
            keepalive_timeout=_KEEPALIVE,
            # aiohttp's default context (the system's CAs, or SSL_CERT_FILE / _DIR), made
            # once when aiohttp is imported: a context of our own would load the CAs again
            ssl=True,
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            # as the SDK's transport had it: connect per socket, each read, the pool wait
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=connect, sock_read=timeout, connect=timeout
            ),
        )
        return self._session

    @asynccontextmanager
    async def open(self, params: Mapping[str, Any]) -> AsyncIterator[Opened]:
        """The request sent; a non-2xx answer raised as its :class:`UpstreamError`."""
        extra_headers = params.get("extra_headers")
        headers = {**self._headers, **extra_headers} if extra_headers else self._headers
        session = self._session or self._open_session()
        post = session.post(self.url, data=request_body(params), headers=headers, proxy=self.proxy)
        async with post as response:
            request_id = response.headers.get("request-id")
            if not 200 <= response.status < 300:
                raw = await response.content.read(_MAX_ERROR_BODY)
                raise classify_response(
                    response.status, response.headers, _decoded(raw), request_id
                )
            yield Opened(request_id, response.content.iter_any())

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


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
