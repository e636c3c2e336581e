"""Both clients expose the same public methods with the same signatures."""

from __future__ import annotations

import inspect
import typing

import shared_ollama
from shared_ollama import SharedClient, SyncSharedClient

# Paired names follow httpx's rule: the async one is prefixed with "a".
PAIRS = {"aclose": "close", "__aenter__": "__enter__", "__aexit__": "__exit__"}


def public(cls: type) -> dict[str, object]:
    paired = set(PAIRS) | set(PAIRS.values())
    return {n: m for n, m in inspect.getmembers(cls) if not n.startswith("_") or n in paired}


def normalized(sig: inspect.Signature) -> list[tuple[str, object, object]]:
    return [(p.name, p.kind, p.default) for p in sig.parameters.values()]


def test_same_public_methods() -> None:
    async_names = {PAIRS.get(n, n) for n in public(SharedClient)}
    sync_names = set(public(SyncSharedClient))
    assert async_names == sync_names


def test_same_signatures() -> None:
    for name, method in public(SharedClient).items():
        if not callable(method) or name in PAIRS:
            continue
        other = getattr(SyncSharedClient, name)
        assert normalized(inspect.signature(method)) == normalized(inspect.signature(other)), name


def test_same_overloads() -> None:
    for name in ("chat", "generate"):
        a = typing.get_overloads(getattr(SharedClient, name))
        s = typing.get_overloads(getattr(SyncSharedClient, name))
        assert len(a) == len(s) == 2
        for x, y in zip(a, s, strict=True):
            assert normalized(inspect.signature(x)) == normalized(inspect.signature(y))


def test_method_names_follow_the_ollama_client() -> None:
    for name in ("chat", "generate", "embed", "list", "ps", "show"):
        assert callable(getattr(SharedClient, name))
    params = inspect.signature(SharedClient.chat).parameters
    assert list(params)[:3] == ["self", "model", "messages"]
    for arg in ("tools", "stream", "think", "format", "options", "keep_alive"):
        assert arg in params


def test_public_namespace_is_flat() -> None:
    for name in shared_ollama.__all__:
        assert hasattr(shared_ollama, name), name
