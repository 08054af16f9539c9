"""``make bench`` (the ``takeover`` scenario): what a producer's death costs.

Two single-process ``hypercorn -w 0`` servers share a redis-server; the emulator (in this
process) paces ``--streams`` answers. Each stream is POSTed to server A and followed live
from server B. Mid-answer, A is SIGKILLed. Measured per stream, at B's follower: the time
from the kill to the first continued delta (no delta can come from the new producer before
A's lease lapses, 3 s, so the first delta more than 0.5 s after the kill is the first
continued one), and the upstream tokens paid beyond one uninterrupted answer (``done``'s
usage, summed over both requests, minus the first request's input and the answer's tokens).

    python -m bench.takeover [--streams 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import httpx2

from quart_claude import SSEParser
from quart_claude.testing import Emulator, Reply

from .run import ROOT, listener, percentile, port_of, redis_server

WORDS = 150
ANSWER = " ".join(f"w{i:03d}" for i in range(WORDS))
KILL_AFTER = 40  # deltas into each answer


async def serve(env: dict[str, str], log: Path) -> tuple[asyncio.subprocess.Process, int]:
    """A ``hypercorn -w 0`` server on a socket it inherits; the process and its port."""
    hypercorn = str(Path(sys.executable).with_name("hypercorn"))
    sock = listener()
    port = port_of(sock)
    with log.open("ab") as sink, sock:
        process = await asyncio.create_subprocess_exec(
            hypercorn, "-w", "0", "-b", f"fd://{sock.fileno()}", "tests.host_app:app",
            cwd=ROOT, env=env, stdout=sink, stderr=sink, pass_fds=(sock.fileno(),),
        )  # fmt: skip
    async with httpx2.AsyncClient() as http:
        for _ in range(400):
            try:
                if (await http.get(f"http://127.0.0.1:{port}/ready")).status_code == 200:
                    return process, port
            except httpx2.TransportError:
                await asyncio.sleep(0.05)
    raise RuntimeError(f"hypercorn on {port} never became ready (see {log})")


async def follow(
    http: httpx2.AsyncClient, url: str, arrivals: list[tuple[float, dict[str, Any]]]
) -> None:
    async with http.stream("GET", url) as response:
        parser = SSEParser()
        async for chunk in response.aiter_bytes():
            for event in parser.feed(chunk):
                payload = event.json()
                arrivals.append((time.monotonic(), payload))
                if payload["type"] in ("done", "error"):
                    return


async def one_round(streams: int, redis_url: str, log: Path) -> list[dict[str, float]]:
    async with Emulator() as emulator:
        emulator.default = Reply(ANSWER, token_delay=0.04)
        env = {
            **os.environ,
            "CLAUDE_API_KEY": "sk-bench-takeover",
            "CLAUDE_BASE_URL": emulator.url,
            "CLAUDE_STREAM_STORE": redis_url,
            "CLAUDE_HEARTBEAT_INTERVAL": "1",
        }
        (a, port_a), (b, port_b) = await asyncio.gather(serve(env, log), serve(env, log))
        try:
            async with httpx2.AsyncClient(timeout=60) as http:
                ids = []
                for index in range(streams):
                    response = await http.send(
                        http.build_request(
                            "POST",
                            f"http://127.0.0.1:{port_a}/chat/stream",
                            json={"message": f"question {index}"},
                        ),
                        stream=True,
                    )
                    ids.append((response, response.headers["x-stream-id"]))
                followed: list[list[tuple[float, dict[str, Any]]]] = [[] for _ in ids]
                tasks = [
                    asyncio.create_task(
                        follow(http, f"http://127.0.0.1:{port_b}/chat/stream/{sid}", followed[i])
                    )
                    for i, (_, sid) in enumerate(ids)
                ]

                def fewest_deltas() -> int:
                    return min(sum(1 for _, e in f if e["type"] == "delta") for f in followed)

                while fewest_deltas() < KILL_AFTER:  # noqa: ASYNC110 (polls plain lists)
                    await asyncio.sleep(0.02)
                killed = time.monotonic()
                a.send_signal(signal.SIGKILL)
                await a.wait()
                await asyncio.wait_for(asyncio.gather(*tasks), 120)
                for response, _ in ids:  # the POSTs to A, cut by the kill
                    with contextlib.suppress(httpx2.HTTPError):
                        await response.aclose()
        finally:
            for process in (a, b):
                if process.returncode is None:
                    process.kill()
                    await process.wait()
    results = []
    for arrivals in followed:
        events = [e for _, e in arrivals]
        text = "".join(e["text"] for e in events if e["type"] == "delta")
        assert events[-1]["type"] == "done" and text == ANSWER, events[-1]
        first = next(t for t, e in arrivals if e["type"] == "delta" and t > killed + 0.5)
        start_usage, usage = events[0]["usage"], events[-1]["usage"]
        extra = (usage["input_tokens"] - start_usage["input_tokens"]) + (
            usage["output_tokens"] - WORDS
        )
        results.append({"gap_s": first - killed, "extra_tokens": float(extra)})
    return results


async def main_async(streams: int, rounds: int, out: Path) -> dict[str, Any]:
    log = out / "takeover-servers.log"
    log.write_bytes(b"")
    with redis_server() as redis_url:
        results = []
        for _ in range(rounds):
            results += await one_round(streams, redis_url, log)
    gaps = [r["gap_s"] for r in results]
    extra = [r["extra_tokens"] for r in results]
    return {
        "streams": len(results),
        "kill_to_first_continued_delta_p50_s": percentile(gaps, 0.5),
        "kill_to_first_continued_delta_p99_s": percentile(gaps, 0.99),
        "extra_upstream_tokens_mean": statistics.fmean(extra),
        "extra_upstream_tokens_max": max(extra),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--results", type=Path, default=ROOT / "bench" / "results", help="where the JSON goes"
    )
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    summary = asyncio.run(main_async(args.streams, args.rounds, args.results))
    print(json.dumps(summary, indent=2))
    out = args.results / "takeover.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        "| scenario | streams | kill to first continued delta p50 | p99 | "
        "extra upstream tokens (mean, max) |\n|---|---|---|---|---|\n"
        f"| takeover | {summary['streams']} | "
        f"{summary['kill_to_first_continued_delta_p50_s']:.2f} s | "
        f"{summary['kill_to_first_continued_delta_p99_s']:.2f} s | "
        f"{summary['extra_upstream_tokens_mean']:.0f}, {summary['extra_upstream_tokens_max']:.0f} |"
    )


if __name__ == "__main__":
    main()
