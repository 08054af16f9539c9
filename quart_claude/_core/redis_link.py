"""The Redis connection every Redis part of a store shares: its clients, keys and scripts.

One server (``redis://``, ``rediss://``, ``unix://``) or a Redis Cluster
(``redis+cluster://host:port,host:port``, ``rediss+cluster://`` with TLS): the parts above
this module never ask which. Every key of one stream carries the stream id as its hash tag
(``qc:{ID}:ev``), so each script runs in one cluster slot, and a pipeline is split per node
by redis-py's cluster pipeline, which re-sends a command answered ``MOVED``, ``ASK`` or
``TRYAGAIN`` (a slot migrating) on its own.

Scripts go as ``EVALSHA`` (loaded on every primary at start). A node that does not know one
(a restarted server, a promoted replica, a node a resharding added) answers ``NOSCRIPT``,
which means the script did not run: the scripts are loaded again and the call sent again.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError

__all__ = ["CLUSTER_SCHEMES", "RedisLink", "ScriptCall", "key", "script_sha"]

CLUSTER_SCHEMES = ("redis+cluster", "rediss+cluster")

#: One script to run: its name, its keys, its arguments.
ScriptCall = tuple[str, Sequence[str], Sequence[Any]]


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


class RedisLink:
    """The clients of one store: ``redis`` for commands and pipelines, ``blocking`` for the
    ``XREAD BLOCK`` of remote readers (each holds a connection while it waits)."""

    def __init__(self, url: str, scripts: dict[str, str]) -> None:
        self.url = url
        self.cluster: bool = urlsplit(url).scheme in CLUSTER_SCHEMES
        self.sources = scripts
        self.shas: dict[str, str] = {name: script_sha(src) for name, src in scripts.items()}
        # typed Any: redis-py's reply unions cover decode_responses=True, which we never use
        self.redis: Any = None
        self.blocking: Any = None

    def _client(self, max_connections: int | None = None) -> Any:
        if self.cluster:  # the cluster client retries moved slots and lost nodes itself
            options = {"max_connections": max_connections} if max_connections else {}
            return _cluster_client(self.url, **options)
        # a pooled connection that went stale (Redis restarted) is retried once on a new one
        # (the asyncio Retry: the sync one never runs; retry_on_error: redis-py 5 needs it)
        retry = {"retry": Retry(NoBackoff(), 1), "retry_on_error": [RedisConnectionError]}
        if max_connections:
            retry["max_connections"] = max_connections
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

    async def close(self) -> None:
        for client in (self.redis, self.blocking):
            if client is not None:
                await client.aclose()
        self.redis = self.blocking = None

    async def load_scripts(self) -> None:
        """On every primary (one server: on it)."""
        options = {"target_nodes": RedisCluster.PRIMARIES} if self.cluster else {}
        for source in self.sources.values():
            await self.redis.execute_command("SCRIPT LOAD", source, **options)

    async def run_many(self, calls: Sequence[ScriptCall]) -> list[Any]:
        """Run scripts in one pipeline (a cluster's: one per node), in order: each one's reply,
        or the exception it raised. A script a node did not know never ran: the scripts are
        loaded again and those calls sent again."""
        replies = await self._pipelined(calls)
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:
            await self.load_scripts()
            again = await self._pipelined([calls[i] for i in missing])
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _pipelined(self, calls: Sequence[ScriptCall]) -> list[Any]:
        async with self.redis.pipeline(transaction=False) as pipe:
            for name, keys, args in calls:
                pipe.execute_command("EVALSHA", self.shas[name], len(keys), *keys, *args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
        return replies

    async def call(self, name: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run one script now (loading the scripts again if the node lost them)."""
        command = ("EVALSHA", self.shas[name], len(keys), *keys, *args)
        try:
            return await self.redis.execute_command(*command)
        except NoScriptError:
            await self.load_scripts()
            return await self.redis.execute_command(*command)
