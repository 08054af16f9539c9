"""``python -m quart_claude.testing --port 8001``: serve the emulator until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from ._emulator import Emulator


async def _main(host: str, port: int, token_delay: float) -> None:
    emulator = Emulator(host=host, port=port, token_delay=token_delay)
    await emulator.start()
    print(f"quart-claude emulator listening on {emulator.url}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await emulator.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description="An offline Anthropic Messages API emulator.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument(
        "--token-delay",
        type=float,
        default=0.03,
        help="seconds between streamed tokens (default 0.03)",
    )
    args = parser.parse_args()
    asyncio.run(_main(args.host, args.port, args.token_delay))


if __name__ == "__main__":
    main()
