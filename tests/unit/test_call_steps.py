"""The call lifecycle in ``_core.steps``, run by a scripted interpreter: no socket, no loop,
no thread and no clock. Time is what the script says it is, so waits and deadlines are
checked to the second without waiting for them."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from shared_ollama import (
    BreakerPolicy,
    ConnectError,
    Endpoint,
    NoEndpointAvailable,
    PoolConfig,
    RetryPolicy,
    ServerError,
    StreamInterrupted,
    Timeouts,
)
from shared_ollama._core import steps
from shared_ollama._core.plan import CallPlan, RetryBudget
from shared_ollama._core.requests import chat_op
from shared_ollama._core.results import CHUNKS
from shared_ollama._core.steps import (
    NOW,
    WALL,
    Close,
    Deliver,
    Gather,
    Head,
    Race,
    Read,
    Send,
    Sleep,
    Steps,
    StreamAbandoned,
)
from shared_ollama.pool import Pool

MESSAGES = [{"role": "user", "content": "hi"}]
ANSWER = {
    "model": "m",
    "message": {"role": "assistant", "content": "hello"},
    "done": True,
    "done_reason": "stop",
    "prompt_eval_count": 3,
    "eval_count": 2,
}


def ndjson(*objs: Any) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


STREAM = [
    ndjson({"model": "m", "message": {"role": "assistant", "content": "hel"}, "done": False}),
    ndjson({"model": "m", "message": {"role": "assistant", "content": "lo"}, "done": False}),
    ndjson({"model": "m", "message": {"role": "assistant", "content": ""}, "done": True,
            "done_reason": "stop", "prompt_eval_count": 3, "eval_count": 2}),
]  # fmt: skip


@dataclass
class Reply:
    """What the scripted server answers one send with: a status and body chunks."""

    status: int = 200
    chunks: list[bytes] = field(default_factory=lambda: [json.dumps(ANSWER).encode()])
    #: Raised at the read after the chunks (a connection cut mid-stream).
    cut: BaseException | None = None


@dataclass
class Script:
    """Performs the operations the steps yield, from a script, on a clock of its own."""

    replies: dict[str, list[Reply | BaseException]]
    #: Seconds each send takes on the script's clock.
    latency: float = 0.01
    now: float = 1000.0
    sent: list[str] = field(default_factory=list)
    slept: list[Sleep] = field(default_factory=list)
    closed: int = 0
    ops: list[Any] = field(default_factory=list)

    def run(self, gen: Steps[Any], value: Any = None, error: BaseException | None = None) -> Any:
        while True:
            try:
                op = gen.send(value) if error is None else gen.throw(error)
            except StopIteration as stop:
                return stop.value
            self.ops.append(op)
            if isinstance(op, Deliver):
                return op
            value, error = None, None
            try:
                value = self.perform(op)
            except BaseException as exc:
                error = exc

    def chunks(self, gen: Steps[None]) -> Iterator[Any]:
        out = self.run(gen)
        while out is not None:
            yield out.chunk
            out = self.run(gen)

    def perform(self, op: Any) -> Any:
        if op is NOW:
            return self.now, int(self.now * 1e9)
        if op is WALL:
            return 0.0
        if isinstance(op, Sleep):
            self.slept.append(op)
            self.now += op.seconds
            return None
        if isinstance(op, Send):
            self.sent.append(op.endpoint.name)
            self.now += self.latency
            reply = self.replies[op.endpoint.name].pop(0)
            if isinstance(reply, BaseException):
                raise reply
            headers = {"content-type": "application/json"}
            return Head(reply.status, headers, [reply, list(reply.chunks)], int(self.now * 1e9))
        if isinstance(op, Read):
            reply, left = op.head.handle
            if op.whole:
                return b"".join(left)
            if left:
                return left.pop(0)
            if reply.cut is not None:
                raise reply.cut
            return None
        if isinstance(op, Close):
            self.closed += 1
            return None
        if isinstance(op, Gather):
            results = []
            for part in op.parts:
                try:
                    results.append(self.run(part))
                except Exception as exc:
                    results.append(exc)
            return results
        if isinstance(op, Race):
            return self.run(op.first)
        raise AssertionError(op)


def make_pool(*names: str, reset_s: float = 60.0, threshold: int = 3, **kw: Any) -> Pool:
    endpoints = [
        Endpoint(f"http://127.0.0.1:{9000 + i}", name=n, kind="ollama", models=["m"], priority=i)
        for i, n in enumerate(names)
    ]
    breaker = BreakerPolicy(failure_threshold=threshold, reset_timeout_s=reset_s)
    cfg = PoolConfig(endpoints=endpoints, strategy="priority", breaker=breaker, **kw)
    return Pool(cfg, rng=random.Random(1))


def make_plan(pool: Pool, now: float, *, stream: bool = False, total: float | None = 30.0,
              retry: RetryPolicy | None = None) -> CallPlan:  # fmt: skip
    policy = retry or RetryPolicy(budget_min=100)
    return CallPlan(pool=pool, budget=RetryBudget(policy), policy=policy,
                    timeouts=pool.config.timeouts, operation="chat", model="m", stream=stream,
                    project="p", request_id="r1", now=now, now_ns=int(now * 1e9),
                    total_timeout=total)  # fmt: skip


def _op(stream: bool = False) -> Any:
    return chat_op("m", MESSAGES, tools=None, stream=stream, think=None, format=None,
                   options=None, keep_alive=None)  # fmt: skip


def call(script: Script, plan: CallPlan, hedging: bool = False) -> Any:
    op = _op()
    return script.run(steps.call(plan, op, {}, hedging))


def test_a_failed_attempt_fails_over_after_a_backoff_sleep() -> None:
    pool = make_pool("a", "b")
    script = Script({"a": [Reply(500, [b'{"error": "boom"}'])], "b": [Reply()]})
    plan = make_plan(pool, script.now)
    parsed = call(script, plan)
    assert parsed.text == "hello"
    assert script.sent == ["a", "b"]
    assert [a.endpoint for a in plan.record.attempts] == [e.url for e in pool.endpoints]
    assert plan.record.attempts[0].status_code == 500
    # One backoff between the attempts, within the policy's first ceiling; no slot wait.
    (backoff,) = script.slept
    assert 0 <= backoff.seconds <= RetryPolicy().backoff_initial_s and not backoff.slot
    assert script.closed == 2  # each reply released
    assert all(not ep.in_flight for ep in pool.endpoints)


def test_a_dead_pool_ends_after_no_endpoint_s_of_the_steps_clock() -> None:
    pool = make_pool("a", "b", timeouts=Timeouts(no_endpoint_s=7.0))
    for ep in pool.endpoints:
        for _ in range(3):
            ep.breaker.record_failure(ServerError("down"), 1000.0)
    script = Script({"a": [], "b": []})
    plan = make_plan(pool, script.now, total=600.0)
    with pytest.raises(NoEndpointAvailable) as err:
        call(script, plan)
    assert type(err.value) is NoEndpointAvailable  # the public error, not the internal wait
    assert set(err.value.reasons) == {"a", "b"}
    assert script.sent == []
    # Waited on the script's clock: 7 s (the no-endpoint bound), not the 600 s deadline.
    assert script.now - 1000.0 == pytest.approx(7.0)
    assert sum(s.seconds for s in script.slept) == pytest.approx(7.0)


def test_the_breaker_runs_on_the_time_the_steps_are_given() -> None:
    """Open at t, refusing until t + reset_timeout_s on the steps' clock, then one probe."""
    pool = make_pool("a", threshold=1, reset_s=10.0)
    script = Script({"a": [Reply(500, [b'{"error": "boom"}']), Reply()]})
    one_try = RetryPolicy(max_attempts=1, budget_min=100)
    with pytest.raises(ServerError):
        call(script, make_plan(pool, script.now, retry=one_try))
    assert pool.endpoints[0].breaker.state == "open"
    opened_at = script.now
    script.now += 4.0
    parsed = call(script, make_plan(pool, script.now))
    assert parsed.text == "hello"
    assert script.sent == ["a", "a"]
    # The second call waited out the 6 s left of the open state, and no more.
    assert script.now - script.latency - opened_at == pytest.approx(10.0, abs=1.0)
    assert pool.endpoints[0].breaker.state == "closed"


