"""The Redis connection every Redis part of a store shares: its clients, keys and scripts.

One server (``redis://``, ``rediss://``, ``unix://``), a Redis Cluster
(``redis+cluster://host:port,host:port``, ``rediss+cluster://`` with TLS) or the primary a
set of Sentinels names (``redis+sentinel://host:port,host:port/service[/db]``): the parts
above this module never ask which.

With Sentinel, the link watches the primary the sentinels name (every ``watch_interval``)
and, when it changes, drops every connection, in use or not, so nothing goes on reading or
writing the demoted one; and :meth:`RedisLink.run_many` with ``durable=True`` (the lease
renewals) waits for a replica to hold the writes (``WAIT 1``), so the primary a failover
promotes knows a live producer renewed, and never lets another worker claim its stream.
Events a failover lost are found by the producer's next checked write and rewritten.

Every key of one stream carries the stream id as its hash tag
(``qc:{ID}:ev``), so each script runs in one cluster slot, and a pipeline is split per node
by redis-py's cluster pipeline, which re-sends a command answered ``MOVED``, ``ASK`` or
``TRYAGAIN`` (a slot migrating) on its own.

Scripts go as ``EVALSHA`` (loaded on every primary at start). A node that does not know one
(a restarted server, a promoted replica, a node a resharding added) answers ``NOSCRIPT``,
which means the script did not run: the scripts are loaded again and the call sent again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import Sequence
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

__all__ = ["CLUSTER_SCHEMES", "SENTINEL_SCHEME", "RedisLink", "ScriptCall", "key", "script_sha"]

log = logging.getLogger("quart_claude")

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")
SENTINEL_SCHEME = "redis+sentinel"
#: how long a durable write waits for a replica to acknowledge it (ms)
WAIT_MS = 500

#: One script to run: its name, its keys, its arguments.
ScriptCall = tuple[str, Sequence[str], Sequence[Any]]


class NotReplicated(Exception):
    """Durable writes that no replica acknowledged in time (a failover may lose them); they
    ran on the primary, and ``replies`` are their replies."""

    def __init__(self, message: str, replies: list[Any]) -> None:
        super().__init__(message)
        self.replies = replies


def key(stream_id: str, part: str) -> str:
    """A stream's key: its id is the hash tag, so all of a stream's keys share a slot."""
    return f"qc:{{{stream_id}}}:{part}"


def script_sha(source: str) -> str:
    return hashlib.sha1(source.encode()).hexdigest()  # Redis's own script id


def _cluster_client(url: str, **options: Any) -> Any:
    """``redis+cluster://[user:pass@]h1:p1,h2:p2/?opts``: every host a startup node."""
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    seeds = []
    for host in hosts.split(","):
        name, _, port = host.rpartition(":")
        seeds.append(ClusterNode(name or host, int(port or 6379)))
    scheme = "rediss" if parts.scheme.startswith("rediss") else "redis"
    first = f"{credentials}@{hosts.split(',')[0]}" if credentials else hosts.split(",")[0]
    seed_url = urlunsplit((scheme, first, parts.path, parts.query, ""))
    return RedisCluster.from_url(seed_url, startup_nodes=seeds, **options)


def _sentinel(url: str) -> tuple[Any, str, dict[str, Any]]:
    """``redis+sentinel://[user:password@]h:p,h:p/service[/db]``: the sentinels, the service
    name and the primary's options (the credentials are the primary's; the sentinels are
    asked without)."""
    from redis.asyncio.sentinel import Sentinel

    parts = urlsplit(url)
    sentinels = []
    for address in parts.netloc.rpartition("@")[2].split(","):
        host, _, port = address.rpartition(":")
        sentinels.append((host, int(port)))
    service, _, db = parts.path.strip("/").partition("/")
    options: dict[str, Any] = {"db": int(db or 0)}
    if parts.username:
        options["username"] = unquote(parts.username)
    if parts.password:
        options["password"] = unquote(parts.password)
    return Sentinel(sentinels), service, options  # type: ignore[no-untyped-call,unused-ignore]


