"""Pytest fixtures that start the real servers (llama.cpp ``llama-server`` and vLLM on CPU) once
per session on free loopback ports. Load with ``pytest_plugins = ["tests.realservers.fixtures"]``.

A server that cannot be installed, found or started skips its tests with a loud reason (and a
warning in the summary); with ``CI=true`` it fails them instead, so CI never skips silently.
Tests that use these fixtures are marked ``realserver`` + ``llamacpp``/``vllm`` automatically and
get a longer timeout (the first run builds llama-server and installs vLLM into its own venv),
and they run with the test process on the client CPUs of the placement policy (``_process.py``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import pytest

from ._process import RealServerUnavailable, ServerProcess, client_cpus, pinned
from .llama_server import LlamaServer, find_llama_server, make_tiny_gguf
from .vllm_server import VLLMServer, ensure_tiny_hf_model, ensure_vllm_venv

__all__ = [
    "DROP_TRIES",
    "LLAMA_API_KEY",
    "RealServerWarning",
    "pytest_collection_modifyitems",
    "pytest_terminal_summary",
    "report_line",
    "pytest_runtest_makereport",
    "llama_server",
    "llama_server_binary",
    "llama_server_factory",
    "llama_server_keyed",
    "tiny_gguf",
    "tiny_hf_model",
    "unavailable",
    "vllm_python",
    "vllm_server",
    "vllm_server_factory",
]

LLAMA_API_KEY = "sk-test-secret"
# The first vLLM test may create the venv (~95 s here, longer on a cold pip cache) and start the
# server (~30 s), all inside that test's setup: more than the project's default 300 s allows.
VLLM_TEST_TIMEOUT_S = 1200
# The first llama.cpp test may build llama-server from source (10-15 min on 2 cores).
LLAMA_TEST_TIMEOUT_S = 3600

_LLAMA_FIXTURES = frozenset(
    {"llama_server", "llama_server_keyed", "llama_server_factory", "llama_server_binary"}
)
_VLLM_FIXTURES = frozenset({"vllm_server", "vllm_server_factory", "vllm_python", "tiny_hf_model"})

T = TypeVar("T")


class RealServerWarning(UserWarning):
    """A real server was unavailable and its tests were skipped."""


def unavailable(reason: str) -> NoReturn:
    """Skip loudly, or fail when ``CI=true`` (CI must run the real servers, not skip them)."""
    message = f"REAL SERVER UNAVAILABLE: {reason}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}\n(CI=true: failing instead of skipping)", pytrace=False)
    warnings.warn(message, RealServerWarning, stacklevel=2)
    pytest.skip(message)


#: Tries at catching a vLLM request mid-generation before dropping its client (see the tests).
DROP_TRIES = 10


_REPORT: dict[str, list[str]] = {}
#: The summary section of the figures the hostile-server tests measured.
HOSTILE = "hostile servers"


def report_line(line: str, section: str = "real servers") -> None:
    """A fact measured in this run (real servers, hostile servers), printed in pytest's
    closing summary under ``section``."""
    _REPORT.setdefault(section, []).append(line)


def _or_unavailable(make: Callable[[], T]) -> T:
    try:
        return make()
    except RealServerUnavailable as exc:
        unavailable(str(exc))


# -- hooks -----------------------------------------------------------------------------------


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # tryfirst: the markers must be in place before `-m` deselects.
    has_timeout = config.pluginmanager.hasplugin("timeout")
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        timeout = 0
        if names & _LLAMA_FIXTURES:
            item.add_marker(pytest.mark.realserver)
            item.add_marker(pytest.mark.llamacpp)
            timeout += LLAMA_TEST_TIMEOUT_S
        if names & _VLLM_FIXTURES:
            item.add_marker(pytest.mark.realserver)
            item.add_marker(pytest.mark.vllm)
            timeout += VLLM_TEST_TIMEOUT_S
        if timeout and has_timeout and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(timeout))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for section, lines in _REPORT.items():
        terminalreporter.section(section)
        for line in lines:
            terminalreporter.line(line)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed:
        funcargs: dict[str, object] = getattr(item, "funcargs", {})
        for name, value in funcargs.items():
            if isinstance(value, ServerProcess):
                report.sections.append((f"{name} log ({value.log_path})", value.log_text(6000)))
    return report


@pytest.fixture(autouse=True)
def _client_placement(request: pytest.FixtureRequest) -> Iterator[None]:
    """Real-server tests run their client on the policy's client CPUs, servers on the rest."""
    if request.node.get_closest_marker("realserver") is None:
        yield
        return
    with pinned(client_cpus()):
        yield


