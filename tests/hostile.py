"""A hostile HTTP server for the tests: raw bytes over a real socket on 127.0.0.1.

FakeEngine speaks the protocols correctly and misbehaves on request; this one says whatever
the test tells it to, byte for byte, so replies no well-behaved server library would produce
(JSON nested 100,000 deep, a redirect, a garbled head) reach the client over real TCP.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Self

__all__ = ["HostileServer", "http_reply"]

# Whole bytes, or pieces sent one after another (an endless body stops when the client goes).
Responder = Callable[[str, str], bytes | Iterable[bytes]]


def http_reply(
    status: int,
    body: bytes,
    *,
    content_type: str = "application/json",
    headers: dict[str, str] | None = None,
) -> bytes:
    """A whole HTTP/1.1 response with ``Content-Length`` and ``Connection: close``."""
    head = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}"]
    head += [f"Content-Length: {len(body)}", "Connection: close"]
    head += [f"{key}: {value}" for key, value in (headers or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class HostileServer:
    """Answers every request with ``respond(method, path)``'s bytes (or pieces), then closes.

    ``with HostileServer(respond) as server: server.url``; ``server.requests`` lists the
    ``(method, path)`` of every request seen.
    """

    def __init__(self, respond: Responder) -> None:
        self.respond = respond
        self.requests: list[tuple[str, str]] = []
        self._sock = socket.create_server(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.port: int = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join(10)
        self._sock.close()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            try:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path = lines[0].split(" ")[:2]
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                while len(body) < length:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    body += chunk
                self.requests.append((method, path))
                reply = self.respond(method, path)
                for piece in [reply] if isinstance(reply, bytes) else reply:
                    if self._stop.is_set():
                        return
                    conn.sendall(piece)
                conn.shutdown(socket.SHUT_WR)
            except OSError:
                return
