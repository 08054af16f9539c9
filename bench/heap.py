"""What one open stream holds of the Python heap, by who allocated it.

    python -m bench.heap [--streams 200] [--plain]

The emulator runs apart (TLS, as production's upstream, unless ``--plain``); the server
(``Claude(app)`` under Hypercorn on uvloop) and the load generator share this process, so
tracemalloc sees the server's side whole. Each open stream has had its first token and waits
for the next. An allocation is charged to the innermost code on its traceback that is not
the standard library's: aiohttp, Quart, Hypercorn, one of our modules, or the load
generator (its own sockets, a row apart). RSS also holds what tracemalloc cannot see:
OpenSSL's allocations, and the pages of the event loop's buffers a stream touched.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import gc
import os
import tempfile
import tracemalloc
from pathlib import Path

from quart_claude import Claude
from quart_claude.testing import certificates

from .load import chat
from .run import emulator_process, listener, port_of
from .servers import config_for, quart_claude_app, run


def owner(traceback: tracemalloc.Traceback) -> str:
    """The innermost code on ``traceback`` that is not the standard library's: an asyncio
    future or an ``ssl`` object is charged to the library (or our module) that made it."""
    for frame in reversed(traceback):
        filename = frame.filename
        if "/quart_claude/" in filename:
            return "quart_claude/" + filename.split("/quart_claude/")[-1]
        if "/bench/" in filename:
            return "load generator" if filename.endswith("load.py") else "bench"
        if "site-packages/" in filename:
            return filename.split("site-packages/")[-1].split("/")[0]
    return "standard library"


async def measure(upstream: str, streams: int) -> collections.Counter[str]:
    from hypercorn.asyncio import serve

    sock = listener()
    port = port_of(sock)
    stop = asyncio.Event()
    app = quart_claude_app(upstream, None)
    config = config_for(f"fd://{sock.fileno()}")
    server = asyncio.ensure_future(serve(app, config, shutdown_trigger=stop.wait))
    try:
        for _ in range(2):  # warm up: imports, the session, first-request costs
            await chat("127.0.0.1", port, "warm up")
        gc.collect()
        tracemalloc.start(40)
        before = tracemalloc.take_snapshot()
        tasks = [asyncio.ensure_future(chat("127.0.0.1", port, f"s{i}")) for i in range(streams)]
        state = Claude.state(app)
        while len(state.producers) < streams:  # noqa: ASYNC110 (a count, with no event to wait on)
            await asyncio.sleep(0.1)
        await asyncio.sleep(1)  # and its first token in (0.05 s after), the next 60 s away
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        owners: collections.Counter[str] = collections.Counter()
        for stat in after.compare_to(before, "traceback"):
            owners[owner(stat.traceback)] += stat.size_diff
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return owners
    finally:
        stop.set()
        await server  # Hypercorn closes the socket it was given


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--plain", action="store_true", help="the emulator serves plain HTTP")
    args = parser.parse_args()
    emulator_args = ["--tokens", "2", "--token-delay", "60", "--first-token-delay", "0.05"]
    with tempfile.TemporaryDirectory(prefix="qc-bench-heap-") as folder:
        if not args.plain:
            ca, cert, key = certificates(Path(folder))
            emulator_args += ["--tls-cert", str(cert), "--tls-key", str(key)]
            os.environ["SSL_CERT_FILE"] = str(ca)  # the server trusts the run's certificate
        emulator, port = emulator_process(emulator_args)
        try:
            scheme = "http" if args.plain else "https"
            owners = run(measure(f"{scheme}://127.0.0.1:{port}", args.streams))
        finally:
            emulator.terminate()
            emulator.wait(10)
    total = sum(owners.values())
    print(f"Python heap per open stream ({'plain' if args.plain else 'TLS'} upstream, "
          f"{args.streams} streams): {total / args.streams / 1024:.1f} KiB")  # fmt: skip
    for name, size in owners.most_common():
        if abs(size) / args.streams >= 10:
            print(f"  {size / args.streams / 1024:6.2f} KiB  {name}")


if __name__ == "__main__":
    main()
