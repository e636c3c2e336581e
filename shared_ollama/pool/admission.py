"""Admission: who gets a freed slot first when calls wait for capacity — free of I/O.

A call that must wait holds a ``Ticket``. Waiters are ordered by service class rank, then
(within a class) by fair share — the project with the least recent token-weighted usage
first — then by deadline (earliest first) and arrival. A call may try for a slot only while
fewer better-ordered waiters for the same model exist than there are free slots, and a
release wakes the best-ordered sleeping waiter, not all of them. Sheddable classes are refused
first under overload; a wait past its class's bound is refused with the reason. Time comes
in as arguments (monotonic seconds); the drivers do the waiting (``Sleep(slot=True)``).
"""

from __future__ import annotations

import itertools
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, TypeAlias

from ..config import AdmissionPolicy, ServiceClass
from ..errors import InvalidRequest

__all__ = ["Admission", "Decision", "Ticket"]

Verdict: TypeAlias = Literal["try", "wait", "refuse"]
# The running mean of a project's tokens per call moves this far toward each new call.
_ESTIMATE_ALPHA = 0.2
_LN2 = math.log(2.0)


@dataclass(eq=False, slots=True)
class Ticket:
    """One call's place in the wait for capacity."""

    project: str
    service_class: str
    cls: ServiceClass
    #: The call's total deadline (monotonic seconds); inf without one.
    deadline: float
    #: What the capacity is for (the logical model): only waiters for it compete.
    key: str
    seq: int
    #: When the call joined the current wait (a retry joins again, keeping ``seq``).
    queued_at: float = 0.0
    waiting: bool = False
    #: Tokens charged to the project at admission (estimates, until the record's count).
    charged: float = 0.0
    #: Set when the ticket was chosen to be shed; the call is refused at its next look.
    shed: str | None = None
    #: The driver's way to end the call's sleep, while it sleeps (``Admission.sleeping``).
    waker: Callable[[], None] | None = None

    def wait_bound(self) -> float:
        """When the wait must end (``max_wait_s`` of the class after queueing), or inf."""
        limit = self.cls.max_wait_s
        return math.inf if limit is None else self.queued_at + limit


@dataclass(frozen=True, slots=True)
class Decision:
    """What a waiter may do now: ``try`` for a slot, ``wait`` for a release, or be refused."""

    verdict: Verdict
    #: For ``refuse``: why, naming the class, queue position and capacity.
    reason: str = ""
    #: Waiters for the same capacity ordered before this one.
    ahead: int = 0
    waiting: int = 0


@dataclass(slots=True)
class _Order:
    """One model's waiters in order, and each one's place (by ``seq``)."""

    tickets: list[Ticket]
    ranks: dict[int, int]


@dataclass(slots=True)
class _Usage:
    value: float = 0.0
    at: float = 0.0
    per_call: float | None = None


