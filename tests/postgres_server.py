"""A throwaway PostgreSQL server on 127.0.0.1 for the tests, from Debian's ``postgresql`` binaries.

Fixtures (defined in ``tests/conftest.py``; tests that use them are marked ``postgres``):

- ``postgres_server`` (session): the running ``PostgresServer``; ``.new_database()`` returns the
  URL of a fresh, empty database owned by the test role (~0.1 s each).
- ``postgres_url`` (session): ``postgresql://<role>:<password>@127.0.0.1:<port>/<db>``, one
  database for the whole session (share it only with tests that clean up their own tables).
- ``postgres_db`` (function): a fresh database per test, the same URL shape.

The server starts once per session on a free port in a temporary data directory, with password
(scram-sha-256) authentication for a test role whose password is random per session, so a test can
check the password never leaks. When we are root it runs as the ``postgres`` system user the
package creates (``initdb`` refuses root). Data durability is switched off (``fsync=off``) because
the directory is thrown away. When the binaries are missing or the server cannot start, the tests
skip loudly, or fail with the server's log tail under ``CI=true``.

Finding the binaries: ``$SHARED_OLLAMA_PG_BIN`` if set, else the newest
``/usr/lib/postgresql/<version>/bin`` (Debian), else ``initdb`` on ``PATH``.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import psycopg
from psycopg.sql import SQL, Composed, Identifier, Literal

__all__ = ["PostgresServer", "PostgresUnavailable", "find_pg_bin"]

_DEBIAN_ROOT = Path("/usr/lib/postgresql")
_START_TIMEOUT_S = 60.0
_SUPERUSER = "postgres"
TEST_ROLE = "shared_ollama_test"
#: TCP on loopback only (no Unix socket to place); no durability: the directory is thrown away.
_SETTINGS = (
    "listen_addresses=127.0.0.1",
    "unix_socket_directories=",
    "fsync=off",
    "synchronous_commit=off",
    "full_page_writes=off",
    "max_connections=200",
)


class PostgresUnavailable(RuntimeError):
    """The binaries are missing or the server did not start (the message has the log tail)."""


def find_pg_bin() -> Path | None:
    """The directory holding ``initdb`` and ``postgres``, or None when not installed."""
    override = os.environ.get("SHARED_OLLAMA_PG_BIN")
    if override:
        return Path(override) if (Path(override) / "initdb").exists() else None

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in path.name.split(".") if p.isdigit())

    if _DEBIAN_ROOT.is_dir():
        versions = sorted(
            (d for d in _DEBIAN_ROOT.iterdir() if (d / "bin" / "initdb").exists()),
            key=version,
        )
        if versions:
            return versions[-1] / "bin"
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _run_as() -> pwd.struct_passwd | None:
    """The unprivileged user to run the server as when we are root (None: ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    raise PostgresUnavailable("running as root and no unprivileged 'postgres' user to run as")


class PostgresServer:
    """One PostgreSQL server process; ``start()``/``stop()`` or use it as a context manager."""

    def __init__(self, bin_dir: Path | None = None) -> None:
        self.bin_dir = bin_dir or find_pg_bin()
        self.port = 0
        self.role = TEST_ROLE
        self._password = secrets.token_urlsafe(18)
        self._super_password = secrets.token_urlsafe(18)
        self._root: Path | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._databases = 0

    def __repr__(self) -> str:
        return f"PostgresServer(port={self.port}, role={self.role!r})"

    @property
    def password(self) -> str:
        """The test role's password (random per server), for leak checks."""
        return self._password

    @property
    def log_path(self) -> Path:
        """The server's log file."""
        if self._root is None:
            raise PostgresUnavailable("server not started")
        return self._root / "server.log"

    def log_tail(self, chars: int = 4000) -> str:
        """The end of the server's log (and of initdb's), for failure messages."""
        if self._root is None:
            return ""
        text = ""
        for name in ("initdb.log", "server.log"):
            path = self._root / name
            if path.exists():
                text += f"--- {name} ---\n" + path.read_text(errors="replace")[-chars:]
        return text

    def url(self, database: str = "postgres", *, superuser: bool = False) -> str:
        """A ``postgresql://`` URL for ``database`` as the test role (or the superuser)."""
        user, password = (
            (_SUPERUSER, self._super_password) if superuser else (self.role, self._password)
        )
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{database}"

    def start(self) -> PostgresServer:
        """initdb a fresh directory, start the server and create the test role.

        Any failure is ``PostgresUnavailable`` with the logs' tail; nothing is left behind.
        """
        try:
            self._start()
        except BaseException as exc:
            tail = self.log_tail()  # before stop() removes the directory
            self.stop()
            if isinstance(exc, PostgresUnavailable) or not isinstance(exc, Exception):
                raise
            raise PostgresUnavailable(f"{type(exc).__name__}: {exc}\n{tail}") from exc
        return self

    def _start(self) -> None:
        if self.bin_dir is None:
            raise PostgresUnavailable(
                "PostgreSQL binaries not found (apt-get install postgresql, or set "
                "SHARED_OLLAMA_PG_BIN)"
            )
        user = _run_as()
        self._root = Path(tempfile.mkdtemp(prefix="shared-ollama-pg-"))
        data = self._root / "data"
        pwfile = self._root / "pwfile"
        pwfile.write_text(self._super_password + "\n")
        if user is not None:
            # The unprivileged user must own the directory it initialises and logs into.
            for path in (self._root, pwfile):
                os.chown(path, user.pw_uid, user.pw_gid)
        # Both processes run as that user, in the C locale and UTC, from the scratch root.
        as_user: dict[str, Any] = {
            "user": user.pw_uid if user is not None else None,
            "group": user.pw_gid if user is not None else None,
            "env": {**os.environ, "LC_ALL": "C", "TZ": "UTC"},
            "cwd": self._root,
        }
        initdb = [str(self.bin_dir / "initdb"), "-D", str(data), "-U", _SUPERUSER]
        initdb += ["--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync"]
        with open(self._root / "initdb.log", "wb") as log:
            done = subprocess.run(
                initdb,
                stdout=log,
                stderr=subprocess.STDOUT,
                check=False,
                **as_user,
            )
        if done.returncode != 0:
            raise PostgresUnavailable(f"initdb failed ({done.returncode}):\n{self.log_tail()}")
        pwfile.unlink()
        self.port = _free_port()
        log_fd = os.open(self._root / "server.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if user is not None:
            os.fchown(log_fd, user.pw_uid, user.pw_gid)
        server = [str(self.bin_dir / "postgres"), "-D", str(data), "-p", str(self.port)]
        for setting in _SETTINGS:
            server += ["-c", setting]
        try:
            self._proc = subprocess.Popen(
                server,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **as_user,
            )
        finally:
            os.close(log_fd)
        self._wait_ready()
        # Utility statements take no bind parameters: compose the literal client-side.
        self._admin(
            SQL("CREATE ROLE {} LOGIN CREATEDB PASSWORD {}").format(
                Identifier(self.role), Literal(self._password)
            )
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise PostgresUnavailable(
                    f"postgres exited ({self._proc.returncode}):\n{self.log_tail()}"
                )
            try:
                with psycopg.connect(self.url(superuser=True), connect_timeout=2):
                    return
            except psycopg.OperationalError as exc:
                last = exc
            # Polling a starting server: no event to wait on.
            time.sleep(0.05)
        raise PostgresUnavailable(
            f"postgres not ready after {_START_TIMEOUT_S:.0f}s ({type(last).__name__}):\n"
            f"{self.log_tail()}"
        )

    def _admin(self, query: Composed) -> None:
        """Run one statement as the superuser (autocommit: CREATE DATABASE needs it)."""
        with psycopg.connect(self.url(superuser=True), autocommit=True) as conn:
            conn.execute(query)

    def new_database(self, prefix: str = "t") -> str:
        """Create a fresh empty database owned by the test role; its URL."""
        self._databases += 1
        name = f"{prefix}_{os.getpid()}_{self._databases}"
        self._admin(
            SQL("CREATE DATABASE {} OWNER {}").format(Identifier(name), Identifier(self.role))
        )
        return self.url(name)

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then remove the data directory (idempotent)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        root, self._root = self._root, None
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
