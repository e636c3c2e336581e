"""Configuration models: endpoints, pool, retry/breaker/timeout/health policies.

Loaded from keyword arguments, a TOML file (``from_config``) or ``SHARED_OLLAMA_*`` env vars.
"""

from __future__ import annotations

import ipaddress
import os
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Self, TypeAlias
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from .errors import ConfigError

__all__ = [
    "AdaptivePolicy",
    "AdmissionPolicy",
    "BreakerPolicy",
    "Budget",
    "Endpoint",
    "EndpointKind",
    "HealthPolicy",
    "Limits",
    "PoolConfig",
    "RetryPolicy",
    "ScrapePolicy",
    "ServiceClass",
    "Timeouts",
    "UsageConfig",
    "load_config",
]

EndpointKind: TypeAlias = Literal["ollama", "openai", "tgi", "auto"]
Strategy: TypeAlias = Literal["least_loaded", "round_robin", "weighted", "priority", "affinity"]


class Endpoint(BaseModel):
    """One server of the pool.

    ``models`` maps logical names to the backend's names (``{"llama3.2":
    "meta-llama/Llama-3.2-3B-Instruct"}``); a list means the names are the same on both
    sides. Models the endpoint reports itself are added by discovery.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str
    kind: EndpointKind = "auto"
    api_key: SecretStr | None = None
    models: dict[str, str] = Field(default_factory=dict)
    name: str = ""
    weight: float = Field(default=1.0, gt=0)
    priority: int = 0
    #: Most concurrent calls this library sends here (e.g. Ollama's OLLAMA_NUM_PARALLEL);
    #: beyond it calls go elsewhere or wait. None: no cap; ``"adaptive"``: a limit learned
    #: from first-chunk latency within ``PoolConfig.adaptive``'s bounds (docs/admission.md).
    max_in_flight: Annotated[int, Field(ge=1)] | Literal["adaptive"] | None = None
    #: Connections to this endpoint at most (httpx pools of 4, see ``_transport``).
    max_connections: int = Field(default=64, ge=1)
    #: Idle connections kept open; None: all of them (closed after 5 s idle).
    max_keepalive: int | None = Field(default=None, ge=0)
    headers: dict[str, str] = Field(default_factory=dict)
    #: An HTTP(S) or SOCKS proxy for this endpoint (``http://user:pass@proxy:3128``); None:
    #: the environment's (``HTTP_PROXY``/``HTTPS_PROXY``/``ALL_PROXY``, minus ``NO_PROXY``)
    #: when ``trust_env``. Secret: it may hold a password.
    proxy: SecretStr | None = None
    #: TLS: True (the system's CAs, or ``SSL_CERT_FILE``/``SSL_CERT_DIR`` when
    #: ``trust_env``), False (no verification), or the path of a CA bundle.
    verify: bool | str = True
    #: TLS client certificate: a PEM file holding the certificate and its key, or
    #: ``(certfile, keyfile)``.
    cert: str | tuple[str, str] | None = None
    #: Read proxies and CA locations from the environment, as ``httpx`` does.
    trust_env: bool = True

    def __init__(self, url: str | None = None, /, **data: Any) -> None:
        """``Endpoint(url, kind=..., ...)``; a bad value is a ``ConfigError`` that never echoes
        the input (a url may carry a password, a field an api_key)."""
        if url is not None:
            data["url"] = url
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise ConfigError(f"invalid endpoint: {_short(exc)}") from None

    @field_validator("url")
    @classmethod
    def _check_url(cls, v: str) -> str:
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # Not echoed: a malformed url may still carry a password.
            raise ValueError("endpoint url must be http(s)://host[:port]")
        if parts.username or parts.password:
            raise ValueError("put credentials in api_key, not in the url")
        if parts.query or parts.fragment:
            # A key in ?api_key= would be shown wherever the url is (status, errors, spans).
            raise ValueError("no query string in an endpoint url: keys go in api_key, "
                             "anything else in headers")  # fmt: skip
        return v.rstrip("/")

    @field_validator("models", mode="before")
    @classmethod
    def _models(cls, v: Any) -> Any:
        if v is None:
            return {}
        if isinstance(v, str):
            return {v: v}
        if isinstance(v, Sequence):
            return {str(m): str(m) for m in v}
        return v

    @property
    def display_name(self) -> str:
        """``name`` or ``host:port``."""
        if self.name:
            return self.name
        parts = urlsplit(self.url)
        return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)

    def __repr__(self) -> str:
        key = ", api_key='***'" if self.api_key is not None else ""
        proxy = ", proxy='***'" if self.proxy is not None else ""
        return f"Endpoint({self.url!r}, kind={self.kind!r}{key}{proxy})"

    __str__ = __repr__


class RetryPolicy(BaseModel):
    """When and how calls are retried (see docs/resilience.md)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    max_attempts: int = Field(default=3, ge=1)
    backoff_initial_s: float = Field(default=0.1, ge=0)
    backoff_max_s: float = Field(default=5.0, ge=0)
    retry_after_cap_s: float = Field(default=30.0, ge=0)
    #: Retries may be at most this share of calls in the window (plus ``budget_min``).
    budget_ratio: float = Field(default=0.2, ge=0)
    budget_window_s: float = Field(default=60.0, gt=0)
    budget_min: int = Field(default=10, ge=0)


