"""Fixtures for the FakeEngine tests: fast timing and engines stopped at teardown."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from shared_ollama.testing import FakeEngine, TimingModel


def fast_timing(**changes: Any) -> TimingModel:
    """Millisecond-scale timing so the suite stays quick."""
    base: dict[str, Any] = {"ttft_base_s": 0.001, "ttft_per_prompt_token_s": 0.0, "itl_s": 0.0005}
    return TimingModel(**{**base, **changes})


EngineFactory = Callable[..., FakeEngine]


@pytest.fixture
def timing() -> Callable[..., TimingModel]:
    """Builds fast timing models; keyword arguments override fields."""
    return fast_timing


@pytest.fixture
def make_engine() -> Iterator[EngineFactory]:
    """Start FakeEngines (fast timing unless given); all are stopped after the test."""
    engines: list[FakeEngine] = []

    def make(kind: str = "ollama", **kwargs: Any) -> FakeEngine:
        kwargs.setdefault("timing", fast_timing())
        engine = FakeEngine(kind, **kwargs)  # type: ignore[arg-type]
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        engine.stop()


@pytest.fixture
def ollama_engine(make_engine: EngineFactory) -> FakeEngine:
    return make_engine("ollama")


@pytest.fixture
def openai_engine(make_engine: EngineFactory) -> FakeEngine:
    return make_engine("openai")


@pytest.fixture
def tgi_engine(make_engine: EngineFactory) -> FakeEngine:
    return make_engine("tgi")
