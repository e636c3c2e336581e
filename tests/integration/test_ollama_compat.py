"""Moving from the official ``ollama`` client is an import change.

Each idiom below is plain ollama-python code, written once against a module ``lib``; it
runs with ``lib = ollama`` and with ``lib = shared_ollama`` against the same Ollama
FakeEngine, and the two outcomes must match. The same idioms then run through
``shared_ollama`` against the OpenAI-compatible and TGI FakeEngines, where ollama itself
cannot go, with the official package's own request types as inputs.
"""

from __future__ import annotations

import asyncio
import datetime
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import ollama
import pytest

import shared_ollama
import shared_ollama.compat
from shared_ollama.testing import FakeEngine
from tests.conftest import FAST, MODEL

PROMPT = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(autouse=True)
def _released(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[None]:
    """ollama-style code never closes its clients: close them after each test (their ledger
    writer threads would outlive it), and keep their records out of the user's ledger."""
    monkeypatch.setenv("SHARED_OLLAMA_LEDGER", str(tmp_path / "usage.db"))
    made: list[Any] = []
    for cls in (shared_ollama.Client, shared_ollama.AsyncClient):
        init = cls.__init__

        def record(self: Any, *args: Any, __init: Any = init, **kwargs: Any) -> None:
            __init(self, *args, **kwargs)
            made.append(self)

        monkeypatch.setattr(cls, "__init__", record)
    yield
    for client in made:
        if isinstance(client, shared_ollama.SyncSharedClient):
            client.close()
        else:  # its event loop has ended: stop what outlives it, the ledger's writer
            client.usage.close()


@pytest.fixture(scope="module")
def ollama_engine() -> Iterator[FakeEngine]:
    with FakeEngine(kind="ollama", models=(MODEL,), timing=FAST, slots=8) as eng:
        yield eng


def get_weather(city: str, unit: str | None = None) -> str:
    """Get the current weather for a city.

    Args:
        city: The name of the city
        unit: celsius or fahrenheit
    """
    return f"22 degrees in {city}"


# -- the idioms: ollama-python code, unchanged but for the module ----------------------------
def chat_idioms(lib: ModuleType, host: str) -> dict[str, Any]:
    client = lib.Client(host=host)
    r = client.chat(model=MODEL, messages=PROMPT, options={"num_predict": 6})
    return {
        "content": r["message"]["content"],
        "same": r.message.content == r["message"]["content"],
        "done": r.done,
        "done_reason": r.done_reason,
        "eval_count": r.eval_count,
        "eval_count[]": r["eval_count"],
        "get": r.get("eval_count"),
        "in": "eval_count" in r,
        "prompt_eval_count": r.prompt_eval_count,
        "durations": all(
            isinstance(getattr(r, f), int) and getattr(r, f) > 0
            for f in ("total_duration", "eval_duration")
        ),
        "rate": r.eval_count / r.eval_duration * 1e9 > 0,
        "created_at": isinstance(r.created_at, str),
        "missing": r.get("nope", "default"),
    }


def stream_idioms(lib: ModuleType, host: str) -> dict[str, Any]:
    client = lib.Client(host=host)
    parts, last = [], None
    for chunk in client.chat(model=MODEL, messages=PROMPT, stream=True, options={"num_predict": 5}):
        parts.append(chunk["message"]["content"])
        last = chunk
    assert last is not None
    return {"text": "".join(parts), "done": last.done, "eval_count": last.eval_count}


def generate_idioms(lib: ModuleType, host: str) -> dict[str, Any]:
    client = lib.Client(host=host)
    r = client.generate(model=MODEL, prompt="Once upon a time", options={"num_predict": 4})
    streamed = "".join(
        c["response"]
        for c in client.generate(
            model=MODEL, prompt="Once", stream=True, options={"num_predict": 3}
        )
    )
    return {"response": r["response"], "eval_count": r.eval_count, "streamed": streamed}


def typed_input_idioms(lib: ModuleType, host: str) -> dict[str, Any]:
    """The official package's own request types, passed to either client."""
    client = lib.Client(host=host)
    r = client.chat(
        model=MODEL,
        messages=[ollama.Message(role="user", content="Why is the sky blue?")],
        options=ollama.Options(num_predict=4, temperature=0.0),
        tools=[get_weather],
    )
    return {"content": r.message.content, "eval_count": r.eval_count}


def embed_and_list_idioms(lib: ModuleType, host: str) -> dict[str, Any]:
    client = lib.Client(host=host)
    e = client.embed(model=MODEL, input=["one", "two"])
    listed = client.list()
    first = listed.models[0]
    loaded = client.ps()
    return {
        "vectors": len(e.embeddings),
        "dims": len(e["embeddings"][0]),
        "model": first.model,
        "family": first.details.family,
        "modified_at": isinstance(first.modified_at, datetime.datetime | None),
        "ps": [m.model for m in loaded.models],
    }


def error_idioms(lib: ModuleType, host: str) -> dict[str, Any]:
    client = lib.Client(host=host)
    try:
        client.chat(model="no-such-model", messages=PROMPT)
    except lib.ResponseError as e:
        return {"caught": True, "status": e.status_code, "has_error": bool(e.error)}
    return {"caught": False}


def async_idioms(lib: ModuleType, host: str) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        client = lib.AsyncClient(host=host)
        r = await client.chat(model=MODEL, messages=PROMPT, options={"num_predict": 6})
        parts = [
            c["message"]["content"]
            async for c in await client.chat(
                model=MODEL, messages=PROMPT, stream=True, options={"num_predict": 5}
            )
        ]
        return {"content": r.message.content, "eval_count": r.eval_count, "text": "".join(parts)}

    return asyncio.run(run())


def module_level_idioms(lib: ModuleType, host: str) -> dict[str, Any]:
    r = lib.chat(model=MODEL, messages=PROMPT, options={"num_predict": 6})
    return {"content": r["message"]["content"], "eval_count": r["eval_count"]}


def management_idioms(lib: ModuleType, host: str) -> dict[str, Any]:
    client = lib.Client(host=host)
    pulled = client.pull("pulled-model")
    statuses = [p.status for p in client.pull("pulled-model", stream=True)]
    copied = client.copy("pulled-model", "copied-model")
    deleted = client.delete("copied-model")
    legacy = client.embeddings(model=MODEL, prompt="one two")
    return {
        "pull": pulled["status"],
        "stream": (statuses[0], statuses[-1]),
        "copy": copied.status,
        "delete": deleted["status"],
        "embedding": len(legacy["embedding"]) > 0,
    }


IDIOMS: dict[str, Callable[[ModuleType, str], dict[str, Any]]] = {
    "model management": management_idioms,
    "chat": chat_idioms,
    "stream": stream_idioms,
    "generate": generate_idioms,
    "typed input": typed_input_idioms,
    "embed and list": embed_and_list_idioms,
    "ResponseError": error_idioms,
    "AsyncClient": async_idioms,
    "module-level": module_level_idioms,
}


@pytest.fixture
def fresh_default(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The module-level default clients are made anew from ``OLLAMA_HOST``."""
    monkeypatch.setattr(shared_ollama.compat, "_default", None)
    monkeypatch.setattr(ollama, "_client", ollama.Client(), raising=False)
    yield
    default = shared_ollama.compat._default
    if default is not None:
        default.close()


@pytest.mark.parametrize("idiom", list(IDIOMS))
def test_ollama_python_code_runs_unchanged_with_the_same_outcome(
    idiom: str, ollama_engine: FakeEngine, monkeypatch: pytest.MonkeyPatch, fresh_default: None
) -> None:
    host = ollama_engine.url.removeprefix("http://")  # ollama accepts a bare host:port
    monkeypatch.setenv("OLLAMA_HOST", host)
    if idiom == "module-level":
        # ollama's module functions bind their default client at import: rebind to this host.
        for name in ("chat", "generate", "embed", "list", "ps", "show"):
            monkeypatch.setattr(ollama, name, getattr(ollama.Client(host=host), name))
    theirs = IDIOMS[idiom](ollama, host)
    ours = IDIOMS[idiom](shared_ollama, host)
    assert ours == theirs


@pytest.mark.parametrize("source", ["pool file", "endpoints variable", "OLLAMA_HOST"])
def test_the_module_functions_read_the_shared_ollama_settings(
    source: str, ollama_engine: FakeEngine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
    fresh_default: None,
) -> None:  # fmt: skip
    """``shared_ollama.chat(...)`` runs on a default client made from the same settings as
    ``SyncSharedClient.from_config()``: ``SHARED_OLLAMA_CONFIG``'s pool file, or
    ``SHARED_OLLAMA_ENDPOINTS``, with the project from ``SHARED_OLLAMA_PROJECT``; only where
    they name no endpoint does ``OLLAMA_HOST`` give it."""
    for name in ("SHARED_OLLAMA_CONFIG", "SHARED_OLLAMA_ENDPOINTS", "OLLAMA_HOST"):
        monkeypatch.delenv(name, raising=False)
    if source == "pool file":
        pool = tmp_path / "pool.toml"
        pool.write_text(f'project = "from-file"\n[[endpoints]]\nurl = "{ollama_engine.url}"\n')
        monkeypatch.setenv("SHARED_OLLAMA_CONFIG", str(pool))
    elif source == "endpoints variable":
        monkeypatch.setenv("SHARED_OLLAMA_ENDPOINTS", f"{ollama_engine.url}=ollama")
        monkeypatch.setenv("SHARED_OLLAMA_PROJECT", "from-env")
    else:
        monkeypatch.setenv("OLLAMA_HOST", ollama_engine.url.removeprefix("http://"))
        monkeypatch.setenv("SHARED_OLLAMA_PROJECT", "from-env")
    reply = shared_ollama.chat(model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert reply.message.content
    default = shared_ollama.compat._default
    assert default is not None
    assert [e.url for e in default.config.endpoints] == [ollama_engine.url]
    assert default.project == ("from-file" if source == "pool file" else "from-env")


@pytest.mark.parametrize("kind", ["openai", "tgi"])
@pytest.mark.parametrize("idiom", ["chat", "stream", "generate", "typed input", "AsyncClient"])
def test_the_same_idioms_on_other_protocols(kind: str, idiom: str) -> None:
    """Where ollama cannot go: the counters are there, from the server or measured."""
    with FakeEngine(kind=kind, models=(MODEL,), timing=FAST, slots=8) as eng:
        client_cls = shared_ollama.Client

        class Lib:  # the same idioms, with a pool of this kind behind ``Client(host=...)``
            Client = staticmethod(
                lambda host: client_cls(endpoints=[shared_ollama.Endpoint(eng.url, kind=kind)])
            )
            AsyncClient = staticmethod(
                lambda host: shared_ollama.AsyncClient(
                    endpoints=[shared_ollama.Endpoint(eng.url, kind=kind)]
                )
            )
            ResponseError = shared_ollama.ResponseError

        out = IDIOMS[idiom](Lib, eng.url)  # type: ignore[arg-type]
    if "eval_count" in out:
        assert isinstance(out["eval_count"], int) and out["eval_count"] > 0, out
    if idiom == "chat":
        assert out["durations"] and out["rate"] and out["created_at"] and out["in"], out
        assert out["prompt_eval_count"] and out["prompt_eval_count"] > 0, out


# -- against the real llama-server -----------------------------------------------------------
def real_idioms(lib: Any, model: str) -> dict[str, Any]:
    """What the tiny model can serve: chat, streaming, generate, embed, list, options, with
    the official package's own types as inputs."""
    client = lib.Client(host="unused")
    r = client.chat(
        model=model,
        messages=[ollama.Message(role="user", content="hello there")],
        options=ollama.Options(num_predict=6),
    )
    streamed = [
        c
        for c in client.chat(model=model, messages=PROMPT, stream=True, options={"num_predict": 5})
    ]
    g = client.generate(model=model, prompt="Once upon a time", options={"num_predict": 4})
    e = client.embed(model=model, input=["one", "two"])
    return {
        "content": isinstance(r["message"]["content"], str),
        "eval_count": r.eval_count,
        "prompt_eval_count": r.prompt_eval_count is not None and r.prompt_eval_count > 0,
        "rate": r.eval_count / r.eval_duration * 1e9 > 0,
        "server_durations": r.prompt_eval_duration is not None and r.prompt_eval_duration > 0,
        "stream_eval_count": streamed[-1].eval_count,
        "stream_done": streamed[-1]["done"],
        "generate_eval_count": g["eval_count"],
        "vectors": len(e.embeddings),
        "listed": model in [m.model for m in client.list().models],
    }


def test_the_idioms_against_the_real_llama_server(llama_server: Any) -> None:
    class Lib:
        Client = staticmethod(
            lambda host: shared_ollama.Client(
                endpoints=[shared_ollama.Endpoint(llama_server.url, kind="openai")]
            )
        )

    out = real_idioms(Lib, "tiny-llama")
    assert out == {
        "content": True,
        "eval_count": 6,
        "prompt_eval_count": True,
        "rate": True,
        "server_durations": True,  # llama.cpp's own timings
        "stream_eval_count": 5,
        "stream_done": True,
        "generate_eval_count": 4,
        "vectors": 2,
        "listed": True,
    }
