"""A real PostgreSQL server for a test: ``initdb`` in a temporary directory, reachable only on
a unix socket there (no port to race for), password authentication on, stopped at the end.
As root (CI's containers), it runs as the ``postgres`` (or ``nobody``) user, since PostgreSQL
refuses to run as root."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

PASSWORD = "pg-secret-password-5521"


class PostgresServer:
    def __init__(self, pg_ctl: str) -> None:
        self.bindir = Path(pg_ctl).resolve().parent
        self.folder = Path(tempfile.mkdtemp(prefix="qc-postgres-"))
        self.data = self.folder / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            user = "postgres" if _exists("postgres") else "nobody"
            entry = pwd.getpwnam(user)
            os.chown(self.folder, entry.pw_uid, entry.pw_gid)
            self._as = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}"]
            self._as += ["--clear-groups", "--"]
        (self.folder / "pw").write_text(PASSWORD)
        if self._as:
            os.chown(self.folder / "pw", pwd.getpwnam(user).pw_uid, -1)
        self._run(
            "initdb", "-D", str(self.data), "-U", "claude", "--pwfile", str(self.folder / "pw"),
            "--auth-local=scram-sha-256", "--auth-host=scram-sha-256", "-E", "UTF8",
        )  # fmt: skip

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://claude:{PASSWORD}@/postgres?host={self.folder}"

    def _run(self, program: str, *args: str) -> None:
        subprocess.run(
            [*self._as, str(self.bindir / program), *args],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=self.folder,
        )

    def start(self) -> None:
        options = f"-c listen_addresses='' -k {self.folder} -c fsync=off -c full_page_writes=off"
        self._run(
            "pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.folder / "log"),
            "-w", "-t", "30", "start",
        )  # fmt: skip

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def close(self) -> None:
        try:
            self.stop()
        except subprocess.CalledProcessError:
            pass  # not running
        shutil.rmtree(self.folder, ignore_errors=True)


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True
