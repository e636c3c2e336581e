"""The sans-IO codec interface every wire protocol implements.

A codec turns typed requests into ``WireRequest`` values and ``WireResponse`` bytes (or
stream bytes, incrementally) into ``Parsed`` / ``Piece`` values. It never does I/O, never
reads the clock and never sees credentials: the drivers add auth and tracing headers.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from ..types import Message

__all__ = [
    "ChatRequest",
    "Codec",
    "EmbedRequest",
    "GenerateRequest",
    "ListedModel",
    "Parsed",
    "Piece",
    "StreamParser",
    "WireRequest",
    "WireResponse",
]


@dataclass(frozen=True, slots=True)
class WireRequest:
    """An HTTP request described without I/O: the driver sends it."""

    method: str
    path: str
    json: Any = None
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Whether the reply is a stream to be read incrementally.
    stream: bool = False


@dataclass(frozen=True, slots=True)
class WireResponse:
    """A complete (non-stream) HTTP reply, or the head of a stream with an empty body."""

    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """A chat call, with the backend's model name already resolved."""

    model: str
    messages: list[Message]
    stream: bool = False
    options: Mapping[str, Any] = field(default_factory=dict)
    format: Any = None
    tools: list[dict[str, Any]] | None = None
    think: bool | str | None = None
    keep_alive: float | str | None = None


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """A completion call (``generate``), with the backend's model name resolved."""

    model: str
    prompt: str
    stream: bool = False
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None
    raw: bool | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    format: Any = None
    think: bool | str | None = None
    keep_alive: float | str | None = None


@dataclass(frozen=True, slots=True)
class EmbedRequest:
    """An embedding call, with the backend's model name resolved."""

    model: str
    input: list[str]
    truncate: bool | None = None
    dimensions: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    keep_alive: float | str | None = None


@dataclass(slots=True)
class Parsed:
    """A decoded non-stream reply (chat, generate or embed)."""

    text: str = ""
    role: str = "assistant"
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    done_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    served_model: str | None = None
    #: ``types.ServerTimings`` field names -> values.
    server_timings: dict[str, float] = field(default_factory=dict)
    context: list[int] | None = None
    embeddings: list[list[float]] | None = None
    #: Prompt tokens served from the server's prompt cache, where it says.
    cached_tokens: int | None = None


class _NoTimings(Mapping[str, float]):
    """An empty, read-only, hashable mapping: the shared default of ``Piece.server_timings``
    (a dataclass default must be hashable; a dict made per chunk cost a call each)."""

    __slots__ = ()

    def __getitem__(self, key: str) -> float:
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "{}"


_NO_TIMINGS: Mapping[str, float] = _NoTimings()


@dataclass(slots=True)
class Piece:
    """One decoded stream event.

    ``text`` is the new content (possibly empty: role-only or usage-only events).
    ``tokens`` is how many output tokens the event carries where the protocol says so
    (TGI: 1; OpenAI with continuous usage: the delta), else None. ``done`` marks the
    event that ends the generation; usage may arrive on it or on a later usage-only
    event (OpenAI ``include_usage``), so decoders keep going until the stream ends.
    """

    text: str = ""
    tokens: int | None = None
    done: bool = False
    done_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    served_model: str | None = None
    #: Read-only (the empty default is shared).
    server_timings: Mapping[str, float] = _NO_TIMINGS
    thinking: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    #: True when the stream's terminator was seen (Ollama ``done``, SSE ``[DONE]``, TGI
    #: final event with ``details``): a stream that ends without it was truncated.
    final: bool = False
    #: Prompt tokens served from the server's prompt cache, where it says.
    cached_tokens: int | None = None

    @property
    def has_content(self) -> bool:
        """Whether the event carries content: text, thinking or tool calls."""
        return bool(self.text or self.thinking or self.tool_calls)


@dataclass(slots=True)
class ListedModel:
    """One model as an endpoint lists it (``/api/tags``, ``/v1/models``, ``/info``, ``/api/ps``)."""

    name: str
    size: int | None = None
    size_vram: int | None = None
    digest: str | None = None
    modified_at: str | None = None
    expires_at: str | None = None
    details: dict[str, Any] = field(default_factory=dict)


class StreamParser(ABC):
    """Incremental decoder for one streamed reply: ``feed(bytes)`` then ``flush()``."""

    @abstractmethod
    def feed(self, data: bytes) -> list[Piece]:
        """Decode what ``data`` completes; keep partial lines for the next call."""

    @abstractmethod
    def flush(self) -> list[Piece]:
        """End of stream: decode what is left (raises ProtocolError on garbage)."""

    @property
    @abstractmethod
    def finished(self) -> bool:
        """Whether the protocol's end-of-stream marker was seen."""


class Codec(ABC):
    """One wire protocol. Stateless: one instance serves every call to its endpoints."""

    kind: ClassVar[Literal["ollama", "openai", "tgi"]]
    #: Operations the protocol can serve at all.
    operations: ClassVar[frozenset[str]]

    # -- building -------------------------------------------------------------------
    @abstractmethod
    def chat(self, req: ChatRequest) -> WireRequest:
        """Request for a chat call."""

    @abstractmethod
    def generate(self, req: GenerateRequest) -> WireRequest:
        """Request for a completion call."""

    @abstractmethod
    def embed(self, req: EmbedRequest) -> WireRequest:
        """Request for an embedding call."""

    @abstractmethod
    def list_models(self) -> WireRequest:
        """Request listing the served models (also used for discovery)."""

    @abstractmethod
    def ps(self) -> WireRequest | None:
        """Request listing loaded models, or None where every served model is loaded."""

    @abstractmethod
    def show(self, model: str) -> WireRequest | None:
        """Request describing one model, or None where the protocol has none."""

    @abstractmethod
    def health(self) -> WireRequest:
        """The cheapest request that proves the server is up."""

    # -- parsing --------------------------------------------------------------------
    @abstractmethod
    def parse_chat(self, resp: WireResponse) -> Parsed:
        """Decode a non-stream chat reply (status 2xx)."""

    @abstractmethod
    def parse_generate(self, resp: WireResponse) -> Parsed:
        """Decode a non-stream completion reply (status 2xx)."""

    @abstractmethod
    def parse_embed(self, resp: WireResponse) -> Parsed:
        """Decode an embedding reply (status 2xx)."""

    @abstractmethod
    def parse_list(self, resp: WireResponse) -> list[ListedModel]:
        """Decode the model list."""

    @abstractmethod
    def parse_ps(self, resp: WireResponse) -> list[ListedModel]:
        """Decode the loaded-model list."""

    @abstractmethod
    def parse_show(self, resp: WireResponse) -> dict[str, Any]:
        """Decode a model description into ``types.ShowResponse`` fields."""

    @abstractmethod
    def stream_parser(self, operation: Literal["chat", "generate"]) -> StreamParser:
        """A fresh incremental decoder for one streamed reply."""

    @abstractmethod
    def error_message(self, resp: WireResponse) -> str | None:
        """The server's own error message from an error reply, if it has one."""

    def is_overload(self, resp: WireResponse) -> bool:
        """Whether an error reply is the engine's backpressure (not a broken server)."""
        return resp.status == 429

    def response_timings(self, headers: Mapping[str, str]) -> dict[str, float]:
        """Server timings carried in response headers (TGI); none by default."""
        return {}
