"""The load a server reports about itself, and the parsers that read it (no I/O).

An endpoint's load signal (``EndpointState.load``) is our own calls in flight, plus what
its server last said it runs and queues for other clients (its count minus our own in
flight at scrape time), faded by the scrape's age: ``exp(-age / tau)``. The server's count
comes from vLLM's ``/metrics`` (``vllm:num_requests_running`` and ``..._waiting``),
llama.cpp's ``/metrics`` (``llamacpp:requests_processing`` and ``..._deferred``) or
``/slots`` (busy slots), TGI's ``/metrics`` (``tgi_batch_current_size`` and
``tgi_queue_size``); Ollama's ``/api/ps`` gives only the models in memory.

The parsers read server bytes: every byte is hostile. Bodies are read bounded by the
driver; lines past ``MAX_LINE`` bytes, garbage and non-finite values are ignored; a body
that is no metrics text at all is a ``ProtocolError``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from ..errors import ProtocolError
from ..protocols.decoders import JSON_ERRORS, excerpt

__all__ = [
    "GAUGES",
    "MAX_LINE",
    "MAX_SCRAPE_BYTES",
    "ServerLoad",
    "busy_slots",
    "parse_prometheus",
    "server_load",
]

#: A metrics reply is read up to this size; the rest is cut off (a truncated last line is
#: dropped). vLLM's reply, histograms included, is some 100 KiB for one model.
MAX_SCRAPE_BYTES = 2 * 1024 * 1024
#: Longer lines are skipped: no gauge we read needs more.
MAX_LINE = 4096
#: Gauge name -> whether it counts running (True) or waiting (False) requests.
GAUGES: dict[str, bool] = {
    "vllm:num_requests_running": True,
    "vllm:num_requests_waiting": False,
    "llamacpp:requests_processing": True,
    "llamacpp:requests_deferred": False,
    "tgi_batch_current_size": True,
    "tgi_queue_size": False,
}
_WANTED = frozenset(GAUGES)


@dataclass(frozen=True, slots=True)
class ServerLoad:
    """One scrape of a server's own load."""

    #: Requests the server is running, and queueing, for every client (None: not said).
    running: float | None
    waiting: float | None
    #: Monotonic seconds of the scrape.
    at: float
    #: Our own calls in flight on it when it was scraped.
    own_in_flight: int
    #: The route read (``/metrics``, ``/slots``).
    source: str

    @property
    def others(self) -> float:
        """What other clients had running or queued there at scrape time (never < 0)."""
        total = (self.running or 0.0) + (self.waiting or 0.0)
        return max(0.0, total - self.own_in_flight)

    def weight(self, now: float, tau_s: float) -> float:
        """How much the scrape still counts: exp(-age / tau)."""
        return math.exp(-max(0.0, now - self.at) / tau_s)


def _sample(line: bytes) -> tuple[str, float] | None:
    """``name{labels} value [timestamp]`` -> (name, value); None for anything else."""
    # Labels are skipped, not parsed: only the sum over every label set is wanted.
    if not line or line[0] in b"# \t":
        return None
    brace = line.find(b"{")
    space = line.find(b" ")
    if space < 0:
        return None
    if 0 <= brace < space:
        close = line.rfind(b"}")
        if close < brace:
            return None
        name, rest = line[:brace], line[close + 1 :]
    else:
        name, rest = line[:space], line[space:]
    parts = rest.split()
    if not parts:
        return None
    try:
        text = name.decode("ascii")
        value = float(parts[0])
    except (UnicodeDecodeError, ValueError):
        return None
    return text, value


def parse_prometheus(body: bytes, *, truncated: bool = False) -> dict[str, float]:
    """The gauges of ``GAUGES`` found in Prometheus text (summed over label sets).

    ``truncated``: the body was cut at the read bound, so its last line is partial and
    dropped. Raises ``ProtocolError`` when the body holds no metrics text at all (an HTML
    page, binary); a body that lacks our gauges gives ``{}``.
    """
    lines = body.split(b"\n")
    if truncated and lines:
        lines.pop()
    found: dict[str, float] = {}
    recognised = 0
    for line in lines:
        if len(line) > MAX_LINE:
            continue
        line = line.strip()
        if line.startswith(b"#"):
            recognised += 1
            continue
        sample = _sample(line)
        if sample is None:
            continue
        recognised += 1
        name, value = sample
        if name in _WANTED and math.isfinite(value) and value >= 0:
            found[name] = found.get(name, 0.0) + value
    if not recognised and body.strip():
        raise ProtocolError(f"not Prometheus metrics text: {excerpt(body[:200])!r}")
    return found


def busy_slots(body: bytes) -> int:
    """llama.cpp's ``/slots``: how many slots are processing a request."""
    try:
        slots = json.loads(body)
    except JSON_ERRORS:
        raise ProtocolError(f"/slots is not JSON: {excerpt(body[:200])!r}") from None
    if not isinstance(slots, list):
        raise ProtocolError("/slots is not a list of slots")
    return sum(1 for s in slots if isinstance(s, dict) and s.get("is_processing") is True)


def server_load(
    gauges: dict[str, float], *, at: float, own_in_flight: int, source: str
) -> ServerLoad | None:
    """A ``ServerLoad`` from parsed gauges; None when none of ours was there."""
    if not gauges:
        return None
    running = [v for k, v in gauges.items() if GAUGES[k]]
    waiting = [v for k, v in gauges.items() if not GAUGES[k]]
    return ServerLoad(
        running=sum(running) if running else None,
        waiting=sum(waiting) if waiting else None,
        at=at,
        own_in_flight=own_in_flight,
        source=source,
    )