class BreakerPolicy(BaseModel):
    """Circuit breaker per endpoint."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    failure_threshold: int = Field(default=5, ge=1)
    reset_timeout_s: float = Field(default=10.0, gt=0)


class Timeouts(BaseModel):
    """Deadlines; ``None`` disables one (not recommended)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    connect_s: float | None = Field(default=5.0, gt=0)
    #: Until the first byte of the reply (non-stream) or the first chunk (stream).
    first_chunk_s: float | None = Field(default=120.0, gt=0)
    between_chunks_s: float | None = Field(default=60.0, gt=0)
    #: Bounds the whole call, all retries and waits included.
    total_s: float | None = Field(default=600.0, gt=0)
    #: How long a call waits for a pool where no endpoint can take it (all down, breakers
    #: open, protocol not detected, backing off on Retry-After) before ``NoEndpointAvailable``;
    #: never longer than ``total_s``. Waiting for a free slot on a saturated endpoint
    #: (``max_in_flight``) is queueing, bounded by ``total_s`` (and the service class's
    #: ``max_wait_s``, see ``AdmissionPolicy``).
    no_endpoint_s: float = Field(default=10.0, ge=0)


class Limits(BaseModel):
    """Bounds on what a server may send: every byte from a server is possibly hostile."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: A whole (non-stream) reply larger than this is a ``ProtocolError``.
    max_response_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    #: An error body is read up to this size and the rest ignored (it is only a message).
    max_error_bytes: int = Field(default=64 * 1024, ge=256)
    #: Text of a stream kept for ``StreamInterrupted.partial_text`` and span content capture;
    #: past it only counts and timings are kept, so memory does not grow with output length.
    max_stream_text_chars: int = Field(default=1024 * 1024, ge=0)


class HealthPolicy(BaseModel):
    """Active health probes and model discovery."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    interval_s: float = Field(default=15.0, gt=0)
    jitter: float = Field(default=0.2, ge=0, le=1)
    timeout_s: float = Field(default=3.0, gt=0)
    #: Model lists (``/api/tags``, ``/v1/models``, ``/info``) are refreshed this often.
    models_refresh_s: float = Field(default=60.0, gt=0)


