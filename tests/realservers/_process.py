"""Process plumbing shared by the real-server helpers: loopback ports, the cache directory,
a file lock, and a server process that is started, probed for readiness, stopped and restarted."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import os
import shlex
import signal
import socket
import subprocess
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, Self

import httpx

__all__ = [
    "RealServerUnavailable",
    "client_cpus",
    "pinned",
    "run_logged",
    "server_cpus",
    "ServerProcess",
    "cache_root",
    "file_lock",
    "free_port",
    "group_members",
    "log_tail",
]

CACHE_ENV = "SHARED_OLLAMA_CACHE"
_PR_SET_PDEATHSIG = 1
_BIND_ERRORS = ("address already in use", "couldn't bind", "could not bind", "errno 98")


class RealServerUnavailable(RuntimeError):
    """The real server cannot be installed, found or started on this machine.

    The pytest fixtures turn it into a skip, or into a failure when ``CI=true``.
    """


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cache_root() -> Path:
    """``$SHARED_OLLAMA_CACHE``, else ``~/.cache/shared_ollama``: kept between test sessions."""
    configured = os.environ.get(CACHE_ENV)
    root = Path(configured) if configured else Path.home() / ".cache" / "shared_ollama"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``: serialises processes (xdist workers, two CI jobs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def run_logged(
    command: Sequence[str],
    log_path: Path,
    timeout: float,
    env: Mapping[str, str] | None = None,
) -> None:
    """Run ``command`` with its output appended to ``log_path``; ``RealServerUnavailable`` (with
    the log tail) when it cannot run, times out or exits non-zero."""
    with log_path.open("ab") as log:
        log.write(f"\n$ {shlex.join(command)}\n".encode())
        log.flush()
        started = time.monotonic()
        try:
            result = subprocess.run(
                list(command),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
                env=None if env is None else dict(env),
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RealServerUnavailable(
                f"`{shlex.join(command)}` failed: {exc}; log {log_path}:\n{log_tail(log_path)}"
            ) from exc
        finally:
            log.write(f"[{time.monotonic() - started:.1f} s]\n".encode())
    if result.returncode != 0:
        raise RealServerUnavailable(
            f"`{shlex.join(command)}` exited with {result.returncode}; "
            f"log {log_path}:\n{log_tail(log_path)}"
        )


def log_tail(path: Path, limit: int = 4000) -> str:
    """The last ``limit`` characters of a log file, or a note when there is none."""
    try:
        data = path.read_bytes()
    except OSError:
        return f"(no log at {path})"
    return data[-limit:].decode("utf-8", errors="replace")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``, read from ``/proc``."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state, ppid, pgrp, ...
        fields = text[text.rfind(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            members.append(int(stat.parent.name))
    return members


# -- CPU placement ----------------------------------------------------------------------------
#
# One policy for every real-server test and benchmark (docs/engines.md): every real server
# (llama-server, vLLM's API server and engine) runs on the first CPU this process may use, the
# test or bench client on the others. Unpinned on 2 cores, vLLM's engine threads and the client
# fight over both cores and streams arrive in bursts; pinned, the server's own scheduling is
# what the client measures. With a single CPU there is nothing to separate: nothing is pinned.
PLACEMENT_ENV = "SHARED_OLLAMA_PIN"  # "0" turns the policy off


def _usable_cpus() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def _placement_on() -> bool:
    return os.environ.get(PLACEMENT_ENV, "1") != "0" and len(_usable_cpus()) >= 2


def server_cpus() -> frozenset[int] | None:
    """The CPUs real servers run on (the first usable one), or None when nothing is pinned."""
    return frozenset(_usable_cpus()[:1]) if _placement_on() else None


def client_cpus() -> frozenset[int] | None:
    """The CPUs the test or bench client runs on (the rest), or None when nothing is pinned."""
    return frozenset(_usable_cpus()[1:]) if _placement_on() else None


def _set_all_threads(cpus: frozenset[int] | set[int]) -> None:
    # os.sched_setaffinity(0, ...) pins only the calling thread on Linux: pin every thread of
    # this process (event-loop helpers, FakeEngine servers) so the whole client moves.
    for task in Path("/proc/self/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            os.sched_setaffinity(int(task.name), cpus)


@contextlib.contextmanager
def pinned(cpus: frozenset[int] | None) -> Iterator[None]:
    """Run the body with every thread of this process on ``cpus`` (no-op for None)."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    _set_all_threads(cpus)
    try:
        yield
    finally:
        _set_all_threads(before)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the test process dies (even by SIGKILL),
    # the kernel sends SIGTERM to the server, so a crashed session leaves no server behind.
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


_LIVE: weakref.WeakSet[ServerProcess] = weakref.WeakSet()


@atexit.register
def _stop_leftovers() -> None:
    for server in list(_LIVE):
        server.kill()


