"""Images as ollama takes them: bytes, paths, base64 text or ``ollama.Image``, all sent as
base64 text."""

from __future__ import annotations

import base64
from pathlib import Path

import ollama
import pytest

from shared_ollama import InvalidRequest, Message
from shared_ollama._core.requests import generate_op
from shared_ollama.protocols import codec_for
from shared_ollama.types import image_data

PNG = b"\x89PNG\r\n\x1a\n fake image bytes"
B64 = base64.b64encode(PNG).decode()


def test_every_form_of_an_image_becomes_the_same_base64(tmp_path: Path) -> None:
    picture = tmp_path / "cat.png"
    picture.write_bytes(PNG)
    forms = [PNG, bytearray(PNG), picture, str(picture), B64, ollama.Image(value=PNG)]
    assert [image_data(f) for f in forms] == [B64] * len(forms)
    assert image_data("https://example.com/cat.png") == "https://example.com/cat.png"
    assert Message(role="user", content="what is it?", images=[picture, PNG]).images == [B64, B64]


def test_generate_sends_images_as_base64_and_refuses_what_is_not_one(tmp_path: Path) -> None:
    picture = tmp_path / "cat.png"
    picture.write_bytes(PNG)
    op = generate_op("m", "describe", suffix=None, system=None, template=None, context=None,
                     stream=False, think=None, raw=None, format=None, images=[picture, PNG],
                     options=None, keep_alive=None)  # fmt: skip
    wire = op.build(codec_for("ollama"), "m")
    assert wire.json["images"] == [B64, B64]
    with pytest.raises(InvalidRequest, match="images"):
        generate_op("m", "describe", suffix=None, system=None, template=None, context=None,
                    stream=False, think=None, raw=None, format=None, images=[3.14],
                    options=None, keep_alive=None)  # fmt: skip
