"""Typed requests and responses shared by every protocol (pydantic models).

Field names follow the official ``ollama`` client so that moving an application over is an
import change; ``model`` is always the logical name, ``served_model`` the backend's.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import (
    AliasChoices,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
)

from .records import RoutingDecision

__all__ = [
    "ChatChunk",
    "ChatResponse",
    "EmbedResponse",
    "EmbeddingsResponse",
    "GenerateChunk",
    "GenerateResponse",
    "ImageLike",
    "ListResponse",
    "Message",
    "MessageLike",
    "ModelDetails",
    "ModelInfo",
    "Operation",
    "Options",
    "ProgressResponse",
    "PsResponse",
    "RunningModel",
    "ServerTimings",
    "ShowResponse",
    "StatusResponse",
    "Timings",
    "ToolCall",
    "ToolCallFunction",
    "Usage",
]

Operation: TypeAlias = Literal["chat", "load", "generate", "embed", "list", "ps", "show"]
#: Ollama-style generation options (``num_predict``, ``temperature``, ``top_p``, ``top_k``,
#: ``seed``, ``stop``, ...); each protocol translates the ones it knows.
Options: TypeAlias = Mapping[str, Any]


class _Model(BaseModel):
    """Base: attribute access plus item access, ``in`` and ``get`` that behave like the
    ``ollama`` client's ``SubscriptableBaseModel``."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def __getitem__(self, key: str) -> Any:
        if key in self:
            return getattr(self, key)
        raise KeyError(key)

    def __setitem__(self, key: str, value: Any) -> None:
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        # ollama's rule: a field that was set (even to None), or one with a non-None default.
        if not isinstance(key, str):
            return False
        if key in self.model_fields_set or key in (self.__pydantic_extra__ or {}):
            return True
        field = type(self).model_fields.get(key)
        return field is not None and (
            field.default is not None or field.default_factory is not None
        )

    def get(self, key: str, default: Any = None) -> Any:
        """The field ``key``, or ``default`` when it is not there (as ``ollama``'s ``get``)."""
        return getattr(self, key) if key in self else default


def image_data(value: Any) -> str:
    """An image as the base64 text the servers take: ``bytes``, a path (``Path`` or a string
    naming a file), an ``ollama.Image``, or base64 / a URL already (kept as given)."""
    value = getattr(value, "value", value)  # ollama.Image
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, os.PathLike):
        return base64.b64encode(Path(value).read_bytes()).decode("ascii")
    if isinstance(value, str):
        looks_like_path = (
            len(value) < 4096
            and not value.startswith("data:")
            and (value.startswith(("/", "./", "~")) or Path(value).suffix != "")
        )
        if looks_like_path and Path(value).expanduser().is_file():
            return base64.b64encode(Path(value).expanduser().read_bytes()).decode("ascii")
        return value
    raise ValueError(f"an image must be bytes, a path or base64 text, not {type(value).__name__}")


def _now_iso() -> str:
    return datetime.now(UTC).isoformat()


