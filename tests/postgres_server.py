"""A real PostgreSQL server for the tests where a database is the point (the tracking server's store, the Optuna
study): Debian's package (`apt-get install postgresql`; .ci/run installs it where it is missing), a cluster made
with initdb in a temporary directory and started on a loopback port for the test session, as an unprivileged user
(PostgreSQL refuses to run as root: as root, the package's `postgres` user runs it).

Password authentication (scram-sha-256), as a managed database asks: the URLs carry a user and a password.
Durability is off (fsync, synchronous commits): a test's database dies with the session.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from ercstudy.netutil import free_port

USER, PASSWORD = "ercstudy", "test-only-password"
SERVER_USER = "postgres"  # the package's own user, when the tests run as root


class PostgresMissing(RuntimeError):
    pass


def binaries() -> Path:
    """The directory of initdb and postgres: Debian keeps them out of PATH, under /usr/lib/postgresql/VERSION/bin."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]) if p.parts[-3].isdigit() else 0)
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise PostgresMissing("PostgreSQL is not installed (Debian: apt-get install postgresql)")


class PostgresServer:
    def __init__(self) -> None:
        self.bin = binaries()
        self.root = Path(tempfile.mkdtemp(prefix="ercstudy-postgres-"))
        self.data, self.port, self.proc = self.root / "data", free_port(), None
        self.log = self.root / "server.log"
        self.as_root = os.geteuid() == 0

    def _command(self, *args: str) -> list[str]:
        return ["runuser", "-u", SERVER_USER, "--", *args] if self.as_root else list(args)

    def start(self, timeout_s: float = 60) -> None:
        password_file = self.root / "password"
        password_file.write_text(PASSWORD)
        if self.as_root:  # the server's user owns its files
            account = pwd.getpwnam(SERVER_USER)
            for path in (self.root, password_file):
                os.chown(path, account.pw_uid, account.pw_gid)
        made = subprocess.run(self._command(str(self.bin / "initdb"), "-D", str(self.data), "-U", USER, f"--pwfile={password_file}",
                                            "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"),
                              capture_output=True, text=True, timeout=120)
        if made.returncode != 0:
            raise RuntimeError(f"initdb failed ({made.returncode}):\n{made.stdout[-1000:]}{made.stderr[-2000:]}")
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self._command(str(self.bin / "postgres"), "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port),
                              "-k", str(self.root), "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"),
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        import psycopg

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.connect("postgres").close()
                return
            except psycopg.OperationalError:  # not accepting connections yet
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    tail = self.log.read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"PostgreSQL did not start on 127.0.0.1:{self.port}:\n{tail}") from None
                time.sleep(0.2)

    def connect(self, database: str, *, autocommit: bool = False):
        import psycopg  # psycopg 3: SQLAlchemy 2.1's driver for postgresql:// URLs, so MLflow's and Optuna's too

        return psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD, dbname=database,
                               connect_timeout=2, autocommit=autocommit)

    def url(self, database: str) -> str:
        return f"postgresql://{USER}:{PASSWORD}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database; returns its URL."""
        with self.connect("postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # PostgreSQL's fast shutdown, through runuser too (its group)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)  # runuser and the server alike
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)
