"""Exact deadlines for the blocking client: a watchdog that shuts a blocked socket down.

httpx's sync timeouts bound each socket read, so a server that trickles one byte a second
never trips a 5 s timeout, and closing the response from another thread does not wake a
blocked ``recv``. ``SyncSharedClient`` therefore arms an alarm for every send and read; when
it rings before the operation ends, the watchdog thread calls ``shutdown()`` on the socket the
blocked thread is using, the read returns at once, and the client raises ``Timeout``.

The socket is found through a thin wrapper around httpcore's network backend: every read or
write records its stream as the calling thread's active one.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import math
import socket
import threading
import time
from collections.abc import Iterable
from typing import Any

import httpcore
import httpx

__all__ = ["Alarm", "Watchdog", "watch_transport"]


class _Slot:
    """The stream the owning thread last read from or wrote to."""

    __slots__ = ("stream",)

    def __init__(self) -> None:
        self.stream: _WatchedStream | None = None


_LOCAL = threading.local()


def _slot() -> _Slot:
    slot: _Slot | None = getattr(_LOCAL, "slot", None)
    if slot is None:
        slot = _LOCAL.slot = _Slot()
    return slot


class _WatchedStream(httpcore.NetworkStream):
    __slots__ = ("_inner",)

    def __init__(self, inner: httpcore.NetworkStream) -> None:
        self._inner = inner

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        _slot().stream = self
        return self._inner.read(max_bytes, timeout)

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        _slot().stream = self
        self._inner.write(buffer, timeout)

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self,
        ssl_context: Any,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> httpcore.NetworkStream:
        return _WatchedStream(self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)

    def kill(self) -> None:
        """Shut the socket down: a read blocked on it in another thread returns at once."""
        sock = self._inner.get_extra_info("socket")
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class _WatchedBackend(httpcore.NetworkBackend):
    def __init__(self, inner: httpcore.NetworkBackend) -> None:
        self._inner = inner

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        stream = self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return _WatchedStream(stream)

    def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        return _WatchedStream(self._inner.connect_unix_socket(path, timeout, socket_options))

    def sleep(self, seconds: float) -> None:
        self._inner.sleep(seconds)


def watch_transport(transport: httpx.BaseTransport) -> bool:
    """Route ``transport``'s connections through the watched backend; False when the
    transport is not httpx's own (a caller's MockTransport, say), which needs no watchdog."""
    pool = getattr(transport, "_pool", None)
    backend = getattr(pool, "_network_backend", None)
    if not isinstance(transport, httpx.HTTPTransport) or backend is None:
        return False
    if not isinstance(backend, _WatchedBackend):
        pool._network_backend = _WatchedBackend(backend)  # type: ignore[union-attr]
    return True


class Alarm:
    """One armed deadline of one thread; ``fired`` tells whether it rang."""

    __slots__ = ("done", "due", "fired", "slot", "thread")

    def __init__(self, due: float, slot: _Slot) -> None:
        self.due = due
        self.slot = slot
        self.thread = threading.get_ident()
        self.fired = False
        self.done = False


class Watchdog:
    """One thread per client that rings alarms; started on the first ``arm``."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        #: Every alarm not yet disarmed (``ring_all`` rings them, deadline or not).
        self._armed: set[Alarm] = set()
        #: Alarms with a deadline, soonest first; disarmed ones are dropped lazily.
        self._heap: list[tuple[float, int, Alarm]] = []
        self._seq = itertools.count()
        self._thread: threading.Thread | None = None
        self._closed = False

    def arm(self, seconds: float | None) -> Alarm:
        """An alarm for the calling thread, ``seconds`` from now (None: only ``ring_all``)."""
        slot = _slot()
        slot.stream = None  # only a stream this operation touches may be shut down
        due = math.inf if seconds is None else time.monotonic() + max(0.0, seconds)
        alarm = Alarm(due, slot)
        with self._cond:
            self._armed.add(alarm)
            if due == math.inf:  # no deadline: only a close rings it, the thread never waits
                return alarm
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=self._run, name="shared_ollama-watchdog", daemon=True
                )
                self._thread.start()
            heapq.heappush(self._heap, (alarm.due, next(self._seq), alarm))
            if self._heap[0][2] is alarm:
                self._cond.notify()
        return alarm

    def disarm(self, alarm: Alarm) -> None:
        """The operation ended; under the lock, so a ringing alarm cannot kill a later one."""
        with self._cond:
            alarm.done = True
            self._armed.discard(alarm)
            # Disarmed alarms leave the heap when they reach its top; with long deadlines
            # and many calls they would pile up, so rebuild it once they are most of it.
            if len(self._heap) > 64 and len(self._heap) > 2 * len(self._armed):
                self._heap = [entry for entry in self._heap if not entry[2].done]
                heapq.heapify(self._heap)

    def ring_all(self) -> set[int]:
        """Ring every armed alarm now (the client is closing); the threads they belonged to."""
        with self._cond:
            threads = set()
            for alarm in self._armed:
                if not alarm.fired:
                    alarm.fired = True
                    threads.add(alarm.thread)
                    if alarm.slot.stream is not None:
                        alarm.slot.stream.kill()
            return threads

    def close(self) -> None:
        """Stop the thread (idempotent)."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                while self._heap and self._heap[0][2].done:
                    heapq.heappop(self._heap)  # ended in time: forget it
                if not self._heap:
                    self._cond.wait()
                    continue
                wait = self._heap[0][0] - time.monotonic()
                if wait > 0:
                    self._cond.wait(wait)
                    continue
                _, _, alarm = heapq.heappop(self._heap)
                if alarm.fired:
                    continue  # rung by ring_all already
                alarm.fired = True
                stream = alarm.slot.stream
                if stream is not None:
                    stream.kill()
