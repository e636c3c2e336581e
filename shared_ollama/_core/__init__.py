"""Sans-IO core: every decision and decoder, free of httpx, asyncio and clock reads.

The sync and async drivers in ``client.py`` only send, stream, sleep and lock around it.
"""

from ..protocols.decoders import NDJSONDecoder, SSEDecoder, SSEEvent
from .status import error_for_response, parse_retry_after

__all__ = [
    "NDJSONDecoder",
    "SSEDecoder",
    "SSEEvent",
    "error_for_response",
    "parse_retry_after",
]