class ScrapePolicy(BaseModel):
    """Reading each server's own load (vLLM/llama.cpp ``/metrics``, llama.cpp ``/slots``,
    Ollama ``/api/ps``) into the load signal the router uses."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Off: the load signal is this client's own in-flight calls and tokens only.
    enabled: bool = True
    interval_s: float = Field(default=5.0, gt=0)
    #: Other clients' load read from a server counts exp(-age / tau_s): a stale count fades.
    tau_s: float = Field(default=10.0, gt=0)


class Budget(BaseModel):
    """Per-project limits, checked before a call is sent.

    Shared by every process using the same ledger location when usage is enabled (a SQLite
    file: one host; a ``postgresql://`` URL: every host), else in-process (``usage.limits``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_day: int | None = Field(default=None, ge=1)
    #: Shared token budgets: the output tokens reserved at admission for a call that sets no
    #: ``max_tokens``/``num_predict`` (added to its prompt's estimate; settled when it ends).
    reserve_tokens: int = Field(default=1024, ge=0)


class UsageConfig(BaseModel):
    """The usage ledger."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    enabled: bool = True
    #: SQLite file, ``":memory:"`` or a ``postgresql://`` URL (needs the ``postgres``
    #: extra); None: ``$SHARED_OLLAMA_LEDGER``, else the per-user file, which degrades to
    #: memory with a warning when it cannot be opened (see ``usage.ledger.Ledger``).
    path: str | None = None
    batch_size: int = Field(default=500, ge=1)
    #: A finished call is committed within this; a crash loses at most the calls finished
    #: in the last ``flush_interval_s`` + 0.1 s (see docs/usage_and_telemetry.md).
    flush_interval_s: float = Field(default=0.5, gt=0)
    #: Records that may wait for the writer; past it new ones are dropped and counted
    #: (``flush()`` returns False, ``summary().dropped``), calls are never blocked.
    max_queue: int = Field(default=20_000, ge=1)
    #: Serve this process's per-project usage on ``/metrics`` for Prometheus (None: off;
    #: 0: any free port); independent of ``enabled``. See ``shared_ollama.usage.prometheus``.
    prometheus_port: int | None = Field(default=None, ge=0, le=65535)
    #: The address that server binds: loopback unless a Prometheus elsewhere must reach it.
    prometheus_addr: str = "127.0.0.1"


class ServiceClass(BaseModel):
    """A service class of calls (``service_class=`` on a call): its place in the wait for
    capacity. Not ``Endpoint.priority``, which ranks endpoints, not calls."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Lower ranks are admitted first when calls wait for a slot.
    rank: int = 0
    #: Refused first (``Overloaded``, "shed: ...") while a call of a class that is not
    #: sheddable waits for the same capacity, or when the queue is full.
    sheddable: bool = False
    #: Longest wait for capacity before ``Overloaded``; None: the call's total timeout.
    max_wait_s: float | None = Field(default=None, gt=0)
    #: Free slots this class leaves to better-ranked classes (it waits rather than take the
    #: last ones), so their calls find a slot at once; keep it below the pool's capacity.
    headroom: int = Field(default=0, ge=0)


def _default_classes() -> dict[str, ServiceClass]:
    return {
        "interactive": ServiceClass(rank=0),
        "standard": ServiceClass(rank=1),
        "batch": ServiceClass(rank=2, sheddable=True),
    }


class AdmissionPolicy(BaseModel):
    """Who gets a freed slot first when calls wait for capacity (see docs/admission.md).

    Class rank first; within a class the project with the least recent token-weighted usage
    (fair share); within a project the earliest deadline, then arrival.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    #: Off: waiters race for freed slots as they wake (no order, no shedding).
    enabled: bool = True
    classes: dict[str, ServiceClass] = Field(default_factory=_default_classes)
    #: The class of a call that names none.
    default_class: str = "standard"
    #: A project's usage (input + output tokens) counts half after this long.
    fair_share_half_life_s: float = Field(default=60.0, gt=0)
    #: Tokens a call is charged when admitted, until its project has finished calls to learn
    #: from (then the project's running mean); the record's real count replaces it.
    estimate_tokens: int = Field(default=512, ge=1)
    #: A project's share relative to others (usage is divided by it); default 1.
    project_weights: dict[str, float] = Field(default_factory=dict)
    #: Most calls waiting for the same model; past it a sheddable waiter is refused, or the
    #: newcomer. None: no bound but the waits' own.
    max_queue: int | None = Field(default=None, ge=1)

    @field_validator("project_weights")
    @classmethod
    def _weights(cls, v: dict[str, float]) -> dict[str, float]:
        if any(not w > 0 for w in v.values()):
            raise ValueError("project weights must be > 0")
        return v

    @model_validator(mode="after")
    def _default_known(self) -> Self:
        if self.default_class not in self.classes:
            raise ValueError("default_class is not among the classes")
        return self


class AdaptivePolicy(BaseModel):
    """Bounds and reflexes of ``max_in_flight="adaptive"`` (AIMD on first-chunk latency)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_limit: int = Field(default=1, ge=1)
    max_limit: int = Field(default=64, ge=1)
    initial_limit: int = Field(default=4, ge=1)
    #: A first chunk later than ``tolerance`` x the no-queue baseline (+ ``slack_s``) means
    #: calls queue in the server: the limit shrinks.
    tolerance: float = Field(default=2.0, gt=1)
    slack_s: float = Field(default=0.01, ge=0)
    #: Multiplicative decrease, at most once per round trip.
    backoff: float = Field(default=0.9, gt=0, lt=1)
    #: The baseline is the fastest first chunk seen, doubling after this many samples none
    #: as fast (so it follows a server grown slower for good).
    window: int = Field(default=200, ge=2)

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if not self.min_limit <= self.initial_limit <= self.max_limit:
            raise ValueError("adaptive limits need min_limit <= initial_limit <= max_limit")
        return self


class PoolConfig(BaseModel):
    """Everything a client needs; what ``SharedClient(**kwargs)`` builds."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    endpoints: list[Endpoint] = Field(default_factory=list)
    project: str = "default"
    strategy: Strategy = "least_loaded"
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    breaker: BreakerPolicy = Field(default_factory=BreakerPolicy)
    timeouts: Timeouts = Field(default_factory=Timeouts)
    limits: Limits = Field(default_factory=Limits)
    health: HealthPolicy = Field(default_factory=HealthPolicy)
    usage: UsageConfig = Field(default_factory=UsageConfig)
    budgets: dict[str, Budget] = Field(default_factory=dict)
    #: Send a second copy of a non-stream call after the p95 latency (off by default).
    hedging: bool = False
    #: ``strategy="affinity"``: a new session goes to the first endpoint on its key's ring
    #: within ceil((1 + affinity_eps) x its share) of the open sessions and of the calls in
    #: flight; a call whose home is over its share of the calls in flight spills on.
    affinity_eps: float = Field(default=0.25, gt=0)
    #: ``strategy="affinity"``: a session (routing key) not seen for this long is forgotten:
    #: its next call is placed anew (most servers will have evicted its prefix by then).
    affinity_ttl_s: float = Field(default=600.0, gt=0)
    scrape: ScrapePolicy = Field(default_factory=ScrapePolicy)
    admission: AdmissionPolicy = Field(default_factory=AdmissionPolicy)
    adaptive: AdaptivePolicy = Field(default_factory=AdaptivePolicy)


_ENV = "SHARED_OLLAMA_"


def _env_endpoints(value: str) -> list[dict[str, Any]]:
    # "http://a:11434=ollama,http://b:8000=openai" (kind optional)
    out: list[dict[str, Any]] = []
    for item in filter(None, (p.strip() for p in value.split(","))):
        url, _, kind = item.partition("=")
        out.append({"url": url, "kind": kind or "auto"})
    return out


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    env: Mapping[str, str] | None = None,
    **overrides: Any,
) -> PoolConfig:
    """Build a ``PoolConfig`` from a TOML file, ``SHARED_OLLAMA_*`` env vars and overrides.

    Precedence: overrides > env > file. ``path`` defaults to ``$SHARED_OLLAMA_CONFIG``.
    Env: ``SHARED_OLLAMA_ENDPOINTS`` (``url[=kind],...``), ``SHARED_OLLAMA_PROJECT``,
    ``SHARED_OLLAMA_STRATEGY``, ``SHARED_OLLAMA_LEDGER`` (ledger path),
    ``SHARED_OLLAMA_USAGE_PROMETHEUS_PORT`` (serve per-project usage for Prometheus),
    ``SHARED_OLLAMA_API_KEY`` (applied to env-given endpoints).
    """
    env = os.environ if env is None else env
    data: dict[str, Any] = {}
    path = path or env.get(_ENV + "CONFIG")
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
        data = data.get("shared_ollama", data)
    if value := env.get(_ENV + "ENDPOINTS"):
        eps = _env_endpoints(value)
        if key := env.get(_ENV + "API_KEY"):
            for ep in eps:
                ep["api_key"] = key
        data["endpoints"] = eps
    if value := env.get(_ENV + "PROJECT"):
        data["project"] = value
    if value := env.get(_ENV + "STRATEGY"):
        data["strategy"] = value
    if value := env.get(_ENV + "LEDGER"):
        data["usage"] = {**data.get("usage", {}), "path": value}
    if value := env.get(_ENV + "USAGE_PROMETHEUS_PORT"):
        data["usage"] = {**data.get("usage", {}), "prometheus_port": value}
    data.update(overrides)
    try:
        return PoolConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {_short(exc)}") from None


def _short(exc: ValidationError) -> str:
    # Never echo input values: an api_key may be among them.
    return "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg'].removeprefix('Value error, ')}"
        for e in exc.errors(include_input=False)
    )


# -- ollama-python's way of naming a server ---------------------------------------------
_DEFAULT_HOST = "127.0.0.1:11434"


def parse_host(host: str | None) -> str:
    """ollama's reading of a host: ``"gpu-a"`` -> ``http://gpu-a:11434``, ``"https://h"``
    -> ``https://h:443``, a path kept (a server behind a reverse proxy)."""
    host, port = (host or "").strip(), 11434
    scheme, _, hostport = host.partition("://")
    if not hostport:
        scheme, hostport = "http", host
    elif scheme == "http":
        port = 80
    elif scheme == "https":
        port = 443
    parts = urlsplit(f"{scheme}://{hostport}")
    name = parts.hostname or "127.0.0.1"
    try:
        if isinstance(ipaddress.ip_address(name), ipaddress.IPv6Address):
            name = f"[{name}]"
    except ValueError:
        pass
    url = f"{scheme}://{name}:{parts.port or port}"
    path = parts.path.strip("/")
    return f"{url}/{path}" if path else url


def ollama_endpoints(
    host: str | Sequence[str] | None = None,
    *,
    headers: Mapping[str, str] | None = None,
) -> list[Endpoint]:
    """Ollama endpoints for ``host`` (one or several), else ``OLLAMA_HOST``, else the local
    default; ``OLLAMA_API_KEY`` as the key unless ``headers`` carry an authorization."""
    hosts = [host] if isinstance(host, str) or host is None else list(host)
    hosts = [h or os.environ.get("OLLAMA_HOST") or _DEFAULT_HOST for h in hosts]
    extra = {k.lower(): v for k, v in (headers or {}).items() if v is not None}
    key = None if "authorization" in extra else os.environ.get("OLLAMA_API_KEY") or None
    return [Endpoint(parse_host(h), kind="ollama", headers=extra, api_key=key) for h in hosts]