def _iso(value: Any) -> Any:
    """An epoch (OpenAI's ``created``) as ollama's ISO 8601 string; strings as they are."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return datetime.fromtimestamp(value, UTC).isoformat()
    return value


#: A time as ollama gives it: a datetime from an ISO 8601 string or an epoch (OpenAI).
When: TypeAlias = Annotated[datetime | None, BeforeValidator(lambda v: _iso(v) or None)]


class _OllamaCounts(_Model):
    """ollama-python's counters and durations (nanoseconds), on every protocol: the
    server's own numbers where it gives them, else measured here (see
    docs/migrating_from_ollama.md for each protocol)."""

    created_at: str | None = Field(default_factory=_now_iso)
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None

    @field_validator("created_at", mode="before")
    @classmethod
    def _created(cls, v: Any) -> Any:
        return _iso(v)


class ToolCallFunction(_Model):
    """The function a model asked to call, with its arguments (a mapping, as in ollama)."""

    name: str = ""
    arguments: dict[str, Any] = Field(default_factory=dict)

    @field_validator("arguments", mode="before")
    @classmethod
    def _arguments(cls, v: Any) -> Any:
        # OpenAI servers send the arguments as a JSON string.
        if isinstance(v, str):
            import json

            try:
                parsed = json.loads(v) if v.strip() else {}
            except ValueError:
                return {"__raw__": v}
            return parsed if isinstance(parsed, dict) else {"__raw__": v}
        return v


class ToolCall(_Model):
    """One tool call of an assistant message (``tool_calls[i].function.name``)."""

    function: ToolCallFunction = Field(default_factory=ToolCallFunction)


class Message(_Model):
    """One chat message."""

    role: str = "assistant"
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None

    @field_validator("images", mode="before")
    @classmethod
    def _images(cls, v: Any) -> Any:
        if v is None or isinstance(v, str | bytes):
            return None if v is None else [image_data(v)]
        return [image_data(i) for i in v]

    @field_validator("content", mode="before")
    @classmethod
    def _content(cls, v: Any) -> Any:
        return "" if v is None else v  # ollama allows None (a message of tool calls only)


MessageLike: TypeAlias = Message | Mapping[str, Any]
#: An image: base64 text, raw ``bytes``, or the path of a file.
ImageLike: TypeAlias = str | bytes | os.PathLike[str]


class Usage(_Model):
    """Token counts as reported by the server (never re-tokenized)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    #: Of the input tokens, those the server took from its prompt cache (None: not said).
    cached_tokens: int | None = None

    @property
    def total_tokens(self) -> int | None:
        """Input plus output tokens, when both are known."""
        if self.input_tokens is None or self.output_tokens is None:
            return None
        return self.input_tokens + self.output_tokens


class ServerTimings(_Model):
    """The server's own timings, where the engine reports them.

    Ollama: durations in nanoseconds from the final object. TGI: ``x-*`` response headers
    (queue/inference/per-token in ms, compute in s).
    """

    total_duration_ns: int | None = None
    load_duration_ns: int | None = None
    prompt_eval_duration_ns: int | None = None
    eval_duration_ns: int | None = None
    queue_time_ms: float | None = None
    inference_time_ms: float | None = None
    time_per_token_ms: float | None = None
    validation_time_ms: float | None = None
    compute_time_s: float | None = None

    def as_dict(self) -> dict[str, float]:
        """The known values only."""
        return {k: float(v) for k, v in self.model_dump().items() if v is not None}


class Timings(_Model):
    """Client-side timestamps (monotonic ns) of the call plus the server's own timings."""

    t_start_ns: int = 0
    t_first_chunk_ns: int | None = None
    t_end_ns: int = 0
    server: ServerTimings = Field(default_factory=ServerTimings)

    @property
    def duration_s(self) -> float:
        """End-to-end latency in seconds, retries included."""
        return (self.t_end_ns - self.t_start_ns) / 1e9

    @property
    def ttft_s(self) -> float | None:
        """Time to the first chunk (streams) or first byte of the body, in seconds."""
        if self.t_first_chunk_ns is None:
            return None
        return (self.t_first_chunk_ns - self.t_start_ns) / 1e9


class _Served(_Model):
    """What every full response says about where and how it was served."""

    model: str = ""
    served_model: str = ""
    endpoint: str = ""
    usage: Usage = Field(default_factory=Usage)
    timings: Timings = Field(default_factory=Timings)
    request_id: str = ""
    attempts: int = 1
    #: Where the router sent the call and why (endpoint, reason, candidates, key hash).
    routing: RoutingDecision | None = None


class ChatResponse(_Served, _OllamaCounts):
    """A complete chat reply."""

    message: Message = Field(default_factory=Message)
    done: bool = True
    done_reason: str | None = None

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's name for ``done_reason``."""
        return self.done_reason


class ChatChunk(_OllamaCounts):
    """One piece of a streamed chat reply; the last has ``done=True``, the usage and
    ollama's counters."""

    model: str = ""
    served_model: str = ""
    endpoint: str = ""
    message: Message = Field(default_factory=Message)
    done: bool = False
    done_reason: str | None = None
    usage: Usage | None = None
    #: Tokens carried by this chunk, where the server says (None: unknown).
    tokens: int | None = None
    #: The last chunk only: where the router sent the call and why.
    routing: RoutingDecision | None = None


