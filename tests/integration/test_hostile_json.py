"""JSON nested far deeper than any reply needs, from a real socket, in both clients.

``json.loads`` gives up on such input with a RecursionError, not a ValueError. Every place that
reads a server's JSON (replies, stream lines, error bodies, protocol detection, model lists at
start-up) must turn it into a typed error or a failed probe: start-up and close still work,
and the call ends in a ``SharedOllamaError`` that is recorded as an error, not as cancelled.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from shared_ollama import (
    Endpoint,
    NoEndpointAvailable,
    ProtocolError,
    ServerError,
    SharedOllamaError,
    Timeouts,
)
from shared_ollama.records import CallRecord
from tests.hostile import HostileServer, http_reply

DEEP = b"[" * 100_000 + b"]" * 100_000
DEEP_OBJECT = b'{"a":' * 100_000 + b"1" + b"}" * 100_000
MESSAGES = [{"role": "user", "content": "hi"}]


def deep_everywhere(method: str, path: str) -> bytes:
    return http_reply(200, DEEP)


@pytest.mark.parametrize("kind", ["ollama", "openai", "tgi", "auto"])
async def test_deep_json_everywhere_is_a_typed_error(make_driver: Any, kind: str) -> None:
    records: list[CallRecord] = []
    timeouts = Timeouts(connect_s=2, first_chunk_s=10, between_chunks_s=10, total_s=30,
                        no_endpoint_s=0.2)  # fmt: skip
    with HostileServer(deep_everywhere) as server:
        endpoint = Endpoint(server.url, kind=kind, models={"m": "m"})  # type: ignore[arg-type]
        # Start-up reads the model list (and, for "auto", the detection probes): deep JSON
        # there is a failed probe, not an exception out of start().
        async with make_driver([endpoint], listeners=[records.append], timeouts=timeouts) as d:
            with pytest.raises(SharedOllamaError) as info:
                await d.call("chat", model="m", messages=MESSAGES)
            assert not isinstance(info.value, RecursionError)
            if kind != "auto":
                assert isinstance(info.value, ProtocolError) or isinstance(
                    info.value.__cause__, ProtocolError
                ), repr(info.value)
            with pytest.raises(NoEndpointAvailable) as listing:
                await d.call("list")
            assert "nested too deeply" in str(listing.value) or kind == "auto"
        # Closed without raising (the context manager above), and the call was accounted.
    assert records and records[0].outcome == "error", [r.outcome for r in records]


@pytest.mark.parametrize("body", [DEEP, DEEP_OBJECT], ids=["array", "object"])
async def test_deep_json_error_body_keeps_the_status(make_driver: Any, body: bytes) -> None:
    def respond(method: str, path: str) -> bytes:
        if path.startswith("/api/tags") or path.startswith("/api/ps"):
            return http_reply(200, b'{"models": []}')
        return http_reply(500, body)

    with HostileServer(respond) as server:
        endpoint = Endpoint(server.url, kind="ollama", models={"m": "m"})
        async with make_driver([endpoint]) as d:
            with pytest.raises(ServerError) as info:
                await d.call("chat", model="m", messages=MESSAGES)
    assert info.value.status_code == 500
    assert len(info.value.server_message or "") <= 1000


async def test_deep_json_stream_line_is_a_typed_error(make_driver: Any) -> None:
    line = b'{"model":"m","created_at":"2024-01-01T00:00:00Z","message":{"role":"assistant",'
    line += b'"content":"hi"},"done":false}\n'

    def respond(method: str, path: str) -> bytes:
        if path.startswith("/api/tags"):
            return http_reply(200, b'{"models": []}')
        return http_reply(200, line + DEEP + b"\n", content_type="application/x-ndjson")

    with HostileServer(respond) as server:
        endpoint = Endpoint(server.url, kind="ollama", models={"m": "m"})
        async with make_driver([endpoint]) as d:
            chunks, error = await d.stream_collect("chat", model="m", messages=MESSAGES)
    assert [c.message.content for c in chunks] == ["hi"]
    assert isinstance(error, SharedOllamaError), repr(error)


async def test_auto_endpoint_that_never_identifies_itself_is_waited_out_briefly(
    make_driver: Any,
) -> None:
    """A pool whose only endpoint was never detected answers in ``no_endpoint_s``."""
    timeouts = Timeouts(connect_s=2, first_chunk_s=10, between_chunks_s=10, total_s=120,
                        no_endpoint_s=0.5)  # fmt: skip
    with HostileServer(deep_everywhere) as server:
        async with make_driver([Endpoint(server.url)], timeouts=timeouts) as d:
            started = time.monotonic()
            with pytest.raises(NoEndpointAvailable) as info:
                await d.call("chat", model="m", messages=MESSAGES)
            elapsed = time.monotonic() - started
    assert "protocol not detected" in str(info.value)
    assert elapsed < timeouts.total_s / 10  # the short wait, not the call's deadline


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirect_is_a_typed_error_not_a_success(make_driver: Any, status: int) -> None:
    """A 3xx is never followed (it would carry the body and key elsewhere) and never parsed
    as an answer: a ProtocolError naming where it pointed, without its query string."""

    def respond(method: str, path: str) -> bytes:
        if path.startswith("/api/tags"):
            return http_reply(200, b'{"models": []}')
        target = {"Location": "https://elsewhere.example/api/chat?token=s3cret"}
        return http_reply(status, b"", headers=target)

    with HostileServer(respond) as server:
        endpoint = Endpoint(server.url, kind="ollama", models={"m": "m"})
        async with make_driver([endpoint]) as d:
            with pytest.raises(ProtocolError) as info:
                await d.call("chat", model="m", messages=MESSAGES)
            _, error = await d.stream_collect("chat", model="m", messages=MESSAGES)
    assert info.value.status_code == status
    assert "redirect refused" in str(info.value)
    assert "elsewhere.example/api/chat" in str(info.value)
    assert "s3cret" not in str(info.value)
    assert isinstance(error, ProtocolError) and error.status_code == status


async def test_garbled_reply_is_sent_once_per_attempt(make_driver: Any) -> None:
    """A reply that is not HTTP at all is retried by the policy, one request per attempt; only
    a connection the server closed without a word is re-sent for free (a stale keep-alive)."""

    def respond(method: str, path: str) -> bytes:
        if path.startswith("/api/tags"):
            return http_reply(200, b'{"models": []}')
        return b"GARBAGE NOT HTTP\r\n\r\n"

    with HostileServer(respond) as server:
        endpoint = Endpoint(server.url, kind="ollama", models={"m": "m"})
        async with make_driver([endpoint]) as d:
            with pytest.raises(SharedOllamaError) as info:
                await d.call("chat", model="m", messages=MESSAGES)
        sent = [p for _, p in server.requests if p == "/api/chat"]
    assert info.value.attempts == 3, repr(info.value)
    assert len(sent) == 3, sent


async def test_a_server_echoing_the_key_does_not_leak_it(make_driver: Any) -> None:
    key = "sk-echoed-secret-4711"
    records: list[CallRecord] = []

    def respond(method: str, path: str) -> bytes:
        if path.startswith("/v1/models"):
            return http_reply(200, b'{"object": "list", "data": []}')
        body = b'{"error": {"message": "Incorrect API key provided: ' + key.encode() + b'"}}'
        return http_reply(401, body)

    with HostileServer(respond) as server:
        endpoint = Endpoint(server.url, kind="openai", api_key=key, models={"m": "m"})
        async with make_driver([endpoint], listeners=[records.append]) as d:
            with pytest.raises(SharedOllamaError) as info:
                await d.call("chat", model="m", messages=MESSAGES)
            status = d.client.pool_status()
    assert "Incorrect API key provided: ***" in str(info.value)
    shown = [str(info.value), repr(info.value), str(info.value.server_message)]
    shown += [str(r.error_message) for r in records] + [repr(s) for s in status]
    assert all(key not in text for text in shown), shown


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://user:hunter2@gpu-a:11434", "credentials in api_key"),
        ("http://gpu-a:11434/?api_key=hunter2", "no query string"),
        ("gpu-a:11434", "http(s)://host"),
    ],
)
def test_a_bad_endpoint_is_a_config_error_that_never_echoes_it(url: str, why: str) -> None:
    from shared_ollama import ConfigError

    with pytest.raises(ConfigError) as info:
        Endpoint(url)
    assert why in str(info.value)
    assert "hunter2" not in str(info.value) and "hunter2" not in repr(info.value)


def test_the_status_cli_answers_a_bad_endpoint_with_one_line() -> None:
    import subprocess
    import sys

    for url in ("gpu-a:11434", "http://user:hunter2@gpu-a:11434"):
        done = subprocess.run(
            [sys.executable, "-m", "shared_ollama", "status", "--endpoint", url],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("error: invalid endpoint: url:"), done.stderr
        assert "Traceback" not in done.stderr and "hunter2" not in done.stderr
        assert done.stderr.count("\n") == 1 and "hunter2" not in done.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--endpoint", "http://user:hunter2@gpu-a:11434"],
        ["--endpoint", "gpu-a:11434"],
        ["--endpoint", "http://gpu-a:11434/?api_key=hunter2"],
    ],
)
def test_the_bench_cli_answers_bad_input_with_one_line(args: list[str]) -> None:
    import subprocess
    import sys

    done = subprocess.run(
        [sys.executable, "-m", "shared_ollama.bench", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: invalid scenario"), done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    assert "hunter2" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("how", "value"),
    [
        ("env", "http://user:hunter2@gpu-a:11434"),
        ("env", "http://gpu-a:11434/?token=hunter2"),
        ("toml", '[[endpoints]]\nurl = "http://gpu-a:11434/?key=hunter2"\n'),
        ("toml", '[[endpoints]]\nurl = "http://a:1"\nmax_in_flight = "hunter2"\n'),
        ("toml", "[[endpoints]\nurl = 'hunter2'\n"),
    ],
)
def test_bad_config_from_env_or_toml_is_one_line_without_the_secret(
    how: str, value: str, tmp_path: Path
) -> None:
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if not k.startswith("SHARED_OLLAMA_")}
    args = [sys.executable, "-m", "shared_ollama", "status"]
    if how == "env":
        env["SHARED_OLLAMA_ENDPOINTS"] = value
    else:
        pool = tmp_path / "pool.toml"
        pool.write_text(value)
        args += ["--config", str(pool)]
    done = subprocess.run(args, capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert done.stderr.startswith("error: ") and done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr and "hunter2" not in done.stderr + done.stdout
