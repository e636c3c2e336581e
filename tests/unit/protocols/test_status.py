"""The status table: every error reply maps to one exception type, with the server's words."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime
from email.utils import format_datetime

import pytest

from shared_ollama._core.status import MAX_SERVER_MESSAGE, error_for_response, parse_retry_after
from shared_ollama.errors import (
    AuthError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    ProtocolError,
    RateLimited,
    ServerError,
    SharedOllamaError,
    Timeout,
)
from shared_ollama.protocols import Codec, WireResponse, codec_for

from . import payloads as P

NOW = 1_700_000_000.0


def error(
    kind: str,
    status: int,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
    model: str | None = "llama3",
) -> SharedOllamaError:
    return error_for_response(
        codec_for(kind),
        WireResponse(status, headers or {}, body),
        endpoint="http://gpu-a:11434",
        model=model,
        attempts=2,
        request_id="req-1",
        now_epoch=NOW,
    )


# (kind, status, body, expected type)
TABLE: list[tuple[str, int, bytes, type[SharedOllamaError]]] = [
    ("ollama", 400, P.body({"error": "invalid options"}), InvalidRequest),
    ("openai", 400, P.body(P.OPENAI_ERROR), InvalidRequest),
    ("tgi", 400, P.body(P.TGI_VALIDATION), InvalidRequest),
    ("ollama", 401, b"", AuthError),
    ("openai", 401, P.body(P.OPENAI_ERROR), AuthError),
    ("tgi", 403, b"forbidden", AuthError),
    ("ollama", 404, P.body(P.OLLAMA_NOT_FOUND), ModelNotFound),
    ("openai", 404, P.body(P.VLLM_ERROR), ModelNotFound),
    ("openai", 404, P.body({"detail": "Not Found"}), InvalidRequest),
    ("ollama", 404, b"404 page not found", InvalidRequest),
    ("tgi", 404, b"", InvalidRequest),
    ("ollama", 408, b"", Timeout),
    ("openai", 413, b"payload too large", InvalidRequest),
    ("openai", 422, P.body(P.FASTAPI_422), InvalidRequest),
    ("tgi", 422, P.body(P.TGI_VALIDATION), InvalidRequest),
    ("ollama", 429, P.body({"error": "too many requests"}), RateLimited),
    ("openai", 429, P.body(P.OPENAI_ERROR), Overloaded),
    ("tgi", 429, P.body(P.TGI_OVERLOADED), Overloaded),
    ("ollama", 503, P.body(P.OLLAMA_BUSY), Overloaded),
    ("openai", 503, b"Service Unavailable", ServerError),
    ("tgi", 503, P.body({"error": "unhealthy", "error_type": "healthcheck"}), ServerError),
    ("tgi", 503, P.body(P.TGI_OVERLOADED), Overloaded),
    ("ollama", 500, P.body({"error": "llama runner process has terminated"}), ServerError),
    ("openai", 500, P.body(P.VLLM_STREAM_ERROR), ServerError),
    (
        "tgi",
        500,
        P.body({"error": "Incomplete generation", "error_type": "incomplete"}),
        ServerError,
    ),
    ("ollama", 502, b"<html>Bad Gateway</html>", ServerError),
    ("openai", 504, b"", ServerError),
    ("tgi", 424, P.body(P.TGI_STREAM_ERROR), ServerError),
    ("ollama", 409, b"", ServerError),
    ("openai", 302, b"", ProtocolError),  # redirects are refused, never answers
    ("openai", 418, b"", ServerError),
]


@pytest.mark.parametrize(("kind", "status", "raw", "expected"), TABLE)
def test_status_table(
    kind: str, status: int, raw: bytes, expected: type[SharedOllamaError]
) -> None:
    err = error(kind, status, raw)
    assert type(err) is expected
    assert err.status_code == status
    assert err.endpoint == "http://gpu-a:11434"
    assert err.model == "llama3"
    assert err.attempts == 2
    assert err.request_id == "req-1"
    assert err.server_message == codec_for(kind).error_message(WireResponse(status, {}, raw))
    assert pickle.loads(pickle.dumps(err)).status_code == status


def test_server_message_carried_in_str() -> None:
    err = error("ollama", 404, P.body(P.OLLAMA_NOT_FOUND))
    assert err.server_message == "model 'llama3' not found, try pulling it first"
    assert "not found, try pulling it first" in str(err)
    assert "status=404" in str(err)


def test_server_message_truncated() -> None:
    err = error("ollama", 500, P.body({"error": "e" * 5000}))
    assert err.server_message is not None
    assert len(err.server_message) == MAX_SERVER_MESSAGE
    assert err.server_message.endswith("...")


def test_408_is_a_server_phase_timeout() -> None:
    err = error("openai", 408)
    assert isinstance(err, Timeout)
    assert err.phase == "server"
    assert err.retryable


def test_404_mentioning_the_model_name_only() -> None:
    err = error("openai", 404, P.body({"detail": "llama3 is unknown here"}))
    assert type(err) is ModelNotFound
    err = error("openai", 404, P.body({"detail": "llama3 is unknown here"}), model=None)
    assert type(err) is InvalidRequest
    assert "route not found" in err.message


def test_rate_limited_carries_retry_after() -> None:
    err = error("ollama", 429, headers={"retry-after": "7"})
    assert isinstance(err, RateLimited)
    assert err.retry_after == 7.0
    assert not err.breaker_failure


def test_overloaded_carries_retry_after_and_is_not_a_breaker_failure() -> None:
    err = error("ollama", 503, P.body(P.OLLAMA_BUSY), headers={"retry-after": "2"})
    assert isinstance(err, Overloaded)
    assert err.retry_after == 2.0
    assert err.retryable
    assert not err.breaker_failure


def test_retry_after_ms_is_preferred() -> None:
    err = error("openai", 429, headers={"retry-after-ms": "1500", "retry-after": "9"})
    assert isinstance(err, RateLimited)
    assert err.retry_after == 1.5
    err = error("openai", 429, headers={"retry-after-ms": "later", "retry-after": "9"})
    assert isinstance(err, RateLimited)
    assert err.retry_after == 9.0


def test_rate_limited_without_hint() -> None:
    err = error("tgi", 429, P.body(P.TGI_OVERLOADED))
    assert isinstance(err, Overloaded)
    assert err.retry_after is None


def test_request_errors_are_not_retryable() -> None:
    for status in (400, 401, 403, 404, 413, 422):
        err = error("ollama", status, P.body(P.OLLAMA_NOT_FOUND))
        assert not err.retryable
        assert not err.breaker_failure
    assert error("ollama", 500).breaker_failure


def http_date(epoch: float) -> str:
    return format_datetime(datetime.fromtimestamp(epoch, UTC), usegmt=True)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 3 ", 3.0),
        ("1.5", 1.5),
        ("-5", 0.0),
        (http_date(NOW + 30), 30.0),
        (http_date(NOW - 30), 0.0),
        ("Tue, 14 Nov 2023 22:13:50 GMT", 30.0),  # NOW + 30 s
        ("Tuesday, 14-Nov-23 22:13:50 GMT", 30.0),  # RFC 850
        ("Tue Nov 14 22:13:50 2023", 30.0),  # asctime
        ("Tue, 14 Nov 2023 22:13:50 +0100", 0.0),  # an hour ago
        (None, None),
        ("", None),
        ("soon", None),
        ("nan", None),
        ("inf", None),
        ("Tue, 99 Nov 2023 22:13:50 GMT", None),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    got = parse_retry_after(value, NOW)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_codec_is_any_codec() -> None:
    # error_for_response needs only error_message and is_overload.
    assert all(isinstance(codec_for(k), Codec) for k in ("ollama", "openai", "tgi"))
