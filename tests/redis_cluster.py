"""A real Redis Cluster for tests: 3 primaries and 3 replicas, each a ``redis-server
--cluster-enabled yes`` in its own temporary directory on 127.0.0.1, joined by
``redis-cli --cluster create``, and resharded by ``redis-cli --cluster reshard``."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import RedisCluster

from . import binaries
from .helpers import free_port


def _free_ports(count: int) -> list[int]:
    """Ports whose cluster bus port (+10000) is free too."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port + 10000 > 65535 or port in ports:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        ports.append(port)
    return ports


class RedisClusterServers:
    """Six nodes; :attr:`url` is the ``redis+cluster://`` a store is configured with."""

    def __init__(self, directory: Path) -> None:
        self.server = binaries.need("redis")
        cli = shutil.which("redis-cli")
        if cli is None:
            binaries.skip("redis", "redis-cli is not installed (Debian: redis-tools)")
        assert cli is not None
        self.cli = cli
        self.directory = directory
        self.ports = _free_ports(6)
        self.processes: list[subprocess.Popen[bytes]] = []

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def start(self) -> None:
        for port in self.ports:
            node = self.directory / str(port)
            node.mkdir()
            command = [
                self.server, "--port", str(port), "--bind", "127.0.0.1",
                "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", "2000", "--save", "", "--appendonly", "no",
                "--dir", str(node),
            ]  # fmt: skip
            self.processes.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        for port in self.ports:
            self._wait(lambda port=port: self._cli(port, "PING") == "PONG", "start")
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(
            [self.cli, "--cluster", "create", *nodes, "--cluster-replicas", "1"],
            input=b"yes\n",
            check=True,
            capture_output=True,
            timeout=60,
        )
        self._wait(self._ok, "form")

    def _ok(self) -> bool:
        """Every node sees the cluster whole, and every replica follows its primary."""
        if not all("cluster_state:ok" in self._cli(p, "CLUSTER", "INFO") for p in self.ports):
            return False
        return self._cli(self.ports[0], "CLUSTER", "NODES").count("slave") == 3

    def _cli(self, port: int, *command: str) -> str:
        done = subprocess.run(
            [self.cli, "-p", str(port), *command], capture_output=True, timeout=10
        )
        return done.stdout.decode().strip()

    @staticmethod
    def _wait(ready: object, what: str) -> None:
        assert callable(ready)
        deadline = time.monotonic() + 30
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the Redis Cluster did not {what}")
            time.sleep(0.1)

    def primaries(self) -> list[tuple[str, int, int]]:
        """(node id, port, slot count) of each primary."""
        found = []
        for line in self._cli(self.ports[0], "CLUSTER", "NODES").splitlines():
            fields = line.split()
            if "master" not in fields[2].split(","):
                continue
            port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
            slots = 0
            for part in fields[8:]:
                low, _, high = part.partition("-")
                if low.isdigit():
                    slots += int(high or low) - int(low) + 1
            found.append((fields[0], port, slots))
        return found

    def migrate_slots_of(self, stream_ids: list[str]) -> int:
        """Move the slot of each stream to the next primary, as ``redis-cli --cluster
        reshard`` moves one: IMPORTING and MIGRATING, keys MIGRATEd in small batches with a
        pause (the window in which clients meet ASK and TRYAGAIN), then the slot's new owner
        told to every node. How many slots moved."""
        import redis

        primaries = [(node_id, port) for node_id, port, _ in self.primaries()]
        clients = {port: redis.Redis(port=port) for _, port in primaries}
        try:
            first = clients[primaries[0][1]]
            slots = {int(first.cluster("KEYSLOT", f"{{{sid}}}")) for sid in stream_ids}
            for slot in sorted(slots):
                self._migrate(slot, primaries, clients)
        finally:
            for client in clients.values():
                client.close()
        return len(slots)

    def _migrate(
        self, slot: int, primaries: list[tuple[str, int]], clients: dict[int, Any]
    ) -> None:
        ports = [port for _, port in primaries]
        source = self._owner(clients[ports[0]], slot)
        target = ports[(ports.index(source) + 1) % len(ports)]
        ids = dict((port, node_id) for node_id, port in primaries)
        clients[target].execute_command("CLUSTER SETSLOT", slot, "IMPORTING", ids[source])
        clients[source].execute_command("CLUSTER SETSLOT", slot, "MIGRATING", ids[target])
        while keys := clients[source].execute_command("CLUSTER GETKEYSINSLOT", slot, 2):
            clients[source].execute_command(
                "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys
            )
            time.sleep(0.02)
        for client in clients.values():
            client.execute_command("CLUSTER SETSLOT", slot, "NODE", ids[target])

    @staticmethod
    def _owner(client: Any, slot: int) -> int:
        """The port of the primary that serves ``slot``."""
        for low, high, primary, *_ in client.execute_command("CLUSTER SLOTS"):
            if low <= slot <= high:
                return int(primary[1])
        raise LookupError(f"no node serves slot {slot}")

    def reshard(self, source: str, target: str, slots: int) -> subprocess.Popen[bytes]:
        """Move ``slots`` slots (and their keys) from node ``source`` to ``target``, started
        in the background."""
        command = [
            self.cli, "--cluster", "reshard", f"127.0.0.1:{self.ports[0]}",
            "--cluster-from", source, "--cluster-to", target,
            "--cluster-slots", str(slots), "--cluster-yes", "--cluster-pipeline", "10",
        ]  # fmt: skip
        return subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def stop(self) -> None:
        for process in self.processes:
            process.kill()
        for process in self.processes:
            process.wait(10)
        self.processes = []


def client_for(url: str) -> Any:
    """A redis-py client for ``url``, one server's or a cluster's (what a test pokes with)."""
    if not url.startswith("redis+cluster://"):
        return aioredis.from_url(url)
    first = url.removeprefix("redis+cluster://").split(",")[0]
    return RedisCluster.from_url(f"redis://{first}")
