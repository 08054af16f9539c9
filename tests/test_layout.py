"""The layout's promises, read from the source's imports (no server, no SDK call):
the core knows no web framework, and the event protocol and the stores import no SDK."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.core

PACKAGE = Path(__file__).resolve().parent.parent / "quart_claude"
CORE = PACKAGE / "_core"
FRAMEWORKS = {"quart", "flask", "werkzeug", "hypercorn", "gunicorn", "flask_cors", "quart_cors"}
SDK = {"anthropic", "httpx2", "httpx", "aiohttp"}


def imports_of(module: str) -> set[str]:
    """The top-level packages and the ``_core`` modules ``module`` imports (any depth of
    code: function-level imports count too)."""
    tree = ast.parse((CORE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:  # from .x import y
                found.add("." + (node.module or "").split(".")[0])
            elif node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def closure(module: str) -> set[str]:
    """Every top-level package ``module`` reaches, through the core modules it imports."""
    seen, todo, packages = set(), [module], set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        for name in imports_of(current):
            if name.startswith("."):
                todo.append(name[1:])
            else:
                packages.add(name)
    return packages


CORE_MODULES = sorted(path.stem for path in CORE.glob("*.py") if path.stem != "__init__")


def test_the_import_reader_sees_imports() -> None:
    assert {"anthropic", ".first_party"} <= imports_of("providers")
    assert "anthropic" in closure("relay")


@pytest.mark.parametrize("module", CORE_MODULES)
def test_the_core_knows_no_web_framework(module: str) -> None:
    assert not closure(module) & FRAMEWORKS


@pytest.mark.parametrize(
    "module",
    [
        "protocol",
        "stream",
        "store",
        "redis_store",
        "redis_link",
        "redis_mirror",
        "redis_remote",
        "sse",
        "framing",
        "continuation",
        "retry",
    ],
)
def test_the_protocol_and_the_stores_import_no_sdk(module: str) -> None:
    assert not closure(module) & SDK


def test_importing_the_package_and_configuring_an_app_loads_no_sdk() -> None:
    """The SDK (about a second of import, most of it its types) loads when the app starts
    serving, where the clients are built: ``import quart_claude``, ``Claude(app)`` and the
    config it reads do not pay for it (issue 27's import target)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from quart import Quart\n"
        "from quart_claude import Claude\n"
        "Claude(Quart('x'), api_key='sk-test', fallbacks=[{'model': 'claude-haiku-4-5'}])\n"
        "print(sorted(m for m in ('anthropic', 'httpx2', 'aiohttp') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
