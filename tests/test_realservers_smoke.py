"""Smoke tests of the real servers the suite starts (llama.cpp llama-server, vLLM on CPU), with
plain httpx: they pin the wire behaviour the library's OpenAI-kind code relies on."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.realservers import LlamaServer, VLLMServer, group_members
from tests.realservers.fixtures import DROP_TRIES, LLAMA_API_KEY, report_line

Json = dict[str, Any]


def chat_body(content: str = "Say hello.", **extra: Any) -> Json:
    return {"model": "tiny-llama", "messages": [{"role": "user", "content": content}], **extra}


def sse_events(response: httpx.Response) -> Iterator[Json]:
    """The JSON payloads of an SSE response, up to ``data: [DONE]`` (which must come)."""
    for line in response.iter_lines():
        if not line.startswith("data: "):
            continue
        data = line.removeprefix("data: ")
        if data == "[DONE]":
            return
        yield json.loads(data)
    raise AssertionError("stream ended without data: [DONE]")


def stream_chat(url: str, body: Json, headers: dict[str, str] | None = None) -> list[Json]:
    # A client per stream: llama-server closes the connection after every streamed response
    # while advertising keep-alive, so a pooled connection reused right after a stream can
    # fail with RemoteProtocolError (test_llama_closes_the_connection_after_a_stream).
    with (
        httpx.Client(base_url=url, timeout=60, headers=headers) as client,
        client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response,
    ):
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(sse_events(response))


def metric(text: str, name: str, **labels: str) -> float:
    """The value of the first sample of ``name`` (with ``labels``) in a Prometheus exposition."""
    wanted = [f'{key}="{value}"' for key, value in labels.items()]
    for line in text.splitlines():
        sample = line.startswith(name) and line[len(name)] in " {"
        if sample and all(label in line for label in wanted):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} {labels} not in /metrics")


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)
    return time.monotonic() - started


# -- llama.cpp llama-server ---------------------------------------------------------------------


@pytest.mark.realserver
@pytest.mark.llamacpp
class TestLlamaServer:
    """llama.cpp's llama-server with the tiny GGUF."""

    @pytest.fixture
    def llama(self, llama_server: LlamaServer) -> Iterator[httpx.Client]:
        with httpx.Client(base_url=llama_server.url, timeout=60) as client:
            yield client

    @pytest.mark.parametrize("max_tokens", [1, 16, 64])
    def test_llama_chat_non_stream(self, llama: httpx.Client, max_tokens: int) -> None:
        response = llama.post("/v1/chat/completions", json=chat_body(max_tokens=max_tokens))
        assert response.status_code == 200, response.text
        body = response.json()
        choice = body["choices"][0]
        assert choice["finish_reason"] == "length"  # the tiny model never emits EOS
        assert choice["message"]["role"] == "assistant"
        assert choice["message"]["content"].strip()
        assert choice["message"]["content"].isascii()
        assert body["model"] == "tiny-llama"
        assert body["usage"]["completion_tokens"] == max_tokens
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + max_tokens

    def test_llama_chat_stream_include_usage(self, llama_server: LlamaServer) -> None:
        body = chat_body(max_tokens=8, stream_options={"include_usage": True})
        events = stream_chat(llama_server.url, body)
        deltas = [e for e in events if e["choices"]]
        text = "".join(c["delta"].get("content") or "" for e in deltas for c in e["choices"])
        assert text.strip()
        assert deltas[-1]["choices"][0]["finish_reason"] == "length"
        usage_chunks = [e for e in events if e.get("usage")]
        assert len(usage_chunks) == 1
        assert usage_chunks[0] is events[-1]
        assert usage_chunks[0]["choices"] == []
        assert usage_chunks[0]["usage"]["completion_tokens"] == 8

    def test_llama_stream_without_include_usage_has_no_usage(
        self, llama_server: LlamaServer
    ) -> None:
        events = stream_chat(llama_server.url, chat_body(max_tokens=4))
        assert not any(e.get("usage") for e in events)

    def test_llama_continuous_usage_stats_is_accepted_and_ignored(
        self, llama_server: LlamaServer
    ) -> None:
        options = {"include_usage": True, "continuous_usage_stats": True}
        events = stream_chat(llama_server.url, chat_body(max_tokens=4, stream_options=options))
        # Accepted (200), but usage comes only once, at the end (vLLM sends it on every chunk).
        assert [bool(e.get("usage")) for e in events].count(True) == 1
        assert events[-1]["usage"]["completion_tokens"] == 4

    def test_llama_closes_the_connection_after_a_stream(self, llama_server: LlamaServer) -> None:
        """A wire fact the pool must live with: after a streamed response llama-server closes
        the connection although it said ``Keep-Alive`` and not ``Connection: close``. A pooled
        connection reused at once then fails with httpx.RemoteProtocolError ("Server
        disconnected without sending a response") before the server saw the request: safe to
        retry on a fresh connection. Non-streamed responses keep the connection (up to 100)."""
        payload = json.dumps(chat_body(max_tokens=2, stream=True)).encode()
        request = (
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\n"
            b"Content-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        with socket.create_connection(("127.0.0.1", llama_server.port or 0), timeout=10) as sock:
            sock.sendall(request)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
        head = received.split(b"\r\n\r\n", 1)[0].lower()
        assert b"keep-alive: timeout=" in head
        assert b"connection: close" not in head
        assert received.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")  # then EOF, no timeout

    def test_llama_completions(self, llama: httpx.Client) -> None:
        response = llama.post(
            "/v1/completions", json={"model": "tiny-llama", "prompt": "Hello", "max_tokens": 5}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"].strip()
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 5

    def test_llama_stop_string_gives_finish_reason_stop(self, llama: httpx.Client) -> None:
        body = {"model": "tiny-llama", "prompt": "Hi", "max_tokens": 12, "temperature": 0}
        free = llama.post("/v1/completions", json=body).json()["choices"][0]["text"]
        stop_word = " " + free.split()[4]
        stopped = llama.post("/v1/completions", json={**body, "stop": [stop_word]}).json()
        assert stopped["choices"][0]["finish_reason"] == "stop"
        assert free.startswith(stopped["choices"][0]["text"] + stop_word)

    def test_llama_embeddings(self, llama: httpx.Client) -> None:
        response = llama.post(
            "/v1/embeddings", json={"model": "tiny-llama", "input": ["hello world", "fox"]}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert [item["index"] for item in body["data"]] == [0, 1]
        vectors = [item["embedding"] for item in body["data"]]
        assert all(len(v) == 64 and all(isinstance(x, float) for x in v) for v in vectors)
        assert vectors[0] != vectors[1]
        assert body["usage"]["prompt_tokens"] > 0

    def test_llama_models(self, llama: httpx.Client) -> None:
        response = llama.get("/v1/models")
        assert response.status_code == 200
        body = response.json()
        assert [m["id"] for m in body["data"]] == ["tiny-llama"]
        # llama-server also answers with an Ollama-style "models" list: auto-detection beware.
        assert "models" in body

    def test_llama_metrics(self, llama: httpx.Client) -> None:
        llama.post("/v1/chat/completions", json=chat_body(max_tokens=3)).raise_for_status()
        response = llama.get("/metrics")
        assert response.status_code == 200
        text = response.text
        assert metric(text, "llamacpp:tokens_predicted_total") >= 3
        assert metric(text, "llamacpp:prompt_tokens_total") > 0
        assert metric(text, "llamacpp:requests_processing") >= 0
        assert metric(text, "llamacpp:requests_deferred") >= 0

    def test_llama_api_key(self, llama_server_keyed: LlamaServer) -> None:
        with httpx.Client(base_url=llama_server_keyed.url, timeout=60) as client:
            missing = client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
            assert missing.status_code == 401
            assert "error" in missing.json()
            wrong = client.post(
                "/v1/chat/completions",
                json=chat_body(max_tokens=2),
                headers={"Authorization": "Bearer sk-wrong"},
            )
            assert wrong.status_code == 401
            good = client.post(
                "/v1/chat/completions",
                json=chat_body(max_tokens=2),
                headers={"Authorization": f"Bearer {LLAMA_API_KEY}"},
            )
            assert good.status_code == 200, good.text
            assert client.get("/health").status_code == 200  # health stays public

    def test_llama_many_requests_no_server_errors(self, llama_server: LlamaServer) -> None:
        """Plain text only, whatever the sampling: random weights would otherwise produce invalid
        UTF-8 (HTTP 500) or hit EOS at random."""
        temperatures = [0.0, 0.8, 2.0, 10.0]

        def one(index: int) -> tuple[int, str | None, str]:
            body = chat_body(
                f"request {index}: \u00fc\u4e2d\n<|im_end|>",
                max_tokens=24,
                temperature=temperatures[index % 4],
                top_k=0,
                top_p=1.0,
                min_p=0.0,
            )
            if index % 2:
                events = stream_chat(llama_server.url, body)
                text = "".join(
                    c["delta"].get("content") or "" for e in events for c in e["choices"]
                )
                reasons = [c["finish_reason"] for e in events for c in e["choices"]]
                return 200, reasons[-1], text
            with httpx.Client(base_url=llama_server.url, timeout=60) as client:
                response = client.post("/v1/chat/completions", json=body)
            if response.status_code != 200:
                return response.status_code, None, response.text
            choice = response.json()["choices"][0]
            return 200, choice["finish_reason"], choice["message"]["content"]

        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(one, range(60)))
        assert {status for status, _, _ in results} == {200}, results
        assert {reason for _, reason, _ in results} == {"length"}
        text = "".join(t for _, _, t in results)
        assert set(text) <= set(" abcdefghijklmnopqrstuvwxyz.,!?"), sorted(set(text))

    def test_llama_kill_and_restart_on_same_port(
        self,
        llama_server_factory: Callable[..., LlamaServer],
    ) -> None:
        server = llama_server_factory()
        port, pid = server.port, server.pid
        assert pid is not None
        server.kill()
        assert not server.is_running()
        assert group_members(pid) == []
        with pytest.raises(httpx.ConnectError):
            httpx.get(server.url + "/health", timeout=2)
        server.restart()
        assert server.port == port
        assert httpx.get(server.url + "/health", timeout=5).status_code == 200
        new_pid = server.pid
        assert new_pid is not None
        server.stop()
        assert group_members(new_pid) == []


# -- vLLM on CPU --------------------------------------------------------------------------------


@pytest.mark.realserver
@pytest.mark.vllm
class TestVLLM:
    """vLLM's OpenAI server on CPU with the tiny HF Llama."""

    @pytest.fixture
    def vllm_client(self, vllm_server: VLLMServer) -> Iterator[httpx.Client]:
        with httpx.Client(base_url=vllm_server.url, timeout=120) as client:
            yield client

    @pytest.mark.parametrize("prompt", ["x", "Tell me about the quick brown fox."])
    def test_vllm_chat(self, vllm_client: httpx.Client, prompt: str) -> None:
        # "x" first: a tiny first prompt is what crashed vLLM's AMX attention kernel (see
        # make_tiny_hf_llama.py, head_dim).
        response = vllm_client.post("/v1/chat/completions", json=chat_body(prompt, max_tokens=8))
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == "tiny-llama"
        assert body["choices"][0]["message"]["content"]
        assert body["choices"][0]["finish_reason"] == "length"  # never EOS
        assert body["usage"]["completion_tokens"] == 8

    def test_vllm_completions(self, vllm_client: httpx.Client) -> None:
        response = vllm_client.post(
            "/v1/completions", json={"model": "tiny-llama", "prompt": "Hello", "max_tokens": 6}
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["object"] == "text_completion"
        assert body["choices"][0]["text"]
        assert body["usage"]["completion_tokens"] == 6

    def test_vllm_stream_include_usage(self, vllm_server: VLLMServer) -> None:
        body = chat_body(max_tokens=8, stream_options={"include_usage": True})
        events = stream_chat(vllm_server.url, body)
        usage_chunks = [e for e in events if e.get("usage")]
        assert len(usage_chunks) == 1
        assert usage_chunks[0] is events[-1]
        assert usage_chunks[0]["choices"] == []
        assert usage_chunks[0]["usage"]["completion_tokens"] == 8
        text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
        assert text

    def test_vllm_continuous_usage_stats(self, vllm_server: VLLMServer) -> None:
        options = {"include_usage": True, "continuous_usage_stats": True}
        events = stream_chat(vllm_server.url, chat_body(max_tokens=4, stream_options=options))
        # vLLM puts a running usage on every chunk, the final usage chunk included.
        assert all(e.get("usage") for e in events)
        assert events[-1]["usage"]["completion_tokens"] == 4

    @pytest.mark.parametrize("max_tokens", [1, 17, 100])
    def test_vllm_ignore_eos_gives_exact_token_count(
        self, vllm_client: httpx.Client, max_tokens: int
    ) -> None:
        response = vllm_client.post(
            "/v1/completions",
            json={
                "model": "tiny-llama",
                "prompt": "Count",
                "max_tokens": max_tokens,
                "ignore_eos": True,
                "temperature": 0,
            },
        )
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == max_tokens

    def test_vllm_unknown_model_is_404(self, vllm_client: httpx.Client) -> None:
        response = vllm_client.post("/v1/chat/completions", json={**chat_body(), "model": "nope"})
        assert response.status_code == 404
        assert response.json()["error"]["code"] == 404

    def test_vllm_max_tokens_over_limit_is_400(self, vllm_client: httpx.Client) -> None:
        response = vllm_client.post("/v1/chat/completions", json=chat_body(max_tokens=5000))
        assert response.status_code == 400
        assert "max_tokens" in response.json()["error"]["message"]

    def test_vllm_models(self, vllm_client: httpx.Client) -> None:
        body = vllm_client.get("/v1/models").json()
        assert [m["id"] for m in body["data"]] == ["tiny-llama"]
        assert body["data"][0]["max_model_len"] == 2048

    def test_vllm_dropped_stream_is_aborted(
        self, vllm_server: VLLMServer, vllm_client: httpx.Client
    ) -> None:
        def metrics() -> str:
            return vllm_client.get("/metrics").text

        def running() -> float:
            return metric(metrics(), "vllm:num_requests_running")

        def finished_by_length() -> float:
            return metric(metrics(), "vllm:request_success_total", finished_reason="length")

        def generated() -> float:
            return metric(metrics(), "vllm:generation_tokens_total")

        payload = json.dumps(
            {
                "model": "tiny-llama",
                "prompt": "Go",
                "max_tokens": 2000,  # ~4 s of generation here
                "ignore_eos": True,
                "stream": True,
            }
        ).encode()
        head = (
            f"POST /v1/completions HTTP/1.1\r\nHost: {vllm_server.host}:{vllm_server.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n"
        )
        # The drop is timed by the server's own gauges, not by what reached the client (vLLM
        # has been seen holding a whole stream back until generation ended, docs/engines.md):
        # the client goes away once the server reports the request running and less than half
        # generated. A try that missed that window (it finished first) is made again.
        progress_at_drop = -1.0
        for attempt in range(1, DROP_TRIES + 1):
            wait_until(lambda: running() == 0, 30, "num_requests_running to be 0")
            completed_before = finished_by_length()
            generated_before = generated()
            address = (vllm_server.host, vllm_server.port)
            with socket.create_connection(address, timeout=30) as sock:
                sock.sendall(head.encode() + payload)
                wait_until(
                    lambda done=completed_before: running() == 1 or finished_by_length() > done,
                    30,
                    "the request to run",
                )
                progress_at_drop = generated() - generated_before
                in_flight = running() == 1 and progress_at_drop < 1000
            # The socket is closed here: the client is gone mid-generation.
            if in_flight:
                report_line(
                    f"vLLM raw-socket drop: try {attempt}, dropped at {progress_at_drop:.0f} of "
                    "2000 tokens"
                )
                break
        else:
            pytest.fail(f"no try of {DROP_TRIES} caught the request mid-generation")
        wait_until(lambda: running() == 0, 10, "num_requests_running to return to 0")
        # Aborted, not run to max_tokens (client aborts are not counted as finished_reason="abort").
        assert finished_by_length() == completed_before
        assert generated() - generated_before < 2000
        after = vllm_client.post("/v1/chat/completions", json=chat_body(max_tokens=2))
        assert after.status_code == 200

    @pytest.mark.slow
    def test_vllm_kill_and_restart_on_same_port(
        self,
        vllm_server_factory: Callable[..., VLLMServer],
    ) -> None:
        server = vllm_server_factory()
        port, pid = server.port, server.pid
        assert pid is not None
        server.kill()
        assert group_members(pid) == []
        server.restart()
        assert server.port == port
        response = httpx.post(server.url + "/v1/chat/completions", json=chat_body(max_tokens=2))
        assert response.status_code == 200
        new_pid = server.pid
        assert new_pid is not None
        server.stop()
        assert group_members(new_pid) == []
