"""The wire protocols: one sans-IO codec per server family, chosen by an endpoint's kind.

``codec_for(kind)`` returns the shared, stateless codec for ``ollama``, ``openai`` or ``tgi``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

from ..errors import ConfigError
from .base import (
    ChatRequest,
    Codec,
    EmbedRequest,
    GenerateRequest,
    ListedModel,
    Parsed,
    Piece,
    StreamParser,
    WireRequest,
    WireResponse,
)
from .ollama import OllamaCodec
from .openai import OpenAICodec
from .tgi import TGICodec

__all__ = [
    "KINDS",
    "ChatRequest",
    "Codec",
    "EmbedRequest",
    "GenerateRequest",
    "ListedModel",
    "OllamaCodec",
    "OpenAICodec",
    "Parsed",
    "Piece",
    "StreamParser",
    "TGICodec",
    "WireRequest",
    "WireResponse",
    "codec_for",
]

_CODECS: Final[Mapping[str, Codec]] = MappingProxyType(
    {codec.kind: codec for codec in (OllamaCodec(), OpenAICodec(), TGICodec())}
)
#: The protocol kinds an endpoint can declare (besides ``auto``, resolved by probing).
KINDS: Final = tuple(_CODECS)


def codec_for(kind: str) -> Codec:
    """The shared codec for ``kind``; ConfigError for an unknown kind.

    >>> codec_for("ollama").kind
    'ollama'
    """
    try:
        return _CODECS[kind]
    except KeyError:
        known = ", ".join(KINDS)
        raise ConfigError(f"unknown protocol kind {kind!r} (expected one of: {known})") from None
