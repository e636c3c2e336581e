"""Typed call arguments -> per-codec request builders and reply parsers (pure).

The public methods of both clients only gather their arguments; everything that turns
them into wire requests and typed results is here, once.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from pydantic import PydanticSchemaGenerationError, TypeAdapter, ValidationError

from ..errors import InvalidRequest
from ..pool.affinity import PROMPT_PREFIX_CHARS, routing_key
from ..protocols import (
    ChatRequest,
    Codec,
    EmbedRequest,
    GenerateRequest,
    Parsed,
    WireRequest,
    WireResponse,
)
from ..protocols.decoders import excerpt
from ..types import Message, MessageLike, image_data

__all__ = [
    "Op",
    "chat_op",
    "create_body",
    "embed_op",
    "generate_op",
    "show_op",
    "tool_from_function",
]

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Op(Generic[T]):
    """What one routed call sends and how its reply is parsed, for any codec."""

    operation: str
    model: str
    stream: bool
    build: Callable[[Codec, str], WireRequest]
    parse: Callable[[Codec, WireResponse], T]
    #: The messages or prompt, for telemetry's opt-in content capture.
    content: object = None
    #: The caller's ``session=`` (kept in memory for admission; never recorded).
    session: str | None = None
    #: The caller's ``service_class=`` (an admission class name).
    service_class: str | None = None
    #: The routing key's short hash (see ``pool.affinity.routing_key``), or None.
    route_key: str | None = None
    #: Prompt tokens, estimated (no tokenizer here: four characters a token, enough to weigh
    #: calls against each other), and the output tokens allowed.
    prompt_tokens: int = 0
    max_tokens: int | None = None


def _check_model(model: str) -> str:
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("model must be a non-empty string", model=None)
    return model


# Ollama's options whose type every engine agrees on; anything else passes through as given
# (engine-specific knobs such as vLLM's ``ignore_eos``). A wrong type is caught here, the
# same way for every endpoint, instead of being refused by some servers and ignored by others.
_INT_OPTIONS = frozenset(
    {"num_predict", "num_ctx", "top_k", "seed", "num_keep", "repeat_last_n", "num_batch",
     "num_gpu", "main_gpu", "num_thread", "mirostat", "min_tokens"}
)  # fmt: skip
_FLOAT_OPTIONS = frozenset(
    {"temperature", "top_p", "min_p", "typical_p", "repeat_penalty", "presence_penalty",
     "frequency_penalty", "tfs_z", "mirostat_tau", "mirostat_eta"}
)  # fmt: skip


def _plain(obj: Any) -> Any:
    """ollama's own request objects (``ollama.Message``, ``Options``, ``Tool``: pydantic
    models) as the mappings they stand for, without importing ``ollama``."""
    dump = getattr(obj, "model_dump", None)
    if callable(dump) and not isinstance(obj, Message):
        return dump(exclude_none=True)
    return obj


def _schema(annotation: Any) -> dict[str, Any]:
    if annotation is inspect.Parameter.empty:
        return {}
    return TypeAdapter(annotation).json_schema()


def _json_type(schema: Mapping[str, Any]) -> tuple[str, bool]:
    """A parameter's JSON schema type as ollama writes it for a function tool, and whether
    it may be null (an ``X | None`` parameter is not required)."""
    types = [t.get("type", "string") for t in schema.get("anyOf", [schema])]
    kept = [t for t in types if t != "null"] or ["string"]
    return ", ".join(dict.fromkeys(kept)), "null" in types


def _doc_args(doc: str) -> tuple[str, dict[str, str]]:
    """A Google-style docstring: its summary, and each ``Args:`` entry's description."""
    summary: list[str] = []
    args: dict[str, str] = {}
    section, last = "summary", None
    for line in doc.splitlines():
        text = line.strip()
        lowered = text.lower()
        if lowered.startswith("args:"):
            section = "args"
        elif lowered.startswith(("returns:", "yields:", "raises:", "examples:")):
            section = "other"
        elif section == "summary" and text:
            summary.append(text)
        elif section == "args" and text:
            name, sep, rest = text.partition(":")
            if sep and " " not in name.split("(")[0].strip():
                last = name.split("(")[0].strip()
                args[last] = rest.strip()
            elif last is not None:
                args[last] += " " + text
    return " ".join(summary), args


