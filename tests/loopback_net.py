"""Loopback network parts for transport tests: a forward proxy and a TLS server, each an
asyncio server in a thread of the test process."""

from __future__ import annotations

import asyncio
import ssl
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType

from tests.instant_server import make_handler

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ThreadServer:
    """``handler`` served on 127.0.0.1 (TLS with ``ssl``) from a thread: ``with`` it."""

    def __init__(self, handler: Handler, *, tls: ssl.SSLContext | None = None) -> None:
        self.handler = handler
        self.tls = tls
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="loopback-server", daemon=True)

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        return f"{scheme}://127.0.0.1:{self.port}"

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self.handler, "127.0.0.1", 0, ssl=self.tls)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

    def __enter__(self) -> ThreadServer:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)


def canned_server(tls: ssl.SSLContext | None = None) -> ThreadServer:
    """The instant server's canned replies, in a thread (TLS when given a context)."""
    return ThreadServer(make_handler(), tls=tls)


@dataclass
class Proxied:
    """One request the proxy forwarded: its absolute target and its headers (lower-case)."""

    target: str
    headers: dict[str, str]


class LoopbackProxy(ThreadServer):
    """A plain HTTP forward proxy (absolute-form requests, ``Content-Length`` bodies) that
    records what it forwarded in ``seen``."""

    def __init__(self) -> None:
        self.seen: list[Proxied] = []
        super().__init__(self._handle)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, _, rest = head.decode("latin-1").partition("\r\n")
                method, target, version = line.split(" ")
                headers = dict(
                    (k.strip().lower(), v.strip())
                    for k, _, v in (h.partition(":") for h in rest.split("\r\n") if h)
                )
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                self.seen.append(Proxied(target, headers))
                hostport, _, path = target.removeprefix("http://").partition("/")
                host, _, port = hostport.partition(":")
                if upstream is None:
                    upstream = await asyncio.open_connection(host, int(port or 80))
                up_reader, up_writer = upstream
                forwarded = [f"{method} /{path} {version}"] + [
                    f"{k}: {v}" for k, v in headers.items() if not k.startswith("proxy-")
                ]
                up_writer.write(("\r\n".join(forwarded) + "\r\n\r\n").encode("latin-1") + body)
                reply_head = await up_reader.readuntil(b"\r\n\r\n")
                length = 0
                for h in reply_head.lower().split(b"\r\n"):
                    if h.startswith(b"content-length:"):
                        length = int(h[15:])
                writer.write(reply_head + await up_reader.readexactly(length))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            if upstream is not None:
                upstream[1].close()
