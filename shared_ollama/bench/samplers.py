"""Background samplers for the bench: GPUs (NVML), the host (psutil), servers' Prometheus
``/metrics`` and Ollama ``/api/ps``, each at its own cadence, stamped with the bench's clock.

A reading is a flat ``{metric: value}`` dict whose keys carry their unit (``gpu0.power_w``,
``host.mem_used_bytes``). ``SamplerSet`` turns readings into ``SampleSeries`` (aligned
columns, ``None`` where a reading lacked the metric), on a thread of this process or, with
``process=True``, in a separate process (``sampler_process``) so that scraping and parsing
never hold the bench's GIL. ``summarize``, ``energy_joules`` and ``tokens_per_joule`` derive
figures from a series afterwards. A sampler that cannot run is recorded as
``"unavailable: <why>"``; nothing here stops a bench run.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import queue
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from itertools import pairwise
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, model_validator

from ..protocols.base import WireResponse
from ..protocols.ollama import OllamaCodec

if TYPE_CHECKING:
    import psutil
    import pynvml

__all__ = [
    "DEFAULT_INCLUDE",
    "HostSampler",
    "NVMLSampler",
    "OllamaPsSampler",
    "PrometheusSampler",
    "SampleSeries",
    "Sampler",
    "SamplerSet",
    "SamplerUnavailable",
    "energy_joules",
    "parse_prometheus_text",
    "summarize",
    "tokens_per_joule",
]

#: Metric-name prefixes kept from ``/metrics``: vLLM, llama.cpp and TGI's own families.
DEFAULT_INCLUDE: tuple[str, ...] = ("vllm:", "llamacpp:", "tgi_")
# A failing sampler is retried after 1, 2, 4 ... ticks, never fewer than once per this many.
_MAX_BACKOFF_TICKS = 16
_T = TypeVar("_T")


class SamplerUnavailable(Exception):
    """A sampler cannot run here (library, driver, device or server missing); ``reason``
    says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Sampler(Protocol):
    """One source of readings, driven by ``SamplerSet`` from a single thread. A sampler may
    also have an ``interval_s`` attribute: its own cadence (``None``: the set's)."""

    name: str

    def open(self) -> None:
        """Acquire what ``sample`` needs; raise ``SamplerUnavailable`` if it cannot run."""

    def sample(self) -> dict[str, float]:
        """One reading: metric name (unit in the name) -> value. May raise."""

    def close(self) -> None:
        """Release what ``open`` acquired."""


# -- GPUs through NVML -------------------------------------------------------------------------

_NVMLReader = Callable[["pynvml.c_nvmlDevice_t"], float]


def _clock_event_reasons(handle: pynvml.c_nvmlDevice_t) -> float:
    import pynvml

    # NVML renamed "throttle reasons" to "clock event reasons" (driver 535); older drivers or
    # bindings only have the old name, which newer drivers keep as an alias.
    try:
        return float(pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
    except AttributeError:
        pass
    except pynvml.NVMLError as exc:
        if exc.value != pynvml.NVML_ERROR_FUNCTION_NOT_FOUND:
            raise
    return float(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))


def _nvml_readers() -> tuple[tuple[str, _NVMLReader], ...]:
    import pynvml

    return (
        ("util_pct", lambda h: float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)),
        # v1 memory info: "used" counts the driver's reservation too (total - free).
        ("mem_used_bytes", lambda h: float(pynvml.nvmlDeviceGetMemoryInfo(h).used)),
        ("power_w", lambda h: pynvml.nvmlDeviceGetPowerUsage(h) / 1000.0),  # mW
        ("energy_j", lambda h: pynvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0),  # mJ
        (
            "temp_c",
            lambda h: float(pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU)),
        ),
        ("sm_clock_mhz", lambda h: float(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))),
        ("throttle_reasons", _clock_event_reasons),
    )


def _nvml_or_none(read: Callable[[], _T]) -> _T | None:
    import pynvml

    try:
        return read()
    except pynvml.NVMLError:
        return None


def _gpu_facts(
    index: int, handle: pynvml.c_nvmlDevice_t, driver: str | None
) -> dict[str, str | int | None]:
    import pynvml

    memory = _nvml_or_none(lambda: pynvml.nvmlDeviceGetMemoryInfo(handle))
    return {
        "index": index,
        "name": _nvml_or_none(lambda: pynvml.nvmlDeviceGetName(handle)),
        "uuid": _nvml_or_none(lambda: pynvml.nvmlDeviceGetUUID(handle)),
        "memory_total_bytes": None if memory is None else memory.total,
        "driver_version": driver,
    }


