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


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in PACKAGE.rglob("*.py")}


def _type_checking_only(tree: ast.Module) -> set[int]:
    """The nodes under ``if TYPE_CHECKING:`` (never run, so never a cycle)."""
    exempt: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            exempt.update(id(inner) for inner in ast.walk(node))
    return exempt


def imported(module: str) -> tuple[set[str], set[str]]:
    """What ``module`` (a dotted name in the package) imports at any depth of code, function
    level too, ``TYPE_CHECKING`` aside: the package's own modules (relative imports at every
    level, ``from ..`` included, and absolute ones), and the top-level packages outside it."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    exempt = _type_checking_only(tree)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    inside: set[str] = set()
    outside: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            names = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for name in names:
            if name in MODULES:
                if name != module:
                    inside.add(name)
            elif name and not name.startswith(PACKAGE.name):
                outside.add(name.split(".")[0])
    return inside, outside


def imports_of(module: str) -> set[str]:
    """The top-level packages and the ``_core`` modules (as ``.name``) a core module imports."""
    inside, outside = imported(f"{PACKAGE.name}._core.{module}")
    core = f"{PACKAGE.name}._core."
    return outside | {"." + name.removeprefix(core) for name in inside if name.startswith(core)}


def closure(module: str) -> set[str]:
    """Every top-level package a core module reaches, through every module of the package
    it imports (the package face and the front ends too)."""
    seen: set[str] = set()
    todo = [f"{PACKAGE.name}._core.{module}"]
    packages: set[str] = set()
    while todo:
        current = todo.pop()
        if current in seen:
            continue
        seen.add(current)
        inside, outside = imported(current)
        todo.extend(inside)
        packages |= outside
    return packages


def cycles() -> list[list[str]]:
    """The import cycles of the package (Tarjan's strongly connected components)."""
    graph = {module: imported(module)[0] for module in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        for other in graph[module]:
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = [stack.pop()]
            while component[-1] != module:
                component.append(stack.pop())
            if len(component) > 1:
                found.append(sorted(component))

    for module in graph:
        if module not in index:
            visit(module)
    return found


def test_the_relay_knows_the_policy_seam_and_no_policy() -> None:
    """Budgets, fallback and the guards plug in as policies: the relay imports none of them."""
    policies = {".budget", ".ledger", ".fallback", ".guards"}
    assert ".policy" in imports_of("relay")
    assert not imports_of("relay") & policies
    assert not closure_modules("relay") & policies


def closure_modules(module: str) -> set[str]:
    """Every core module ``module`` reaches (as ``.name``)."""
    core = f"{PACKAGE.name}._core."
    seen: set[str] = set()
    todo = [core + module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo.extend(imported(current)[0])
    return {"." + name.removeprefix(core) for name in seen if name.startswith(core)} - {
        "." + module
    }


def test_the_package_has_no_import_cycle() -> None:
    """Every import inside the package, function level too (``TYPE_CHECKING`` aside)."""
    assert cycles() == []


def test_the_cycle_finder_sees_a_cycle(tmp_path: Path) -> None:
    """The finder fails on a cycle: ``from ..`` and a function-level import close one."""
    global MODULES
    saved = MODULES
    (tmp_path / "pkg" / "sub").mkdir(parents=True)
    (tmp_path / "pkg" / "__init__.py").write_text("from .sub.a import x\n")
    (tmp_path / "pkg" / "sub" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "sub" / "a.py").write_text("def f():\n    from .. import y\n")
    try:
        MODULES = {
            "quart_claude": tmp_path / "pkg" / "__init__.py",
            "quart_claude.sub": tmp_path / "pkg" / "sub" / "__init__.py",
            "quart_claude.sub.a": tmp_path / "pkg" / "sub" / "a.py",
        }
        assert cycles() == [["quart_claude", "quart_claude.sub.a"]]
    finally:
        MODULES = saved


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
    config it reads do not pay for it (issue 27's import target). Nor does an app without
    conversations pay for SQLAlchemy (about 20 MB of a worker)."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from quart import Quart\n"
        "from quart_claude import Claude\n"
        "Claude(Quart('x'), api_key='sk-test', fallbacks=[{'model': 'claude-haiku-4-5'}])\n"
        "print(sorted(m for m in ('anthropic', 'httpx2', 'aiohttp', 'sqlalchemy')"
        " if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]", done.stdout + done.stderr
