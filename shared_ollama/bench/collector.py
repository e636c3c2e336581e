"""Collector: the client listener that keeps the bench's CallRecords, matched to its sends.

The runner tags each call with its sequence number; the collector pairs each CallRecord
with what the runner noted (phase, workload, planned time, which chunks had content).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from ..records import CallRecord
from .result import RequestRecord

__all__ = ["PHASE_TAG", "SEQ_TAG", "WORKLOAD_TAG", "Collector"]

SEQ_TAG = "bench.seq"
PHASE_TAG = "bench.phase"
WORKLOAD_TAG = "bench.workload"


@dataclass(slots=True)
class _Sent:
    phase: str
    workload: str
    t_scheduled_ns: int | None
    content: list[bool] | None = None
    session: str | None = None
    history_share: float | None = None
    #: A non-library exception the runner caught (a bug, not an endpoint failure).
    error: str | None = None


class Collector:
    """Call it with every CallRecord (``client.add_listener(collector)``)."""

    def __init__(self, on_record: Callable[[CallRecord], None] | None = None) -> None:
        self._sent: dict[int, _Sent] = {}
        self._records: dict[int, CallRecord] = {}
        self._lock = threading.Lock()  # the sync client calls listeners from many threads
        self.on_record = on_record

    def __call__(self, rec: CallRecord) -> None:
        seq = rec.tags.get(SEQ_TAG)
        if seq is None:
            return  # not a bench call (health probes, list, ...)
        with self._lock:
            self._records[int(seq)] = rec
        if self.on_record is not None:
            self.on_record(rec)

    def sent(
        self,
        seq: int,
        phase: str,
        workload: str,
        t_scheduled_ns: int | None,
        *,
        session: str | None = None,
        history_share: float | None = None,
    ) -> None:
        """The runner is about to send call ``seq`` (of ``session``, with ``history_share``
        of its prompt sent before, where the workload knows)."""
        with self._lock:
            note = _Sent(phase, workload, t_scheduled_ns)
            note.session, note.history_share = session, history_share
            self._sent[seq] = note

    def saw(self, seq: int, content: list[bool] | None, error: str | None = None) -> None:
        """What the runner saw of call ``seq``: content per chunk, an unexpected error."""
        with self._lock:
            note = self._sent[seq]
            note.content, note.error = content, error

    def take(self, phase: str) -> tuple[list[RequestRecord], int]:
        """The phase's requests in send order, and how many sends left no record."""
        with self._lock:
            seqs = sorted(s for s, n in self._sent.items() if n.phase == phase)
            pairs = [(s, self._sent.pop(s), self._records.pop(s, None)) for s in seqs]
        out: list[RequestRecord] = []
        for seq, note, rec in pairs:
            if rec is None:
                continue
            req = RequestRecord.from_call(
                rec,
                seq=seq,
                phase=phase,
                workload=note.workload,
                t_scheduled_ns=note.t_scheduled_ns,
                chunk_content=note.content,
                session=note.session,
                history_share=note.history_share,
            )
            if note.error is not None and req.outcome == "cancelled":
                req.outcome, req.error_type = "error", note.error
            out.append(req)
        return out, len(pairs) - len(out)
