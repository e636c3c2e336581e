"""``AiohttpSharedClient``: ``SharedClient`` sending over aiohttp instead of httpx.

The call lifecycle (routing, retries, breakers, deadlines, bounds, accounting) is the same
code as ``SharedClient``'s: the steps in ``_core`` yield operations and only their
interpreter's I/O differs. aiohttp reads a stream's bytes in C (its parser and
``StreamReader``) where httpx passes every chunk through several layers of Python: at 64
concurrent 16-token streams on one core it drives about twice the requests per second. The
bench uses it when aiohttp is installed (the ``aiohttp`` extra, part of ``bench``); httpx
stays the library's default (its proxies include SOCKS, and ``transport=`` is httpx's seam).

Bounds are the interpreter's, not aiohttp's: the same phase deadlines, ``max_response_bytes``
and chunk sizes as the httpx interpreter. aiohttp's own header limits (8 KiB a line) turn an
oversized head into a ``ProtocolError``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import aiohttp

from ._core.steps import Head, Read, Send
from ._transport import DEFAULT_HEADERS, Connection, env_proxy, ssl_context
from .client import SharedClient, _Body, _deadline_error, _limit
from .config import Endpoint
from .errors import ConfigError, ConnectError, ProtocolError, SharedOllamaError

__all__ = ["AiohttpSharedClient"]

_READ_SIZE = 1 << 16


class _AioReply:
    """The driver's side of a ``Head``: aiohttp's response."""

    __slots__ = ("response",)

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response


class _Session:
    """One endpoint's aiohttp session (its connection pool), URL and proxy."""

    __slots__ = ("_fresh", "base", "connect_s", "proxy", "session", "ssl")

    def __init__(self, endpoint: Endpoint, connect_s: float | None) -> None:
        proxy = endpoint.proxy.get_secret_value() if endpoint.proxy is not None else None
        if proxy is None and endpoint.trust_env:
            proxy = env_proxy(endpoint.url)
        if proxy is not None and not proxy.startswith(("http://", "https://")):
            raise ConfigError(f"aiohttp sends through HTTP(S) proxies only: {endpoint.url}")
        self.base = endpoint.url
        self.proxy = proxy
        self.connect_s = connect_s
        self.ssl = ssl_context(endpoint)
        connector = aiohttp.TCPConnector(
            limit=endpoint.max_connections,
            limit_per_host=0,
            ssl=self.ssl,
            keepalive_timeout=5.0,  # httpcore's keep-alive expiry
        )
        self.session = self._client(connector)
        self._fresh: aiohttp.ClientSession | None = None

    def _client(self, connector: aiohttp.TCPConnector) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self.connect_s),
            headers=DEFAULT_HEADERS,
            auto_decompress=True,
            skip_auto_headers=("user-agent",),
            trust_env=False,  # the proxy is resolved above, per endpoint
        )

    def fresh(self) -> aiohttp.ClientSession:
        """A session that opens a new connection for every request: for a request sent once
        more after a pooled connection turned out closed. Every other idle connection of
        the pool may be closed too (llama-server closes each after its stream) and aiohttp
        would hand out the next one. Each such request replaces a connection the pool just
        dropped, so the endpoint's connection bound holds."""
        if self._fresh is None:
            connector = aiohttp.TCPConnector(limit=0, ssl=self.ssl, force_close=True)
            self._fresh = self._client(connector)
        return self._fresh

    async def close(self) -> None:
        """Close both sessions."""
        await self.session.close()
        if self._fresh is not None:
            await self._fresh.close()


