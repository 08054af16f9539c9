"""``make bench`` keeps working: a small run of two scenarios, every stream complete."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_quick_benchmark_runs_without_failures() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--only", "flat-out", "setup"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    rows = [
        line for line in result.stdout.splitlines() if line.startswith(("| flat-out", "| setup"))
    ]
    assert len(rows) == 4, result.stdout  # bare, common, quart_claude; setup
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert int(cells[3]) > 0, row  # events relayed
        assert cells[4] == "0", row  # failures
