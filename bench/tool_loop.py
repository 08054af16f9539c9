"""``make bench`` (the ``tool-loop`` scenario): what one tool step costs the relay.

A Quart app served by Hypercorn in this process, with one async tool that returns at once,
answers ``--streams`` questions, ``--concurrency`` at a time; the emulator (in this process
too, no pacing) makes each answer a tool call, then a short text. Measured per stream, in the
emulator's own records: the gap from the end of the first upstream response (the one that
asked for the tool) to the arrival of the second request (the one carrying the result). That
gap is everything the relay does for a step: parse the tool call, validate its input, run the
tool, record the result, emit two events, build and send the next request.

    python -m bench.tool_loop [--streams 100] [--concurrency 1]

The emulator, the server and the load share one process and one event loop, so with
``--concurrency`` above 1 the gap mostly measures that loop's queue, not the relay.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx2
from quart import Quart

from quart_claude import Claude
from quart_claude.testing import Emulator, Reply, ToolUse

from .run import percentile


async def measure(streams: int, concurrency: int) -> dict[str, float]:
    from tests.helpers import serving  # the suite's in-process Hypercorn

    async with Emulator() as emulator:
        app = Quart(__name__)
        claude = Claude(
            app,
            api_key="sk-bench",
            base_url=emulator.url,
            max_concurrent_streams=concurrency * 2,
            max_streams_per_client=0,
        )

        @claude.tool
        async def lookup(key: str) -> dict[str, str]:
            """Looks a key up."""
            return {"key": key, "value": "v"}

        script = []
        for index in range(streams):
            script += [
                Reply("Checking. ", tool_calls=[ToolUse("lookup", {"key": f"k{index}"})]),
                Reply("The value is v."),
            ]
        emulator.script(*script)
        gate = asyncio.Semaphore(concurrency)
        async with serving(app) as url, httpx2.AsyncClient(timeout=60) as http:

            async def one(index: int) -> None:
                async with gate:
                    body = {"message": f"question {index}"}
                    async with http.stream("POST", url + "/chat/stream", json=body) as response:
                        await response.aread()

            started = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(streams)))
            elapsed = time.perf_counter() - started
    by_prompt: dict[str, list[float]] = {}
    firsts: dict[str, float] = {}
    for record in emulator.requests:
        prompt = record.body["messages"][0]["content"]
        if len(record.body["messages"]) == 1:
            assert record.ended_at is not None
            firsts[prompt] = record.ended_at
        else:
            by_prompt.setdefault(prompt, []).append(record.received_at - firsts[prompt])
    gaps = sorted(gap * 1000 for values in by_prompt.values() for gap in values)
    assert len(gaps) == streams, f"{len(gaps)} tool steps for {streams} streams"
    return {
        "streams": streams,
        "gap_p50_ms": statistics.median(gaps),
        "gap_p99_ms": percentile(gaps, 0.99) or 0.0,
        "streams_per_s": streams / elapsed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=1)
    args = parser.parse_args()
    result = asyncio.run(measure(args.streams, args.concurrency))
    print("| scenario | streams | concurrency | step gap p50 / p99 ms | streams/s |")
    print("|---|---|---|---|---|")
    print(
        f"| tool-loop | {result['streams']:.0f} | {args.concurrency} | "
        f"{result['gap_p50_ms']:.1f} / {result['gap_p99_ms']:.1f} | "
        f"{result['streams_per_s']:.1f} |"
    )


if __name__ == "__main__":
    main()