class AiohttpSharedClient(SharedClient):
    """``SharedClient`` over aiohttp (needs the ``aiohttp`` extra); the same API and
    semantics. It takes no ``transport=`` (that is httpx's seam)."""

    def _open_connections(self, transport: Any) -> None:
        super()._open_connections(transport)
        self._sessions: dict[str, _Session] = {}

    def _http_connections(self, transport: Any) -> dict[str, Connection]:
        # No httpx transport is built (each would cost a pool and, per endpoint, a TLS
        # context): aiohttp's sessions are made on first use.
        if transport is not None:
            raise ConfigError("AiohttpSharedClient takes no httpx transport")
        return {}

    def _session(self, endpoint: Endpoint) -> _Session:
        # Created on first use: an aiohttp session belongs to the running loop.
        session = self._sessions.get(endpoint.url)
        if session is None:
            connect_s = self.config.timeouts.connect_s
            session = self._sessions[endpoint.url] = _Session(endpoint, connect_s)
        return session

    async def aclose(self) -> None:
        """As ``SharedClient.aclose``, then the aiohttp sessions are closed."""
        await super().aclose()
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(s.close() for s in sessions))

    async def _close_reply(self, reply: Any) -> None:
        response: aiohttp.ClientResponse = reply.response
        if response.content.at_eof():
            response.release()  # read to the end: the connection goes back to the pool
        else:
            response.close()  # abandoned mid-body: the connection cannot be reused

    def _ready(self, op: Read) -> bytes | None:
        content = op.head.handle.response.content
        if content.exception() is not None:
            return None  # the read raises it, mapped as every other transport error
        if op.phase_deadline is not None or op.deadline is not None:
            limit, _ = _limit(op)
            if limit is not None and limit <= 0:
                return None  # past a deadline: the read raises the Timeout
        data: bytes = content.read_nowait()
        if data:
            return data
        return b"" if content.at_eof() else None

    async def _perform_io(self, op: Send | Read) -> Any:
        limit, total = _limit(op)
        try:
            async with asyncio.timeout(limit):
                if isinstance(op, Send):
                    return await self._send(op)
                response: aiohttp.ClientResponse = op.head.handle.response
                if op.whole:
                    body = _Body(op)
                    while chunk := await response.content.read(_READ_SIZE):
                        if body.add(chunk):
                            break
                    return bytes(body.data)
                return await response.content.readany() or None
        except TimeoutError:
            raise _deadline_error(op, total) from None
        except aiohttp.ClientError as exc:
            raise _error(op, exc) from None

    async def _send(self, op: Send) -> Head:
        session = self._session(op.endpoint.config)
        wire = op.wire
        headers = {**op.headers, **wire.headers}
        data: bytes | None = None
        if wire.json is not None:
            # As httpx encodes it: compact, UTF-8, no NaN.
            text = json.dumps(wire.json, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            data = text.encode()
            headers["content-type"] = "application/json"
        url = session.base + wire.path
        for fresh in (False, True):
            try:
                client = session.fresh() if fresh else session.session
                response = await client.request(
                    wire.method,
                    url,
                    data=data,
                    headers=headers,
                    proxy=session.proxy,
                    allow_redirects=False,
                )
            except aiohttp.ClientError as exc:
                # A pooled keep-alive connection the server had closed: it never saw the
                # request, so once more on a fresh connection (as the httpx interpreter).
                if fresh or not _unsent(exc):
                    raise
                continue
            raw = {k.lower(): v for k, v in response.headers.items()}
            return Head(response.status, raw, _AioReply(response), time.monotonic_ns())
        raise AssertionError("unreachable")


def _unsent(exc: aiohttp.ClientError) -> bool:
    """The request cannot have been served: the server closed the connection before any of
    the reply (llama-server closes after every stream while advertising keep-alive), or
    before aiohttp could write the whole request on it (a closing or reset transport)."""
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientConnectionResetError):
        return True
    # aiohttp says so only in the message (its errno is None when the transport was closing).
    return isinstance(exc, aiohttp.ClientOSError) and str(exc.strerror).startswith(
        "Can not write request"
    )


def _error(op: Send | Read, exc: aiohttp.ClientError) -> SharedOllamaError:
    kw: dict[str, Any] = {"endpoint": op.endpoint.url, "model": op.model}
    reason = (str(exc) or type(exc).__name__)[:200]
    if isinstance(op, Read):
        return ProtocolError(f"connection lost mid-reply: {reason}", **kw)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ConnectError(f"cannot connect: {reason}", **kw)
    if isinstance(exc, aiohttp.ClientResponseError):  # a head aiohttp could not parse
        return ProtocolError(f"bad reply head: {reason}", **kw)
    return ConnectError(f"connection lost before a reply: {reason}", **kw)
