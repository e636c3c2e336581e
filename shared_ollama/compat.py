"""The official ``ollama`` client's front door: ``Client(host=...)``, ``AsyncClient``,
``OLLAMA_HOST``/``OLLAMA_API_KEY`` and module-level ``chat``/``generate``/... on a default
client, so that moving an application over is an import change.

``Client`` and ``AsyncClient`` are ``SyncSharedClient`` and ``SharedClient``: every
argument of those is accepted too (``endpoints=``, ``project=``, ``usage=``...), and
``host`` may name several servers (a pool). They start lazily on their first call and
release their resources at ``close()`` or when the interpreter exits, so, as with ollama,
no ``with`` block is needed.
"""

from __future__ import annotations

import atexit
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from .client import SharedClient, SyncSharedClient
from .config import Timeouts, ollama_endpoints, parse_host

__all__ = [
    "AsyncClient",
    "Client",
    "chat",
    "copy",
    "create",
    "delete",
    "embed",
    "embeddings",
    "generate",
    "list",
    "ollama_endpoints",
    "parse_host",
    "ps",
    "pull",
    "push",
    "show",
]


def _options(
    host: str | Sequence[str] | None,
    headers: Mapping[str, str] | None,
    timeout: float | None,
    kwargs: dict[str, Any],
) -> dict[str, Any]:
    if "endpoints" not in kwargs and "config" not in kwargs:
        kwargs["endpoints"] = ollama_endpoints(host, headers=headers)
    if timeout is not None and "timeouts" not in kwargs:
        # ollama's one timeout bounds each request; here it is every phase's deadline.
        kwargs["timeouts"] = Timeouts(
            first_chunk_s=timeout, between_chunks_s=timeout, total_s=timeout
        )
    return kwargs


class Client(SyncSharedClient):
    """ollama's ``Client(host=...)``: a blocking client over one Ollama server or several."""

    def __init__(
        self,
        host: str | Sequence[str] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**_options(host, headers, timeout, kwargs))
        atexit.register(self.close)

    def close(self) -> None:
        """Release connections and flush the usage ledger (idempotent)."""
        atexit.unregister(self.close)
        super().close()


class AsyncClient(SharedClient):
    """ollama's ``AsyncClient(host=...)``: an async client over one Ollama server or several."""

    def __init__(
        self,
        host: str | Sequence[str] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**_options(host, headers, timeout, kwargs))


# -- module-level calls on a default client ---------------------------------------------
_default: SyncSharedClient | None = None
_default_lock = threading.Lock()


def _client() -> SyncSharedClient:
    """The default client, made on first use: ``SHARED_OLLAMA_*`` settings when there are
    any, else ``OLLAMA_HOST`` (or the local default), as ollama's module functions."""
    global _default
    with _default_lock:
        if _default is None:
            configured = any(k.startswith("SHARED_OLLAMA_ENDPOINTS") for k in os.environ)
            _default = Client.from_config() if configured else Client()
        return _default


def chat(*args: Any, **kwargs: Any) -> Any:
    """``ollama.chat``: ``Client().chat`` on the default client."""
    return _client().chat(*args, **kwargs)


def generate(*args: Any, **kwargs: Any) -> Any:
    """``ollama.generate`` on the default client."""
    return _client().generate(*args, **kwargs)


def embed(*args: Any, **kwargs: Any) -> Any:
    """``ollama.embed`` on the default client."""
    return _client().embed(*args, **kwargs)


def list(**kwargs: Any) -> Any:
    """``ollama.list`` on the default client."""
    return _client().list(**kwargs)


def ps(**kwargs: Any) -> Any:
    """``ollama.ps`` on the default client."""
    return _client().ps(**kwargs)


def show(*args: Any, **kwargs: Any) -> Any:
    """``ollama.show`` on the default client."""
    return _client().show(*args, **kwargs)


def embeddings(*args: Any, **kwargs: Any) -> Any:
    """``ollama.embeddings`` (legacy, one vector) on the default client."""
    return _client().embeddings(*args, **kwargs)


def pull(*args: Any, **kwargs: Any) -> Any:
    """``ollama.pull`` on the default client (every Ollama endpoint of its pool)."""
    return _client().pull(*args, **kwargs)


def push(*args: Any, **kwargs: Any) -> Any:
    """``ollama.push`` on the default client."""
    return _client().push(*args, **kwargs)


def create(*args: Any, **kwargs: Any) -> Any:
    """``ollama.create`` on the default client."""
    return _client().create(*args, **kwargs)


def delete(*args: Any, **kwargs: Any) -> Any:
    """``ollama.delete`` on the default client."""
    return _client().delete(*args, **kwargs)


def copy(*args: Any, **kwargs: Any) -> Any:
    """``ollama.copy`` on the default client."""
    return _client().copy(*args, **kwargs)