# -- llama.cpp ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """The portable llama-server binary (built from source once per machine, 10-15 min)."""
    return _or_unavailable(find_llama_server)


@pytest.fixture(scope="session")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-weight Llama GGUF (0.55 MB), written once per session (~0.1 s)."""
    return make_tiny_gguf(tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.gguf")


S = TypeVar("S", bound=ServerProcess)


def _started(server: S) -> S:
    try:
        return server.start()
    except RealServerUnavailable as exc:
        unavailable(str(exc))


def _private_servers(build: Callable[[int, dict[str, Any]], S]) -> Iterator[Callable[..., S]]:
    """A factory fixture's body: ``make(**kw)`` builds and starts a server; all are stopped
    when the test ends (also the one whose start failed)."""
    servers: list[S] = []

    def make(**kwargs: Any) -> S:
        server = build(len(servers), kwargs)
        servers.append(server)
        return _started(server)

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


@pytest.fixture(scope="session")
def llama_server(
    llama_server_binary: Path, tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    """A running llama-server (model ``tiny-llama``, no auth); ``.url`` has no ``/v1``."""
    logs = tmp_path_factory.mktemp("llama-server")
    server = LlamaServer(tiny_gguf, binary=llama_server_binary, log_path=logs / "server.log")
    _started(server)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def llama_server_keyed(
    llama_server_binary: Path, tiny_gguf: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    """A running llama-server that wants ``Authorization: Bearer sk-test-secret``."""
    logs = tmp_path_factory.mktemp("llama-server-keyed")
    server = LlamaServer(
        tiny_gguf,
        binary=llama_server_binary,
        log_path=logs / "server.log",
        api_key=LLAMA_API_KEY,
    )
    _started(server)
    yield server
    server.stop()


@pytest.fixture
def llama_server_factory(
    llama_server_binary: Path, tiny_gguf: Path, tmp_path: Path
) -> Iterator[Callable[..., LlamaServer]]:
    """Start private llama-servers (to kill, restart, fail over): ``make(api_key=None, **kw)``.

    Each is started on its own free port and stopped when the test ends.
    """
    yield from _private_servers(
        lambda i, kw: LlamaServer(
            tiny_gguf,
            binary=llama_server_binary,
            log_path=tmp_path / f"llama-server-{i}.log",
            **kw,
        )
    )


# -- vLLM --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The python of the cached vLLM venv (created on first use, ~95 s)."""
    return _or_unavailable(ensure_vllm_venv)


@pytest.fixture(scope="session")
def tiny_hf_model(vllm_python: Path) -> Path:
    """The tiny HF Llama directory for vLLM (cached by script hash, ~5 s to make)."""
    return _or_unavailable(lambda: ensure_tiny_hf_model(vllm_python))


@pytest.fixture(scope="session")
def vllm_server(
    vllm_python: Path, tiny_hf_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[VLLMServer]:
    """A running vLLM OpenAI server on CPU (model ``tiny-llama``, ~30 s to start)."""
    logs = tmp_path_factory.mktemp("vllm")
    server = VLLMServer(tiny_hf_model, python=vllm_python, log_path=logs / "server.log")
    _started(server)
    yield server
    server.stop()


@pytest.fixture
def vllm_server_factory(
    vllm_python: Path, tiny_hf_model: Path, tmp_path: Path
) -> Iterator[Callable[..., VLLMServer]]:
    """Start private vLLM servers: ``make(omp_threads_bind="auto", **kw)``; ~30 s each, about
    2.7 GB of RAM each; pin two at once to "0" and "1". Stopped when the test ends."""
    yield from _private_servers(
        lambda i, kw: VLLMServer(
            tiny_hf_model, python=vllm_python, log_path=tmp_path / f"vllm-{i}.log", **kw
        )
    )
