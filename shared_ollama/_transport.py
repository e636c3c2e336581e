"""httpx glue shared by both drivers: transports per endpoint, requests, error mapping.

The drivers send through httpx's transports directly, below ``httpx.AsyncClient``: its
layers (auth and redirect loops, cookies, event hooks, URL merging) cost about as much as
the transport itself per call and give this library nothing. What they did give is here:
proxies (explicit or from the environment, ``NO_PROXY`` honoured), TLS settings, limits
and per-request timeouts. Only this module, ``_watchdog`` and ``client.py`` import httpx.
"""

from __future__ import annotations

import ssl
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from ._version import __version__
from .config import Endpoint, Timeouts
from .errors import (
    ConfigError,
    ConnectError,
    ProtocolError,
    SharedOllamaError,
    Timeout,
)
from .protocols import WireRequest

__all__ = [
    "Connection",
    "env_proxy",
    "map_transport_error",
    "shard_limits",
    "ssl_context",
    "timeout_extension",
    "transport_options",
]

USER_AGENT = f"shared-ollama/{__version__}"
# The standard library's NO_PROXY matching (host, domain suffix, host:port, "*"), the one
# ``requests`` uses; typeshed does not list it.
_proxy_bypass = urllib.request.proxy_bypass_environment  # type: ignore[attr-defined]
DEFAULT_HEADERS = {"accept": "*/*", "user-agent": USER_AGENT}


def env_proxy(url: str) -> str | None:
    """The proxy the environment sets for ``url`` (``HTTP_PROXY``, ``HTTPS_PROXY``,
    ``ALL_PROXY``, lower or upper case), or None when there is none or ``NO_PROXY`` exempts
    its host: the variables ``httpx`` and ``requests`` read, with the standard library's
    reading of them."""
    proxies = urllib.request.getproxies_environment()
    parts = urlsplit(url)
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy:
        return None
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    if _proxy_bypass(netloc, proxies):
        return None
    return proxy if "://" in proxy else f"http://{proxy}"


def ssl_context(endpoint: Endpoint) -> ssl.SSLContext:
    """The endpoint's TLS context: its ``verify`` and ``cert`` settings."""
    # Built once per endpoint and shared by its shards: httpx would build one per transport
    # (about 20 ms each, loading the CA bundle).
    verify = endpoint.verify
    if isinstance(verify, str):
        path = Path(verify)
        context = ssl.create_default_context(
            cafile=str(path) if path.is_file() else None,
            capath=str(path) if path.is_dir() else None,
        )
    elif verify:
        context = httpx.create_ssl_context(trust_env=endpoint.trust_env)
    else:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if endpoint.cert is not None:
        certfile, keyfile = (
            (endpoint.cert, None) if isinstance(endpoint.cert, str) else endpoint.cert
        )
        context.load_cert_chain(certfile, keyfile)
    return context


def transport_options(endpoint: Endpoint) -> dict[str, Any]:
    """What ``httpx.AsyncClient`` would have given the endpoint's transports: TLS settings
    and the proxy (explicit, else from the environment); limits are per shard."""
    proxy = endpoint.proxy.get_secret_value() if endpoint.proxy is not None else None
    if proxy is None and endpoint.trust_env:
        proxy = env_proxy(endpoint.url)
    return {"verify": ssl_context(endpoint), "trust_env": endpoint.trust_env, "proxy": proxy}


#: Connections per httpcore pool (a shard). On every request and every release, httpcore's
#: pool walks all its connections, and for each idle one counts them all again (quadratic);
#: it also closes any idle connection while it holds more than its keep-alive limit. One
#: pool of 64 at 64 concurrent calls cost 2.4x (keep-alive 20: connections churn) to 11x
#: (keep-alive 64) per call what 16 pools of 4 cost (``benchmarks/overhead.py``'s server).
SHARD_CONNECTIONS = 4