class RedisLink:
    """The clients of one store: ``redis`` for commands and pipelines, ``blocking`` for the
    ``XREAD BLOCK`` of remote readers (each holds a connection while it waits)."""

    def __init__(self, url: str, scripts: dict[str, str], *, watch_interval: float = 0.5) -> None:
        self.url = url
        scheme = urlsplit(url).scheme
        self.cluster: bool = scheme in CLUSTER_SCHEMES
        self.sentinel: bool = scheme == SENTINEL_SCHEME
        self.sources = scripts
        self.shas: dict[str, str] = {name: script_sha(src) for name, src in scripts.items()}
        self.watch_interval = watch_interval
        # typed Any: redis-py's reply unions cover decode_responses=True, which we never use
        self.redis: Any = None
        self.blocking: Any = None
        self._sentinels: Any = None  # with Sentinel: redis-py's Sentinel (its clients)
        self._service = ""
        self._options: dict[str, Any] = {}
        self._watch: asyncio.Task[None] | None = None

    def _client(self, max_connections: int | None = None) -> Any:
        if self.cluster:  # the cluster client retries moved slots and lost nodes itself
            options = {"max_connections": max_connections} if max_connections else {}
            return _cluster_client(self.url, **options)
        # a pooled connection that went stale (Redis restarted) is retried once on a new one
        # (the asyncio Retry: the sync one never runs; retry_on_error: redis-py 5 needs it)
        retry: dict[str, Any] = {
            "retry": Retry(NoBackoff(), 1),
            "retry_on_error": [RedisConnectionError],
        }
        if max_connections:
            retry["max_connections"] = max_connections
        if self.sentinel:  # one Sentinel (its clients) for both
            if self._sentinels is None:
                self._sentinels, self._service, self._options = _sentinel(self.url)
            return self._sentinels.master_for(self._service, **self._options, **retry)
        return aioredis.from_url(self.url, **retry)

    async def connect(self) -> None:
        """Connect and load the scripts; on any failure nothing is left open."""
        self.redis = self._client()
        self.blocking = self._client(max_connections=10_000)
        try:
            await self.redis.ping()
            await self.load_scripts()
        except BaseException:  # unreachable, or refused our credentials
            await self.close()
            raise
        if self.sentinel:
            self._watch = asyncio.get_running_loop().create_task(self._watch_primary())

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None
        for client in (self.redis, self.blocking):
            if client is not None:
                await client.aclose()
        if self._sentinels is not None:
            for sentinel in self._sentinels.sentinels:
                await sentinel.aclose()
        self.redis = self.blocking = self._sentinels = None

    async def _watch_primary(self) -> None:
        """When the sentinels name another primary, drop every connection (the blocking
        reads' too: they would go on reading the demoted node), so each reconnects to it."""
        service = self._service
        known = None
        while True:
            await asyncio.sleep(self.watch_interval)
            try:
                primary = await self._sentinels.discover_master(service)
            except Exception:
                log.warning("the sentinels did not name a primary for %s", service)
                continue
            if known is not None and primary != known:
                log.warning("Redis failed over to %s:%s; reconnecting", *primary)
                for client in (self.redis, self.blocking):
                    await client.connection_pool.disconnect(inuse_connections=True)
            known = primary

    async def load_scripts(self) -> None:
        """On every primary (one server: on it)."""
        options = {"target_nodes": RedisCluster.PRIMARIES} if self.cluster else {}
        for source in self.sources.values():
            await self.redis.execute_command("SCRIPT LOAD", source, **options)

    async def run_many(self, calls: Sequence[ScriptCall], *, durable: bool = False) -> list[Any]:
        """Run scripts in one pipeline (a cluster's: one per node), in order: each one's reply,
        or the exception it raised. A script a node did not know never ran: the scripts are
        loaded again and those calls sent again. ``durable`` (with Sentinel): a replica holds
        them when this returns, else it raises :class:`NotReplicated`."""
        replies = await self._pipelined(calls, wait=durable and self.sentinel)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            await self.load_scripts()
            again = await self._pipelined([calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipelined(self, calls: Sequence[ScriptCall], *, wait: bool = False) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, keys, args in calls:
                pipe.execute_command("EVALSHA", self.shas[name], len(keys), *keys, *args)
            if wait:
                pipe.execute_command("WAIT", 1, WAIT_MS)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        if wait:
            acknowledged = replies.pop()
            if not isinstance(acknowledged, int) or acknowledged < 1:
                raise NotReplicated(f"no replica acknowledged within {WAIT_MS} ms", replies)
        return replies

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one script now (loading the scripts again if the node lost them)."""
        command = ("EVALSHA", self.shas[name], len(keys), *keys, *args)
        try:
            return await self.redis.execute_command(*command)
        except NoScriptError:
            await self.load_scripts()
            return await self.redis.execute_command(*command)
