"""Real inference servers for the test suite (not part of the library): llama.cpp's
``llama-server`` and vLLM on CPU, started on free loopback ports with tiny generated models.

Pytest fixtures live in ``tests.realservers.fixtures`` (load it with ``pytest_plugins``); the
two fixture factories are re-exported here. The classes also work outside pytest::

    from tests.realservers import LlamaServer, find_llama_server, make_tiny_gguf

    with LlamaServer(make_tiny_gguf(tmp / "tiny.gguf"), log_path=tmp / "log") as server:
        httpx.get(server.url + "/v1/models")
"""

from ._process import (
    RealServerUnavailable,
    ServerProcess,
    cache_root,
    free_port,
    group_members,
)
from .fixtures import (
    LLAMA_API_KEY,
    llama_server_factory,
    unavailable,
    vllm_server_factory,
)
from .llama_server import LlamaServer, find_llama_server, make_tiny_gguf
from .vllm_server import (
    VLLM_REQUIREMENT,
    VLLMServer,
    ensure_tiny_hf_model,
    ensure_vllm_venv,
    vllm_venv_dir,
)

__all__ = [
    "LLAMA_API_KEY",
    "VLLM_REQUIREMENT",
    "LlamaServer",
    "RealServerUnavailable",
    "ServerProcess",
    "VLLMServer",
    "cache_root",
    "ensure_tiny_hf_model",
    "ensure_vllm_venv",
    "find_llama_server",
    "free_port",
    "group_members",
    "llama_server_factory",
    "make_tiny_gguf",
    "unavailable",
    "vllm_server_factory",
    "vllm_venv_dir",
]
