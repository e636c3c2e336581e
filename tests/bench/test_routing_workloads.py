"""Routing workloads: shared prefixes and multi-turn sessions (deterministic from the seed,
growing history, think time, session ids reaching the client), and the per-strategy A/B."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

from shared_ollama import Endpoint, SharedClient
from shared_ollama.bench import workload as workload_module
from shared_ollama.bench.ab import parse_strategies
from shared_ollama.bench.cli import main
from shared_ollama.bench.collector import SEQ_TAG, Collector
from shared_ollama.bench.runner import Runner
from shared_ollama.bench.scenario import ScenarioError, validate_scenario
from shared_ollama.bench.scheduler import ClosedLoop, PhasePlan, Stop
from shared_ollama.bench.workload import (
    Delay,
    LengthDist,
    PrefixSpec,
    SessionSpec,
    Workload,
    WorkloadMix,
    conversation,
    echoed,
    parse_delay,
)
from shared_ollama.records import CallRecord
from shared_ollama.testing import FakeEngine, TimingModel

from ..conftest import MODEL, client_kwargs

USER = LengthDist(dist="uniform", min=5, max=15, mean=5)
REPLY = LengthDist(dist="uniform", min=3, max=9, mean=3)


def words(text: str) -> int:
    return len(text.split())


# -- sessions: the generator -----------------------------------------------------------------


def test_a_session_is_the_same_for_a_seed_and_differs_across_seeds() -> None:
    spec = SessionSpec(turns=5, system_tokens=20, think_s="uniform:1:3")
    one = conversation(spec, 3, seed=7, user_tokens=USER, reply_tokens=REPLY)
    assert one == conversation(spec, 3, seed=7, user_tokens=USER, reply_tokens=REPLY)
    assert one != conversation(spec, 3, seed=8, user_tokens=USER, reply_tokens=REPLY)
    assert one != conversation(spec, 4, seed=7, user_tokens=USER, reply_tokens=REPLY)
    assert one.session == "s00003"


def test_history_grows_by_the_reply_and_a_new_user_message() -> None:
    spec = SessionSpec(turns=4, system_tokens=12)
    conv = conversation(spec, 0, seed=1, user_tokens=USER, reply_tokens=REPLY)
    first = conv.turns[0]
    assert [m["role"] for m in first.messages] == ["system", "user"]
    assert first.history_words == 12 and first.think_s == 0.0
    for before, turn in zip(conv.turns, conv.turns[1:], strict=False):
        assert turn.messages[: len(before.messages)] == before.messages  # a true prefix
        reply, user = turn.messages[len(before.messages) :]
        assert (reply["role"], user["role"]) == ("assistant", "user")
        assert words(reply["content"]) == before.max_tokens  # the length asked of that turn
        assert turn.history_words == before.prompt_words + before.max_tokens
        assert turn.prompt_words == turn.history_words + words(user["content"])
        assert 0 < turn.history_share < 1


def test_think_times_follow_the_distribution() -> None:
    spec = SessionSpec(turns=50, think_s="uniform:0.5:2")
    conv = conversation(spec, 0, seed=2, user_tokens=USER, reply_tokens=REPLY)
    thinks = [t.think_s for t in conv.turns[1:]]
    assert all(0.5 <= t <= 2 for t in thinks) and len(set(thinks)) == len(thinks)
    fixed = SessionSpec(turns=3, think_s=0.25)
    conv = conversation(fixed, 0, seed=2, user_tokens=USER, reply_tokens=REPLY)
    assert [t.think_s for t in conv.turns] == [0.0, 0.25, 0.25]
    rng = random.Random(0)
    capped = [parse_delay("exp:1:1.5").sample(rng) for _ in range(500)]
    assert max(capped) == 1.5 and 0.7 < sum(capped) / len(capped) < 1.1


@pytest.mark.parametrize("bad", ["uniform:3", "exp:", "soon", "uniform:3:1", "-1"])
def test_bad_think_times_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        parse_delay(bad)


def test_delay_round_trips_its_text_form() -> None:
    for text in ("0.5", "uniform:1:3", "exp:2", "exp:2:5"):
        assert parse_delay(text).describe() == text
    assert parse_delay({"dist": "uniform", "min": 1, "max": 2}) == Delay(
        dist="uniform", min=1, max=2
    )


def test_sessions_mix_hands_out_count_sessions_a_phase() -> None:
    w = Workload(name="s", prompt_tokens=8, max_tokens=4, sessions=SessionSpec(count=2, turns=3))
    mix = WorkloadMix([w], MODEL, 5)
    mix.begin_phase()
    got = [mix.next_conversation() for _ in range(3)]
    assert got[2] is None
    ids = [c.session for c, _ in filter(None, got)]
    assert ids == ["s00000", "s00001"]
    mix.begin_phase()  # the next phase continues the numbering
    nxt = mix.next_conversation()
    assert nxt is not None and nxt[0].session == "s00002"
    conv, specs = nxt
    assert [s.session for s in specs] == ["s00002"] * 3
    assert [s.messages for s in specs] == [t.messages for t in conv.turns]
    hidden = Workload(sessions=SessionSpec(pass_session=False))
    nxt = WorkloadMix([hidden], MODEL, 5).next_conversation()
    assert nxt is not None and all(s.session is None for s in nxt[1])


# -- shared prefixes ---------------------------------------------------------------------------


def _prefix_mix(seed: int = 3, **spec: Any) -> WorkloadMix:
    prefix = PrefixSpec(**{"prefixes": 3, "users": 4, "prefix_tokens": 40, **spec})
    w = Workload(name="px", prompt_tokens="uniform:5:10", max_tokens=4, prefix=prefix)
    return WorkloadMix([w], MODEL, seed)


def test_shared_prefixes_are_deterministic_and_few() -> None:
    def draws(mix: WorkloadMix) -> list[Any]:
        return [mix.next() for _ in range(60)]

    a = draws(_prefix_mix())
    assert a == draws(_prefix_mix())
    assert a != draws(_prefix_mix(seed=4))
    systems = {s.messages[0]["content"] for s in a if s.messages}
    assert len(systems) == 3 and all(words(t) == 40 for t in systems)
    assert {s.session for s in a} == {f"px-p{i}" for i in range(3)}
    for s in a:
        assert s.messages is not None
        user = words(s.messages[1]["content"])
        assert s.history_share == pytest.approx(40 / (40 + user))
    by_user = [_prefix_mix(session="user").next().session for _ in range(1)]
    assert by_user[0] is not None and "-u" in by_user[0]


def test_prefix_share_zero_means_nothing_to_reuse() -> None:
    mix = _prefix_mix(share=0.0)
    specs = [mix.next() for _ in range(20)]
    systems = [s.messages[0]["content"] for s in specs if s.messages]
    assert len(set(systems)) == 20
    assert all(s.history_share == 0.0 for s in specs)


def test_prefix_generate_puts_the_prefix_first() -> None:
    w = Workload(operation="generate", max_tokens=4, prefix=PrefixSpec(prefixes=1, users=1))
    mix = WorkloadMix([w], MODEL, 0)
    spec, twin = mix.next(), mix.next()
    assert spec.prompt is not None and twin.prompt is not None and spec.messages is None
    assert spec.prompt.split()[:512] == twin.prompt.split()[:512]
    assert spec.prompt.split()[512:] != twin.prompt.split()[512:]


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"workloads": [{"sessions": {}}, {"name": "b"}]}, "only workload"),
        ({"workloads": [{"sessions": {}}], "schedules": [{"kind": "rate", "rates": [1]}]},
         "closed loop"),
        ({"workloads": [{"sessions": {}, "prefix": {}}]}, "not both"),
        ({"workloads": [{"sessions": {}, "operation": "generate"}]}, "chats"),
        ({"workloads": [{"prefix": {"share": 2}}]}, "share"),
        ({"workloads": [{"sessions": {"think_s": "later"}}]}, "think"),
    ],
)  # fmt: skip
def test_bad_routing_scenarios(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ScenarioError, match=match):
        validate_scenario({"simulate": True, **data})


def test_strategies_flag_is_checked() -> None:
    assert parse_strategies("affinity, round_robin") == ["affinity", "round_robin"]
    for bad in ("affinity", "affinity,affinity", "affinity,nearest"):
        with pytest.raises(ValueError):
            parse_strategies(bad)


def test_routing_flags_without_their_workload_are_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["--simulate", "--turns", "3", "--quiet"]) == 2
    assert "no sessions workload" in capsys.readouterr().err


# -- sessions through the runner -----------------------------------------------------------------


async def test_sessions_run_in_order_with_think_time_and_session_ids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sessions = SessionSpec(count=4, turns=3, system_tokens=10, think_s="uniform:0.5:5")
    w = Workload(name="s", prompt_tokens="uniform:4:8", max_tokens=3, sessions=sessions)
    events: list[tuple[str, Any]] = []
    passed: list[str | None] = []
    real_chat_op = workload_module.chat_op

    def spy(*args: Any, **kw: Any) -> Any:
        passed.append(kw.get("session"))
        return real_chat_op(*args, **kw)

    async def think(seconds: float) -> None:  # a scripted clock: no time passes
        events.append(("think", seconds))

    def on_record(rec: CallRecord) -> None:
        events.append(("end", int(rec.tags[SEQ_TAG])))

    monkeypatch.setattr(workload_module, "chat_op", spy)
    timing = TimingModel(ttft_base_s=0.001, ttft_per_prompt_token_s=0.0, itl_s=0.0005)
    with FakeEngine("openai", models=(MODEL,), timing=timing, slots=8) as engine:
        collector = Collector(on_record)
        client = SharedClient(
            endpoints=[Endpoint(engine.url, kind="openai")],
            listeners=[collector],
            **client_kwargs(),
        )
        async with client:
            runner = Runner(client, WorkloadMix([w], MODEL, 9), collector, think=think)
            run = await runner.run(PhasePlan("c=2", ClosedLoop(2), Stop(requests=100)))
    # Every turn of the four sessions, and no more: the sessions ran out, not the count.
    assert len(run.requests) == 12 and all(r.ok for r in run.requests)
    assert sorted(filter(None, passed)) == sorted(f"s0000{k}" for k in range(4) for _ in range(3))
    expected = {k: conversation(sessions, k, seed=9, user_tokens=w.prompt_tokens,
                                reply_tokens=w.max_tokens) for k in range(4)}  # fmt: skip
    by_session: dict[str, list[Any]] = {}
    for r in sorted(run.requests, key=lambda r: r.seq):
        assert r.session is not None
        by_session.setdefault(r.session, []).append(r)
    position = {e: i for i, e in enumerate(events)}
    for conv in expected.values():
        turns = by_session[conv.session]
        # The history grows as the engine counts it: each prompt longer than the last.
        counts = [r.input_tokens or 0 for r in turns]
        assert counts == sorted(counts) and len(set(counts)) == 3
        assert [r.history_share for r in turns] == [t.history_share for t in conv.turns]
        for i in range(1, len(turns)):
            before, turn, rec = turns[i - 1], conv.turns[i], turns[i]
            # Its think time passed after the previous turn ended and before it was sent.
            mark = position[("think", turn.think_s)]
            assert position[("end", before.seq)] < mark < position[("end", rec.seq)]
    assert len([e for e in events if e[0] == "think"]) == 4 * 2


# -- the A/B ---------------------------------------------------------------------------------------


def test_strategy_ab_shows_affinity_keeps_sessions_cached(tmp_path: Path) -> None:
    out = tmp_path / "ab"
    argv = [
        "--simulate", "--workload", "sessions", "--sessions", "8", "--turns", "4",
        "--think", "0.01", "--strategies", "affinity,round_robin", "--seed", "5",
        "--no-samplers", "--no-calibrate", "--quiet", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    doc = json.loads((out / "comparison.json").read_text(encoding="utf-8"))
    rows = {r["strategy"]: r for r in doc["strategies"]}
    aff, rr = rows["affinity"], rows["round_robin"]
    assert aff["completed"] == rr["completed"] == 32
    # The same prompts went out both times (same workload and seed).
    assert aff["cache_reported"] == rr["cache_reported"] == 32
    assert aff["cache_hit_ratio"] > 1.25 * rr["cache_hit_ratio"]
    assert aff["history_hit_ratio"] > 1.25 * rr["history_hit_ratio"]
    assert set(aff["routing"]) <= {"affinity", "spill"} and rr["routing"] == {"round_robin": 32}
    for strategy in ("affinity", "round_robin"):
        result = json.loads((out / strategy / "result.json").read_text(encoding="utf-8"))
        assert all(r["cached_tokens"] is not None for r in result["requests"])
        assert result["phases"][0]["summary"]["cache_hit_ratio"] is not None
        assert "Prefix cache and routing" in (out / strategy / "report.html").read_text("utf-8")
    assert "round_robin" in (out / "comparison.html").read_text(encoding="utf-8")


def test_a_real_pool_ab_names_its_salts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The note shows the salts as they are sent (rich took "[ab 1]" for markup and printed
    # nothing in its place).
    with FakeEngine(kind="openai", models=("m",), slots=4) as engine:
        argv = [
            "--endpoint", f"{engine.url},openai", "--model", "m", "--workload", "sessions",
            "--sessions", "2", "--turns", "2", "--think", "0", "--prompt-tokens", "8",
            "--max-tokens", "2", "--strategies", "affinity,round_robin", "--no-samplers",
            "--no-calibrate", "--quiet", "--no-html", "--out", str(tmp_path / "ab"),
        ]  # fmt: skip
        assert main(argv) == 0
    assert "salt of their own ([ab 1], [ab 2], ...)" in " ".join(capsys.readouterr().out.split())


def test_routing_keys_in_a_scenario_file(tmp_path: Path) -> None:
    from shared_ollama.bench.scenario import load_scenario

    path = tmp_path / "s.toml"
    path.write_text(
        'simulate = true\n[simulation]\nengines = ["openai", "openai"]\n'
        "prefix_cache_tokens = 4096\n"
        '[[workloads]]\nname = "chat"\nprompt_tokens = 20\nmax_tokens = 8\n'
        '[workloads.sessions]\ncount = 3\nturns = 2\nthink_s = "exp:0.5:2"\n'
        '[[schedules]]\nkind = "concurrency"\nlevels = [3]\n',
        encoding="utf-8",
    )
    scenario = load_scenario(path)
    sessions = scenario.workloads[0].sessions
    assert sessions is not None and sessions.think_s == Delay(dist="exponential", mean=0.5, max=2)
    assert scenario.simulation.engines == ["openai", "openai"]
    assert scenario.simulation.prefix_cache_tokens == 4096


def test_workload_flag_replaces_the_workloads_of_a_real_pool() -> None:
    from shared_ollama.bench.cli import _parser, build_scenario

    args = _parser().parse_args(
        ["run", "--endpoint", "http://127.0.0.1:9,openai", "--model", "m", "--workload",
         "prefix", "--prefixes", "2", "--prefix-share", "0.5", "--strategy", "affinity"]
    )  # fmt: skip
    scenario = build_scenario(args)
    (w,) = scenario.workloads
    assert w.prefix is not None and (w.prefix.prefixes, w.prefix.share) == (2, 0.5)
    from shared_ollama.bench.simulate import routing_defaults

    defaults = routing_defaults("prefix")["workloads"][0]["prefix"]
    assert w.prefix.users == defaults["users"]  # the rest from the workload's defaults
    assert scenario.pool.strategy == "affinity" and not scenario.simulate


# -- the strategy A/B against real servers: a salt per strategy ---------------------------------


def test_a_salt_goes_before_every_prompt_and_changes_nothing_else() -> None:
    plain_w = Workload(name="p", prompt_tokens=8, max_tokens=4)
    gen_w = Workload(name="g", operation="generate", prompt_tokens=8, max_tokens=4)
    sess_w = Workload(name="s", prompt_tokens=8, max_tokens=4, sessions=SessionSpec(count=1))
    for w in (plain_w, gen_w, _prefix_mix().workloads[0]):
        a, b = WorkloadMix([w], MODEL, 5), WorkloadMix([w], MODEL, 5, salt="[ab 2] ")
        for _ in range(5):
            x, y = a.next(), b.next()
            if x.messages is not None:
                assert y.messages is not None
                assert y.messages[0]["content"] == "[ab 2] " + x.messages[0]["content"]
                assert y.messages[1:] == x.messages[1:]
            else:
                assert (y.prompt, y.system) == ("[ab 2] " + (x.prompt or ""), x.system)
            assert y.session == x.session and y.max_tokens == x.max_tokens
    a, b = WorkloadMix([sess_w], MODEL, 5), WorkloadMix([sess_w], MODEL, 5, salt="[ab 2] ")
    (conv, plain), (_, salted) = a.next_conversation(), b.next_conversation()  # type: ignore[misc]
    for x, y in zip(plain, salted, strict=True):
        assert x.messages is not None and y.messages is not None
        assert y.messages[0]["content"] == "[ab 2] " + x.messages[0]["content"]  # once a turn
        assert y.messages[1:] == x.messages[1:]
    assert all(t.messages[0]["content"] == plain[0].messages[0]["content"] for t in conv.turns)


def test_real_server_strategies_get_salts_of_one_length_and_simulated_ones_none() -> None:
    from shared_ollama.bench.ab import strategy_scenarios

    names = ["affinity", "least_loaded", "round_robin"]
    real = validate_scenario({"model": MODEL, "pool": {"endpoints": [{"url": "http://h:1"}]}})
    salts = [s.prompt_salt for s in strategy_scenarios(real, names)]
    assert salts == ["[ab 1] ", "[ab 2] ", "[ab 3] "]
    simulated = validate_scenario({"simulate": True})
    assert {s.prompt_salt for s in strategy_scenarios(simulated, names)} == {""}


# -- sessions that send the server's replies back -------------------------------------------------


def test_an_echoed_turn_carries_the_history_as_sent_and_the_reply() -> None:
    sessions = SessionSpec(count=1, turns=3, system_tokens=6)
    w = Workload(name="s", prompt_tokens=4, max_tokens=3, sessions=sessions)
    _, specs = WorkloadMix([w], MODEL, 2).next_conversation()  # type: ignore[misc]
    first, second = specs[0], specs[1]
    assert first.messages is not None and second.messages is not None
    turn = echoed(second, first.messages, "the server said this")
    assert turn.messages == [
        *first.messages,
        {"role": "assistant", "content": "the server said this"},
        second.messages[-1],
    ]
    words_all = sum(len(str(m["content"]).split()) for m in turn.messages)
    new = len(str(second.messages[-1]["content"]).split())
    assert turn.history_share == pytest.approx((words_all - new) / words_all)
    assert second.messages[-2]["content"] != "the server said this"  # the drawn one, untouched


@pytest.mark.parametrize("stream", [True, False])
async def test_echoing_sessions_send_the_servers_replies_back(stream: bool) -> None:
    sessions = SessionSpec(count=2, turns=3, system_tokens=5, echo_replies=True)
    w = Workload(name="s", prompt_tokens=4, max_tokens=5, stream=stream, sessions=sessions)
    sent: list[tuple[str | None, list[dict[str, Any]]]] = []
    replies: list[tuple[str | None, str]] = []
    timing = TimingModel(ttft_base_s=0.0, ttft_per_prompt_token_s=0.0, itl_s=0.0)
    with FakeEngine("openai", models=(MODEL,), timing=timing, slots=8) as engine:
        collector = Collector()
        client = SharedClient(
            endpoints=[Endpoint(engine.url, kind="openai")], listeners=[collector],
            **client_kwargs(),
        )  # fmt: skip
        async with client:
            runner = Runner(client, WorkloadMix([w], MODEL, 4), collector)
            send = runner._send

            async def watched(spec: Any, *args: Any, reply: list[str] | None = None) -> None:
                sent.append((spec.session, list(spec.messages)))
                await send(spec, *args, reply=reply)
                assert reply is not None
                replies.append((spec.session, "".join(reply)))

            runner._send = watched  # type: ignore[method-assign]
            run = await runner.run(PhasePlan("c=2", ClosedLoop(2), Stop(requests=100)))
    assert len(run.requests) == 6 and all(r.ok for r in run.requests)
    for session in ("s00000", "s00001"):
        prompts = [m for s, m in sent if s == session]
        answers = [r for s, r in replies if s == session]
        assert len(prompts) == len(answers) == 3 and all(answers)
        for i in (1, 2):
            # Each later turn: everything the previous turn sent, its real reply, a new message.
            assert prompts[i][: len(prompts[i - 1])] == prompts[i - 1]
            assert prompts[i][len(prompts[i - 1])] == {
                "role": "assistant",
                "content": answers[i - 1],
            }
            assert len(prompts[i]) == len(prompts[i - 1]) + 2
