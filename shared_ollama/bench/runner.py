"""The runner: sends the workload's requests through a SharedClient on a schedule's times.

It only sleeps, sends and reads streams to the end; the client's CallRecords (kept by the
``Collector``) are the measurements. ``stop()`` ends a run early and cleanly. A sessions
workload runs in closed loop over sessions: each worker sends one conversation's turns in
order, thinking between them, then takes the next session.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from ..client import SharedClient
from ..errors import SharedOllamaError
from .collector import PHASE_TAG, SEQ_TAG, WORKLOAD_TAG, Collector
from .result import RequestRecord
from .scheduler import ClosedLoop, OpenLoop, PhasePlan, Stop, planned_arrivals
from .workload import RequestSpec, WorkloadMix, echoed

__all__ = ["PhaseRun", "ProgressSink", "Runner"]

WARMUP = "warmup"


class ProgressSink(Protocol):
    """Where the runner reports progress (the CLI's rich progress bar)."""

    def start_phase(self, name: str, stop: Stop) -> None:
        """A phase begins."""

    def end_phase(self) -> None:
        """The phase ended (all its calls are done)."""


_PREDRAWN = 10_000  # requests a closed-loop phase draws before its clock starts
_PREDRAWN_CHARS = 64 << 20  # ... and at most this much prompt text


def _prompt_chars(spec: RequestSpec) -> int:
    """The prompt text a drawn request holds (system, prompt, messages' content)."""
    chars = len(spec.prompt or "") + len(spec.system or "")
    for message in spec.messages or ():
        content = message.get("content")
        chars += len(content) if isinstance(content, str) else 0
    return chars


@dataclass
class PhaseRun:
    """What one phase produced: its requests and how it ended."""

    plan: PhasePlan
    t_start_ns: int
    t_end_ns: int
    stop_reason: Literal["requests", "duration", "interrupted"]
    requests: list[RequestRecord] = field(default_factory=list)
    unrecorded: int = 0
    #: CPU seconds the event-loop thread (every request's driver) used during the phase.
    driver_cpu_s: float | None = None


async def _sleep_until(t_ns: int) -> None:
    delay = (t_ns - time.monotonic_ns()) / 1e9
    if delay > 0:
        await asyncio.sleep(delay)


class Runner:
    """Runs phases; every request goes through ``client`` tagged for the ``collector``."""

    def __init__(
        self,
        client: SharedClient,
        mix: WorkloadMix,
        collector: Collector,
        *,
        seed: int = 0,
        progress: ProgressSink | None = None,
        think: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.client = client
        self.mix = mix
        self.collector = collector
        self.progress = progress
        self._rng = random.Random(seed)  # arrival times: independent of the workload's draws
        self._seq = 0
        self._stopping = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        #: Waits a session's think time (tests give a scripted clock).
        self._think = think

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was called."""
        return self._stopping.is_set()

    def stop(self) -> None:
        """Send nothing more and cancel calls in flight (their records say "cancelled")."""
        self._stopping.set()
        for task in list(self._tasks):
            task.cancel()

    # -- one request ------------------------------------------------------------------
    async def _send(self, spec: RequestSpec, phase: str, t_scheduled_ns: int | None,
                    *, reply: list[str] | None = None) -> None:  # fmt: skip
        """Send one request and hand what the client recorded to the collector; ``reply``
        (a session that echoes replies) gets the reply's text."""
        self._seq += 1
        seq = self._seq
        tags = {SEQ_TAG: str(seq), PHASE_TAG: phase, WORKLOAD_TAG: spec.workload}
        self.collector.sent(
            seq,
            phase,
            spec.workload,
            t_scheduled_ns,
            session=spec.session,
            history_share=spec.history_share,
        )
        content: list[bool] | None = [] if spec.stream else None
        error: str | None = None
        try:
            await self._exchange(spec, tags, content, reply)
        except SharedOllamaError:
            pass  # the CallRecord says what failed
        except Exception as exc:  # a bug somewhere: keep measuring, say so in the result
            error = type(exc).__name__
        finally:
            self.collector.saw(seq, content, error)

    async def _exchange(
        self,
        spec: RequestSpec,
        tags: dict[str, str],
        content: list[bool] | None,
        reply: list[str] | None = None,
    ) -> None:
        if content is None:
            opts = spec.call_options()
            # Only routing workloads name a session: other calls keep the client's plain path.
            session: dict[str, Any] = {} if spec.session is None else {"session": spec.session}
            if spec.operation == "chat":
                answer = await self.client.chat(
                    spec.model, spec.messages, options=opts, tags=tags, **session
                )
                text = answer.message.content
            else:
                prompt, system = spec.prompt or "", spec.system
                made = await self.client.generate(
                    spec.model, prompt, system=system, options=opts, tags=tags, **session
                )
                text = made.response
            if reply is not None:
                reply.append(text or "")
            return
        # Streams are read as content flags, with no typed chunk built: the call is routed,
        # retried and accounted as any stream, and the driver keeps up with faster servers.
        op = spec.stream_op(spec.session)
        flags = self.client._content_flags(op, tags, text=reply is not None)
        # aclosing: a cancelled stream must emit its record now, not when collected.
        async with contextlib.aclosing(flags):  # type: ignore[type-var]
            if reply is None:
                async for flag in flags:
                    content.append(flag)
            else:
                async for flag, piece in flags:
                    content.append(flag)
                    reply.append(piece)

    def _spawn(self, coro: Awaitable[None]) -> asyncio.Task[None]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _wait(self, tasks: list[asyncio.Task[None]]) -> None:
        # return_exceptions: a cancelled task (stop()) must not abort the others' wait.
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- phases -----------------------------------------------------------------------
    async def warmup(self, requests: int, concurrency: int = 1) -> PhaseRun | None:
        """Send ``requests`` calls that no result includes (connections, model loads)."""
        if requests <= 0:
            return None
        plan = PhasePlan(WARMUP, ClosedLoop(min(concurrency, requests)), Stop(requests))
        return await self.run(plan)

    async def run(self, plan: PhasePlan) -> PhaseRun:
        """Run one phase to its stop rule (or ``stop()``) and collect its requests."""
        if self.progress is not None:
            self.progress.start_phase(plan.name, plan.stop)
        self.mix.begin_phase()
        # A closed-loop phase of a known count has its requests drawn before the clock starts
        # (as vLLM's client does): sending then costs no workload generation. Up to
        # _PREDRAWN of them and _PREDRAWN_CHARS of prompt text (held meanwhile); the rest
        # as they go.
        drawn = None
        stop = plan.stop
        closed = isinstance(plan.schedule, ClosedLoop)
        if closed and stop.requests is not None and self.mix.sessions is None:
            drawn = deque[RequestSpec]()
            chars = 0
            while len(drawn) < min(stop.requests, _PREDRAWN) and chars < _PREDRAWN_CHARS:
                spec = self.mix.next()
                drawn.append(spec)
                chars += _prompt_chars(spec)
        t_start = time.monotonic_ns()
        cpu_start = time.thread_time()  # this thread runs the loop: every request's driver
        try:
            if isinstance(plan.schedule, ClosedLoop):
                ended = await self._closed(plan, plan.schedule, t_start, drawn)
            else:
                ended = await self._open(plan, plan.schedule, t_start)
        finally:
            if self.progress is not None:
                self.progress.end_phase()
        t_end = time.monotonic_ns()
        cpu_s = time.thread_time() - cpu_start
        requests, unrecorded = self.collector.take(plan.name)
        reason: Literal["requests", "duration", "interrupted"] = (
            "interrupted" if self.stopping else ended
        )
        return PhaseRun(plan, t_start, t_end, reason, requests, unrecorded, cpu_s)

    async def _closed(
        self, plan: PhasePlan, sched: ClosedLoop, t0: int, drawn: deque[RequestSpec] | None
    ) -> Literal["requests", "duration"]:
        stop = plan.stop
        deadline = None if stop.duration_s is None else t0 + int(stop.duration_s * 1e9)
        left = stop.requests  # None: no count limit
        timed_out = False

        def may_send() -> bool:
            nonlocal left, timed_out
            if self.stopping or left == 0:
                return False
            if deadline is not None and time.monotonic_ns() >= deadline:
                timed_out = True
                return False
            if left is not None:
                left -= 1
            return True

        def next_spec() -> RequestSpec:
            return drawn.popleft() if drawn else self.mix.next()

        async def worker(offset_s: float) -> None:
            await _sleep_until(t0 + int(offset_s * 1e9))
            while may_send():
                await self._send(next_spec(), plan.name, None)

        echo = self.mix.echo_replies

        async def session_worker(offset_s: float) -> None:
            await _sleep_until(t0 + int(offset_s * 1e9))
            while not self.stopping and left != 0:
                drawn = self.mix.next_conversation()
                if drawn is None:
                    return  # the phase's sessions are all taken
                conv, specs = drawn
                sent: list[dict[str, Any]] | None = None
                reply: list[str] = []
                for turn, spec in zip(conv.turns, specs, strict=True):
                    if turn.think_s > 0 and not self.stopping:
                        await self._think(turn.think_s)
                    if not may_send():
                        return
                    # The history as this session sent it, with the server's reply.
                    spec = echoed(spec, sent, reply)
                    reply = []
                    await self._send(spec, plan.name, None, reply=reply if echo else None)
                    sent = spec.messages

        run = worker if self.mix.sessions is None else session_worker
        await self._wait([self._spawn(run(o)) for o in sched.start_offsets()])
        return "duration" if timed_out else "requests"

    async def _open(
        self, plan: PhasePlan, sched: OpenLoop, t0: int
    ) -> Literal["requests", "duration"]:
        offsets = planned_arrivals(sched, plan.stop, self._rng)
        # Drawn before the clock starts, so sending costs no workload generation.
        specs = [self.mix.next() for _ in offsets]
        tasks: list[asyncio.Task[None]] = []
        for offset, spec in zip(offsets, specs, strict=True):
            due = t0 + int(offset * 1e9)
            await _sleep_until(due)
            if self.stopping:
                break
            # Sent on time whatever the replies do: no coordinated omission.
            tasks.append(self._spawn(self._send(spec, plan.name, due)))
        await self._wait(tasks)
        full = plan.stop.requests is not None and len(offsets) >= plan.stop.requests
        return "requests" if full else "duration"

    async def sweep_points(
        self,
        sync: PhasePlan,
        saturated: PhasePlan,
        rate_of: Callable[[PhaseRun], float],
        make: Callable[[float, float], list[PhasePlan]],
    ) -> list[PhaseRun]:
        """Run the synchronous and saturated ends, then the rate phases ``make`` plans."""
        runs = [await self.run(sync)]
        if not self.stopping:
            runs.append(await self.run(saturated))
        if self.stopping:
            return runs
        lo, hi = rate_of(runs[0]), rate_of(runs[1])
        if lo <= 0 or hi <= 0:
            return runs  # nothing completed at one end: no rate to sweep to
        for plan in make(lo, hi):
            if self.stopping:
                break
            runs.append(await self.run(plan))
        return runs
