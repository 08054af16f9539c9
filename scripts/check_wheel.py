"""The built wheel as a user gets it (``make check-wheel``; CI runs it).

Checks the wheel's contents (what runs is in it; tests, bench and the example app are not),
installs it into a clean venv with only the locked runtime dependencies (no dev tools, not
editable), then, from a directory outside the checkout, imports the public API, serves a tiny
``Claude(app)`` with the real ``hypercorn`` command against ``python -m quart_claude.testing``,
and streams one reply through :mod:`quart_claude.client`. Last, ``pyright --verifytypes`` on
the installed package: every name a user can reach has a known type (100 %).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

REQUIRED = (
    "quart_claude/__init__.py",
    "quart_claude/py.typed",
    "quart_claude/testing/__main__.py",
    "quart_claude/static/claude-stream.js",
)
FORBIDDEN = ("tests/", "bench/", "example_app/", "scripts/")

# Runs in the clean venv, with the temporary directory as its working directory.
SMOKE = textwrap.dedent(
    """
    import os, socket, subprocess, sys, time
    from pathlib import Path

    import quart_claude
    from quart_claude import Claude, ClaudeConfig, ConfigError, SSEParser, UpstreamError
    from quart_claude.client import stream_chat_sync
    from quart_claude.testing import Emulator, Reply

    checkout = Path(sys.argv[1]).resolve()
    installed = Path(quart_claude.__file__).resolve()
    assert checkout not in installed.parents, f"imported from the checkout: {installed}"
    assert (installed.parent / "py.typed").is_file()
    print("imported", quart_claude.__version__, "from", installed.parent)

    def free_port():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]

    def wait_for(port, process):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            assert process.poll() is None, f"exited with {process.returncode}"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"nothing listening on {port}")

    Path("smoke_app.py").write_text(
        "from quart import Quart\\n"
        "from quart_claude import Claude\\n"
        "app = Quart(__name__)\\n"
        "Claude(app)\\n"
    )
    emulator_port, app_port = free_port(), free_port()
    emulator = subprocess.Popen(
        [sys.executable, "-m", "quart_claude.testing", "--port", str(emulator_port),
         "--tokens", "12", "--token-delay", "0.01"]
    )
    env = {
        **os.environ,
        "CLAUDE_API_KEY": "sk-wheel-smoke-0000000000",
        "CLAUDE_BASE_URL": f"http://127.0.0.1:{emulator_port}",
    }
    server = subprocess.Popen(
        [sys.executable, "-m", "hypercorn", "-b", f"127.0.0.1:{app_port}", "smoke_app:app"],
        env=env,
    )
    try:
        wait_for(emulator_port, emulator)
        wait_for(app_port, server)
        events = list(
            stream_chat_sync(f"http://127.0.0.1:{app_port}/chat/stream", message="hi")
        )
    finally:
        for process in (server, emulator):
            process.terminate()
            process.wait(15)
    types = [event["type"] for event in events]
    text = "".join(event["text"] for event in events if event["type"] == "delta")
    assert types[0] == "start" and types[-1] == "done", types
    assert text == " ".join(["token"] * 12), text
    print(f"streamed {len(events)} events through the installed wheel: ok")
    """
)


def check_contents(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    missing = [name for name in REQUIRED if name not in names]
    extra = [name for name in names if name.startswith(FORBIDDEN)]
    if missing or extra:
        sys.exit(f"{wheel.name}: missing {missing}, should not contain {extra}")
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    license_file = [n for n in names if n.endswith("licenses/LICENSE")]
    if not license_file:
        sys.exit(f"{wheel.name}: no license file")
    print(f"{wheel.name}: {len(names)} files, contents ok ({metadata})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wheel", type=Path)
    parser.add_argument("--python", default="python3", help="the interpreter for the venv")
    parser.add_argument("--runtime-lock", type=Path, required=True)
    parser.add_argument("--pyright", type=Path, help="pyright, for --verifytypes (tools/)")
    args = parser.parse_args()
    checkout = Path(__file__).resolve().parent.parent
    wheel, lock = args.wheel.resolve(), args.runtime_lock.resolve()
    check_contents(wheel)
    with tempfile.TemporaryDirectory(prefix="quart-claude-wheel-") as tmp:
        venv = Path(tmp) / "venv"
        python = str(venv / "bin" / "python")
        work = Path(tmp) / "app"
        work.mkdir()

        def run(*command: str) -> None:
            subprocess.run(command, check=True, cwd=work)

        run(args.python, "-m", "venv", str(venv))
        pip = (python, "-m", "pip", "install", "-q", "--disable-pip-version-check")
        run(*pip, "--require-hashes", "--no-deps", "-r", str(lock))
        run(*pip, "--no-deps", str(wheel))
        run(python, "-m", "pip", "check")  # the wheel's declared dependencies are all there
        run(python, "-c", SMOKE, str(checkout))
        if args.pyright is None:
            return
        if args.pyright.is_file():
            verify_types(args.pyright.resolve(), venv, work)
        elif os.environ.get("QUART_CLAUDE_REQUIRE_ALL") == "1":
            sys.exit(f"{args.pyright} is missing (npm ci --prefix tools): types not verified")
        else:
            print(f"TYPES NOT VERIFIED: {args.pyright} is missing (npm ci --prefix tools)")


def verify_types(pyright: Path, venv: Path, work: Path) -> None:
    """The installed package's public interface is 100 % typed (pyright finds the package
    through the venv it runs in: an editable install would hide it)."""
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}:{os.environ['PATH']}"}
    result = subprocess.run(
        [str(pyright), "--verifytypes", "quart_claude", "--ignoreexternal"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    score = [line for line in result.stdout.splitlines() if "completeness score" in line]
    if result.returncode != 0 or score != ["Type completeness score: 100%"]:
        sys.exit(f"pyright --verifytypes quart_claude:\n{result.stdout}{result.stderr}")
    print(f"pyright --verifytypes quart_claude: {score[0]}")


if __name__ == "__main__":
    main()
