"""One table from an HTTP error reply to the typed exception a caller sees, plus Retry-After.

Pure: the codec supplies the server's message and what counts as overload; no I/O, no clock.
"""

from __future__ import annotations

import calendar
import email.utils
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from ..errors import (
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

if TYPE_CHECKING:  # a runtime import would make _core and protocols import each other
    from ..protocols.base import Codec, WireResponse

__all__ = ["MAX_SERVER_MESSAGE", "error_for_response", "is_answer", "parse_retry_after"]

#: How much of the server's message an error carries (error pages can be huge).
MAX_SERVER_MESSAGE: Final = 500


@dataclass(frozen=True, slots=True)
class _Rule:
    error: type[SharedOllamaError]
    label: str
    extra: Mapping[str, Any] = field(default_factory=dict)


_BY_STATUS: Final[Mapping[int, _Rule]] = {
    400: _Rule(InvalidRequest, "the server rejected the request"),
    401: _Rule(AuthError, "authentication failed"),
    403: _Rule(AuthError, "access denied"),
    404: _Rule(ModelNotFound, "model not found"),
    408: _Rule(Timeout, "the server timed out reading the request", {"phase": "server"}),
    413: _Rule(InvalidRequest, "request too large"),
    422: _Rule(InvalidRequest, "the server rejected the request"),
    429: _Rule(RateLimited, "rate limited"),
}
_OVERLOAD: Final = _Rule(Overloaded, "the engine is overloaded")
_SERVER: Final = _Rule(ServerError, "server error")
_UNEXPECTED: Final = _Rule(ServerError, "unexpected HTTP status")
# A 404 that does not talk about a model is a path the server does not have: usually an
# endpoint configured with the wrong protocol kind. Retrying will not help.
_NO_ROUTE: Final = _Rule(InvalidRequest, "route not found (is the endpoint's kind right?)")
# Redirects are never followed (a POST body and an API key must not go where a server points)
# and a 3xx is no answer: usually http:// where the server wants https://, or a proxy's login.
_REDIRECT: Final = _Rule(ProtocolError, "redirect refused (is the endpoint's URL right?)")


def is_answer(status: int) -> bool:
    """Whether a status carries the reply itself (2xx); anything else becomes an error."""
    return 200 <= status <= 299


def error_for_response(
    codec: Codec,
    resp: WireResponse,
    *,
    endpoint: str,
    model: str | None,
    attempts: int,
    request_id: str | None,
    now_epoch: float,
) -> SharedOllamaError:
    """The exception for a non-2xx reply (returned, not raised: the caller decides)."""
    if 300 <= resp.status <= 399:
        # Where it pointed, without a query string (which may carry a token).
        location = resp.headers.get("location", "").split("?", 1)[0]
        message: str | None = f"Location: {location}" if location else None
    else:
        message = codec.error_message(resp)
    if message is not None and len(message) > MAX_SERVER_MESSAGE:
        message = message[: MAX_SERVER_MESSAGE - 3] + "..."
    rule = _rule_for(codec, resp, model, message)
    kwargs: dict[str, Any] = dict(rule.extra)
    if issubclass(rule.error, RateLimited):
        kwargs["retry_after"] = _retry_after(resp.headers, now_epoch)
    error = rule.error(
        rule.label,
        endpoint=endpoint,
        model=model,
        attempts=attempts,
        status_code=resp.status,
        server_message=message,
        request_id=request_id,
        **kwargs,
    )
    if rule is _REDIRECT:
        error.retryable = False  # the endpoint's configuration, not a passing fault
    return error


def _rule_for(codec: Codec, resp: WireResponse, model: str | None, message: str | None) -> _Rule:
    if 300 <= resp.status <= 399:
        return _REDIRECT
    if codec.is_overload(resp):
        return _OVERLOAD
    rule = _BY_STATUS.get(resp.status)
    if rule is None:
        return _SERVER if 500 <= resp.status <= 599 else _UNEXPECTED
    if rule.error is ModelNotFound and not _mentions_model(message, model):
        return _NO_ROUTE
    return rule


def _mentions_model(message: str | None, model: str | None) -> bool:
    if not message:
        return False
    text = message.lower()
    return "model" in text or bool(model and model.lower() in text)


def _retry_after(headers: Mapping[str, str], now_epoch: float) -> float | None:
    # ``retry-after-ms`` (OpenAI's proxies) is more precise than ``retry-after`` when both come.
    ms = parse_retry_after(headers.get("retry-after-ms"), now_epoch, http_date=False)
    if ms is not None:
        return ms / 1000.0
    return parse_retry_after(headers.get("retry-after"), now_epoch)


def _real_date(year: int, month: int, day: int, hour: int, minute: int, second: int) -> bool:
    # parsedate_tz takes "99 Nov" as it comes; a date that does not exist is no date.
    if not (1 <= month <= 12 and 0 <= hour <= 23 and 0 <= minute <= 59 and 0 <= second <= 60):
        return False
    return 1 <= day <= calendar.monthrange(year, month)[1]


def parse_retry_after(
    value: str | None, now_epoch: float, *, http_date: bool = True
) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP-date.

    A moment in the past gives 0; a missing or unparseable value gives None. The cap on how
    long to honour it belongs to the retry policy, not here.

    >>> parse_retry_after("120", 0.0)
    120.0
    >>> parse_retry_after("Thu, 01 Jan 1970 00:01:00 GMT", 30.0)
    30.0
    >>> parse_retry_after("soon", 0.0) is None
    True
    """
    if value is None or not (text := value.strip()):
        return None
    try:
        seconds = float(text)
    except ValueError:
        if not http_date:
            return None
        parsed = email.utils.parsedate_tz(text)
        if parsed is None or not _real_date(*parsed[:6]):
            return None
        # RFC 9110 dates are GMT; no zone at all ("-0000") means GMT too, not local time.
        offset = parsed[9] if parsed[9] is not None else 0
        try:
            seconds = email.utils.mktime_tz((*parsed[:9], offset)) - now_epoch
        except (OverflowError, ValueError):
            return None
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