class ServerProcess:
    """One server child process in its own process group, on a fixed loopback port, on the
    CPUs of the placement policy (``server_cpus()``; ``cpus=None`` leaves it unpinned).

    ``start()`` returns once ``health_path`` answers 200, ``stop()`` sends SIGTERM to the whole
    group and SIGKILL after ``stop_timeout`` seconds, ``kill()`` sends SIGKILL at once (for
    failover tests) and ``restart()`` starts it again on the same port. Output goes to
    ``log_path`` (appended across restarts), quoted in errors.
    """

    name = "server"
    health_path = "/health"

    def __init__(
        self,
        *,
        log_path: Path,
        startup_timeout: float,
        stop_timeout: float = 15.0,
        host: str = "127.0.0.1",
        cpus: frozenset[int] | str | None = "policy",
    ) -> None:
        self.cpus: frozenset[int] | None = server_cpus() if isinstance(cpus, str) else cpus
        self.log_path = log_path
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.host = host
        self.port: int | None = None
        self.ready_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    # -- what subclasses provide -------------------------------------------------------------

    def command(self, port: int) -> Sequence[str]:
        raise NotImplementedError

    def environment(self) -> Mapping[str, str]:
        return dict(os.environ)

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` (no trailing slash, no ``/v1``)."""
        if self.port is None:
            raise RuntimeError(f"{self.name} has not been started")
        return f"http://{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self, port: int | None = None) -> Self:
        """Start on ``port`` (default: a free loopback port) and wait until it is healthy.

        With no ``port`` given, a port taken between the pick and the bind is retried on another.
        """
        if self.is_running():
            raise RuntimeError(f"{self.name} is already running on {self.url}")
        attempts = 1 if port is not None else 3
        for attempt in range(attempts):
            chosen = port if port is not None else free_port()
            try:
                self._launch(chosen)
                return self
            except RealServerUnavailable:
                lost_race = any(err in log_tail(self.log_path).lower() for err in _BIND_ERRORS)
                if attempt + 1 == attempts or not lost_race:
                    raise
        raise AssertionError("unreachable")

    def _launch(self, port: int) -> None:
        self.port = port
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = self.log_path.open("ab")
        self._log.write(f"\n===== starting {self.name} on port {port} =====\n".encode())
        self._log.flush()
        command = list(self.command(port))
        started = time.monotonic()
        try:
            self._proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=dict(self.environment()),
                start_new_session=True,
                preexec_fn=self._in_child,
            )
        except OSError as exc:
            self._close_log()
            raise RealServerUnavailable(f"cannot run {command[0]}: {exc}") from exc
        _LIVE.add(self)
        try:
            self._wait_healthy()
        except BaseException:
            self.kill()
            raise
        self.ready_seconds = time.monotonic() - started

    def _in_child(self) -> None:
        # Between fork and exec: the server and everything it spawns inherit the placement.
        _die_with_parent()
        if self.cpus is not None:
            os.sched_setaffinity(0, self.cpus)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        with httpx.Client(timeout=2.0) as client:
            while True:
                assert self._proc is not None
                code = self._proc.poll()
                if code is not None:
                    raise RealServerUnavailable(
                        f"{self.name} exited with code {code} during start-up; "
                        f"log {self.log_path}:\n{log_tail(self.log_path)}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if client.get(self.url + self.health_path).status_code == 200:
                        return
                if time.monotonic() > deadline:
                    raise RealServerUnavailable(
                        f"{self.name} not healthy on {self.url}{self.health_path} after "
                        f"{self.startup_timeout:.0f}s; log {self.log_path}:\n"
                        f"{log_tail(self.log_path)}"
                    )
                time.sleep(0.1)

    def stop(self) -> None:
        """SIGTERM to the process group; SIGKILL when it is still up after ``stop_timeout``."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                proc.wait()
        self._reap()

    def kill(self) -> None:
        """SIGKILL to the process group now: the abrupt death a failover test needs."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            self._signal_group(signal.SIGKILL)
            proc.wait()
        self._reap()

    def restart(self) -> Self:
        """Stop (gracefully) and start again on the same port."""
        port = self.port
        self.stop()
        return self.start(port)

    def _signal_group(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)

    def _reap(self) -> None:
        # Children that outlived the leader (engine workers) are still in its group.
        assert self._proc is not None
        deadline = time.monotonic() + 5.0
        while group_members(self._proc.pid) and time.monotonic() < deadline:
            self._signal_group(signal.SIGKILL)
            time.sleep(0.05)
        self._proc = None
        _LIVE.discard(self)
        self._close_log()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None

    def log_text(self, limit: int = 4000) -> str:
        """The end of the server's log, for failure messages."""
        return log_tail(self.log_path, limit)

    def __enter__(self) -> Self:
        if not self.is_running():
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running on {self.url}" if self.is_running() else "stopped"
        return f"<{type(self).__name__} {state}>"