def tool_from_function(fn: Callable[..., Any]) -> dict[str, Any]:
    """A Python function as a tool, from its signature and docstring (as ollama does)."""
    summary, described = _doc_args(inspect.getdoc(fn) or "")
    properties: dict[str, Any] = {}
    required: list[str] = []
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    for name, param in inspect.signature(fn).parameters.items():
        kind, nullable = _json_type(_schema(hints.get(name, param.annotation)))
        properties[name] = {"type": kind, "description": described.get(name, "")}
        if param.default is inspect.Parameter.empty and not nullable:
            required.append(name)
    return {
        "type": "function",
        "function": {
            "name": fn.__name__,
            "description": summary,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def _tools(tools: Sequence[Any] | None) -> list[dict[str, Any]] | None:
    if not tools:
        return None
    if isinstance(tools, str | bytes | Mapping) or not isinstance(tools, Sequence):
        raise InvalidRequest("tools must be a list of tool definitions or functions")
    out: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        tool = _plain(tool)
        if isinstance(tool, Mapping):
            out.append(dict(tool))
        elif callable(tool):
            try:
                out.append(tool_from_function(tool))
            except (TypeError, ValueError, PydanticSchemaGenerationError) as exc:
                raise InvalidRequest(f"tools[{i}]: cannot describe {tool!r}: {exc}") from None
        else:
            raise InvalidRequest(f"tools[{i}] must be a mapping or a function")
    return out


def _options(options: Mapping[str, Any] | None) -> dict[str, Any]:
    options = _plain(options)
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise InvalidRequest(f"options must be a mapping, got {type(options).__name__}")
    for key, value in options.items():
        if value is None:
            continue
        if key in _INT_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, int):
                kind = type(value).__name__
                raise InvalidRequest(f"options[{key!r}] must be an integer, got {kind}")
        elif key in _FLOAT_OPTIONS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                kind = type(value).__name__
                raise InvalidRequest(f"options[{key!r}] must be a number, got {kind}")
        elif key == "stop" and not (
            isinstance(value, str)
            or (isinstance(value, Sequence) and all(isinstance(s, str) for s in value))
        ):
            raise InvalidRequest("options['stop'] must be a string or a list of strings")
    return dict(options)


#: The roles every protocol understands (OpenAI's ``developer`` is its ``system``).
ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


def _messages(messages: Sequence[MessageLike] | None) -> list[Message]:
    if messages is None:
        messages = []
    if isinstance(messages, str | bytes) or not isinstance(messages, Sequence):
        raise InvalidRequest("messages must be a list of {'role': ..., 'content': ...}")
    out: list[Message] = []
    for i, m in enumerate(messages):
        if isinstance(m, Message):
            out.append(m)
            continue
        m = _plain(m)
        if not isinstance(m, Mapping):
            raise InvalidRequest(f"messages[{i}] must be a mapping or Message")
        role = m.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequest(f"messages[{i}] has no role ('system', 'user', 'assistant'...)")
        if role not in ROLES:
            known = ", ".join(sorted(ROLES))
            raise InvalidRequest(f"messages[{i}].role {excerpt(repr(role))} is not one of {known}")
        try:
            out.append(Message.model_validate(dict(m)))
        except ValidationError as exc:
            raise InvalidRequest(f"messages[{i}] is invalid: {exc.errors()[0]['msg']}") from None
    return out


def _max_tokens(opts: Mapping[str, Any]) -> int | None:
    for name in ("num_predict", "max_tokens"):
        value = opts.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def chat_op(
    model: str,
    messages: Sequence[MessageLike] | None,
    *,
    tools: Sequence[Any] | None,
    stream: bool,
    think: bool | str | None,
    format: Any,
    options: Mapping[str, Any] | None,
    keep_alive: float | str | None,
    session: str | None = None,
    service_class: str | None = None,
) -> Op[Parsed]:
    """A chat call."""
    msgs = _messages(messages)
    opts = _options(options)
    tool_list = _tools(tools)

    def build(codec: Codec, served: str) -> WireRequest:
        return codec.chat(
            ChatRequest(
                model=served,
                messages=msgs,
                stream=stream,
                options=opts,
                format=format,
                tools=tool_list,
                think=think,
                keep_alive=keep_alive,
            )
        )

    # No messages: Ollama loads the model (unloads it with keep_alive=0) and generates
    # nothing; OpenAI-compatible engines would make a reply up from nothing. Routed as its
    # own operation, to the endpoints that honour it only.
    operation = "chat" if msgs else "load"
    parse = lambda c, r: c.parse_chat(r)  # noqa: E731
    # One plain loop (no generators): this runs on every call.
    system = first_user = None
    chars = 0
    for m in msgs:
        chars += len(m.content)
        if system is None and (m.role == "system" or m.role == "developer"):
            system = m.content
        elif first_user is None and m.role == "user":
            first_user = m.content
    key = routing_key(session=session, options=opts, system=system, first_user=first_user)
    return Op(operation, _check_model(model), stream, build, parse, msgs, session=session,
              service_class=service_class, route_key=key, prompt_tokens=(chars + 3) // 4,
              max_tokens=_max_tokens(opts) if opts else None)  # fmt: skip


def generate_op(
    model: str,
    prompt: str,
    *,
    suffix: str | None,
    system: str | None,
    template: str | None,
    context: Sequence[int] | None,
    stream: bool,
    think: bool | str | None,
    raw: bool | None,
    format: Any,
    images: Sequence[Any] | None,
    options: Mapping[str, Any] | None,
    keep_alive: float | str | None,
    session: str | None = None,
    service_class: str | None = None,
) -> Op[Parsed]:
    """A completion call."""
    if not isinstance(prompt, str):
        raise InvalidRequest(f"prompt must be a string, got {type(prompt).__name__}")
    opts = _options(options)
    try:
        pictures = None if images is None else [image_data(i) for i in images]
    except (ValueError, OSError) as exc:
        raise InvalidRequest(f"images: {exc}") from None

    def build(codec: Codec, served: str) -> WireRequest:
        return codec.generate(
            GenerateRequest(
                model=served,
                prompt=prompt,
                stream=stream,
                suffix=suffix,
                system=system,
                template=template,
                context=list(context) if context is not None else None,
                images=pictures,
                raw=raw,
                options=opts,
                format=format,
                think=think,
                keep_alive=keep_alive,
            )
        )

    parse = lambda c, r: c.parse_generate(r)  # noqa: E731
    key = routing_key(session=session, options=opts, system=system,
                      first_user=prompt[:PROMPT_PREFIX_CHARS])  # fmt: skip
    chars = len(prompt) + len(system or "")
    return Op("generate", _check_model(model), stream, build, parse, prompt, session=session,
              service_class=service_class, route_key=key, prompt_tokens=(chars + 3) // 4,
              max_tokens=_max_tokens(opts) if opts else None)  # fmt: skip


def embed_op(
    model: str,
    input: str | Sequence[str],
    *,
    truncate: bool | None,
    options: Mapping[str, Any] | None,
    keep_alive: float | str | None,
    dimensions: int | None,
) -> Op[Parsed]:
    """An embedding call."""
    inputs = [input] if isinstance(input, str) else list(input)
    if not inputs or not all(isinstance(i, str) for i in inputs):
        raise InvalidRequest("input must be a string or a non-empty list of strings")
    opts = _options(options)

    def build(codec: Codec, served: str) -> WireRequest:
        return codec.embed(
            EmbedRequest(
                model=served,
                input=inputs,
                truncate=truncate,
                dimensions=dimensions,
                options=opts,
                keep_alive=keep_alive,
            )
        )

    return Op("embed", _check_model(model), False, build, lambda c, r: c.parse_embed(r), inputs)


def show_op(model: str) -> Op[dict[str, Any]]:
    """A model description; protocols without a show route answer from their model list."""
    _check_model(model)

    def build(codec: Codec, served: str) -> WireRequest:
        return codec.show(served) or codec.list_models()

    def parse(codec: Codec, resp: WireResponse) -> dict[str, Any]:
        if codec.show(model) is not None:
            return codec.parse_show(resp)
        listed = codec.parse_list(resp)
        details = next((m.details for m in listed if m.name == model), {})
        return {"details": dict(details)}

    return Op("show", model, False, build, parse)


def create_body(
    model: str,
    quantize: str | None,
    from_: str | None,
    files: Mapping[str, str] | None,
    adapters: Mapping[str, str] | None,
    template: str | None,
    license: str | Sequence[str] | None,
    system: str | None,
    parameters: Mapping[str, Any] | None,
    messages: Sequence[MessageLike] | None,
    stream: bool,
) -> dict[str, Any]:
    """Ollama's ``/api/create`` body, the fields given only."""
    _check_model(model)
    body: dict[str, Any] = {"model": model, "stream": stream}
    given = {"quantize": quantize, "from": from_, "files": files, "adapters": adapters,
             "template": template, "license": license, "system": system,
             "parameters": parameters}  # fmt: skip
    body.update({k: v for k, v in given.items() if v is not None})
    if messages:
        body["messages"] = [m.model_dump(exclude_none=True) for m in _messages(messages)]
    return body