def test_a_hedged_call_is_a_race_of_two_attempts() -> None:
    pool = make_pool("a", "b")
    for _ in range(30):
        pool.observe("chat", 0.25)
    script = Script({"a": [Reply()], "b": [Reply()]})
    plan = make_plan(pool, script.now)
    assert call(script, plan, hedging=True).text == "hello"
    (race,) = [op for op in script.ops if isinstance(op, Race)]
    assert race.after == pytest.approx(0.25)
    second = race.second()
    assert next(second) is NOW  # a fresh attempt, routed when it starts
    second.close()


def test_stream_delivers_each_chunk_then_closes() -> None:
    pool = make_pool("a")
    script = Script({"a": [Reply(200, list(STREAM))]})
    plan = make_plan(pool, script.now, stream=True)
    gen = steps.stream(plan, _op(stream=True), {}, CHUNKS["chat"])
    chunks = list(script.chunks(gen))
    assert [c.message.content for c in chunks] == ["hel", "lo", ""]
    assert chunks[-1].done and plan.delivered == 3
    assert plan.record.output_tokens == 2
    assert plan.record.t_last_token_ns is not None
    assert plan.record.t_last_token_ns == plan.record.chunk_times_ns[1]
    assert script.closed == 1


def test_a_stream_the_caller_abandons_closes_its_reply() -> None:
    pool = make_pool("a")
    script = Script({"a": [Reply(200, list(STREAM))]})
    plan = make_plan(pool, script.now, stream=True)
    gen = steps.stream(plan, _op(stream=True), {}, CHUNKS["chat"])
    first = script.run(gen)
    assert isinstance(first, Deliver)
    with pytest.raises(StreamAbandoned):
        script.run(gen, error=StreamAbandoned())
    assert script.closed == 1 and plan.delivered == 1


