"""``python -m quart_claude.testing --port 8001``: serve the emulator until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal

from ._emulator import Emulator, Reply


async def _main(args: argparse.Namespace) -> None:
    default = Reply(
        text=" ".join(["token"] * args.tokens) if args.tokens else None,
        token_delay=args.token_delay,
        first_token_delay=args.first_token_delay,
        stamp=args.stamp,
    )
    emulator = Emulator(
        host=args.host, port=args.port, token_delay=args.token_delay, default=default
    )
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
    parser.add_argument(
        "--tokens",
        type=int,
        default=0,
        help="answer with this many tokens (default: a demo answer)",
    )
    parser.add_argument(
        "--first-token-delay",
        type=float,
        default=0.0,
        help="seconds of silence before the first token (thinking)",
    )
    parser.add_argument(
        "--stamp",
        action="store_true",
        help="each token carries its send time, for latency measurements",
    )
    args = parser.parse_args()
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