class GenerateResponse(_Served, _OllamaCounts):
    """A complete completion (``generate``) reply."""

    response: str = ""
    done: bool = True
    done_reason: str | None = None
    context: list[int] | None = None

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's name for ``done_reason``."""
        return self.done_reason


class GenerateChunk(_OllamaCounts):
    """One piece of a streamed completion; the last has ollama's counters."""

    model: str = ""
    served_model: str = ""
    endpoint: str = ""
    response: str = ""
    done: bool = False
    done_reason: str | None = None
    usage: Usage | None = None
    tokens: int | None = None
    #: The last chunk only: where the router sent the call and why.
    routing: RoutingDecision | None = None


class EmbedResponse(_Served, _OllamaCounts):
    """Embeddings, one vector per input."""

    embeddings: list[list[float]] = Field(default_factory=list)


class ProgressResponse(_Model):
    """A model-management progress report (``pull``/``push``/``create``), as ollama's; a
    stream's chunks carry the ``endpoint`` they come from, a whole answer every endpoint's
    final status in ``endpoints``."""

    status: str | None = None
    digest: str | None = None
    total: int | None = None
    completed: int | None = None
    endpoint: str = ""
    endpoints: dict[str, str] = Field(default_factory=dict)


class StatusResponse(_Model):
    """``delete``/``copy``: ``status`` ("success"), per endpoint in ``endpoints``."""

    status: str | None = None
    endpoints: dict[str, str] = Field(default_factory=dict)


class EmbeddingsResponse(_Served):
    """The legacy ``embeddings`` call's answer: one vector."""

    embedding: list[float] = Field(default_factory=list)


class ModelDetails(_Model):
    """What a server says about a model's make (``details.family`` as in ollama)."""

    parent_model: str | None = None
    format: str | None = None
    family: str | None = None
    families: list[str] | None = None
    parameter_size: str | None = None
    quantization_level: str | None = None


class ModelInfo(_Model):
    """One model as listed by an endpoint."""

    model: str
    """The logical name (an alias if one maps to it, else the served name)."""
    served_model: str = ""
    endpoint: str = ""
    name: str = ""
    size: int | None = None
    digest: str | None = None
    modified_at: When = None
    details: ModelDetails = Field(default_factory=ModelDetails)


class ListResponse(_Model):
    """Models across the pool (one entry per endpoint and model)."""

    models: list[ModelInfo] = Field(default_factory=list)


class RunningModel(_Model):
    """A model loaded in memory on an endpoint (``/api/ps``; always-loaded engines too)."""

    model: str
    served_model: str = ""
    endpoint: str = ""
    name: str = ""
    size: int | None = None
    size_vram: int | None = None
    expires_at: When = None
    details: ModelDetails = Field(default_factory=ModelDetails)


class PsResponse(_Model):
    """Loaded models across the pool."""

    models: list[RunningModel] = Field(default_factory=list)


class ShowResponse(_Model):
    """What an endpoint says about one model."""

    model: str = ""
    served_model: str = ""
    endpoint: str = ""
    modelfile: str | None = None
    parameters: str | None = None
    template: str | None = None
    license: str | None = None
    modified_at: When = None
    details: ModelDetails = Field(default_factory=ModelDetails)
    #: ollama's name (the server's ``model_info``); ``model_info`` still reads it.
    modelinfo: dict[str, Any] = Field(
        default_factory=dict, validation_alias=AliasChoices("modelinfo", "model_info")
    )
    capabilities: list[str] = Field(default_factory=list)

    @property
    def model_info(self) -> dict[str, Any]:
        """The server's name for ``modelinfo``."""
        return self.modelinfo


def normalize_messages(messages: Sequence[MessageLike] | None) -> list[Message]:
    """Validate chat messages given as ``Message`` objects or dicts."""
    out: list[Message] = []
    for m in messages or ():
        out.append(m if isinstance(m, Message) else Message.model_validate(dict(m)))
    return out
