"""``make bench`` keeps working: a small run of three scenarios, every stream complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from . import binaries

pytestmark = pytest.mark.system

ROOT = Path(__file__).resolve().parent.parent


def bench(module: str, *args: str) -> list[str]:
    """Run ``python -m bench.<module> args``; its output lines, then its log (the reasons
    for any failure) as the last one. It must exit 0."""
    result = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    return [*result.stdout.splitlines(), result.stderr]


@pytest.mark.parametrize(
    ("scenario", "systems", "plain"),
    [
        # the upstream over TLS (the default, as production's): a server that did not trust
        # the run's certificate would fail every stream
        ("flat-out", 4, False),  # bare, common, quart_claude, and on Bedrock (event stream)
        # bare, common, quart_claude and flask (more streams than one client may hold by
        # default, so a cap the bench forgot shows up as failures), and an output guard in
        # each mode (a hold guard's split deltas relayed whole)
        ("paced", 6, False),
        # quart_claude, with conversations in SQLite, and with a budget; over plain HTTP
        ("setup", 3, True),
    ],
)
def test_quick_benchmark_runs_without_failures(
    scenario: str, systems: int, plain: bool, tmp_path: Path
) -> None:
    """One scenario each (they run side by side on the suite's workers)."""
    args = ["--quick", "--only", scenario, "--results", str(tmp_path), *(["--plain"] * plain)]
    lines = bench("run", *args)
    name = scenario + ("+plain" if plain else "")
    rows = [line for line in lines if line.startswith(f"| {name} ")]
    assert len(rows) == systems, lines
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert int(cells[3]) > 0, row  # events relayed
        assert cells[4] == "0", row  # failures


def test_takeover_benchmark_runs(tmp_path: Path) -> None:
    """``python -m bench.takeover``: every stream continued exactly after the kill (the
    script asserts it), and a figure for each column."""
    binaries.need("redis")  # the benchmark starts a redis-server of its own
    lines = bench("takeover", "--streams", "3", "--rounds", "1", "--results", str(tmp_path))
    (row,) = [line for line in lines if line.startswith("| takeover")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "3"
    gap = float(cells[2].removesuffix(" s"))
    assert 0.5 < gap < 30  # after the lease lapsed, and not never


def test_tool_loop_benchmark_runs() -> None:
    """``python -m bench.tool_loop``: every answer took its tool step (the script asserts
    it), and a figure for each column."""
    lines = bench("tool_loop", "--streams", "5")
    (row,) = [line for line in lines if line.startswith("| tool-loop")]
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "5"
    p50, p99 = (float(part) for part in cells[3].split(" / "))
    assert 0 < p50 <= p99
