"""The FakeEngine's compute model inside the server loop: slots, queue, model loads and the
timed emission of planned tokens. Knows nothing of HTTP or of any wire format."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from ._faults import Faults
from ._prefix_cache import PrefixCache
from ._stats import StatsRecorder
from ._timing import TimingModel
from ._tokens import Plan, Token
from ._tokens import plan as make_plan

__all__ = ["Emit", "GenTimes", "Kind", "Overloaded", "Runtime", "Settings", "SlotPool", "Ticket"]

Kind = Literal["ollama", "openai", "tgi"]
# emit(index, token, is_last): hands one produced token to the wire layer.
Emit = Callable[[int, Token, bool], Awaitable[None]]


@dataclass
class Settings:
    """What a FakeEngine keeps across restarts; ``timing`` may be replaced at any time."""

    kind: Kind
    models: tuple[str, ...]
    timing: TimingModel
    slots: int
    max_queue: int | None
    api_key: str | None
    seed: int
    faults: Faults = field(default_factory=Faults)
    stats: StatsRecorder = field(default_factory=StatsRecorder)


class Overloaded(Exception):
    """No free slot and ``max_queue`` requests already waiting."""


def now_ns() -> int:
    return time.monotonic_ns()


@dataclass
class GenTimes:
    """Monotonic ns stamps of one request, from which every engine reports its durations."""

    arrival_ns: int
    admitted_ns: int = 0
    started_ns: int = 0  # slot held
    load_ns: int = 0  # time spent waiting for the model load (ollama)
    first_ns: int = 0  # first token produced
    end_ns: int = 0
    #: Prompt tokens the prefix cache served (not computed again).
    cached_tokens: int = 0

    @property
    def queue_ns(self) -> int:
        return max(self.started_ns - self.admitted_ns, 0)

    @property
    def prefill_ns(self) -> int:
        return max(self.first_ns - self.started_ns - self.load_ns, 0)

    @property
    def decode_ns(self) -> int:
        return max(self.end_ns - self.first_ns, 0)

    @property
    def total_ns(self) -> int:
        return max(self.end_ns - self.arrival_ns, 0)


class Ticket:
    """A request's place in the slot pool: granted at once, or queued until ``wait()`` ends.

    ``done()`` gives the slot back, or leaves the queue; it is idempotent.
    """

    def __init__(self, pool: SlotPool) -> None:
        self._pool = pool
        self.future: asyncio.Future[None] | None = None
        self.held = False
        self.finished = False

    async def wait(self) -> None:
        if not self.held and self.future is not None:
            await self.future

    def done(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.held:
            self._pool.release()
        else:
            self._pool.withdraw(self)


class SlotPool:
    """``size`` concurrent generations, a FIFO queue behind them, bounded by ``max_queue``."""

    def __init__(self, size: int, max_queue: int | None, stats: StatsRecorder) -> None:
        self.size = size
        self.max_queue = max_queue
        self.active = 0
        self._waiting: deque[Ticket] = deque()
        self._stats = stats
        self._publish()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    def admit(self) -> Ticket:
        """Take a slot or a queue place now, without waiting; ``Overloaded`` if neither."""
        ticket = Ticket(self)
        if self.active < self.size and not self._waiting:
            self.active += 1
            ticket.held = True
        elif self.max_queue is not None and len(self._waiting) >= self.max_queue:
            raise Overloaded
        else:
            ticket.future = asyncio.get_running_loop().create_future()
            self._waiting.append(ticket)
        self._publish()
        return ticket

    def release(self) -> None:
        self.active -= 1
        self._grant()
        self._publish()

    def withdraw(self, ticket: Ticket) -> None:
        if ticket in self._waiting:
            self._waiting.remove(ticket)
            self._publish()

    def resize(self, size: int) -> None:
        self.size = size
        self._grant()
        self._publish()

    def _grant(self) -> None:
        while self._waiting and self.active < self.size:
            ticket = self._waiting.popleft()
            assert ticket.future is not None
            if ticket.future.done():  # its waiter was cancelled; its done() finds it gone
                continue
            self.active += 1
            ticket.held = True
            ticket.future.set_result(None)

    def _publish(self) -> None:
        self._stats.slots(self.active, len(self._waiting))


async def _sleep_until(loop: asyncio.AbstractEventLoop, deadline: float) -> None:
    # Absolute deadlines keep timer overshoot from adding up over a long stream.
    await asyncio.sleep(max(deadline - loop.time(), 0.0))


class Runtime:
    """One running engine's state inside its event loop; rebuilt by every ``start()``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stats = settings.stats
        self.pool = SlotPool(settings.slots, settings.max_queue, settings.stats)
        self.kv_tokens = 0  # prompt + generated tokens of the generations holding a slot
        self.cache = PrefixCache()
        self._loads: dict[str, asyncio.Future[None]] = {}

    @property
    def timing(self) -> TimingModel:
        return self.settings.timing

    def admit(self, tickets: list[Ticket], times: GenTimes) -> Ticket:
        """Admit one request (``Overloaded`` if the queue is full); ``tickets`` tracks it so
        that the request's cleanup frees its place whatever happens."""
        times.admitted_ns = now_ns()
        try:
            ticket = self.pool.admit()
        except Overloaded:
            self.stats.add("overloaded")
            raise
        tickets.append(ticket)
        return ticket

    def plan(self, prompt_text: str, limit: int | None, stop: tuple[str, ...] = ()) -> Plan:
        """The output for a prompt under this engine's seed and default length."""
        return make_plan(
            self.settings.seed, prompt_text, limit, self.timing.default_max_tokens, stop
        )

    def cache_ids(self, make: Callable[[], list[int]]) -> list[int] | None:
        """A prompt's token ids for the prefix cache (``make()``), or None while it is off:
        no tokenizing cost for engines without a cache."""
        return make() if self.timing.prefix_cache_tokens > 0 else None

    def loaded(self) -> list[str]:
        """Models loaded since start (ollama's ``/api/ps``)."""
        return [m for m, f in self._loads.items() if f.done()]

    def unload(self, model: str) -> None:
        self._loads.pop(model, None)

    async def load(self, model: str) -> int:
        """Load ``model`` unless loaded (ollama only); returns the ns waited."""
        if self.settings.kind != "ollama":
            return 0
        start = now_ns()
        future = self._loads.get(model)
        if future is None:
            future = asyncio.ensure_future(asyncio.sleep(self.timing.load_s))
            self._loads[model] = future
        # Shielded: one waiter giving up must not cancel the load the others wait for.
        await asyncio.shield(future)
        return now_ns() - start

    async def generate(
        self,
        ticket: Ticket,
        times: GenTimes,
        model: str,
        plan: Plan,
        prompt_tokens: int,
        emit: Emit,
        prompt_ids: Sequence[int] | None = None,
    ) -> None:
        """Run one generation on an admitted ticket, calling ``emit`` at each token's time.

        ``prompt_ids`` (the prompt's token ids) go through the prefix cache: the tokens it
        serves are left out of the prefill time and noted in ``times.cached_tokens``.
        """
        held = 0
        try:
            await ticket.wait()
            times.started_ns = now_ns()
            times.load_ns = await self.load(model)
            loop = asyncio.get_running_loop()
            self.stats.add("prompt_tokens", prompt_tokens)
            self.kv_tokens += prompt_tokens
            held = prompt_tokens
            cached = self._cached(model, prompt_ids, times)
            deadline = loop.time() + self.timing.prefill_s(prompt_tokens - cached)
            last = len(plan.tokens) - 1
            for i, token in enumerate(plan.tokens):
                if i:
                    deadline += self.timing.token_gap_s(self.pool.active)
                await _sleep_until(loop, deadline)
                if not i:
                    times.first_ns = now_ns()
                self.stats.add("tokens_generated")
                self.kv_tokens += 1
                held += 1
                await emit(i, token, i == last)
            times.end_ns = now_ns()
            self.stats.add("generations")
        finally:
            self.kv_tokens -= held
            ticket.done()

    def _cached(self, model: str, ids: Sequence[int] | None, times: GenTimes) -> int:
        """Look the prompt up in the prefix cache (when on) and count what it served."""
        timing = self.timing
        if ids is None or timing.prefix_cache_tokens <= 0:
            return 0
        hit = self.cache.lookup(model, ids, timing.prefix_cache_tokens, timing.prefix_block_tokens)
        times.cached_tokens = hit.cached
        self.stats.add("cached_tokens", hit.cached)
        self.stats.add("cache_evicted_tokens", hit.evicted)
        return hit.cached

    async def embed(self, ticket: Ticket, times: GenTimes, model: str, words: int) -> None:
        """Run one embedding request: a slot, then the prefill time of its words."""
        try:
            await ticket.wait()
            times.started_ns = now_ns()
            times.load_ns = await self.load(model)
            self.stats.add("prompt_tokens", words)
            await asyncio.sleep(self.timing.prefill_s(words))
            times.first_ns = times.end_ns = now_ns()
            self.stats.add("generations")
        finally:
            ticket.done()