def shard_limits(max_connections: int, max_keepalive: int | None) -> list[httpx.Limits]:
    """Limits of each shard: ``max_connections`` cut into pools of ``SHARD_CONNECTIONS``,
    the keep-alive allowance shared in proportion (all of them when None)."""
    sizes = [SHARD_CONNECTIONS] * (max_connections // SHARD_CONNECTIONS)
    if max_connections % SHARD_CONNECTIONS:
        sizes.append(max_connections % SHARD_CONNECTIONS)
    keep = max_connections if max_keepalive is None else min(max_keepalive, max_connections)
    limits = []
    for size in sizes:
        share = -(-keep * size // max_connections)  # rounded up: at least one when keep > 0
        limits.append(httpx.Limits(max_connections=size, max_keepalive_connections=share))
    return limits


def timeout_extension(connect: float | None, read: float | None) -> dict[str, float | None]:
    """httpcore's per-request timeouts (what an ``httpx.Timeout`` becomes in a request); a
    read bound shorter than the connect one shortens that too."""
    if read is not None and connect is not None:
        connect = min(connect, read)
    return {"connect": connect, "read": read, "write": connect, "pool": read}


class Connection:
    """One endpoint's httpx transports (its shards), and the request building that
    ``httpx.AsyncClient`` did: its URLs (parsed once per path), default headers and timeouts.
    Requests go straight to a transport: redirects are never followed (a 3xx is a typed
    error upstream), there are no cookies, auth flows or event hooks to run.

    ``take`` picks the first shard with a free connection, so at low concurrency one shard
    (and its warm connections) serves every call; the driver gives the shard back when the
    reply is closed. The sync driver holds a lock around both."""

    __slots__ = ("_room", "_urls", "base", "timeout", "transports")

    def __init__(
        self,
        endpoint: Endpoint,
        timeouts: Timeouts,
        transports: Sequence[Any],
        sizes: Sequence[int],
    ) -> None:
        self.transports = list(transports)
        self._room = list(sizes)  # free connections per shard (negative: calls queued)
        self.base = endpoint.url
        self.timeout = timeout_extension(timeouts.connect_s, timeouts.first_chunk_s)
        self._urls: dict[str, httpx.URL] = {}

    @classmethod
    def open(
        cls, endpoint: Endpoint, timeouts: Timeouts, factory: Callable[..., Any]
    ) -> Connection:
        """The endpoint's shards, built by ``factory`` (an httpx transport class)."""
        options = transport_options(endpoint)
        limits = shard_limits(endpoint.max_connections, endpoint.max_keepalive)
        try:
            transports = [factory(limits=lim, **options) for lim in limits]
        except ImportError as exc:  # a SOCKS proxy without httpx's socks extra
            raise ConfigError(f"{endpoint.url}: {exc}") from None
        return cls(endpoint, timeouts, transports, [lim.max_connections or 0 for lim in limits])

    def take(self) -> int:
        """A shard for one request: the first with room, else the least queued."""
        room = self._room
        for shard, free in enumerate(room):
            if free > 0:
                room[shard] = free - 1
                return shard
        shard = room.index(max(room))
        room[shard] -= 1
        return shard

    def give(self, shard: int) -> None:
        """The request on ``shard`` is done (its reply closed, or it failed)."""
        self._room[shard] += 1

    def request(
        self,
        wire: WireRequest,
        headers: Mapping[str, str],
        timeout: Mapping[str, float | None] | None = None,
    ) -> httpx.Request:
        """Build (not send) the request for ``wire``."""
        url = self._urls.get(wire.path)
        if url is None:
            url = self._urls[wire.path] = httpx.URL(self.base + wire.path)
        merged = {**DEFAULT_HEADERS, **headers, **wire.headers}
        extensions = {"timeout": timeout or self.timeout}
        if wire.json is None:
            return httpx.Request(wire.method, url, headers=merged, extensions=extensions)
        return httpx.Request(
            wire.method, url, headers=merged, json=wire.json, extensions=extensions
        )


def map_transport_error(
    exc: Exception, *, endpoint: str, model: str | None, got_reply: bool, got_chunk: bool
) -> SharedOllamaError:
    """Typed error for an httpx failure; the phase decides connect vs mid-reply."""
    kw: dict[str, Any] = {"endpoint": endpoint, "model": model}
    if isinstance(exc, httpx.ConnectTimeout):
        return Timeout("connect timed out", phase="connect", **kw)
    if isinstance(exc, httpx.PoolTimeout):
        return Timeout("no free connection in time", phase="connect", **kw)
    if isinstance(exc, httpx.TimeoutException):
        phase = "between_chunks" if got_chunk else "first_chunk"
        return Timeout(f"no data within the {phase} deadline", phase=phase, **kw)
    if isinstance(exc, httpx.ConnectError):
        return ConnectError(f"cannot connect: {_reason(exc)}", **kw)
    if isinstance(exc, httpx.TransportError):
        if got_reply:
            return ProtocolError(f"connection lost mid-reply: {_reason(exc)}", **kw)
        return ConnectError(f"connection lost before a reply: {_reason(exc)}", **kw)
    return ConnectError(f"transport failure: {_reason(exc)}", **kw)


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text[:200]
