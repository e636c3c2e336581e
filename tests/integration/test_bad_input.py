"""Bad call arguments get the same typed error from every endpoint kind, before anything is
sent: the answer must not depend on where the router would have sent the call."""

from __future__ import annotations

from typing import Any

import pytest

from shared_ollama import Endpoint, InvalidRequest
from shared_ollama.testing import FakeEngine
from tests.conftest import MODEL

HI = [{"role": "user", "content": "hi"}]
BAD_CALLS = {
    "message without role": ({"messages": [{"content": "hi"}]}, "messages[0] has no role"),
    "unknown role": (
        {"messages": [{"role": "robot", "content": "hi"}]},
        "messages[0].role 'robot' is not one of assistant, developer, system, tool, user",
    ),
    "num_predict as text": (
        {"messages": HI, "options": {"num_predict": "ten"}},
        "options['num_predict'] must be an integer",
    ),
    "num_predict as bool": (
        {"messages": HI, "options": {"num_predict": True}},
        "options['num_predict'] must be an integer",
    ),
    "temperature as text": (
        {"messages": HI, "options": {"temperature": "hot"}},
        "options['temperature'] must be a number",
    ),
    "stop as number": ({"messages": HI, "options": {"stop": 3}}, "options['stop']"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
async def test_bad_arguments_are_refused_alike_before_sending(
    engine: FakeEngine, make_driver: Any, case: str
) -> None:
    kwargs, message = BAD_CALLS[case]
    async with make_driver([Endpoint(engine.url, kind=engine.kind)]) as d:
        before = engine.stats.total_requests
        with pytest.raises(InvalidRequest) as info:
            await d.call("chat", model=MODEL, **kwargs)
        assert engine.stats.total_requests == before  # nothing was sent
    assert message in str(info.value)


async def test_good_options_still_pass(engine: FakeEngine, make_driver: Any) -> None:
    options = {"num_predict": 3, "temperature": 0, "top_p": 0.9, "stop": ["\n"], "seed": 1}
    async with make_driver([Endpoint(engine.url, kind=engine.kind)]) as d:
        r = await d.call("chat", model=MODEL, messages=HI, options=options)
    assert r.usage.output_tokens == 3


@pytest.mark.parametrize("kwargs", [{"messages": []}, {}], ids=["empty", "omitted"])
async def test_no_messages_loads_the_model_on_ollama_and_is_refused_elsewhere(
    engine: FakeEngine, make_driver: Any, kwargs: dict[str, Any]
) -> None:
    """Ollama's meaning (load, or unload with keep_alive=0; nothing generated) where it is
    honoured; never a reply made up from nothing by an OpenAI-compatible or TGI engine."""
    async with make_driver([Endpoint(engine.url, kind=engine.kind)]) as d:
        before = engine.stats.total_requests
        if engine.kind != "ollama":
            with pytest.raises(InvalidRequest) as info:
                await d.call("chat", model=MODEL, **kwargs)
            assert engine.stats.total_requests == before  # nothing was sent
            assert "no messages" in str(info.value) and "Ollama endpoints only" in str(info.value)
            return
        r = await d.call("chat", model=MODEL, keep_alive=0, **kwargs)
    assert r.message.content == "" and not r.eval_count
