"""A real PostgreSQL 15 server for the tests: one private cluster per test session, a fresh database per test.

Use from a conftest: `from tests.support.postgres import postgres_dsn, postgres_server  # noqa: F401`.
Importing the fixtures into several conftests still starts one server: it is kept in the pytest config's stash.
The cluster lives in a temp directory, listens on 127.0.0.1 at a free port with trust auth, and runs as the
`postgres` user when the tests run as root (the server refuses to run as root). Missing binaries are installed
with apt-get when possible; otherwise every test that needs the server fails with the reason, never skips.
"""

from __future__ import annotations

import os
import pwd
import shlex
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

PG_VERSION = "15"
PG_PACKAGE = f"postgresql-{PG_VERSION}"
SERVER_USER = "postgres"
# A throwaway cluster: the tests check our SQL, not Postgres' crash safety, so skip the fsyncs. Dropping a
# database forces a checkpoint, which with fsync on cost ~1.5 s per test on a busy disk here (~12 ms without).
TEST_SERVER_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")
_SERVER_KEY = pytest.StashKey["PostgresServer"]()


def find_postgres_bin() -> Path | None:
    """The bin directory of the PostgreSQL 15 server (Debian layout), or of the newest other one installed."""
    root = Path("/usr/lib/postgresql")
    preferred = root / PG_VERSION / "bin"
    if (preferred / "initdb").exists():
        return preferred
    others = sorted(
        (p for p in root.glob("*/bin") if (p / "initdb").exists() and p.parent.name.isdigit()),
        key=lambda p: int(p.parent.name),
        reverse=True,
    )
    return others[0] if others else None


def ensure_postgres_installed() -> Path:
    """The server's bin directory, installing the package with apt-get first if it is missing (as root)."""
    found = find_postgres_bin()
    if found is not None:
        return found
    if os.geteuid() != 0:
        pytest.fail(
            f"PostgreSQL server binaries not found under /usr/lib/postgresql and not root to install them: "
            f"run `apt-get install -y {PG_PACKAGE}`",
            pytrace=False,
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", PG_PACKAGE]
    attempts = [
        install,
        ["apt-get", "update"],
        install,
    ]  # the package lists may be missing on a fresh machine
    log = []
    for cmd in attempts:
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        log.append(f"$ {' '.join(cmd)} -> {done.returncode}\n{done.stderr[-2000:]}")
        found = find_postgres_bin()
        if found is not None:
            return found
    pytest.fail(
        f"PostgreSQL server binaries missing and `apt-get install {PG_PACKAGE}` did not provide them:\n"
        + "\n".join(log),
        pytrace=False,
    )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PostgresServer:
    """One private PostgreSQL cluster: where it lives, how to reach it, and how to make and drop databases."""

    bin_dir: Path
    root: Path
    port: int
    host: str = "127.0.0.1"
    user: str = "postgres"  # the superuser initdb creates; trust auth, so no password

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    @classmethod
    def start(cls, bin_dir: Path, settings: Sequence[str] = (), attempts: int = 3) -> PostgresServer:
        """initdb into a fresh temp directory and start the server on a free port (a new one if it was taken)."""
        as_root = os.geteuid() == 0
        # /tmp rather than $TMPDIR when root: the server user must be able to reach the directory.
        root = Path(tempfile.mkdtemp(prefix="iota-pg-", dir="/tmp" if as_root else None))
        if as_root:
            try:
                account = pwd.getpwnam(SERVER_USER)
            except KeyError:
                pytest.fail(f"tests run as root but there is no `{SERVER_USER}` user to run PostgreSQL as")
            os.chown(root, account.pw_uid, account.pw_gid)
        server = cls(bin_dir=bin_dir, root=root, port=0)
        server._run(
            "initdb", "-D", str(server.data_dir), "-U", server.user, "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync",
        )  # fmt: skip
        (root / "sock").mkdir()
        if as_root:
            os.chown(root / "sock", account.pw_uid, account.pw_gid)
        for _ in range(attempts):
            server.port = _free_port()
            options = " ".join(
                [f"-k {root / 'sock'} -p {server.port} -c listen_addresses={server.host}"]
                + [f"-c {setting}" for setting in settings]
            )
            started = server._run(
                "pg_ctl", "-D", str(server.data_dir), "-l", str(server.log_file), "-w", "-t", "60",
                "-o", options, "start", check=False,
            )  # fmt: skip
            if started.returncode == 0:
                return server
        log = server.log_file.read_text(errors="replace")[-3000:] if server.log_file.exists() else ""
        shutil.rmtree(root, ignore_errors=True)
        pytest.fail(
            f"PostgreSQL did not start after {attempts} attempts:\n{started.stderr}\n{log}", pytrace=False
        )

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "-t", "30", "stop", check=False)
        shutil.rmtree(self.root, ignore_errors=True)

    def create_database(self) -> str:
        """A new empty database; returns its name."""
        name = f"test_{uuid.uuid4().hex[:16]}"
        with psycopg.connect(self.dsn(), autocommit=True) as admin:
            admin.execute(f"CREATE DATABASE {name}")
        return name

    def drop_database(self, name: str) -> None:
        # FORCE: a test that forgot to close its connections must not leak the database.
        with psycopg.connect(self.dsn(), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def _run(self, tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [str(self.bin_dir / tool), *args]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", SERVER_USER, "--", *cmd] if shutil.which("runuser") else _su(cmd)
        # cwd=root: the server user may not be allowed into the current directory (e.g. /root).
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.root)
        if check and done.returncode != 0:
            pytest.fail(f"{tool} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}", pytrace=False)
        return done


def _su(cmd: list[str]) -> list[str]:
    return ["su", SERVER_USER, "-s", "/bin/sh", "-c", shlex.join(cmd)]


@pytest.fixture(scope="session")
def postgres_server(request: pytest.FixtureRequest) -> Iterator[PostgresServer]:
    """The session's PostgreSQL server, started on first use and stopped when pytest finishes."""
    server = request.config.stash.get(_SERVER_KEY, None)
    if server is None:
        server = PostgresServer.start(ensure_postgres_installed(), settings=TEST_SERVER_SETTINGS)
        request.config.stash[_SERVER_KEY] = server
        request.config.add_cleanup(server.stop)
    yield server


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A DSN for a fresh, empty database of its own, dropped after the test."""
    name = postgres_server.create_database()
    yield postgres_server.dsn(name)
    postgres_server.drop_database(name)