def test_a_stream_cut_after_delivery_is_interrupted_not_retried() -> None:
    pool = make_pool("a", "b")
    cut = ConnectError("connection reset")
    script = Script({"a": [Reply(200, STREAM[:1], cut=cut)], "b": [Reply(200, list(STREAM))]})
    plan = make_plan(pool, script.now, stream=True)
    gen = steps.stream(plan, _op(stream=True), {}, CHUNKS["chat"])
    got: list[Any] = []
    with pytest.raises(StreamInterrupted) as err:
        got.extend(script.chunks(gen))
    assert [c.message.content for c in got] == ["hel"]
    assert err.value.partial_text == "hel" and err.value.chunks == 1
    assert script.sent == ["a"] and script.closed == 1
    assert pool.endpoints[0].breaker.failures == 1


def test_a_stream_failing_before_its_first_chunk_is_retried_elsewhere() -> None:
    pool = make_pool("a", "b")
    script = Script({"a": [ConnectError("refused")], "b": [Reply(200, list(STREAM))]})
    plan = make_plan(pool, script.now, stream=True)
    gen = steps.stream(plan, _op(stream=True), {}, CHUNKS["chat"])
    assert len(list(script.chunks(gen))) == 3
    assert script.sent == ["a", "b"] and len(script.slept) == 1


def test_fan_out_gathers_every_endpoint_and_fails_only_when_all_fail() -> None:
    pool = make_pool("a", "b")
    models = json.dumps({"models": [{"name": "m", "model": "m"}]}).encode()
    script = Script({"a": [ConnectError("refused")], "b": [Reply(200, [models])]})
    plan = make_plan(pool, script.now)
    listed = script.run(steps.fan_out(plan, pool.endpoints, "list", 5.0))
    assert [(url, m.name) for url, m in listed] == [(pool.endpoints[1].url, "m")]
    assert isinstance(script.ops[0], Gather)
    script = Script({"a": [ConnectError("refused")], "b": [ConnectError("refused")]})
    with pytest.raises(NoEndpointAvailable) as err:
        script.run(steps.fan_out(make_plan(pool, script.now), pool.endpoints, "list", 5.0))
    assert set(err.value.reasons) == {"a", "b"}
