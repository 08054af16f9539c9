"""Metrics across worker processes (``PROMETHEUS_MULTIPROC_DIR``), through the real
``hypercorn`` command, and the shipped Prometheus config and Grafana dashboard evaluated by a
real Prometheus."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx2
import pytest

from quart_claude.testing import Emulator, ErrorReply, Reply

from . import binaries
from .helpers import free_port, stream_chat
from .test_hypercorn_cli import HYPERCORN, start, stop, wait_ready
from .test_observability import samples, value

pytestmark = [pytest.mark.system, pytest.mark.deps]

ROOT = Path(__file__).resolve().parent.parent
MODEL = "claude-sonnet-5-5"
ANSWER = " ".join(f"w{i}" for i in range(30))


def fresh_connection() -> httpx2.AsyncClient:
    """A client that never reuses a connection, so the kernel may pick any worker."""
    return httpx2.AsyncClient(timeout=30, limits=httpx2.Limits(max_keepalive_connections=0))


@contextlib.asynccontextmanager
async def hypercorn(
    emulator: Emulator, metrics_dir: Path, *args: str, **env: str
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    port = free_port()
    environ = {
        "CLAUDE_API_KEY": "sk-test-metrics",
        "CLAUDE_BASE_URL": emulator.url,
        "CLAUDE_MAX_RETRIES": "2",
        "CLAUDE_RETRY_BASE_DELAY": "0.05",
        "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir),
        **env,
    }
    process = await start(
        [HYPERCORN, *args, "-b", f"127.0.0.1:{port}", "tests.host_app:app"], environ
    )
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_ready(url + "/ready", process)
        yield url, process
    finally:
        await stop(process)


async def traffic_on_both_workers(url: str, emulator: Emulator) -> tuple[int, int, set[str]]:
    """Streams in concurrent batches until both workers produced some: (streams, output
    tokens, the pids that produced them)."""
    emulator.default = Reply(ANSWER, token_delay=0.01)
    streams = tokens = 0
    pids: set[str] = set()
    async with fresh_connection() as http:
        for _ in range(10):
            results = await asyncio.gather(
                *(stream_chat(http, url + "/chat/stream", {"message": "hi"}) for _ in range(6))
            )
            for result in results:
                assert result.types[-1] == "done"
                streams += 1
                tokens += result.events[-1]["usage"]["output_tokens"]
                pids.add(result.headers["x-worker-pid"])
            if len(pids) == 2:
                return streams, tokens, pids
    raise AssertionError("the kernel never gave the second worker a stream")


async def test_any_worker_answers_the_scrape_with_everyones_counts(
    emulator: Emulator, tmp_path: Path
) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    async with hypercorn(emulator, metrics_dir, "-w", "2") as (url, _):
        streams, tokens, producers = await traffic_on_both_workers(url, emulator)
        scraped_by: set[str] = set()
        async with fresh_connection() as http:
            for _ in range(60):
                response = await http.get(url + "/metrics")
                assert response.status_code == 200
                scraped_by.add(response.headers["x-worker-pid"])
                found = samples(response.text)
                assert value(found, "claude_streams_total", model=MODEL, outcome="done") == streams
                assert (
                    value(
                        found,
                        "claude_upstream_requests_total",
                        model=MODEL,
                        outcome="ok",
                        provider="anthropic",
                    )
                    == streams
                )
                assert (
                    value(
                        found,
                        "claude_tokens_total",
                        model=MODEL,
                        kind="output",
                        provider="anthropic",
                    )
                    == tokens
                )
                count = "claude_time_to_first_token_seconds_count"
                assert value(found, count, model=MODEL) == streams
                assert value(found, "claude_streams_active", model=MODEL) == 0
                if len(scraped_by) == 2:
                    break
        assert scraped_by == producers, "the scrapes did not reach both workers"


async def test_a_killed_worker_leaves_no_active_streams_behind(
    emulator: Emulator, tmp_path: Path
) -> None:
    """Two servers on one host share the metrics directory; one is SIGKILLed mid-stream: the
    other's scrape keeps its finished counts and stops counting its open streams."""
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    async with (
        hypercorn(emulator, metrics_dir, "-w", "0") as (doomed, process),
        hypercorn(emulator, metrics_dir, "-w", "0") as (survivor, _),
    ):
        async with fresh_connection() as http:
            emulator.script(Reply(ANSWER))
            finished = await stream_chat(http, doomed + "/chat/stream", {"message": "hi"})
            assert finished.types[-1] == "done"
            emulator.default = Reply(ANSWER, token_delay=1.0)
            readers = [
                asyncio.create_task(stream_chat(http, doomed + "/chat/stream", {"message": "x"}))
                for _ in range(3)
            ]
            await emulator.wait_for_requests(4)
            before = samples((await http.get(survivor + "/metrics")).text)
            assert value(before, "claude_streams_active", model=MODEL) == 3
            os.kill(process.pid, signal.SIGKILL)
            await process.wait()
            await asyncio.gather(*readers, return_exceptions=True)
            after = samples((await http.get(survivor + "/metrics")).text)
    assert value(after, "claude_streams_active", model=MODEL) == 0
    assert value(after, "claude_streams_total", model=MODEL, outcome="done") == 1


