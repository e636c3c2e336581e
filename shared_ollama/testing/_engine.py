"""FakeEngine: a real uvicorn server on its own thread and event loop, speaking one engine's
wire protocol; start/stop/restart on a stable port, sync and async context management."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Self, get_args

import uvicorn

from . import _ollama, _openai, _tgi
from ._admin import admin_app
from ._faults import Faults
from ._http import EngineApp, Transports, protocol_class
from ._runtime import Kind, Runtime, Settings
from ._stats import EngineStats
from ._timing import TimingModel

__all__ = ["FakeEngine"]

_BUILDERS = {"ollama": _ollama.build, "openai": _openai.build, "tgi": _tgi.build}
_START_TIMEOUT_S = 10.0
_BACKLOG = 2048
# Requests still running at stop() get this long to notice their connection is gone.
_DRAIN_S = 1.0


class _Server(uvicorn.Server):
    """uvicorn's server with a stop that wakes at once and drops every connection, as a
    crashed engine would, instead of polling every 0.1 s and draining gracefully."""

    def __init__(self, config: uvicorn.Config, app: EngineApp, transports: Transports) -> None:
        super().__init__(config)
        self.engine_app = app
        self.transports = transports
        self.ready = threading.Event()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._wake = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        self.loop = asyncio.get_running_loop()
        self.ready.set()

    async def main_loop(self) -> None:
        counter = 0
        while not await self.on_tick(counter):
            counter += 10  # on_tick refreshes the Date header whenever counter % 10 == 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    def request_exit(self) -> None:
        """Ask the server to stop; callable from any thread."""
        self.should_exit = True
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self._wake.set)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine_app.stopping = True
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for transport in list(self.transports.values()):
            transport.abort()
        # Aborted connections make the requests' disconnect watchers end them; stragglers
        # (none expected) are cancelled.
        tasks = list(self.server_state.tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=_DRAIN_S)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=_DRAIN_S)
        for server in self.servers:
            await server.wait_closed()


class FakeEngine:
    """A real HTTP server on loopback that speaks Ollama's, vLLM's (OpenAI) or TGI's protocol.

    ``kind``: "ollama" | "openai" | "tgi". ``models``: served names (tgi serves the first).
    ``slots`` generations run at once, others queue FIFO; beyond ``max_queue`` waiting the
    engine answers its overload reply (ollama 503, openai 429, tgi 429). ``api_key`` makes
    the engine require ``Authorization: Bearer <key>`` (health and info stay public).
    Timing follows ``timing`` (see ``TimingModel``), output follows ``seed`` and the prompt.

    ``start()`` binds ``host:port`` (port 0: a free one, kept by ``restart()``) and serves on
    a background thread; ``stop()`` drops every connection and frees the port. Use it as a
    sync or async context manager; the async one starts and stops off the event loop.
    ``url``/``port`` are known once started.
    """

    def __init__(
        self,
        kind: Kind = "ollama",
        models: Iterable[str] = ("fake-llama",),
        timing: TimingModel | None = None,
        slots: int = 4,
        max_queue: int | None = None,
        api_key: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        seed: int = 0,
    ) -> None:
        if kind not in get_args(Kind):
            raise ValueError(f"kind must be one of {get_args(Kind)}, not {kind!r}")
        served = tuple(models)
        if not served:
            raise ValueError("a FakeEngine serves at least one model")
        if slots < 1 or (max_queue is not None and max_queue < 0):
            raise ValueError("slots must be >= 1 and max_queue None or >= 0")
        self._settings = Settings(
            kind, served, timing or TimingModel(), slots, max_queue, api_key, seed
        )
        self.host = host
        self._port = port
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._runtime: Runtime | None = None
        self._failure: BaseException | None = None

    # -- configuration ---------------------------------------------------------------------

    @property
    def kind(self) -> Kind:
        return self._settings.kind

    @property
    def models(self) -> tuple[str, ...]:
        return self._settings.models

    @property
    def port(self) -> int:
        """The bound port (the one asked for before the first start)."""
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._port}"

    @property
    def timing(self) -> TimingModel:
        """The timing model; assign a new one (or change its fields) at any time."""
        return self._settings.timing

    @timing.setter
    def timing(self, value: TimingModel) -> None:
        self._settings.timing = value

    @property
    def slots(self) -> int:
        """Concurrent generations; may be changed while running."""
        return self._settings.slots

    @slots.setter
    def slots(self, value: int) -> None:
        if value < 1:
            raise ValueError("slots must be >= 1")
        self._settings.slots = value
        self._in_loop(lambda rt: rt.pool.resize(value))

    @property
    def max_queue(self) -> int | None:
        return self._settings.max_queue

    @max_queue.setter
    def max_queue(self, value: int | None) -> None:
        self._settings.max_queue = value

        def apply(rt: Runtime) -> None:
            rt.pool.max_queue = value

        self._in_loop(apply)

    @property
    def api_key(self) -> str | None:
        return self._settings.api_key

    @property
    def seed(self) -> int:
        return self._settings.seed

    @property
    def faults(self) -> Faults:
        """Fault knobs, thread-safe, effective at once (see ``Faults``)."""
        return self._settings.faults

    @property
    def stats(self) -> EngineStats:
        """A snapshot of the counters; ``engine.stats()`` works too (a snapshot is callable)."""
        return self._settings.stats.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters (live gauges keep their values)."""
        self._settings.stats.reset()

    def wait_stats(
        self, predicate: Callable[[EngineStats], bool], timeout: float = 10.0
    ) -> EngineStats:
        """Block until ``predicate(stats)`` holds and return those stats (``TimeoutError``)."""
        return self._settings.stats.wait(predicate, timeout)

    async def await_stats(
        self, predicate: Callable[[EngineStats], bool], timeout: float = 10.0
    ) -> EngineStats:
        """``wait_stats`` without blocking the caller's event loop."""
        return await asyncio.to_thread(self._settings.stats.wait, predicate, timeout)

    @property
    def running(self) -> bool:
        return self._server is not None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the port and serve on a background thread; returns once requests are served."""
        with self._lock:
            if self._server is not None:
                raise RuntimeError(f"{self!r} is already running")
            sock = self._bind()
            runtime = Runtime(self._settings)
            transports: Transports = {}
            wire, routes = _BUILDERS[self.kind](runtime)
            app = EngineApp(runtime, wire, routes, admin_app(self._settings), transports)
            server = _Server(self._config(app, transports), app, transports)
            self._failure = None
            thread = threading.Thread(
                target=self._serve, args=(server, sock), name=f"FakeEngine-{self.kind}", daemon=True
            )
            thread.start()
            if not server.ready.wait(_START_TIMEOUT_S):
                server.request_exit()
                thread.join(_START_TIMEOUT_S)
                sock.close()
                raise RuntimeError(f"FakeEngine did not start on {self.url}") from self._failure
            self._server, self._thread, self._runtime = server, thread, runtime

    def stop(self) -> None:
        """Stop serving: every open connection is dropped and the port is freed."""
        with self._lock:
            server, thread = self._server, self._thread
            self._server = self._thread = self._runtime = None
            if server is None or thread is None:
                return
            server.request_exit()
            thread.join(_START_TIMEOUT_S)
            if thread.is_alive():
                raise RuntimeError(f"FakeEngine on {self.url} did not stop")

    def restart(self) -> None:
        """Stop, then serve again on the same port (state of running requests is lost)."""
        self.stop()
        self.start()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<FakeEngine {self.kind} {self.url} models={list(self.models)} {state}>"

    # -- internals -------------------------------------------------------------------------

    def _bind(self) -> socket.socket:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted sockets only when
        # their proto says TCP; without it Nagle holds each small chunk for a delayed ACK.
        sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            # SO_REUSEADDR: restart() binds the same port again while old connections linger.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._port))
            sock.listen(_BACKLOG)
        except OSError:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        return sock

    @staticmethod
    def _config(app: EngineApp, transports: Transports) -> uvicorn.Config:
        return uvicorn.Config(
            app,
            http=protocol_class(transports),
            ws="none",
            lifespan="off",
            interface="asgi3",
            loop="asyncio",
            log_config=None,  # leave the process's logging configuration alone
            access_log=False,
            server_header=False,
            proxy_headers=False,  # scope["client"] must stay the real peer (transport lookup)
            backlog=_BACKLOG,
        )

    def _serve(self, server: _Server, sock: socket.socket) -> None:
        try:
            server.run(sockets=[sock])
        except BaseException as exc:  # reported by start(); the thread must not die loudly
            self._failure = exc
        finally:
            sock.close()

    def _in_loop(self, change: Callable[[Runtime], None]) -> None:
        """Apply a change to the running runtime on its own loop (it is not thread-safe)."""
        server, runtime = self._server, self._runtime
        if server is not None and server.loop is not None and runtime is not None:
            server.loop.call_soon_threadsafe(change, runtime)
