"""Bytes to values, incrementally and safely: NDJSON and SSE framing plus checked JSON.

Shared by the sync and async drivers and by every codec; malformed input is ProtocolError.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from ..errors import ProtocolError, ServerError, SharedOllamaError

_T = TypeVar("_T")
_U = TypeVar("_U")

__all__ = [
    "JSON_ERRORS",
    "MAX_BUFFER",
    "NDJSONDecoder",
    "PendingError",
    "SSEDecoder",
    "SSEEvent",
    "decode_json",
    "error_text",
    "excerpt",
    "expect_dict",
    "float_list",
    "message_in",
    "opt_bool",
    "opt_dict",
    "opt_int",
    "opt_list",
    "opt_number",
    "opt_str",
    "stream_error",
]

#: Largest partial line or event a decoder holds before giving up: a peer that never
#: sends a line end must not grow our memory without bound.
MAX_BUFFER: Final = 32 * 1024 * 1024
_EXCERPT = 200


def excerpt(text: str | bytes, limit: int = _EXCERPT) -> str:
    """A short, printable prefix of ``text`` for error messages (at most ``limit`` chars)."""
    if isinstance(text, bytes | bytearray):
        text = bytes(text[: limit * 4]).decode("utf-8", "replace")
    return text if len(text) <= limit else text[: limit - 3] + "..."


#: What ``json.loads`` raises on hostile input: ValueError (JSONDecodeError, bad UTF-8) and
#: RecursionError (nesting deeper than the interpreter's recursion limit, ~1000 levels; the C
#: scanner stops there without touching the C stack). Every JSON read of server bytes catches
#: both, so a deeply nested body is a malformed reply, never an escaping RecursionError.
JSON_ERRORS: Final = (ValueError, RecursionError)


# The C scanner that ``json.loads`` ends in, called directly for a str: loads -> decode ->
# raw_decode cost two regex matches and three Python calls around it, on every stream chunk.
_SCAN: Final[Callable[[str, int], tuple[Any, int]]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]


def decode_json(data: str | bytes, what: str) -> Any:
    """``json.loads`` that raises ProtocolError (with an excerpt) instead of ValueError or
    RecursionError."""
    try:
        if type(data) is str:
            try:
                value, end = _SCAN(data, 0)
            except StopIteration:
                pass  # not a JSON value at 0 (whitespace, a BOM, bad input): loads says why
            else:
                if end == len(data):
                    return value
        return json.loads(data)
    except RecursionError as exc:
        raise ProtocolError(f"JSON nested too deeply in {what}: {excerpt(data)!r}") from exc
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ProtocolError(f"malformed JSON in {what}: {excerpt(data)!r}") from exc


class PendingError:
    """Hands out what was decoded before an error, then raises the error on the next call.

    A feed that completes three good lines and one broken one returns the three; the
    caller delivers them and only then sees the failure, so nothing received is lost.
    """

    __slots__ = ("_error",)

    def __init__(self) -> None:
        self._error: SharedOllamaError | None = None

    def raise_if_set(self) -> None:
        """Raise the error held back by an earlier call, if any."""
        if self._error is not None:
            raise self._error

    def collect(self, convert: Callable[[_T], Iterable[_U]], values: Iterable[_T]) -> list[_U]:
        """Concatenate ``convert(value)`` for each value; an error after results is held back."""
        out: list[_U] = []
        try:
            for value in values:
                out.extend(convert(value))
        except SharedOllamaError as exc:
            if not out:
                raise
            self._error = exc
        return out

    def hold(self, error: SharedOllamaError, out: list[Any]) -> None:
        """Raise ``error`` now when ``out`` is empty, else hold it for the next call."""
        if not out:
            raise error
        self._error = error


# -- NDJSON ------------------------------------------------------------------------------


class NDJSONDecoder:
    """Newline-delimited JSON: ``feed(bytes)`` returns the values of the completed lines.

    Lines are split on ``\\n`` before UTF-8 decoding, so a multibyte character split across
    feeds is reassembled for free (``0x0A`` never occurs inside one). ``\\r\\n`` and blank
    lines are tolerated.
    """

    def __init__(self, *, what: str = "NDJSON stream", max_buffer: int = MAX_BUFFER) -> None:
        self._buf = bytearray()
        self._scanned = 0  # bytes of _buf known to hold no newline
        self._what = what
        self._max = max_buffer
        self._pending = PendingError()

    def feed(self, data: bytes) -> list[Any]:
        """Decode every line that ``data`` completes; keep the partial tail."""
        self._pending.raise_if_set()
        self._buf += data
        lines: list[bytes] = []
        start = 0
        while (nl := self._buf.find(b"\n", max(start, self._scanned))) >= 0:
            lines.append(bytes(self._buf[start:nl]))
            start = nl + 1
        del self._buf[:start]
        self._scanned = len(self._buf)
        out = self._pending.collect(self._decode_line, lines)
        if len(self._buf) > self._max:
            self._pending.hold(
                ProtocolError(f"{self._what}: line longer than {self._max} bytes"), out
            )
        return out

    def flush(self) -> list[Any]:
        """End of stream: decode a final line that had no newline."""
        self._pending.raise_if_set()
        tail, self._buf, self._scanned = bytes(self._buf), bytearray(), 0
        return self._pending.collect(self._decode_line, [tail])

    def _decode_line(self, line: bytes) -> list[Any]:
        line = line.strip()  # also drops the \r of \r\n
        return [decode_json(line, self._what)] if line else []


# -- Server-sent events ------------------------------------------------------------------


@dataclass(slots=True)  # not frozen: its __init__ would cost a setattr call per field
class SSEEvent:
    """One dispatched server-sent event."""

    event: str
    data: str
    id: str | None = None


_LINE_END = re.compile(r"\r\n|\r|\n")


class SSEDecoder:
    """Server-sent events per the WHATWG HTML spec, fed with bytes.

    Handles ``data``/``event``/``id``/``retry`` fields, ``:`` comments, multi-line data,
    ``\\r\\n``/``\\r``/``\\n`` line ends (also split across feeds) and a leading BOM. Field
    names in ``field_events`` are an extension: ``error: {...}`` (llama.cpp's way of
    reporting a failure mid-stream) is read as ``event: error`` plus ``data: {...}``, where
    the spec would silently drop the unknown field.
    """

    def __init__(
        self,
        *,
        field_events: Iterable[str] = (),
        what: str = "SSE stream",
        max_buffer: int = MAX_BUFFER,
    ) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._at_start = True
        self._partial: list[str] = []  # the current line so far (no line end in it)
        self._partial_len = 0
        self._skip_lf = False  # the last feed ended with \r: a leading \n completes \r\n
        self._data: list[str] = []
        self._event = ""
        self._size = 0
        self._field_events = frozenset(field_events)
        self._what = what
        self._max = max_buffer
        self._pending = PendingError()
        #: The id of the last event (kept across events, as the spec says).
        self.last_event_id: str | None = None
        #: The server's reconnection time in ms, if it sent one.
        self.retry: int | None = None

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Decode every event that ``data`` completes."""
        self._pending.raise_if_set()
        return self._consume(self._decoder.decode(data), final=False)

    def flush(self) -> list[SSEEvent]:
        """End of stream. Per the spec, an event without its closing blank line is dropped."""
        self._pending.raise_if_set()
        out = self._consume(self._decoder.decode(b"", final=True), final=True)
        self._data, self._event, self._size = [], "", 0
        return out

    def _consume(self, text: str, *, final: bool) -> list[SSEEvent]:
        out: list[SSEEvent] = []
        pos = 0
        if text:
            if self._at_start:
                self._at_start = False
                pos = 1 if text.startswith("\ufeff") else 0
            if self._skip_lf:
                self._skip_lf = False
                if text.startswith("\n", pos):
                    pos += 1
        if "\r" not in text:
            # The common case (every server here ends lines with \n): str.split, not the
            # regex, finds the lines; the last piece is the start of an unfinished line.
            lines = text[pos:].split("\n") if pos else text.split("\n")
            tail = lines.pop()
            if lines:
                if self._partial:
                    lines[0] = "".join(self._partial) + lines[0]
                    self._partial, self._partial_len = [], 0
                line_of, data = self._line, self._data
                for line in lines:
                    if line.startswith("data: "):  # most lines: inline, not a call
                        data.append(line[6:])
                        self._size += len(line) - 6
                    else:
                        line_of(line, out)
                        data = self._data  # a blank line dispatched the event: a new list
            if tail:
                self._partial.append(tail)
                self._partial_len += len(tail)
        else:
            for m in _LINE_END.finditer(text, pos):
                line = text[pos : m.start()]
                if self._partial:
                    line = "".join(self._partial) + line
                    self._partial, self._partial_len = [], 0
                self._line(line, out)
                pos = m.end()
                self._skip_lf = m.group() == "\r" and pos == len(text)
            if pos < len(text):
                self._partial.append(text[pos:])
                self._partial_len += len(text) - pos
        if final and self._partial:
            line = "".join(self._partial)  # the line ends here; its event still needs a blank line
            self._partial, self._partial_len = [], 0
            self._line(line, out)
        if self._partial_len + self._size > self._max:
            error = ProtocolError(f"{self._what}: event larger than {self._max} characters")
            self._pending.hold(error, out)
        return out

    def _line(self, line: str, out: list[SSEEvent]) -> None:
        if not line:
            if self._data:
                out.append(
                    SSEEvent(self._event or "message", "\n".join(self._data), self.last_event_id)
                )
            self._data, self._event, self._size = [], "", 0
            return
        if line.startswith(":"):
            return
        name, sep, value = line.partition(":")
        if sep and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._size += len(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry":
            if value.isascii() and value.isdigit():
                self.retry = int(value)
        elif name in self._field_events:
            self._event = name
            self._data.append(value)
            self._size += len(value)


# -- Checked access to decoded JSON --------------------------------------------------------
# Servers are not trusted to send the documented shape: every accessor turns a wrong type
# into ProtocolError, so callers never see KeyError or TypeError from a reply.


def expect_dict(value: Any, what: str) -> dict[str, Any]:
    """``value`` if it is a JSON object, else ProtocolError."""
    if not isinstance(value, dict):
        raise ProtocolError(f"{what}: expected a JSON object, got {_kind(value)}")
    return value


def opt_str(obj: Mapping[str, Any], key: str, what: str) -> str | None:
    """``obj[key]`` as a string; None when absent or null."""
    value = obj.get(key)
    if value is None or isinstance(value, str):
        return value
    raise _wrong(what, key, "a string", value)


def opt_int(obj: Mapping[str, Any], key: str, what: str) -> int | None:
    """``obj[key]`` as an integer (an integral float is accepted); None when absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _wrong(what, key, "an integer", value)


def opt_number(obj: Mapping[str, Any], key: str, what: str) -> float | None:
    """``obj[key]`` as a float; None when absent or null."""
    value = obj.get(key)
    if value is None:
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _wrong(what, key, "a number", value)


def opt_bool(obj: Mapping[str, Any], key: str, what: str) -> bool | None:
    """``obj[key]`` as a boolean; None when absent or null."""
    value = obj.get(key)
    if value is None or isinstance(value, bool):
        return value
    raise _wrong(what, key, "a boolean", value)


def opt_dict(obj: Mapping[str, Any], key: str, what: str) -> dict[str, Any] | None:
    """``obj[key]`` as a JSON object; None when absent or null."""
    value = obj.get(key)
    if value is None or isinstance(value, dict):
        return value
    raise _wrong(what, key, "an object", value)


def opt_list(obj: Mapping[str, Any], key: str, what: str) -> list[Any] | None:
    """``obj[key]`` as a JSON array; None when absent or null."""
    value = obj.get(key)
    if value is None or isinstance(value, list):
        return value
    raise _wrong(what, key, "an array", value)


def float_list(value: Any, what: str) -> list[float]:
    """``value`` as a list of floats (an embedding vector), else ProtocolError."""
    if not isinstance(value, list) or not all(
        isinstance(x, int | float) and not isinstance(x, bool) for x in value
    ):
        raise ProtocolError(f"{what}: expected an array of numbers, got {_kind(value)}")
    return [float(x) for x in value]


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _wrong(what: str, key: str, expected: str, value: Any) -> ProtocolError:
    return ProtocolError(f"{what}: {key!r} should be {expected}, got {_kind(value)}")


# -- Error bodies ------------------------------------------------------------------------


def error_text(body: bytes) -> str | None:
    """The server's message from an error body, whichever engine's shape it has.

    Knows ``{"error": "..."}`` (Ollama, TGI), ``{"error": {"message": ...}}`` (OpenAI,
    llama.cpp), ``{"object": "error", "message": ...}`` (vLLM) and ``{"detail": ...}``
    (FastAPI, including its 422 list); any other non-empty body is returned as text.
    """
    text = body.decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        value = json.loads(text)
    except JSON_ERRORS:
        return text
    return message_in(value) or text


def message_in(value: Any) -> str | None:
    """The human-readable message inside a decoded error value, if there is one."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, list):
        parts = [m for item in value if (m := _detail_item(item))]
        return "; ".join(parts) or None
    if not isinstance(value, dict):
        return None
    for key in ("error", "message", "detail", "msg"):
        if key in value and (found := message_in(value[key])):
            return found
    return None


def _detail_item(item: Any) -> str | None:
    # FastAPI validation errors: {"loc": ["body", "messages"], "msg": "...", "type": "..."}
    if isinstance(item, dict) and isinstance(msg := item.get("msg"), str):
        loc = item.get("loc")
        if isinstance(loc, list) and loc:
            return ".".join(str(p) for p in loc) + ": " + msg
        return msg
    return message_in(item)


def stream_error(value: Any) -> ServerError:
    """The error for a failure the server reported inside a stream (after its 200 head).

    ``value`` is the decoded error object, or the raw text of an ``error`` event.
    """
    if isinstance(value, str):
        with contextlib.suppress(*JSON_ERRORS):  # not JSON: the text is the message
            value = json.loads(value)
    message = excerpt(message_in(value) or "error event in the stream", 500)
    return ServerError("the server failed during the stream", server_message=message)
