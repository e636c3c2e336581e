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
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any, ClassVar

from .client import SharedClient, SyncSharedClient
from .config import Timeouts, load_config, ollama_endpoints, parse_host

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


class _FrontDoor:
    """ollama's constructor, shared by both clients: ``host`` (one or several), ``headers``,
    ``timeout``, and every pool argument as well."""

    #: Close at interpreter exit when the application never does (blocking client only: an
    #: async client's loop is gone by then).
    _close_at_exit: ClassVar[bool] = False

    def __init__(
        self,
        host: str | Sequence[str] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        timeout: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**_options(host, headers, timeout, kwargs))
        if self._close_at_exit:
            atexit.register(self.close)  # type: ignore[attr-defined]


class Client(_FrontDoor, SyncSharedClient):
    """ollama's ``Client(host=...)``: a blocking client over one Ollama server or several."""

    _close_at_exit = True

    def close(self) -> None:
        """Release connections and flush the usage ledger (idempotent)."""
        atexit.unregister(self.close)
        super().close()


class AsyncClient(_FrontDoor, SharedClient):
    """ollama's ``AsyncClient(host=...)``: an async client over one Ollama server or several."""


# -- module-level calls on a default client ---------------------------------------------
_default: SyncSharedClient | None = None
_default_lock = threading.Lock()


def _client() -> SyncSharedClient:
    """The default client, made on first use from ``SHARED_OLLAMA_*`` settings (a pool file
    named by ``SHARED_OLLAMA_CONFIG``, ``SHARED_OLLAMA_ENDPOINTS``, the project, the
    ledger...); where they name no endpoint, ``OLLAMA_HOST`` (or the local default), as
    ollama's module functions."""
    global _default
    with _default_lock:
        if _default is None:
            config = load_config()
            if not config.endpoints:
                config = config.model_copy(update={"endpoints": ollama_endpoints()})
            _default = Client(config=config)
        return _default


def _on_default(name: str, what: str) -> Callable[..., Any]:
    """ollama's module-level ``name``: the same method of the default client."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(_client(), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"``ollama.{name}``: {what}, on the default client."
    return call


chat = _on_default("chat", "a chat")
generate = _on_default("generate", "a completion")
embed = _on_default("embed", "embeddings")
embeddings = _on_default("embeddings", "one embedding (legacy)")
list = _on_default("list", "the models of the pool")
ps = _on_default("ps", "the models loaded across the pool")
show = _on_default("show", "what an endpoint says about a model")
pull = _on_default("pull", "pull a model onto every Ollama endpoint")
push = _on_default("push", "push a model")
create = _on_default("create", "create a model")
delete = _on_default("delete", "delete a model")
copy = _on_default("copy", "copy a model")
