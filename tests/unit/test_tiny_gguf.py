"""The generated test model: its shape is what the GGUF header and tensors say, and the
default is the tests' tiny model, byte for byte the same every time."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from tests.realservers.llama_server import TINY, ModelShape, make_tiny_gguf

gguf = pytest.importorskip("gguf")


def _read(path: Path) -> tuple[dict[str, int], dict[str, tuple[int, ...]]]:
    reader = gguf.GGUFReader(str(path))
    keys = ("embedding_length", "block_count", "feed_forward_length", "attention.head_count")
    header = {key: int(reader.fields[f"llama.{key}"].contents()) for key in keys}
    tensors = {t.name: tuple(int(n) for n in t.shape) for t in reader.tensors}
    return header, tensors


def test_default_shape_is_the_tiny_model_and_deterministic(tmp_path: Path) -> None:
    first = make_tiny_gguf(tmp_path / "a.gguf", emit="letters")
    again = make_tiny_gguf(tmp_path / "b.gguf", emit="letters", shape=ModelShape())
    assert (
        hashlib.sha256(first.read_bytes()).digest() == hashlib.sha256(again.read_bytes()).digest()
    )
    header, tensors = _read(first)
    assert header == {
        "embedding_length": TINY.embd,
        "block_count": TINY.layers,
        "feed_forward_length": TINY.ff,
        "attention.head_count": TINY.heads,
    }
    assert sum(name.startswith("blk.") and name.endswith("ffn_up.weight") for name in tensors) == 2


def test_a_wider_shape_is_written_as_declared(tmp_path: Path) -> None:
    shape = ModelShape(embd=128, heads=2, layers=3, ff=384)
    header, tensors = _read(make_tiny_gguf(tmp_path / "wide.gguf", emit="letters", shape=shape))
    assert header == {
        "embedding_length": 128,
        "block_count": 3,
        "feed_forward_length": 384,
        "attention.head_count": 2,
    }
    # GGUF lists dimensions innermost first: ffn_up maps the width to the feed-forward.
    assert tensors["blk.2.ffn_up.weight"] == (128, 384)
    assert tensors["blk.2.attn_q.weight"] == (128, 128)
    assert "blk.3.attn_q.weight" not in tensors
    assert shape.label == "128x3 ff384"
