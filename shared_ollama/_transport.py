"""httpx glue shared by both drivers: clients per endpoint, requests, error mapping.

Only this module and ``client.py`` import httpx; everything here is synchronous and pure
apart from building the (not yet sent) httpx objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import httpx

from ._version import __version__
from .config import Endpoint, Timeouts
from .errors import (
    ConnectError,
    ProtocolError,
    SharedOllamaError,
    Timeout,
)
from .protocols import WireRequest

__all__ = ["client_kwargs", "map_transport_error", "to_httpx"]

USER_AGENT = f"shared-ollama/{__version__}"


def client_kwargs(endpoint: Endpoint, timeouts: Timeouts) -> dict[str, Any]:
    """Arguments for the (Async)Client of one endpoint: its pool limits and deadlines."""
    return {
        "base_url": endpoint.url,
        "limits": httpx.Limits(
            max_connections=endpoint.max_connections,
            max_keepalive_connections=endpoint.max_connections,
        ),
        "timeout": httpx.Timeout(
            connect=timeouts.connect_s,
            read=timeouts.first_chunk_s,
            write=timeouts.connect_s,
            pool=timeouts.first_chunk_s,
        ),
        "headers": {"user-agent": USER_AGENT},
        "follow_redirects": False,
    }


def to_httpx(
    client: httpx.Client | httpx.AsyncClient,
    wire: WireRequest,
    headers: Mapping[str, str],
    timeout: httpx.Timeout | None = None,
) -> httpx.Request:
    """Build (not send) the httpx request for ``wire``."""
    merged = {**headers, **wire.headers}
    kwargs: dict[str, Any] = {"headers": merged}
    if wire.json is not None:
        kwargs["json"] = wire.json
    if timeout is not None:
        kwargs["timeout"] = timeout
    return client.build_request(wire.method, wire.path, **kwargs)


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
