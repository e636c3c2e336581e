"""Per-request TTFT, TPOT and ITL from raw chunk times, with exactly known answers."""

from __future__ import annotations

import pytest

from shared_ollama.bench.timings import apportion_tokens, derive

from ._helpers import MS, req


@pytest.mark.parametrize(
    ("chunk_tokens", "output", "content", "expected"),
    [
        ([None] * 4, 4, None, [1, 1, 1, 1]),  # N chunks for N tokens: one each
        ([None] * 3, 10, None, [4, 3, 3]),  # uneven: the earlier chunks take the remainder
        ([None] * 3, 2, [True, True, False], [1, 1, 0]),  # an empty final "done" chunk
        ([2, None, None], 6, None, [2, 2, 2]),  # a server-given count is kept
        ([1, 1, 1], 3, None, [1, 1, 1]),
        ([None, None], None, None, [1, 1]),  # no output count: one token a chunk
        ([None, None, None], 2, None, [1, 1, 0]),  # more chunks than tokens
        ([5, None], 3, None, [5, 0]),  # counts above the total: trust the counts
    ],
)
def test_apportioning_rule(
    chunk_tokens: list[int | None],
    output: int | None,
    content: list[bool] | None,
    expected: list[int],
) -> None:
    assert apportion_tokens(chunk_tokens, output, content) == expected


def test_content_flags_must_match_chunks() -> None:
    with pytest.raises(ValueError, match="content flags"):
        apportion_tokens([None, None], 2, [True])


def test_one_token_chunks() -> None:
    d = derive(0, 100 * MS, [10 * MS, 20 * MS, 35 * MS, 40 * MS], [None] * 4, 4)
    assert d.ttft_ns == 10 * MS
    assert d.itls_ns == [10 * MS, 15 * MS, 5 * MS]
    assert d.tpot_ns == pytest.approx(10 * MS)  # (40 - 10) / (4 - 1)
    assert d.e2e_ns == 100 * MS


def test_multi_token_chunks_count_k_intervals() -> None:
    # 12 tokens in 3 chunks of 4, every 40 ms after the first: each token 10 ms apart.
    d = derive(0, 200 * MS, [100 * MS, 140 * MS, 180 * MS], [None] * 3, 12)
    assert d.tokens == [4, 4, 4]
    assert d.ttft_ns == 100 * MS
    assert d.itls_ns == [10 * MS] * 8  # the first chunk's 3 extra tokens are not intervals
    assert d.tpot_ns == pytest.approx(10 * MS)


def test_empty_done_chunk_is_not_a_token() -> None:
    # Ollama: 3 tokens, then a final object with no content 50 ms later.
    d = derive(
        0, 100 * MS, [10 * MS, 20 * MS, 30 * MS, 80 * MS], [None] * 4, 3, [True, True, True, False]
    )
    assert d.itls_ns == [10 * MS, 10 * MS]
    assert d.tpot_ns == pytest.approx(10 * MS)


def test_ttft_is_the_first_content_chunk() -> None:
    d = derive(0, 50 * MS, [5 * MS, 15 * MS, 25 * MS], [None] * 3, 2, [False, True, True])
    assert d.ttft_ns == 15 * MS
    assert d.itls_ns == [10 * MS]


def test_single_token_has_no_tpot() -> None:
    d = derive(0, 30 * MS, [20 * MS], [None], 1)
    assert d.ttft_ns == 20 * MS
    assert d.tpot_ns is None
    assert d.itls_ns == []


def test_non_stream_has_only_e2e() -> None:
    r = req(stream=False, chunks_ms=(), end_ms=250, output_tokens=16)
    assert r.e2e_ms == 250
    assert r.ttft_ms is None
    assert r.tpot_ms is None


def test_request_record_computed_fields() -> None:
    r = req(start_ms=1000, chunks_ms=(50, 60, 70), end_ms=75, t_scheduled_ms=998)
    assert r.ttft_ms == 50
    assert r.tpot_ms == 10
    assert r.e2e_ms == 75
    assert r.send_lag_ms == 2
    dumped = r.model_dump()
    assert dumped["ttft_ms"] == 50
    assert dumped["chunk_offsets_ns"] == [50 * MS, 60 * MS, 70 * MS]


def test_content_flags_of_an_interrupted_stream_are_dropped() -> None:
    # The runner saw fewer chunks than the record holds: do not guess which were content.
    r = req(chunks_ms=(10, 20, 30), content=[True])
    assert r.chunk_content is None


def test_extra_tokens_go_to_the_chunks_that_waited_for_them() -> None:
    """Ollama, a client falling behind: every 5th chunk carries 3 tokens after a 3x wait.
    Shared by waits, every token is again 20 ms apart; split evenly, the p99 ITL tripled."""
    offsets, t, truth = [], 100 * MS, []
    for n in range(1, 41):
        k = 3 if n % 5 == 0 else 1
        if n > 1:
            t += k * 20 * MS
        offsets.append(t)
        truth.append(k)
    d = derive(0, t + MS, offsets, [None] * len(offsets), sum(truth))
    assert d.tokens == truth
    assert d.itls_ns == [20 * MS] * (sum(truth) - 1)
    even = apportion_tokens([None] * len(offsets), sum(truth))
    assert even != truth  # what the even split made of it


def test_waits_never_leave_a_content_chunk_without_a_token() -> None:
    # Barely more tokens than chunks, one long stall: each chunk keeps at least one.
    assert apportion_tokens([None] * 4, 5, offsets_ns=[0, 10, 1000, 1010]) == [1, 1, 2, 1]
    assert apportion_tokens([None] * 4, 4, offsets_ns=[0, 10, 1000, 1010]) == [1, 1, 1, 1]


def test_e2e_ends_at_the_last_token_and_the_call_time_is_kept() -> None:
    """Streams: E2E ends at the last content chunk (as vLLM's bench); the closing events
    (usage chunk, [DONE], release) stay in ``call_ms``."""
    from shared_ollama.bench.result import RequestRecord

    from ._helpers import call

    rec = call(start_ms=1000, chunks_ms=(50, 60, 70, 72), end_ms=75)
    rec.t_last_token_ns = rec.chunk_times_ns[2]  # the 4th chunk is the closing one
    r = RequestRecord.from_call(rec, seq=1, phase="p")
    assert r.e2e_ms == 70 and r.call_ms == 75
    assert r.model_dump()["call_ms"] == 75
    whole = RequestRecord.from_call(call(stream=False, end_ms=250), seq=2, phase="p")
    assert whole.e2e_ms == whole.call_ms == 250
