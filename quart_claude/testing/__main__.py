"""``python -m quart_claude.testing --port 8001``: serve the emulator until interrupted."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import ssl

from ._emulator import Emulator, ErrorReply, Reply, Scripted


async def _main(args: argparse.Namespace) -> None:
    default: Scripted
    if args.error_status:
        headers = {"retry-after": args.retry_after} if args.retry_after else {}
        default = ErrorReply(args.error_status, headers=headers)
    else:
        default = Reply(
            text=" ".join(["token"] * args.tokens) if args.tokens else None,
            token_delay=args.token_delay,
            first_token_delay=args.first_token_delay,
            stamp=args.stamp,
            fault=args.fault,
            fault_after=args.fault_after,
            on_continue=args.on_continue,
        )
    context = None
    if args.tls_cert:  # HTTPS, as production's upstream is
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(args.tls_cert, args.tls_key)
    emulator = Emulator(
        host=args.host,
        port=args.port,
        token_delay=args.token_delay,
        default=default,
        ssl=context,
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
    parser = argparse.ArgumentParser(
        prog="python -m quart_claude.testing",
        description="An offline Anthropic Messages API emulator.",
    )
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
    parser.add_argument(
        "--fault",
        choices=["error", "drop", "stall", "eof"],
        help="every answer fails this way after --fault-after deltas",
    )
    parser.add_argument("--fault-after", type=int, default=5, help="deltas before the fault")
    parser.add_argument(
        "--on-continue",
        choices=["rest", "restart", "repeat_tail", "diverge"],
        default="rest",
        help="how continuation requests are answered (default: the rest of the text)",
    )
    parser.add_argument(
        "--error-status",
        type=int,
        help="answer every request with this HTTP error (e.g. 429, 529)",
    )
    parser.add_argument("--retry-after", help="the retry-after header of --error-status")
    parser.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    parser.add_argument("--tls-key", help="the certificate's private key (PEM)")
    args = parser.parse_args()
    asyncio.run(_main(args))


if __name__ == "__main__":
    main()