class NVMLSampler:
    """Every GPU NVML sees (or only ``indices``): keys ``gpu<i>.util_pct``,
    ``.mem_used_bytes``, ``.power_w``, ``.energy_j``, ``.temp_c``, ``.sm_clock_mhz`` and
    ``.throttle_reasons`` (a bitmask). A metric a GPU does not support is absent."""

    def __init__(
        self,
        indices: Sequence[int] | None = None,
        *,
        name: str = "nvml",
        interval_s: float | None = None,
    ) -> None:
        self.name = name
        self.interval_s = interval_s
        self._indices = None if indices is None else tuple(indices)
        self._handles: list[tuple[int, pynvml.c_nvmlDevice_t]] = []
        self._readers: tuple[tuple[str, _NVMLReader], ...] = ()
        self._unsupported: set[tuple[int, str]] = set()
        self._open = False

    def open(self) -> None:
        """Initialise NVML and find the GPUs; ``SamplerUnavailable("NVML: ...")`` if the
        binding, the library, the driver or the GPUs are missing."""
        try:
            import pynvml
        except ImportError as exc:
            raise SamplerUnavailable(
                f"NVML: nvidia-ml-py is not installed (pip install 'shared-ollama[gpu]'): {exc}"
            ) from exc
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            raise SamplerUnavailable(f"NVML: {exc}") from exc
        try:
            self._handles = self._find_handles()
        except pynvml.NVMLError as exc:
            _nvml_or_none(pynvml.nvmlShutdown)
            raise SamplerUnavailable(f"NVML: {exc}") from exc
        except SamplerUnavailable:
            _nvml_or_none(pynvml.nvmlShutdown)
            raise
        self._readers = _nvml_readers()
        self._unsupported.clear()
        self._open = True

    def _find_handles(self) -> list[tuple[int, pynvml.c_nvmlDevice_t]]:
        import pynvml

        count = pynvml.nvmlDeviceGetCount()
        indices = tuple(range(count)) if self._indices is None else self._indices
        if not indices:
            raise SamplerUnavailable("NVML: no GPU visible")
        missing = [index for index in indices if not 0 <= index < count]
        if missing:
            raise SamplerUnavailable(f"NVML: no GPU with index {missing} ({count} visible)")
        return [(index, pynvml.nvmlDeviceGetHandleByIndex(index)) for index in indices]

    def sample(self) -> dict[str, float]:
        """One reading of every metric of every GPU; raises only when nothing could be read."""
        import pynvml

        unsupported = (pynvml.NVML_ERROR_NOT_SUPPORTED, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
        reading: dict[str, float] = {}
        failure: pynvml.NVMLError | None = None
        for index, handle in self._handles:
            for metric, read in self._readers:
                if (index, metric) in self._unsupported:
                    continue
                try:
                    reading[f"gpu{index}.{metric}"] = read(handle)
                except pynvml.NVMLError as exc:
                    # Unsupported stays unsupported: stop asking. Anything else (a GPU that
                    # fell off the bus, a timeout) may pass, so ask again next time.
                    if exc.value in unsupported:
                        self._unsupported.add((index, metric))
                    else:
                        failure = exc
        if not reading and failure is not None:
            raise failure
        return reading

    def gpu_info(self) -> list[dict[str, str | int | None]]:
        """Static facts per GPU for run metadata: index, name, uuid, memory_total_bytes,
        driver_version (``None`` where NVML cannot tell). Opens NVML for the call if needed,
        so it raises ``SamplerUnavailable`` like ``open``."""
        opened_here = not self._open
        if opened_here:
            self.open()  # first: it turns a missing nvidia-ml-py into SamplerUnavailable
        import pynvml

        try:
            driver = _nvml_or_none(pynvml.nvmlSystemGetDriverVersion)
            return [_gpu_facts(index, handle, driver) for index, handle in self._handles]
        finally:
            if opened_here:
                self.close()

    def close(self) -> None:
        """Shut NVML down (it counts inits, so other users in the process keep theirs)."""
        if not self._open:
            return
        import pynvml

        self._open = False
        self._handles = []
        _nvml_or_none(pynvml.nvmlShutdown)


# -- the host through psutil -------------------------------------------------------------------


def _cpu_busy_total(fields: Mapping[str, float]) -> tuple[float, float]:
    # Linux counts guest time inside user/nice already; idle and iowait are not busy.
    total = sum(v for k, v in fields.items() if k not in ("guest", "guest_nice"))
    idle = fields.get("idle", 0.0) + fields.get("iowait", 0.0)
    return total - idle, total


class HostSampler:
    """This machine and one process: ``host.cpu_pct`` (all cores, 0-100),
    ``host.mem_used_bytes``, ``host.proc_rss_bytes``, ``host.proc_cpu_pct`` (100 = one
    core busy). The process is ``pid``, by default the one that created the sampler, so a
    sampler sent to a sampler process still measures the bench."""

    def __init__(
        self, *, name: str = "host", pid: int | None = None, interval_s: float | None = None
    ) -> None:
        self.name = name
        self.pid = os.getpid() if pid is None else pid
        self.interval_s = interval_s
        self._process: psutil.Process | None = None
        self._last_cpu = (0.0, 0.0)
        self._last_proc = (0.0, 0.0)

    def open(self) -> None:
        """Import psutil; ``SamplerUnavailable`` when it is missing."""
        try:
            import psutil
        except ImportError as exc:
            raise SamplerUnavailable(
                f"psutil is not installed (pip install 'shared-ollama[bench]'): {exc}"
            ) from exc
        try:
            self._process = psutil.Process(self.pid)
        except psutil.Error as exc:
            raise SamplerUnavailable(f"process {self.pid}: {exc}") from exc
        # CPU use is a rate: remember where the counters stand so the first reading covers
        # the time since open. Kept here, not in psutil's per-thread state, because readings
        # come from the caller's thread and from the sampling thread alike.
        self._last_cpu = _cpu_busy_total(psutil.cpu_times()._asdict())
        self._last_proc = (time.monotonic(), self._process_cpu_s())

    def _process_cpu_s(self) -> float:
        assert self._process is not None
        times = self._process.cpu_times()
        return times.user + times.system

    def sample(self) -> dict[str, float]:
        """One reading of host CPU and memory and of this process's CPU and RSS."""
        import psutil

        if self._process is None:
            raise RuntimeError("HostSampler.sample() before open()")
        reading = {
            "host.mem_used_bytes": float(psutil.virtual_memory().used),
            "host.proc_rss_bytes": float(self._process.memory_info().rss),
        }
        busy, total = _cpu_busy_total(psutil.cpu_times()._asdict())
        if total > self._last_cpu[1]:
            share = (busy - self._last_cpu[0]) / (total - self._last_cpu[1])
            reading["host.cpu_pct"] = min(100.0, max(0.0, 100.0 * share))
            self._last_cpu = (busy, total)
        now, proc_s = time.monotonic(), self._process_cpu_s()
        if now > self._last_proc[0]:
            reading["host.proc_cpu_pct"] = max(
                0.0, 100.0 * (proc_s - self._last_proc[1]) / (now - self._last_proc[0])
            )
            self._last_proc = (now, proc_s)
        return reading

    def close(self) -> None:
        """Forget the process handle."""
        self._process = None


# -- servers: Prometheus /metrics and Ollama /api/ps -------------------------------------------


def _metric_key(name: str, labels: Mapping[str, str]) -> str:
    if not labels:
        return name
    return name + "{" + ",".join(f"{k}={v}" for k, v in sorted(labels.items())) + "}"


def parse_prometheus_text(text: str, include: Sequence[str] = DEFAULT_INCLUDE) -> dict[str, float]:
    """Gauges and counters (totals as they are) of a Prometheus text exposition, plus the
    ``_sum``/``_count`` of histograms and summaries, from families whose name starts with a
    prefix in ``include`` (empty: every family). Keys are sample names with labels folded in,
    sorted and unquoted: ``vllm:num_requests_running{engine=0,model_name=tiny}``. Counter
    samples are named as prometheus_client's parser names them: ``<family>_total``."""
    from prometheus_client.parser import text_string_to_metric_families

    prefixes = tuple(include)
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if prefixes and not family.name.startswith(prefixes):
            continue
        wanted: tuple[str, ...] | None
        if family.type in ("histogram", "summary"):
            # Buckets and quantiles are per-run shapes; their sum and count give the means.
            wanted = (f"{family.name}_sum", f"{family.name}_count")
        elif family.type in ("gauge", "counter", "unknown"):
            wanted = None
        else:
            continue  # info / stateset / gaugehistogram: not a number to plot over time
        for sample in family.samples:
            # prometheus_client servers (vLLM) expose each series' creation time as a
            # separate `_created` gauge: a timestamp, not a measurement.
            if sample.name.endswith("_created"):
                continue
            if wanted is None or sample.name in wanted:
                out[_metric_key(sample.name, sample.labels)] = float(sample.value)
    return out


def _netloc(url: str) -> str:
    return urlsplit(url).netloc or url


class PrometheusSampler:
    """A server's Prometheus ``/metrics`` (vLLM, llama.cpp ``--metrics``, TGI), parsed by
    ``parse_prometheus_text``. ``url`` is the server's base URL or the metrics URL itself."""

    def __init__(
        self,
        url: str,
        name: str | None = None,
        include: Sequence[str] = DEFAULT_INCLUDE,
        timeout_s: float = 2.0,
        *,
        headers: Mapping[str, str] | None = None,
        interval_s: float | None = None,
    ) -> None:
        self.interval_s = interval_s
        base = url.rstrip("/")
        # An OpenAI-style base URL (".../v1") is common in configs; metrics live at the root.
        base = base.removesuffix("/v1")
        self.url = base if base.endswith("/metrics") else base + "/metrics"
        self.name = name if name is not None else f"metrics@{_netloc(self.url)}"
        self.include = tuple(include)
        self.timeout_s = timeout_s
        self._headers = dict(headers or {})
        self._client: httpx.Client | None = None

    def open(self) -> None:
        """Create the HTTP client. The server is not probed: one that is down shows up as
        failed readings (and ``unavailable`` if none ever succeeds)."""
        self._client = httpx.Client(timeout=self.timeout_s, headers=self._headers)

    def sample(self) -> dict[str, float]:
        """Scrape once; raises on a transport error or a non-2xx reply."""
        if self._client is None:
            raise RuntimeError("PrometheusSampler.sample() before open()")
        response = self._client.get(self.url)
        response.raise_for_status()
        return parse_prometheus_text(response.text, self.include)

    def close(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            self._client.close()
            self._client = None


class OllamaPsSampler:
    """An Ollama server's loaded models (``GET /api/ps``): ``ollama.<model>.size_vram_bytes``
    and ``ollama.<model>.size_bytes``; a model not loaded is absent from the reading."""

    def __init__(
        self,
        url: str,
        name: str | None = None,
        timeout_s: float = 2.0,
        *,
        headers: Mapping[str, str] | None = None,
        interval_s: float | None = None,
    ) -> None:
        self.interval_s = interval_s
        self.url = url.rstrip("/")
        self.name = name if name is not None else f"ollama-ps@{_netloc(self.url)}"
        self.timeout_s = timeout_s
        self._headers = dict(headers or {})
        self._codec = OllamaCodec()
        self._client: httpx.Client | None = None

    def open(self) -> None:
        """Create the HTTP client (the server is not probed, as for ``PrometheusSampler``)."""
        self._client = httpx.Client(timeout=self.timeout_s, headers=self._headers)

    def sample(self) -> dict[str, float]:
        """Ask ``/api/ps`` once; raises on a transport error, a non-2xx or a malformed reply."""
        if self._client is None:
            raise RuntimeError("OllamaPsSampler.sample() before open()")
        wire = self._codec.ps()
        response = self._client.request(wire.method, self.url + wire.path)
        response.raise_for_status()
        reply = WireResponse(response.status_code, dict(response.headers), response.content)
        reading: dict[str, float] = {}
        for model in self._codec.parse_ps(reply):
            if model.size_vram is not None:
                reading[f"ollama.{model.name}.size_vram_bytes"] = float(model.size_vram)
            if model.size is not None:
                reading[f"ollama.{model.name}.size_bytes"] = float(model.size)
        return reading

    def close(self) -> None:
        """Close the HTTP client."""
        if self._client is not None:
            self._client.close()
            self._client = None


# -- series and the sampling thread ------------------------------------------------------------


class SampleSeries(BaseModel):
    """Everything one sampler recorded during a run (part of the bench's JSON result)."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    name: str
    """The sampler's name (``nvml``, ``host``, ``metrics@host:port`` ...)."""
    available: bool
    """False when the sampler could not open or none of its readings succeeded."""
    reason: str | None = None
    """Why it is unavailable: ``"unavailable: <why>"``."""
    times_ns: list[int] = []
    """When each successful reading was taken, on the bench's monotonic clock."""
    values: dict[str, list[float | None]] = {}
    """Metric -> one value per entry of ``times_ns``; ``None`` where a reading lacked it."""
    errors: int = 0
    """How many readings raised (they are not in ``times_ns``)."""
    last_error: str | None = None
    """The last of those errors, ``"Type: message"``."""
    interval_s: float | None = None
    """The cadence it was read at, in seconds (phase boundaries add readings)."""

    @model_validator(mode="after")
    def _aligned(self) -> SampleSeries:
        for key, column in self.values.items():
            if len(column) != len(self.times_ns):
                raise ValueError(f"{key}: {len(column)} values for {len(self.times_ns)} times")
        return self


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _finite(value: float) -> float | None:
    number = float(value)
    # NaN/inf (an idle server's ratio, say) would poison means and is not valid JSON.
    return number if math.isfinite(number) else None


class _Recorder:
    """One sampler's state inside a SamplerSet: opened or why not, cadence, columns, errors,
    backoff."""

    def __init__(self, sampler: Sampler, interval_s: float) -> None:
        self.sampler = sampler
        self.interval_s = interval_s
        self.interval_ns = round(interval_s * 1e9)
        self.due_ns = 0
        self.is_open = False
        self.reason: str | None = None
        self.times: list[int] = []
        self.values: dict[str, list[float | None]] = {}
        self.errors = 0
        self.last_error: str | None = None
        self._failures_in_a_row = 0
        # Turns: readings that were due or asked for (phase marks), skipped ones included.
        self._turn = 0
        self._next_turn = 0

    def open(self) -> None:
        try:
            self.sampler.open()
        except SamplerUnavailable as exc:
            self.reason = f"unavailable: {exc.reason}"
        except Exception as exc:  # a broken sampler must not stop the run
            self.reason = f"unavailable: {_describe(exc)}"
        else:
            self.is_open = True

    def read(self, clock: Callable[[], int]) -> None:
        if not self.is_open:
            return
        turn, self._turn = self._turn, self._turn + 1
        if turn < self._next_turn:
            return
        before = clock()
        try:
            reading = self.sampler.sample()
            # The reading describes the whole call (a scrape can take milliseconds).
            t_ns = (before + clock()) // 2
            row = {str(key): _finite(value) for key, value in reading.items()}
        except Exception as exc:
            self.errors += 1
            self.last_error = _describe(exc)
            self._failures_in_a_row += 1
            # Back off: an unreachable URL can block for its whole timeout on each try,
            # delaying the readings of the other samplers behind it.
            backoff = min(2 ** (self._failures_in_a_row - 1), _MAX_BACKOFF_TICKS)
            self._next_turn = turn + backoff
            return
        self._failures_in_a_row = 0
        self._append(t_ns, row)

    def _append(self, t_ns: int, row: Mapping[str, float | None]) -> None:
        filled = len(self.times)
        for key, value in row.items():
            column = self.values.get(key)
            if column is None:
                column = self.values[key] = [None] * filled
            column.append(value)
        self.times.append(t_ns)
        for column in self.values.values():
            if len(column) == filled:
                column.append(None)

    def close(self) -> None:
        if not self.is_open:
            return
        self.is_open = False
        try:
            self.sampler.close()
        except Exception as exc:  # the readings are already safe; say so, do not raise
            self.last_error = f"close: {_describe(exc)}"

    def series(self) -> SampleSeries:
        available = self.reason is None and (bool(self.times) or self.errors == 0)
        reason = self.reason
        if reason is None and not available:
            reason = f"unavailable: every reading failed ({self.errors}); last: {self.last_error}"
        return SampleSeries(
            name=self.sampler.name,
            available=available,
            reason=reason,
            times_ns=self.times,
            values=self.values,
            errors=self.errors,
            last_error=self.last_error,
            interval_s=self.interval_s,
        )


def _own_interval(sampler: Sampler, default_s: float) -> float:
    own = getattr(sampler, "interval_s", None)
    interval = default_s if own is None else float(own)
    if not interval > 0:
        raise ValueError(f"{sampler.name}: interval_s must be positive, got {interval!r}")
    return interval


class SamplerSet:
    """Runs samplers in the background, each every ``interval_s`` or its own ``interval_s``,
    stamping readings with ``clock`` (the bench's ``time.monotonic_ns``). ``start()``, then
    ``stop()`` for the series; or ``with SamplerSet(...) as samplers:`` and
    ``samplers.results`` afterwards.

    ``process=True`` runs them in a separate process (same clock, ``time.monotonic_ns``):
    scraping and parsing a server's ``/metrics`` then never holds this process's GIL, and the
    bench's threads spend nothing on sampling between ``start``, ``sample_now`` and ``stop``.
    Samplers must then be picklable; where the process cannot start, a thread runs them and
    ``fallback`` says why."""

    def __init__(
        self,
        samplers: Iterable[Sampler],
        interval_s: float = 0.5,
        clock: Callable[[], int] = time.monotonic_ns,
        *,
        process: bool = False,
    ) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s must be positive, got {interval_s!r}")
        if process and clock is not time.monotonic_ns:
            raise ValueError("a sampler process stamps with time.monotonic_ns: no custom clock")
        self.interval_s = interval_s
        self._samplers = list(samplers)
        self._recorders = [_Recorder(s, _own_interval(s, interval_s)) for s in self._samplers]
        self._clock = clock
        self._halt = threading.Event()
        # sample_now() may run in the caller's thread while the sampling thread reads.
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._state: Literal["new", "running", "stopped"] = "new"
        self._results: list[SampleSeries] = []
        self._process = process
        self._child: _Child | None = None
        #: Where the samplers run: ``"process"`` (a sampler process) or ``"thread"``.
        self.mode: Literal["thread", "process"] = "process" if process else "thread"
        #: Why a thread ran them although a process was asked (None otherwise).
        self.fallback: str | None = None
        #: CPU seconds the sampler process spent sampling (``process`` mode, after ``stop``;
        #: its start, an interpreter importing the library, is not counted).
        self.process_cpu_s: float | None = None

    @property
    def process_pid(self) -> int | None:
        """The sampler process's id while it runs (``process`` mode)."""
        return None if self._child is None else self._child.pid

    @property
    def intervals(self) -> dict[str, float]:
        """Sampler name -> its cadence in seconds."""
        return {r.sampler.name: r.interval_s for r in self._recorders}

    def start(self) -> None:
        """Open every sampler (one that cannot is recorded as ``unavailable: why``), take the
        first reading before returning (so a run that starts now is bracketed), then sample
        in the background."""
        if self._state != "new":
            raise RuntimeError("a SamplerSet can be started once")
        if self._process and self._samplers:
            child = _Child(self._samplers, self.interval_s)
            try:
                child.start()
            except _ChildFailed as exc:
                self.mode, self.fallback = "thread", exc.reason
            else:
                self._child, self._state = child, "running"
                return
        for recorder in self._recorders:
            recorder.open()
        self._state = "running"
        self.sample_now()
        if any(recorder.is_open for recorder in self._recorders):
            self._thread = threading.Thread(
                target=self._run, name="shared-ollama-samplers", daemon=True
            )
            self._thread.start()

    def sample_now(self) -> None:
        """Take one reading of every open sampler now, e.g. at a phase boundary of a run so
        that ``energy_joules`` has readings at both ends of the phase."""
        if self._child is not None:
            if self._state == "running":
                self._child.mark()
            return
        with self._lock:
            if self._state != "running":
                return
            for recorder in self._recorders:
                recorder.read(self._clock)

    def _read_due(self) -> None:
        with self._lock:
            if self._state != "running":
                return
            for recorder in self._recorders:
                if recorder.is_open and recorder.due_ns <= self._clock():
                    recorder.read(self._clock)
                    # A slow reading pushes the schedule back instead of firing a burst.
                    recorder.due_ns = max(recorder.due_ns + recorder.interval_ns, self._clock())

    def _run(self) -> None:
        active = [r for r in self._recorders if r.is_open]
        now_ns = self._clock()
        for recorder in active:
            recorder.due_ns = now_ns + recorder.interval_ns
        while True:
            wait_ns = min(r.due_ns for r in active) - self._clock()
            if self._halt.wait(max(0, wait_ns) / 1e9):
                return
            self._read_due()

    def stop(self) -> list[SampleSeries]:
        """Stop the thread (it wakes at once) and join it, take a closing reading, close the
        samplers and return one series per sampler, in the order given. Idempotent."""
        if self._state == "running" and self._child is not None:
            self._state = "stopped"
            self._results = self._child.stop()
            self.process_cpu_s = self._child.cpu_s
        if self._state == "running":
            self._halt.set()
            if self._thread is not None:
                self._thread.join()
                self._thread = None
            self.sample_now()
            with self._lock:
                self._state = "stopped"
            for recorder in self._recorders:
                recorder.close()
            self._results = [recorder.series() for recorder in self._recorders]
        self._state = "stopped"
        return list(self._results)

    @property
    def results(self) -> list[SampleSeries]:
        """The series returned by ``stop()`` (empty before it)."""
        return list(self._results)

    def __enter__(self) -> SamplerSet:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


# -- the bench's end of a sampler process ------------------------------------------------------

# A fresh interpreter imports the library (~0.5 s on a small VM) before its first reading.
_START_TIMEOUT_S = 60.0
# A mark or the closing readings wait behind a reading in progress (a scrape's timeout).
_REPLY_TIMEOUT_S = 30.0


class _ChildFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Child:
    """Starts ``sampler_process``, sends it the samplers, asks for marks and the series."""

    def __init__(self, samplers: Sequence[Sampler], interval_s: float) -> None:
        self._samplers = samplers
        self._interval_s = interval_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr: Any = None
        self._replies: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self._reader: threading.Thread | None = None
        self._asked = 0
        self._offset_ns = 0
        self.pid: int | None = None
        self._started_cpu_s = 0.0
        #: CPU seconds the process spent from its first reading to its last (not its start).
        self.cpu_s: float | None = None

    def start(self) -> None:
        from . import sampler_process

        try:
            payload = pickle.dumps((self._samplers, self._interval_s))
        except Exception as exc:  # pickling runs user code: any error means "not sendable"
            raise _ChildFailed(f"samplers cannot be sent to a process: {_describe(exc)}") from exc
        # Kept open while the process lives (its last line explains a failure).
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                sampler_process.command(),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=self._stderr,
                **sampler_process.popen_options(),
            )
        except (OSError, ValueError) as exc:
            self._stderr.close()
            raise _ChildFailed(f"sampler process: {_describe(exc)}") from exc
        self._reader = threading.Thread(
            target=self._read_replies, name="shared-ollama-sampler-replies", daemon=True
        )
        self._reader.start()
        try:
            self._send(("start", list(sys.path), payload))
            self.pid, self._started_cpu_s = self._await("ready", None, _START_TIMEOUT_S)
            before = time.monotonic_ns()
            child_now = int(self._ask("clock"))
            after = time.monotonic_ns()
        except _ChildFailed:
            self._end(kill=True)
            raise
        # Same clock on every platform Python supports; should it ever differ, move the
        # child's stamps onto ours (to within half a round trip).
        if not before <= child_now <= after:
            self._offset_ns = child_now - (before + after) // 2

    def mark(self) -> None:
        """A reading of every sampler now (best effort: a dead process is left to ``stop``)."""
        with contextlib.suppress(_ChildFailed):
            self._ask("mark")

    def stop(self) -> list[SampleSeries]:
        """The series, closing the process; unavailable series if it failed."""
        try:
            dumped, cpu_s = self._ask("stop")
            series = [SampleSeries.model_validate(d) for d in dumped]
            self.cpu_s = max(0.0, cpu_s - self._started_cpu_s)
        except _ChildFailed as exc:
            self._end(kill=True)
            return [self._lost(s, exc.reason) for s in self._samplers]
        self._end(kill=False)
        if self._offset_ns:
            for one in series:
                one.times_ns = [t - self._offset_ns for t in one.times_ns]
        return series

    def _lost(self, sampler: Sampler, reason: str) -> SampleSeries:
        interval = _own_interval(sampler, self._interval_s)
        return SampleSeries(
            name=sampler.name, available=False, reason=f"unavailable: {reason}", interval_s=interval
        )

    def _send(self, message: tuple[Any, ...]) -> None:
        from .sampler_process import write_frame

        assert self._proc is not None and self._proc.stdin is not None
        try:
            write_frame(self._proc.stdin, message)
        except (OSError, ValueError) as exc:
            try:  # a closed pipe almost always means the process is gone: say how
                self._proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                raise _ChildFailed(self._died(f"cannot write to it ({_describe(exc)})")) from exc
            raise _ChildFailed(self._died("it exited")) from exc

    def _ask(self, what: str) -> Any:
        self._asked += 1
        self._send((what, self._asked))
        return self._await("done", self._asked, _REPLY_TIMEOUT_S)

    def _await(self, kind: str, ident: int | None, timeout_s: float) -> Any:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                reply = self._replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise _ChildFailed(f"sampler process: no answer in {timeout_s:g} s") from None
            if reply is None:
                self._replies.put(None)  # the end stays in view for later requests
                raise _ChildFailed(self._died("it exited"))
            if reply[0] == "error":
                raise _ChildFailed(f"sampler process: {reply[1]}")
            if reply[0] == kind and (ident is None or reply[1] == ident):
                return reply[-1] if kind == "done" else reply[1:]
            # Anything else answers an earlier request that timed out: drop it.

    def _read_replies(self) -> None:
        from .sampler_process import read_frame

        assert self._proc is not None and self._proc.stdout is not None
        try:
            while (message := read_frame(self._proc.stdout)) is not None:
                self._replies.put(message)
        except Exception:  # a torn frame means the process is gone: say so below
            pass
        self._replies.put(None)

    def _died(self, what: str) -> str:
        code = None if self._proc is None else self._proc.poll()
        if code is not None:
            what += f" (signal {-code})" if code < 0 else f" (exit code {code})"
        tail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
            tail = f": {lines[-1]}" if lines else ""
        return f"sampler process: {what}{tail}"

    def _end(self, *, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            proc.kill()
        with contextlib.suppress(OSError, ValueError):
            assert proc.stdin is not None
            proc.stdin.close()  # end of input: a process still reading stops and exits
        try:
            proc.wait(timeout=_REPLY_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._reader is not None:
            self._reader.join()  # it ends at the end of the process's output
        if proc.stdout is not None:
            proc.stdout.close()
        self._stderr.close()


# -- derived figures -------------------------------------------------------------------------


def _points(series: SampleSeries, key: str) -> list[tuple[int, float]]:
    column = series.values.get(key)
    if column is None:
        return []
    return [(t, v) for t, v in zip(series.times_ns, column, strict=True) if v is not None]


def summarize(series: SampleSeries) -> dict[str, dict[str, float]]:
    """Per metric with at least one value: ``mean``, ``max``, ``min`` and ``last``."""
    out: dict[str, dict[str, float]] = {}
    for key, column in series.values.items():
        present = [v for v in column if v is not None]
        if present:
            out[key] = {
                "mean": math.fsum(present) / len(present),
                "max": max(present),
                "min": min(present),
                "last": present[-1],
            }
    return out


def _interpolate(points: Sequence[tuple[int, float]], t_ns: int) -> float:
    """Piecewise-linear value at ``t_ns``, which lies within the points' time range."""
    for (ta, va), (tb, vb) in pairwise(points):
        if ta <= t_ns <= tb:
            return va if tb == ta else va + (vb - va) * (t_ns - ta) / (tb - ta)
    return points[-1][1]


def _covered(points: Sequence[tuple[int, float]], t0_ns: int, t1_ns: int) -> tuple[int, int]:
    return max(t0_ns, points[0][0]), min(t1_ns, points[-1][0])


def _counter_delta(points: list[tuple[int, float]], t0_ns: int, t1_ns: int) -> float | None:
    if len(points) < 2:
        return None
    lo, hi = _covered(points, t0_ns, t1_ns)
    if hi < lo:
        return None
    # A counter that went down was reset (driver reload): count only the increases.
    running, total = [points[0]], points[0][1]
    for (_, previous), (t, value) in pairwise(points):
        total += max(0.0, value - previous)
        running.append((t, total))
    return _interpolate(running, hi) - _interpolate(running, lo)


def _integral(points: list[tuple[int, float]], t0_ns: int, t1_ns: int) -> float | None:
    if len(points) < 2:
        return None
    lo, hi = _covered(points, t0_ns, t1_ns)
    if hi < lo:
        return None
    area = 0.0
    for (ta, _), (tb, _) in pairwise(points):
        a, b = max(ta, lo), min(tb, hi)
        if b > a:
            area += (_interpolate(points, a) + _interpolate(points, b)) / 2 * (b - a)
    return area / 1e9


def energy_joules(
    series: SampleSeries, t0_ns: int, t1_ns: int, *, device: str | None = None
) -> float | None:
    """Joules used between ``t0_ns`` and ``t1_ns`` by the GPUs of an NVML series (or only
    ``device``, e.g. ``"gpu0"``): the energy counter's increase where a GPU has one, else its
    power integrated over time. Counts the part of the window the readings cover; GPUs that
    report neither are left out; ``None`` when no GPU reports either."""
    if t1_ns < t0_ns:
        raise ValueError(f"window ends before it starts: {t0_ns} > {t1_ns}")
    suffixes = (".energy_j", ".power_w")
    devices = sorted({key.rsplit(".", 1)[0] for key in series.values if key.endswith(suffixes)})
    total: float | None = None
    for name in devices:
        if device is not None and name != device:
            continue
        joules = _counter_delta(_points(series, f"{name}.energy_j"), t0_ns, t1_ns)
        if joules is None:
            joules = _integral(_points(series, f"{name}.power_w"), t0_ns, t1_ns)
        if joules is not None:
            total = joules if total is None else total + joules
    return total


def tokens_per_joule(tokens: int | float, joules: float | None) -> float | None:
    """Tokens per joule, or ``None`` when the energy is unknown or not positive."""
    if joules is None or not joules > 0:
        return None
    return tokens / joules
