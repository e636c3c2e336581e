"""The exception hierarchy: every failure a caller can see, typed.

Each error carries the endpoint (its URL, never its credentials), the logical model, the
attempt count and the server's own message where there was one::

    SharedOllamaError
     ├── EndpointError            the server side failed; retryable on another endpoint
     │    ├── ConnectError        refused, reset or unreachable before a reply  (+ ConnectionError)
     │    ├── Timeout             connect / first-chunk / between-chunk / total  (+ TimeoutError)
     │    ├── ServerError         5xx                                     (+ ResponseError)
     │    ├── RateLimited         429 (carries retry_after)               (+ ResponseError)
     │    │    └── Overloaded     the engine's own backpressure (Ollama 503 queue full)
     │    └── CircuitOpen         the endpoint's breaker is open
     ├── RequestError             the request is wrong; never retried
     │    ├── ModelNotFound       404 / unknown model / no endpoint serves it  (+ ResponseError)
     │    ├── InvalidRequest      400 / 422 / unsupported operation, bad input (+ ResponseError)
     │    │    └── NotSupported   the operation needs a kind of endpoint the pool lacks
     │    └── AuthError           401 / 403                               (+ ResponseError)
     ├── ResponseError            ollama-python's name for an error answer: ``.error``,
     │                            ``.status_code`` (the classes marked above are also one)
     ├── NoEndpointAvailable      every endpoint for the model is open, saturated or down
     ├── StreamInterrupted        a stream broke after chunks reached the caller
     ├── BudgetExceeded           a project limit would be exceeded; nothing was sent
     │    └── BudgetUnavailable   the shared budget store could not be reached; nothing sent
     ├── ClientClosed             the client was closed before or during the call
     ├── ConfigError              bad configuration                       (+ ValueError)
     └── ProtocolError            a malformed reply (bad JSON, broken stream framing)

``except shared_ollama.ResponseError as e: e.error, e.status_code`` works as it does with
the ``ollama`` client; ``except ConnectionError`` / ``except TimeoutError`` catch ours too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = [
    "AuthError",
    "BudgetExceeded",
    "BudgetUnavailable",
    "CircuitOpen",
    "ClientClosed",
    "ConfigError",
    "LedgerUnavailable",
    "ConnectError",
    "EndpointError",
    "InvalidRequest",
    "ModelNotFound",
    "NoEndpointAvailable",
    "NotSupported",
    "Overloaded",
    "ProtocolError",
    "RateLimited",
    "RequestError",
    "ResponseError",
    "ServerError",
    "SharedOllamaError",
    "StreamInterrupted",
    "Timeout",
]


class SharedOllamaError(Exception):
    """Base of every error this library raises."""

    #: Whether the call may be retried (on this or another endpoint).
    retryable: bool = False
    #: Whether this failure counts against the endpoint's circuit breaker.
    breaker_failure: bool = False

    def __init__(
        self,
        message: str,
        *,
        endpoint: str | None = None,
        model: str | None = None,
        attempts: int = 0,
        status_code: int | None = None,
        server_message: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.endpoint = endpoint
        self.model = model
        self.attempts = attempts
        self.status_code = status_code
        self.server_message = server_message
        self.request_id = request_id

    def __str__(self) -> str:
        parts = [self.message]
        if self.status_code is not None:
            parts.append(f"status={self.status_code}")
        if self.endpoint:
            parts.append(f"endpoint={self.endpoint}")
        if self.model:
            parts.append(f"model={self.model}")
        if self.attempts:
            parts.append(f"attempts={self.attempts}")
        if self.server_message and self.server_message not in self.message:
            parts.append(f"server said: {self.server_message}")
        return " | ".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Exceptions with keyword-only arguments do not pickle by default; records and
        # multiprocessing workers need them to.
        return (_rebuild, (type(self), self.message, self.__dict__.copy()))


def _rebuild(cls: type[SharedOllamaError], message: str, state: dict[str, Any]) -> Any:
    obj = cls.__new__(cls)
    Exception.__init__(obj, message)
    obj.__dict__.update(state)
    return obj


class ResponseError(SharedOllamaError):
    """An error answer, as ollama-python names it: ``error`` is what the server said (or
    why the library refused the request), ``status_code`` its HTTP status (None without
    one)."""

    @property
    def error(self) -> str:
        """The server's message, else ours (ollama's ``ResponseError.error``)."""
        return self.server_message or self.message


class EndpointError(SharedOllamaError):
    """The endpoint failed to answer properly; another endpoint may succeed."""

    retryable = True
    breaker_failure = True


class ConnectError(EndpointError, ConnectionError):
    """The connection was refused, reset or could not be made."""


class Timeout(EndpointError, TimeoutError):
    """A deadline passed: ``phase`` is connect, first_chunk, between_chunks or total."""

    def __init__(self, message: str, *, phase: str = "total", **kw: Any) -> None:
        super().__init__(message, **kw)
        self.phase = phase


class ServerError(EndpointError, ResponseError):
    """The server answered with a 5xx status."""


class RateLimited(EndpointError, ResponseError):
    """The server answered 429; ``retry_after`` is its hint in seconds, if any."""

    breaker_failure = False

    def __init__(self, message: str, *, retry_after: float | None = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Overloaded(RateLimited):
    """The engine's queue is full (Ollama's 503): backpressure, not a broken endpoint."""


class CircuitOpen(EndpointError):
    """The endpoint's circuit breaker is open; the call was not sent there."""

    breaker_failure = False