class Admission:
    """The ordered wait for capacity, shared by every call of a client.

    Usage decays by the same factor for every project, so the order of waiters changes only
    when one joins, leaves or is charged: it is kept sorted per model between changes, and
    each look at it costs a dictionary read, not a sort.
    """

    def __init__(self, policy: AdmissionPolicy) -> None:
        self.policy = policy
        self._queues: dict[str, list[Ticket]] = {}
        #: Per model: the waiters in order, and each one's place; dropped on any change.
        self._orders: dict[str, _Order] = {}
        self._usage: dict[str, _Usage] = {}
        self._seq = itertools.count()
        self._lock = threading.Lock()
        self._count = 0
        #: Wakers taken under the lock, called once it is released.
        self._to_wake: list[Callable[[], None]] = []
        #: Calls refused by shedding, and by a bounded wait (for status and tests).
        self.shed_count = 0
        self.expired_count = 0
        #: Decisions taken (``decide`` calls): per call, flat however many wait.
        self.decisions = 0

    @property
    def enabled(self) -> bool:
        """Whether waiters are ordered at all."""
        return self.policy.enabled

    @property
    def idle(self) -> bool:
        """Nobody waits (a racy read: only a fast-path hint)."""
        return self._count == 0

    def resolve(self, name: str | None) -> tuple[str, ServiceClass]:
        """The named class (or the default); an unknown name is ``InvalidRequest``."""
        name = self.policy.default_class if name is None else name
        cls = self.policy.classes.get(name) if isinstance(name, str) else None
        if cls is None:
            known = ", ".join(sorted(self.policy.classes))
            raise InvalidRequest(f"unknown service_class {name!r} (known: {known})")
        return name, cls

    def ticket(self, project: str, service_class: str | None, *, key: str,
               deadline: float | None) -> Ticket:  # fmt: skip
        """A ticket for a new call (not waiting yet)."""
        name, cls = self.resolve(service_class)
        end = math.inf if deadline is None else deadline
        return Ticket(project, name, cls, end, key, next(self._seq))

    # -- fair share ---------------------------------------------------------------------
    def usage(self, project: str, now: float) -> float:
        """The project's decayed token usage, divided by its weight."""
        with self._lock:
            return self._usage_of(project, now)

    def _usage_of(self, project: str, now: float) -> float:
        u = self._usage.get(project)
        if u is None:
            return 0.0
        weight = self.policy.project_weights.get(project, 1.0)
        return self._decayed(u, now) / weight

    def _decayed(self, u: _Usage, now: float) -> float:
        age = max(0.0, now - u.at)
        return u.value * math.exp(-_LN2 * age / self.policy.fair_share_half_life_s)

    def _charge(self, project: str, tokens: float, now: float) -> None:
        u = self._usage.setdefault(project, _Usage(at=now))
        u.value = max(0.0, self._decayed(u, now) + tokens)
        u.at = max(u.at, now)
        self._orders.clear()

    def estimate(self, project: str) -> float:
        """Tokens a call of ``project`` is expected to cost."""
        u = self._usage.get(project)
        if u is None or u.per_call is None:
            return float(self.policy.estimate_tokens)
        return u.per_call

    # -- the wait -----------------------------------------------------------------------
    def _rank(self, ticket: Ticket, now: float) -> int:
        """How many waiters for the same model are ordered before ``ticket``."""
        return self._order(ticket.key, now).ranks[ticket.seq]

    def _order(self, key: str, now: float) -> _Order:
        """The waiters for ``key`` in order (sorted again only after a change)."""
        order = self._orders.get(key)
        if order is None:
            usage: dict[str, float] = {}
            for t in self._queues.get(key, ()):
                if t.project not in usage:
                    usage[t.project] = self._usage_of(t.project, now)
            tickets = sorted(
                self._queues.get(key, ()),
                key=lambda t: (t.cls.rank, usage[t.project], t.deadline, t.seq),
            )
            order = self._orders[key] = _Order(tickets, {t.seq: i for i, t in enumerate(tickets)})
        return order

    def _join(self, ticket: Ticket, now: float) -> None:
        ticket.waiting, ticket.queued_at = True, now
        self._queues.setdefault(ticket.key, []).append(ticket)
        self._orders.pop(ticket.key, None)
        self._count += 1

    def _leave(self, ticket: Ticket) -> None:
        ticket.waker = None
        if ticket.waiting:
            ticket.waiting = False
            queue = self._queues[ticket.key]
            queue.remove(ticket)
            if not queue:
                del self._queues[ticket.key]
            self._orders.pop(ticket.key, None)
            self._count -= 1

    def decide(self, ticket: Ticket, now: float, free: int | None) -> Decision:
        """May ``ticket`` try for a slot now? ``free``: free slots for its model across
        the pool (None: some endpoint has no cap). Joins the wait if not in it yet.

        Sleeping waiters that may now take a free slot, or were chosen to be shed, are woken.
        """
        with self._lock:
            self.decisions += 1
            decision = self._decide(ticket, now, free)
            wakers, self._to_wake = self._to_wake, []
        for wake in wakers:
            wake()
        return decision

    def _decide(self, ticket: Ticket, now: float, free: int | None) -> Decision:
        if not ticket.waiting:
            self._join(ticket, now)
            if (refused := self._over_bound(ticket)) is not None:
                return refused
        if ticket.shed is not None:
            return self._refuse(ticket, ticket.shed, shed=True)
        if free is None:
            return Decision("try")
        rivals = self._queues[ticket.key]
        ahead = self._rank(ticket, now)
        usable = free - ticket.cls.headroom
        short = free == 0 or ahead >= usable
        if short and ticket.cls.sheddable:
            vip = sum(1 for t in rivals if not t.cls.sheddable)
            if vip:
                why = (f"shed: class {ticket.service_class} under overload ({vip} calls of "
                       "classes not sheddable wait for the same capacity)")  # fmt: skip
                return self._refuse(ticket, why, shed=True)
        elif short:
            # This call must wait: the sheddable calls ordered after it are refused at
            # their next look, and are woken to take it now.
            for t in rivals:
                if t.cls.sheddable and t.shed is None and self._rank(t, now) > ahead:
                    t.shed = (f"shed: class {t.service_class} under overload (a call "
                              f"of class {ticket.service_class} waits for the same "
                              "capacity)")  # fmt: skip
                    self._wake_later(t)  # refused at its next look: let it look now
        if usable > 0:
            # Free slots go to the best-ordered waiters: those asleep are woken (the order
            # may have changed since a release woke the one it thought best).
            for t in self._orders[ticket.key].tickets[:usable]:
                self._wake_later(t)
        if short and now >= ticket.wait_bound():
            return self._expired(ticket, ahead, len(rivals), free)
        # No free slot at all: trying costs nothing and lets the pool say why (saturated,
        # down, backing off); with free slots only the best-ordered waiters may take them.
        verdict: Verdict = "try" if free == 0 or ahead < usable else "wait"
        return Decision(verdict, ahead=ahead, waiting=len(rivals))

    def _over_bound(self, ticket: Ticket) -> Decision | None:
        """A newcomer past ``max_queue``: shed the worst sheddable waiter, else refuse it."""
        bound = self.policy.max_queue
        if bound is None:
            return None
        rivals = [t for t in self._queues[ticket.key] if t.shed is None]
        if len(rivals) <= bound:
            return None
        victims = [t for t in rivals if t.cls.sheddable]
        if not victims:
            why = f"queue full: {len(rivals) - 1} calls wait for {ticket.key!r} (max_queue={bound})"
            return self._refuse(ticket, why, shed=False)
        victim = max(victims, key=lambda t: (t.cls.rank, -t.deadline, t.seq))
        victim.shed = (f"shed: class {victim.service_class} under overload (queue for "
                       f"{ticket.key!r} full, max_queue={bound})")  # fmt: skip
        self._wake_later(victim)
        if victim is ticket:
            return self._refuse(ticket, victim.shed, shed=True)
        return None

    # -- sleeping and waking ------------------------------------------------------------
    # A release wakes one sleeping waiter per model, the best-ordered, not all of them: with
    # N waiters, waking all on every release cost O(N) wake-ups and decisions per slot
    # (800 calls on 4 slots: 25 ms of CPU a call). A woken waiter that finds more free slots
    # wakes the others entitled to them (``decide``); the recheck interval bounds a missed one.
    def sleeping(self, ticket: Ticket, waker: Callable[[], None]) -> None:
        """``ticket``'s call sleeps until ``waker`` is called (or its own timeout)."""
        with self._lock:
            ticket.waker = waker if ticket.waiting else None

    def awake(self, ticket: Ticket) -> None:
        """``ticket``'s call woke (its waker is no longer valid)."""
        ticket.waker = None

    def wake(self, now: float) -> None:
        """A slot was given back: wake the best-ordered sleeping waiter of each model."""
        with self._lock:
            for key in self._queues:
                for t in self._order(key, now).tickets:
                    if t.waker is not None:
                        self._wake_later(t)
                        break
            wakers, self._to_wake = self._to_wake, []
        for wake in wakers:
            wake()

    def _wake_later(self, ticket: Ticket) -> None:
        if ticket.waker is not None:
            self._to_wake.append(ticket.waker)
            ticket.waker = None

    def _expired(self, ticket: Ticket, ahead: int, waiting: int, free: int) -> Decision:
        waited = ticket.cls.max_wait_s
        why = (f"waited {waited:g}s for capacity (max_wait_s of class {ticket.service_class}):"
               f" {ahead} of {waiting} waiting calls ahead, {free} slots free")  # fmt: skip
        self.expired_count += 1
        self._leave(ticket)
        return Decision("refuse", why, ahead, waiting)

    def _refuse(self, ticket: Ticket, why: str, *, shed: bool) -> Decision:
        self.shed_count += shed
        self._leave(ticket)
        return Decision("refuse", why)

    def granted(self, ticket: Ticket, now: float) -> None:
        """The ticket's call took a slot: it leaves the wait; its estimate is charged."""
        with self._lock:
            self._leave(ticket)
            cost = self.estimate(ticket.project)
            ticket.charged += cost
            self._charge(ticket.project, cost, now)

    def withdraw(self, ticket: Ticket) -> None:
        """The call no longer waits (it failed elsewhere, or gave up)."""
        with self._lock:
            self._leave(ticket)

    def finished(self, ticket: Ticket, tokens: int | None, now: float) -> None:
        """The call ended: it leaves the wait, its real token count replaces its estimate."""
        with self._lock:
            self._leave(ticket)
            if tokens is None:
                return  # an estimate stays charged for a call that never said
            self._charge(ticket.project, tokens - ticket.charged, now)
            ticket.charged = tokens
            u = self._usage[ticket.project]
            prev = u.per_call
            u.per_call = tokens if prev is None else prev + _ESTIMATE_ALPHA * (tokens - prev)

    def waiting(self, now: float) -> list[Ticket]:
        """Waiters for every model, best-ordered first within each (a snapshot)."""
        with self._lock:
            return sorted(
                (t for queue in self._queues.values() for t in queue),
                key=lambda t: (t.key, self._rank(t, now)),
            )
