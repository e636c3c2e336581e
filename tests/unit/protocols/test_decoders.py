"""NDJSON and SSE framing: every cut of the bytes decodes the same; garbage is ProtocolError."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
from collections.abc import Callable
from typing import Any

import pytest

from shared_ollama.errors import ProtocolError, ServerError
from shared_ollama.protocols.decoders import (
    NDJSONDecoder,
    SSEDecoder,
    SSEEvent,
    decode_json,
    error_text,
    excerpt,
    expect_dict,
    float_list,
    opt_bool,
    opt_dict,
    opt_int,
    opt_list,
    opt_number,
    opt_str,
    stream_error,
)

from . import payloads as P


def ndjson_all(data: bytes, chunks: list[int] | None = None) -> list[Any]:
    dec = NDJSONDecoder()
    out: list[Any] = []
    if chunks is None:
        out += dec.feed(data)
    else:
        pos = 0
        for size in chunks:
            out += dec.feed(data[pos : pos + size])
            pos += size
        out += dec.feed(data[pos:])
    return out + dec.flush()


def sse_all(data: bytes, **kw: Any) -> list[SSEEvent]:
    dec = SSEDecoder(**kw)
    return dec.feed(data) + dec.flush()


def every_split(decode: Callable[[list[bytes]], list[Any]], data: bytes) -> list[Any]:
    whole = decode([data])
    for cut in range(len(data) + 1):
        assert decode([data[:cut], data[cut:]]) == whole, cut
    assert decode([data[i : i + 1] for i in range(len(data))]) == whole
    return whole


def ndjson_chunks(chunks: list[bytes]) -> list[Any]:
    dec = NDJSONDecoder()
    out: list[Any] = []
    for c in chunks:
        out += dec.feed(c)
    return out + dec.flush()


def sse_chunks(chunks: list[bytes], **kw: Any) -> list[SSEEvent]:
    dec = SSEDecoder(**kw)
    out: list[SSEEvent] = []
    for c in chunks:
        out += dec.feed(c)
    return out + dec.flush()


# -- sans-IO -----------------------------------------------------------------------------

FORBIDDEN = {"httpx", "httpcore", "asyncio", "time", "datetime", "socket", "anyio", "requests"}
# Shared state (pool counters, the breaker, retry budgets) may hold a lock; nothing may read a
# clock or touch I/O: time comes in from the drivers (``NOW`` in the call steps).
ALLOWED: dict[str, set[str]] = {}
PACKAGES = ("_core", "pool", "protocols")
SANS_IO = [f"shared_ollama.{package}" for package in PACKAGES]
SANS_IO += sorted(
    f"shared_ollama.{package}.{info.name}"
    for package in PACKAGES
    for info in pkgutil.iter_modules(importlib.import_module(f"shared_ollama.{package}").__path__)
)


@pytest.mark.parametrize("name", SANS_IO)
def test_modules_are_sans_io(name: str) -> None:
    tree = ast.parse(inspect.getsource(importlib.import_module(name)))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & (FORBIDDEN - ALLOWED.get(name, set())), imported & FORBIDDEN


def test_protocols_do_not_import_the_core() -> None:
    """The codecs and their decoders sit below ``_core``: no import goes up."""
    for info in pkgutil.iter_modules(importlib.import_module("shared_ollama.protocols").__path__):
        source = inspect.getsource(importlib.import_module(f"shared_ollama.protocols.{info.name}"))
        assert "_core" not in source.replace("_core/", ""), info.name


# -- NDJSON ------------------------------------------------------------------------------


def test_ndjson_every_split_same_values() -> None:
    data = P.ndjson(*P.OLLAMA_CHAT_STREAM)
    assert every_split(ndjson_chunks, data) == P.OLLAMA_CHAT_STREAM


def test_ndjson_multibyte_character_split_across_feeds() -> None:
    data = '{"t": "🦙é"}\n'.encode()
    cut = data.index("🦙".encode()) + 2  # inside the 4-byte llama
    dec = NDJSONDecoder()
    assert dec.feed(data[:cut]) == []
    assert dec.feed(data[cut:]) == [{"t": "🦙é"}]


def test_ndjson_crlf_and_blank_lines() -> None:
    data = b'\r\n{"a": 1}\r\n\r\n  \n{"b": 2}\r\n\n'
    assert every_split(ndjson_chunks, data) == [{"a": 1}, {"b": 2}]


def test_ndjson_keeps_partial_line_until_newline() -> None:
    dec = NDJSONDecoder()
    assert dec.feed(b'{"a": ') == []
    assert dec.feed(b"1}") == []
    assert dec.feed(b"\n") == [{"a": 1}]


def test_ndjson_flush_decodes_trailing_line() -> None:
    dec = NDJSONDecoder()
    assert dec.feed(b'{"a": 1}\n{"b": 2}') == [{"a": 1}]
    assert dec.flush() == [{"b": 2}]
    assert dec.flush() == []


def test_ndjson_flush_of_garbage_is_protocol_error() -> None:
    dec = NDJSONDecoder()
    dec.feed(b'{"a": 1}\n{"b": ')
    with pytest.raises(ProtocolError, match="malformed JSON"):
        dec.flush()


def test_ndjson_json_null_and_scalars_are_values() -> None:
    assert ndjson_all(b'null\n1\n"x"\n') == [None, 1, "x"]


def test_ndjson_bad_line_after_good_ones_is_raised_on_next_call() -> None:
    dec = NDJSONDecoder()
    assert dec.feed(b'{"a": 1}\n{"b": 2}\nnot json\n{"c": 3}\n') == [{"a": 1}, {"b": 2}]
    with pytest.raises(ProtocolError):
        dec.feed(b"")
    with pytest.raises(ProtocolError):
        dec.flush()


def test_ndjson_bad_first_line_raises_at_once() -> None:
    with pytest.raises(ProtocolError):
        NDJSONDecoder().feed(b"<html>\n")


def test_ndjson_error_excerpt_is_short() -> None:
    long_garbage = b"x" * 10_000 + b"\n"
    with pytest.raises(ProtocolError) as info:
        NDJSONDecoder().feed(long_garbage)
    assert len(str(info.value)) < 300
    assert "xxx" in str(info.value)


def test_ndjson_line_longer_than_the_limit() -> None:
    dec = NDJSONDecoder(max_buffer=16)
    assert dec.feed(b'{"a": 1}\n' + b"x" * 10) == [{"a": 1}]
    with pytest.raises(ProtocolError, match="longer than"):
        dec.feed(b"x" * 10)


def test_ndjson_overflow_after_values_is_held_back() -> None:
    dec = NDJSONDecoder(max_buffer=4)
    assert dec.feed(b'{"a": 1}\n' + b"x" * 10) == [{"a": 1}]
    with pytest.raises(ProtocolError, match="longer than"):
        dec.feed(b"")


def test_ndjson_long_line_in_many_small_feeds() -> None:
    payload = '{"t": "' + "a" * 50_000 + '"}\n'
    dec = NDJSONDecoder()
    out: list[Any] = []
    data = payload.encode()
    for i in range(0, len(data), 7):
        out += dec.feed(data[i : i + 7])
    assert out == [{"t": "a" * 50_000}]


# -- SSE ---------------------------------------------------------------------------------


def test_sse_multiline_data_joined_with_newline() -> None:
    data = b"data: YHOO\ndata: +2\ndata: 10\n\n"
    assert every_split(sse_chunks, data) == [SSEEvent("message", "YHOO\n+2\n10")]


def test_sse_spec_example_ids_and_spaces() -> None:
    data = (
        b": test stream\n\n"
        b"data: first event\nid: 1\n\n"
        b"data:second event\nid\n\n"
        b"data:  third event\n\n"
    )
    assert every_split(sse_chunks, data) == [
        SSEEvent("message", "first event", "1"),
        SSEEvent("message", "second event", ""),
        SSEEvent("message", " third event", ""),
    ]


def test_sse_empty_data_fields() -> None:
    # "data" alone is an empty data line; the last, unterminated event is dropped.
    data = b"data\n\ndata\ndata\n\ndata:"
    assert every_split(sse_chunks, data) == [SSEEvent("message", ""), SSEEvent("message", "\n")]


def test_sse_space_after_colon_is_optional() -> None:
    data = b"data:test\n\ndata: test\n\n"
    assert sse_all(data) == [SSEEvent("message", "test"), SSEEvent("message", "test")]


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_sse_line_endings(eol: bytes) -> None:
    data = eol.join([b"event: add", b"data: 73857293", b"", b"data: 2", b"id: 9", b"", b""])
    assert every_split(sse_chunks, data) == [
        SSEEvent("add", "73857293"),
        SSEEvent("message", "2", "9"),
    ]


def test_sse_mixed_line_endings_and_cr_at_chunk_edge() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\r") == []
    assert dec.feed(b"\n\r") == [SSEEvent("message", "a")]  # \r\n then \r: blank line
    assert dec.feed(b"\ndata: b\n\n") == [SSEEvent("message", "b")]


def test_sse_event_type_resets_between_events() -> None:
    data = b"event: ping\ndata: 1\n\ndata: 2\n\n"
    assert sse_all(data) == [SSEEvent("ping", "1"), SSEEvent("message", "2")]


def test_sse_event_without_data_is_not_dispatched() -> None:
    assert sse_all(b"event: ping\n\nid: 5\n\ndata: x\n\n") == [SSEEvent("message", "x", "5")]


def test_sse_comments_and_unknown_fields_ignored() -> None:
    data = b": keep-alive\n\nfoo: bar\ndata: x\n:comment\n\n"
    assert sse_all(data) == [SSEEvent("message", "x")]


def test_sse_bom_stripped_only_at_start() -> None:
    data = "\ufeffdata: a\n\n\ufeffdata: b\n\n".encode()
    # The second BOM is part of a field name ("\ufeffdata"), which is unknown: ignored.
    assert every_split(sse_chunks, data) == [SSEEvent("message", "a")]


def test_sse_bom_split_across_feeds() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"\xef\xbb") == []
    assert dec.feed(b"\xbfdata: a\n\n") == [SSEEvent("message", "a")]


def test_sse_retry_and_id_rules() -> None:
    dec = SSEDecoder()
    out = dec.feed(b"retry: 3000\nid: a\0b\ndata: x\n\nretry: soon\ndata: y\n\n")
    assert out == [SSEEvent("message", "x"), SSEEvent("message", "y")]
    assert dec.retry == 3000
    assert dec.last_event_id is None  # an id containing NUL is ignored


def test_sse_id_persists_across_events() -> None:
    assert sse_all(b"id: 7\ndata: a\n\ndata: b\n\n") == [
        SSEEvent("message", "a", "7"),
        SSEEvent("message", "b", "7"),
    ]


def test_sse_multibyte_split_and_invalid_utf8_replaced() -> None:
    data = "data: 🦙 é\n\n".encode()
    assert every_split(sse_chunks, data) == [SSEEvent("message", "🦙 é")]
    assert sse_all(b"data: \xff\n\n") == [SSEEvent("message", "\ufffd")]


def test_sse_flush_drops_an_unterminated_event() -> None:
    dec = SSEDecoder()
    assert dec.feed(b"data: a\n\ndata: b\n") == [SSEEvent("message", "a")]
    assert dec.flush() == []


def test_sse_field_events_extension() -> None:
    data = b'error: {"message": "boom"}\n\ndata: x\n\n'
    assert sse_all(data, field_events=("error",)) == [
        SSEEvent("error", '{"message": "boom"}'),
        SSEEvent("message", "x"),
    ]
    assert sse_all(data) == [SSEEvent("message", "x")]  # per spec: ignored


def test_sse_event_larger_than_the_limit() -> None:
    dec = SSEDecoder(max_buffer=8)
    with pytest.raises(ProtocolError, match="larger than"):
        dec.feed(b"data: 0123456789")
    dec = SSEDecoder(max_buffer=8)
    assert dec.feed(b"data: a\n\ndata: 0123456789") == [SSEEvent("message", "a")]
    with pytest.raises(ProtocolError):
        dec.flush()


def test_sse_many_events_in_one_feed() -> None:
    data = b"".join(b"data: %d\n\n" % i for i in range(1000))
    assert [e.data for e in sse_all(data)] == [str(i) for i in range(1000)]


# -- checked JSON access -----------------------------------------------------------------


def test_decode_json_and_excerpt() -> None:
    assert decode_json(b'{"a": [1]}', "x") == {"a": [1]}
    with pytest.raises(ProtocolError, match="malformed JSON in reply"):
        decode_json(b"\xff\xfe garbage", "reply")
    assert excerpt("abc") == "abc"
    assert len(excerpt("y" * 1000)) == 200
    assert excerpt(b"\xff" * 3) == "\ufffd" * 3


def test_accessors_accept_right_types_and_absent() -> None:
    obj = {"s": "x", "i": 3, "f": 2.0, "b": True, "d": {}, "l": [], "n": None}
    assert opt_str(obj, "s", "w") == "x"
    assert opt_int(obj, "i", "w") == 3
    assert opt_int(obj, "f", "w") == 2  # integral float
    assert opt_number(obj, "i", "w") == 3.0
    assert opt_bool(obj, "b", "w") is True
    assert opt_dict(obj, "d", "w") == {}
    assert opt_list(obj, "l", "w") == []
    for fn in (opt_str, opt_int, opt_number, opt_bool, opt_dict, opt_list):
        assert fn(obj, "n", "w") is None
        assert fn(obj, "missing", "w") is None


@pytest.mark.parametrize(
    ("fn", "value"),
    [
        (opt_str, 1),
        (opt_int, "1"),
        (opt_int, True),
        (opt_int, 1.5),
        (opt_number, "1"),
        (opt_number, False),
        (opt_bool, 0),
        (opt_dict, []),
        (opt_list, {}),
    ],
)
def test_accessors_reject_wrong_types(fn: Callable[..., Any], value: Any) -> None:
    with pytest.raises(ProtocolError, match="'k' should be"):
        fn({"k": value}, "k", "the reply")


def test_expect_dict_and_float_list() -> None:
    assert expect_dict({"a": 1}, "w") == {"a": 1}
    with pytest.raises(ProtocolError, match="expected a JSON object, got list"):
        expect_dict([], "w")
    assert float_list([1, 2.5], "w") == [1.0, 2.5]
    for bad in ("x", [1, "2"], [True], None):
        with pytest.raises(ProtocolError):
            float_list(bad, "w")


# -- error bodies --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (P.body(P.OLLAMA_NOT_FOUND), "model 'llama3' not found, try pulling it first"),
        (P.body(P.OPENAI_ERROR), "Incorrect API key provided: sk-abc."),
        (P.body(P.VLLM_ERROR), "The model `llama3` does not exist."),
        (P.body(P.TGI_OVERLOADED), "Model is overloaded"),
        (
            P.body(P.FASTAPI_422),
            "body.messages: Field required; body.temperature: Input should be a number",
        ),
        (P.body({"detail": "Not Found"}), "Not Found"),
        (P.body({"error": {"code": 500}}), '{"error": {"code": 500}}'),
        (b"404 page not found", "404 page not found"),
        (b"  \n", None),
        (b"", None),
        (b"<html>Bad Gateway</html>", "<html>Bad Gateway</html>"),
    ],
)
def test_error_text(raw: bytes, message: str | None) -> None:
    assert error_text(raw) == message


def test_stream_error_from_text_or_object() -> None:
    err = stream_error('{"error": {"message": "boom"}}')
    assert isinstance(err, ServerError)
    assert err.server_message == "boom"
    assert stream_error("plain words").server_message == "plain words"
    assert stream_error({"error": "x" * 2000}).server_message == "x" * 497 + "..."
    assert stream_error({}).server_message == "error event in the stream"


@pytest.mark.parametrize(
    ("text", "value"),
    [('{"a": [1, 2.5, "x", null, true]}', {"a": [1, 2.5, "x", None, True]}),
     (' {"a": 1} \n', {"a": 1}), ("[]", []), ("3", 3), ('"s"', "s"),
     (b'{"b": "\xc3\xa9"}', {"b": "\u00e9"})],
)  # fmt: skip
def test_decode_json_values(text: str | bytes, value: object) -> None:
    assert decode_json(text, "test") == value


@pytest.mark.parametrize(
    "text",
    ['{"a": 1} x', '{"a": 1}{"b": 2}', "", "  ", "\ufeff{}", '{"a": ', "nul", "[1,]",
     "[" * 100_000 + "]" * 100_000],
)  # fmt: skip
def test_decode_json_refuses_what_json_loads_refuses(text: str) -> None:
    # The fast path (the C scanner on its own) must not accept trailing data or anything
    # json.loads would refuse, and deep nesting is a ProtocolError, not a RecursionError.
    with pytest.raises(ProtocolError):
        decode_json(text, "test")