class RequestError(SharedOllamaError):
    """The request itself is wrong; retrying it elsewhere will not help."""


class ModelNotFound(RequestError, ResponseError):
    """The model is unknown to the endpoint (or to every endpoint of the pool)."""


class InvalidRequest(RequestError, ResponseError):
    """The server (or the library) rejected the request as invalid."""


class NotSupported(InvalidRequest):
    """The operation exists only on some kinds of endpoint (``pull`` and the other model
    management calls: Ollama), and none of them can take it."""


class AuthError(RequestError, ResponseError):
    """The endpoint refused the credentials (401/403)."""


class NoEndpointAvailable(SharedOllamaError):
    """No endpoint could take the call before its deadline; ``reasons`` says why, per endpoint."""

    def __init__(self, message: str, *, reasons: Mapping[str, str] | None = None, **kw: Any):
        self.reasons: dict[str, str] = dict(reasons or {})
        if self.reasons:
            detail = "; ".join(f"{ep}: {why}" for ep, why in self.reasons.items())
            message = f"{message} ({detail})"
        super().__init__(message, **kw)


class StreamInterrupted(SharedOllamaError):
    """The stream broke after chunks reached the caller; it is never retried.

    ``partial_text`` holds what was delivered, ``chunks`` how many chunks, and
    ``__cause__`` the underlying error.
    """

    def __init__(self, message: str, *, partial_text: str = "", chunks: int = 0, **kw: Any):
        super().__init__(message, **kw)
        self.partial_text = partial_text
        self.chunks = chunks


class BudgetExceeded(SharedOllamaError):
    """A project limit would be exceeded; nothing was sent.

    ``limit`` names the limit (e.g. ``tokens_per_minute``), ``resets_in`` is seconds
    until enough budget is back.
    """

    def __init__(
        self,
        message: str,
        *,
        project: str = "",
        limit: str = "",
        resets_in: float | None = None,
        **kw: Any,
    ) -> None:
        super().__init__(message, **kw)
        self.project = project
        self.limit = limit
        self.resets_in = resets_in


class BudgetUnavailable(BudgetExceeded):
    """The shared budget store (``usage.limits``) could not be reached or locked in time.

    Nothing was sent: a budget that cannot be checked refuses the call (fail closed). A
    ``BudgetExceeded``, so code that handles refusals handles this one too.
    """


class ConfigError(SharedOllamaError, ValueError):
    """The configuration is invalid.

    Also a ``ValueError``, so that pydantic reports one raised while it builds a nested
    ``Endpoint`` (a pool file, a bench scenario) as a validation error at that place.
    """


class LedgerUnavailable(SharedOllamaError):
    """The usage ledger's database could not be read (e.g. the PostgreSQL server went away).

    Only queries raise it; recording calls never does (see ``usage.Ledger``).
    """


class ClientClosed(SharedOllamaError):
    """The client was closed before or while the call ran; the call is recorded as an error."""


class ProtocolError(SharedOllamaError):
    """The server's reply is malformed (bad JSON, broken stream framing, wrong shape).

    Retryable before any chunk reached the caller: a sick endpoint should not fail the call
    when another one can answer.
    """

    retryable = True
    breaker_failure = True
