"""Hostile sizes over real sockets, each call in a child process so its memory is its own.

A server may send a 2 GiB reply, a 2 GiB error body, or a stream that never ends. The client
holds at most ``Limits.max_response_bytes`` (64 MiB) of a reply and ``max_error_bytes`` of an
error body, and a stream costs counts and timings (a few bytes a chunk), not its text.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hostile import HostileServer
from tests.realservers.fixtures import HOSTILE, report_line

GIB = 1024**3
PIECE = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]
_LINE = (
    b'{"model":"m","created_at":"2024-01-01T00:00:00Z",'
    b'"message":{"role":"assistant","content":"token "},"done":false}\n'
)


def _head(status: int, content_type: str, length: int | None = None) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Type: {content_type}", "Connection: close"]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _listing(path: str) -> bytes | None:
    if path.startswith("/api/tags") or path.startswith("/api/ps"):
        body = b'{"models": []}'
        return _head(200, "application/json", len(body)) + body
    return None


def two_gib(status: int, *, declared: bool) -> Iterator[bytes]:
    """A 2 GiB body of spaces (valid JSON whitespace), with or without Content-Length."""
    yield _head(status, "application/json", 2 * GIB if declared else None)
    piece = b" " * PIECE
    for _ in range(2 * GIB // PIECE):
        yield piece


def endless_stream() -> Iterator[bytes]:
    yield _head(200, "application/x-ndjson")
    piece = _LINE * 2000
    while True:
        yield piece


CASES = {
    "declared-2gib": lambda: two_gib(200, declared=True),
    "undeclared-2gib": lambda: two_gib(200, declared=False),
    "error-2gib": lambda: two_gib(500, declared=False),
    "stream": endless_stream,
}


def run_child(case: str, client: str, seconds: float = 0.0) -> dict[str, object]:
    make = CASES["stream" if case == "stream" else case]

    def respond(method: str, path: str) -> bytes | Iterator[bytes]:
        return _listing(path) or make()

    with HostileServer(respond) as server:
        command = [sys.executable, "-m", "tests.integration._memory_child", server.url, case,
                   client, str(seconds)]  # fmt: skip
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    chunks = f", {result['chunks']} chunks" if result.get("chunks") else ""
    report_line(
        f"{case} [{client}]: {result['error'] or 'no error'}{chunks}, "
        f"child RSS +{result['growth_mib']:.1f} MiB",
        HOSTILE,
    )
    return result


@pytest.mark.parametrize("client", ["async", "sync"])
@pytest.mark.parametrize("case", ["declared-2gib", "undeclared-2gib"])
def test_two_gib_reply_is_a_protocol_error_in_bounded_memory(case: str, client: str) -> None:
    result = run_child(case, client)
    assert result["error"] == "ProtocolError", result
    assert "larger than" in str(result["message"]), result
    assert isinstance(result["growth_mib"], float) and result["growth_mib"] < 100, result


@pytest.mark.parametrize("client", ["async", "sync"])
def test_two_gib_error_body_is_read_only_up_to_its_cap(client: str) -> None:
    result = run_child("error-2gib", client)
    assert result["error"] == "ServerError", result
    assert isinstance(result["growth_mib"], float) and result["growth_mib"] < 100, result


@pytest.mark.slow
@pytest.mark.parametrize("client", ["async", "sync"])
def test_endless_fast_stream_costs_a_few_bytes_a_chunk(client: str) -> None:
    result = run_child("stream", client, seconds=25.0)
    assert result["error"] is None, result
    chunks = result["chunks"]
    assert isinstance(chunks, int) and chunks > 10_000, result
    assert isinstance(result["growth_mib"], float) and result["growth_mib"] < 50, result