# -- the shipped deploy/prometheus.yml and Grafana dashboard, in a real Prometheus -----------


@contextlib.contextmanager
def prometheus(tmp_path: Path, target: str) -> Iterator[str]:
    prometheus_binary = binaries.need("prometheus")
    config = (ROOT / "deploy" / "prometheus.yml").read_text()
    for old, new in {
        'targets: ["app:8000"]': f'targets: ["{target}"]',
        "scrape_interval: 15s": "scrape_interval: 1s",
    }.items():
        assert old in config, old
        config = config.replace(old, new)
    (tmp_path / "prometheus.yml").write_text(config)
    port = free_port()
    process = subprocess.Popen(
        [
            prometheus_binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


async def query(http: httpx2.AsyncClient, prometheus_url: str, expr: str) -> list[float]:
    response = await http.get(prometheus_url + "/api/v1/query", params={"query": expr})
    body = response.json()
    assert body["status"] == "success", (expr, body)
    return [float(item["value"][1]) for item in body["data"]["result"]]


def dashboard_queries() -> dict[str, list[str]]:
    """Each panel's PromQL with Grafana's variables as it fills them in ("All" models)."""
    dashboard = json.loads(
        (ROOT / "deploy" / "grafana" / "quart-claude-dashboard.json").read_text()
    )
    return {
        panel["title"]: [
            target["expr"].replace("$model", ".*").replace("$__rate_interval", "1m")
            for target in panel["targets"]
        ]
        for panel in dashboard["panels"]
    }


async def test_the_dashboard_reads_real_prometheus_data(emulator: Emulator, tmp_path: Path) -> None:
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    async with hypercorn(emulator, metrics_dir, "-w", "2") as (url, _):
        with prometheus(tmp_path, url.removeprefix("http://")) as prom:
            async with httpx2.AsyncClient(timeout=10) as http:
                for _ in range(200):  # ready, and the target scraped once
                    with contextlib.suppress(httpx2.TransportError, AssertionError, ValueError):
                        if await query(http, prom, 'up{job="quart-claude"} == 1'):
                            break
                    await asyncio.sleep(0.1)
                else:
                    raise AssertionError("prometheus never scraped the server")
                emulator.script(ErrorReply(529))  # one retried failure, for "errors by class"
                emulator.default = Reply(ANSWER, cache_read_input_tokens=300)
                async with fresh_connection() as client:
                    results = await asyncio.gather(
                        *(
                            stream_chat(client, url + "/chat/stream", {"message": "hi"})
                            for _ in range(8)
                        )
                    )
                usage = [result.events[-1]["usage"] for result in results]
                prompt = sum(
                    u["input_tokens"]
                    + u["cache_read_input_tokens"]
                    + u["cache_creation_input_tokens"]
                    for u in usage
                )
                await asyncio.sleep(3)  # a few scrapes after the traffic
                panels = dashboard_queries()
                answers = {
                    title: [await query(http, prom, expr) for expr in exprs]
                    for title, exprs in panels.items()
                }
    assert len(answers) >= 9
    for title, found in answers.items():  # every query parses and finds its series
        assert all(series for series in found), (title, panels[title], found)
    assert answers["Active streams"] == [[0.0]]
    ratio = answers["Cache hit ratio"][0][0]
    assert math.isclose(ratio, 300 * 8 / prompt, rel_tol=1e-6), ratio
    p50, p95 = (series[0] for series in answers["Time to first token"])
    assert 0 < p50 <= p95 < 60
    assert answers["Output tokens per second"][0][0] > 0
    (errors,) = answers["Errors by class"]  # a series per class, all there from the start
    assert len(errors) > 1 and len([rate for rate in errors if rate > 0]) == 1  # overloaded
