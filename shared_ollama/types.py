"""Typed requests and responses shared by every protocol (pydantic models).

Field names follow the official ``ollama`` client so that moving an application over is an
import change; ``model`` is always the logical name, ``served_model`` the backend's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "ChatChunk",
    "ChatResponse",
    "EmbedResponse",
    "GenerateChunk",
    "GenerateResponse",
    "ListResponse",
    "Message",
    "MessageLike",
    "ModelInfo",
    "Operation",
    "Options",
    "PsResponse",
    "RunningModel",
    "ServerTimings",
    "ShowResponse",
    "Timings",
    "Usage",
]

Operation: TypeAlias = Literal["chat", "generate", "embed", "list", "ps", "show"]
#: Ollama-style generation options (``num_predict``, ``temperature``, ``top_p``, ``top_k``,
#: ``seed``, ``stop``, ...); each protocol translates the ones it knows.
Options: TypeAlias = Mapping[str, Any]


class _Model(BaseModel):
    """Base: attribute access plus ``obj["field"]`` like the ``ollama`` client's models."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and getattr(self, key, None) is not None

    def get(self, key: str, default: Any = None) -> Any:
        """Return the field ``key`` or ``default``."""
        return getattr(self, key, default)


class Message(_Model):
    """One chat message."""

    role: str = "assistant"
    content: str = ""
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None


MessageLike: TypeAlias = Message | Mapping[str, Any]


class Usage(_Model):
    """Token counts as reported by the server (never re-tokenized)."""

    input_tokens: int | None = None
    output_tokens: int | None = None

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


class ChatResponse(_Served):
    """A complete chat reply."""

    message: Message = Field(default_factory=Message)
    done: bool = True
    done_reason: str | None = None

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's name for ``done_reason``."""
        return self.done_reason


class ChatChunk(_Model):
    """One piece of a streamed chat reply; the last has ``done=True`` and the usage."""

    model: str = ""
    served_model: str = ""
    endpoint: str = ""
    message: Message = Field(default_factory=Message)
    done: bool = False
    done_reason: str | None = None
    usage: Usage | None = None
    #: Tokens carried by this chunk, where the server says (None: unknown).
    tokens: int | None = None


class GenerateResponse(_Served):
    """A complete completion (``generate``) reply."""

    response: str = ""
    done: bool = True
    done_reason: str | None = None
    context: list[int] | None = None

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's name for ``done_reason``."""
        return self.done_reason


class GenerateChunk(_Model):
    """One piece of a streamed completion."""

    model: str = ""
    served_model: str = ""
    endpoint: str = ""
    response: str = ""
    done: bool = False
    done_reason: str | None = None
    usage: Usage | None = None
    tokens: int | None = None


class EmbedResponse(_Served):
    """Embeddings, one vector per input."""

    embeddings: list[list[float]] = Field(default_factory=list)


class ModelInfo(_Model):
    """One model as listed by an endpoint."""

    model: str
    """The logical name (an alias if one maps to it, else the served name)."""
    served_model: str = ""
    endpoint: str = ""
    name: str = ""
    size: int | None = None
    digest: str | None = None
    modified_at: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


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
    expires_at: str | None = None
    details: dict[str, Any] = Field(default_factory=dict)


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
    details: dict[str, Any] = Field(default_factory=dict)
    model_info: dict[str, Any] = Field(default_factory=dict)
    capabilities: list[str] = Field(default_factory=list)


def normalize_messages(messages: Sequence[MessageLike] | None) -> list[Message]:
    """Validate chat messages given as ``Message`` objects or dicts."""
    out: list[Message] = []
    for m in messages or ():
        out.append(m if isinstance(m, Message) else Message.model_validate(dict(m)))
    return out
