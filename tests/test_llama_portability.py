"""The llama-server the suite builds runs on every x86-64 CPU, not only on the one it was built on.

It is built with runtime CPU dispatch: one ``libggml-cpu-<variant>.so`` per x86-64 level, the
best one chosen when the server starts. A machine without AVX-512 cannot be conjured here, but
the baseline it would fall back to can: with only the ``x64`` variant present (plain x86-64, no
AVX at all) the server must still load the model and answer. Which variant a running server
mapped is read from ``/proc/PID/maps`` and shown in the session summary.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import httpx

from tests.realservers import LlamaServer
from tests.realservers.fixtures import report_line
from tests.realservers.llama_server import cpu_variants

BASELINE = "libggml-cpu-x64.so"


def _check_server(url: str) -> None:
    """Chat (streamed and not), embeddings and /metrics: what the suite relies on."""
    with httpx.Client(base_url=url, timeout=60) as client:
        body = {"model": "tiny-llama", "messages": [{"role": "user", "content": "hi"}]}
        reply = client.post("/v1/chat/completions", json={**body, "max_tokens": 8})
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 8
        with client.stream(
            "POST", "/v1/chat/completions", json={**body, "max_tokens": 4, "stream": True}
        ) as stream:
            assert stream.status_code == 200
            data = [line for line in stream.iter_lines() if line.startswith("data: ")]
        assert data[-1] == "data: [DONE]" and len(data) >= 5
        embedded = client.post("/v1/embeddings", json={"model": "tiny-llama", "input": ["fox"]})
        assert embedded.status_code == 200, embedded.text
        assert len(embedded.json()["data"][0]["embedding"]) == 64
        assert "llamacpp:" in client.get("/metrics").text


def test_running_server_maps_exactly_one_cpu_variant(llama_server: LlamaServer) -> None:
    assert llama_server.pid is not None
    variants = cpu_variants(llama_server.pid)
    report_line(f"llama-server chose CPU variant {variants} on this machine")
    assert len(variants) == 1, variants


def test_server_runs_on_the_baseline_x64_variant_alone(
    llama_server_binary: Path, tiny_gguf: Path, tmp_path: Path
) -> None:
    source = llama_server_binary.parent
    shipped = sorted(lib.name for lib in source.glob("libggml-cpu-*.so"))
    # A portable build carries the baseline and several dispatch levels.
    assert BASELINE in shipped and len(shipped) >= 4, shipped
    only = tmp_path / "bin"
    # A copy, not links: ggml looks for its backends beside the executable's real path.
    shutil.copytree(source, only, symlinks=True)
    for lib in only.glob("libggml-cpu-*.so"):
        if lib.name != BASELINE:
            lib.unlink()
    server = LlamaServer(tiny_gguf, binary=only / llama_server_binary.name,
                         log_path=tmp_path / "server.log")  # fmt: skip
    with server:
        assert server.pid is not None
        variants = cpu_variants(server.pid)
        report_line(f"llama-server with only {BASELINE} present mapped {variants}")
        assert variants == ["x64"]
        _check_server(server.url)
