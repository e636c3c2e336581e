"""Locust: a real master and two workers (subprocesses) against a FakeEngine; the counts
Locust aggregated and the bench records must equal the engine's own counters.

Locust is never imported here: importing it monkey-patches this process with gevent.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from shared_ollama.bench.cli import main
from shared_ollama.bench.locust_report import load_locust_run
from shared_ollama.bench.result import RequestRecord, load_result
from shared_ollama.testing import FakeEngine, TimingModel
from shared_ollama.usage import Ledger

pytestmark = [pytest.mark.locust, pytest.mark.timeout(180)]

MODEL = "fake-llama"
FAST = TimingModel(ttft_base_s=0.002, ttft_per_prompt_token_s=0.0, itl_s=0.001)
#: Calls of 0.5 to 1.7 s: some are always in flight when the run ends, and they end later
#: than Locust's master waits for its workers' last reports (0.5 s) unless they drain first.
SLOW = TimingModel(ttft_base_s=0.05, ttft_per_prompt_token_s=0.0, itl_s=0.2)
#: The engine's generation routes (chat streams, generate does not).
GENERATION = ("/v1/chat/completions", "/v1/completions")
#: Longest any Locust process may take (its run is a few seconds; start-up is imports).
WAIT_S = 90
SCENARIO = f"""
model = "{MODEL}"
seed = 7

[[workloads]]
name = "talk"
weight = 2
operation = "chat"
prompt_tokens = "uniform:4:20"
max_tokens = "uniform:3:9"

[[workloads]]
name = "complete"
operation = "generate"
stream = false
prompt_tokens = 12
max_tokens = 5
"""


@pytest.fixture(autouse=True)
def _locust_installed() -> None:
    # find_spec, not import: importing locust would gevent-patch the test process.
    if importlib.util.find_spec("locust") is None:
        message = "locust is not installed: pip install 'shared-ollama[locust]'"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message} (CI=true: failing instead of skipping)", pytrace=False)
        pytest.skip(message)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Locust:
    """Locust processes started by a test, each logging to a file; all killed at the end."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        (folder / "locustfile.py").write_text(
            "from shared_ollama.bench.locust import SharedOllamaUser  # noqa: F401\n",
            encoding="utf-8",
        )
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("LOCUST_")}
        self.env["PYTHONUNBUFFERED"] = "1"

    def start(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> None:
        log = (self.folder / f"{name}.log").open("wb")
        cmd = [sys.executable, "-m", "locust", "-f", "locustfile.py", *args]
        proc = subprocess.Popen(
            cmd,
            cwd=self.folder,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**self.env, **(env or {})},
        )
        log.close()
        self.procs.append((name, proc))

    def logs(self) -> str:
        tails = []
        for name, _ in self.procs:
            text = (self.folder / f"{name}.log").read_text(encoding="utf-8", errors="replace")
            tails.append(f"--- {name} (last lines) ---\n" + "\n".join(text.splitlines()[-25:]))
        return "\n".join(tails)

    def wait(self, name: str) -> int:
        """The exit code of ``name``; a process that does not end in time fails the test."""
        proc = dict(self.procs)[name]
        try:
            return proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"locust {name} did not end in {WAIT_S} s\n{self.logs()}", pytrace=False)

    def kill(self) -> None:
        for _, proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def locust(tmp_path: Path) -> Iterator[_Locust]:
    runs = _Locust(tmp_path)
    try:
        yield runs
    finally:
        runs.kill()


def _stats(path: Path) -> dict[str, dict[str, int]]:
    """Locust's --json-file entries summed by request type."""
    out: dict[str, dict[str, int]] = {}
    for entry in json.loads(path.read_text(encoding="utf-8")):
        kind = out.setdefault(entry["method"], {"requests": 0, "failures": 0, "length": 0})
        kind["requests"] += entry["num_requests"]
        kind["failures"] += entry["num_failures"]
        kind["length"] += entry["total_content_length"]
    return out


def _records(out: Path) -> list[dict[str, Any]]:
    lines = (out / "records.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_master_and_two_workers_count_what_the_engine_served(
    locust: _Locust, tmp_path: Path
) -> None:
    scenario = tmp_path / "scenario.toml"
    scenario.write_text(SCENARIO, encoding="utf-8")
    out, stats_file, port = tmp_path / "run", tmp_path / "stats", _free_port()
    with FakeEngine(kind="openai", models=(MODEL,), timing=SLOW, slots=32) as engine:
        locust.start("master", [
            "--headless", "--master", "--master-bind-host", "127.0.0.1",
            "--master-bind-port", str(port), "--expect-workers", "2",
            "--expect-workers-max-wait", "60",
            "-u", "6", "-r", "6", "--run-time", "4s", "--stop-timeout", "20",
            "--host", engine.url, "--bench-scenario", str(scenario), "--bench-out", str(out),
            "--json-file", str(stats_file), "--only-summary",
        ])  # fmt: skip
        for n in (1, 2):
            worker = ["--worker", "--master-host", "127.0.0.1", "--master-port", str(port)]
            locust.start(f"worker{n}", worker)
        code = locust.wait("master")
        assert code == 0, f"master exit code {code}\n{locust.logs()}"
        for n in (1, 2):
            assert locust.wait(f"worker{n}") == 0, locust.logs()
        served = engine.stats

    calls = sum(served.requests.get(path, 0) for path in GENERATION)
    assert calls > 0, locust.logs()
    stats = _stats(stats_file.with_suffix(".json"))
    # Locust's master counted exactly the calls the engine served, tokens as it counted them.
    assert stats["chat"]["requests"] + stats["generate"]["requests"] == calls, stats
    assert stats["chat"]["failures"] + stats["generate"]["failures"] == 0, stats
    assert stats["chat"]["length"] + stats["generate"]["length"] == served.tokens_generated
    assert stats["chat"]["requests"] == served.requests.get("/v1/chat/completions", 0)

    rows = _records(out)
    assert {row["worker"] for row in rows} and len({row["worker"] for row in rows}) == 2
    records = [RequestRecord.model_validate(row) for row in rows]
    assert len(records) == calls
    assert sum(r.input_tokens or 0 for r in records) == served.prompt_tokens
    assert sum(r.output_tokens or 0 for r in records) == served.tokens_generated
    # The ttft and itl entries: one TTFT per stream (its length the prompt tokens), one ITL
    # per gap between content chunks.
    streams = [r for r in records if r.stream]
    assert stats["ttft"]["requests"] == len(streams) == stats["chat"]["requests"]
    assert stats["ttft"]["length"] == sum(r.input_tokens or 0 for r in streams)
    assert stats["itl"]["requests"] == sum(len(r.derived().itls_ns) for r in streams) > 0

    assert main(["report", "--from-locust", str(out)]) == 0
    result = load_result(out / "result.json")
    assert result.summary.requests == result.summary.completed == calls
    assert result.summary.total_input_tokens == served.prompt_tokens
    assert result.summary.total_output_tokens == served.tokens_generated
    assert result.summary.ttft_ms is not None and result.summary.itl_ms is not None
    assert [p.name for p in result.phases] == ["locust"] and result.phases[0].concurrency == 6
    assert (out / "report.html").stat().st_size > 0
    assert (out / "requests.csv").read_text(encoding="utf-8").count("\n") == calls + 1


def test_one_process_under_gevent_keeps_probes_deadlines_and_ledger(
    locust: _Locust, tmp_path: Path
) -> None:
    """A single Locust process: pool from SHARED_OLLAMA_CONFIG, an explicit ledger, fast
    health probes and a short deadline. Under gevent each background thread still works."""
    ledger = tmp_path / "usage.sqlite3"
    pool = tmp_path / "pool.toml"
    pool.write_text(
        "[health]\ninterval_s = 0.2\n[timeouts]\ntotal_s = 1.0\n"
        f"[usage]\npath = {json.dumps(str(ledger))}\n",
        encoding="utf-8",
    )
    out = tmp_path / "run"
    with FakeEngine(kind="ollama", models=(MODEL,), timing=FAST, slots=8) as engine:
        engine.faults.delay_first_byte(30.0)  # one call: the watchdog must cut it at 1 s
        env = {"SHARED_OLLAMA_CONFIG": str(pool), "SHARED_OLLAMA_ENDPOINTS": engine.url}
        locust.start("local", [
            "--headless", "-u", "3", "-r", "3", "--run-time", "4s", "--stop-timeout", "20",
            "--bench-model", MODEL, "--bench-max-tokens", "4", "--bench-out", str(out),
            "--json-file", str(tmp_path / "stats"), "--only-summary",
        ], env)  # fmt: skip
        code = locust.wait("local")
        served = engine.stats
    assert code in (0, 1), f"exit code {code}\n{locust.logs()}"  # 1: Locust saw a failure
    stats = _stats(tmp_path / "stats.json")
    calls = served.requests.get("/api/chat", 0)
    assert stats["chat"]["requests"] == calls > 1, locust.logs()
    # The deadline watchdog: the delayed call failed as a Timeout, the others went on.
    assert stats["chat"]["failures"] == 1, locust.logs()
    records = [RequestRecord.model_validate(row) for row in _records(out)]
    assert [r.error_type for r in records if not r.ok] == ["Timeout"]
    # Health probes ran during the test (start-up probed /api/version once).
    assert served.requests.get("/api/version", 0) > 2, served.requests
    # The ledger (asked for explicitly) wrote every call.
    with Ledger(ledger) as usage:
        assert usage.count() == calls
    result = load_locust_run(out)
    assert result.summary.requests == calls and result.summary.failed == 1


SESSIONS = """
model = "fake-llama"
seed = 11

[pool]
strategy = "affinity"
endpoints = [{ url = "URL_A", kind = "openai" }, { url = "URL_B", kind = "openai" }]

[[workloads]]
name = "talk"
prompt_tokens = 6
max_tokens = 5
# Replies end early at the stop string, so an echoed reply is shorter than a drawn one.
options = { stop = ["e"] }

[workloads.sessions]
count = 3
turns = 3
system_tokens = 8
systems = 2
think_s = 0.05
echo_replies = true

[[schedules]]
kind = "concurrency"
levels = [1]

[warmup]
requests = 0

[samplers]
enabled = false
"""


def _turns(records: list[RequestRecord]) -> dict[str, list[RequestRecord]]:
    """Each session's records in the order they were sent."""
    out: dict[str, list[RequestRecord]] = {}
    for rec in sorted(records, key=lambda r: r.t_start_ns):
        assert rec.session is not None, rec
        out.setdefault(rec.session, []).append(rec)
    return out


def test_a_sessions_workload_sends_the_benchs_conversations(
    locust: _Locust, tmp_path: Path
) -> None:
    """Each Locust user holds one conversation at a time: its turns in order, with think
    times, the session id passed as ``session=`` (affinity keeps a session on one endpoint)
    and the server's replies echoed into the history, the very prompts the bench's runner
    sends for the seed (before, each call was a single-turn request)."""
    with (
        FakeEngine(kind="openai", models=(MODEL,), timing=FAST, slots=8) as a,
        FakeEngine(kind="openai", models=(MODEL,), timing=FAST, slots=8) as b,
    ):
        scenario = tmp_path / "sessions.toml"
        text = SESSIONS.replace("URL_A", a.url).replace("URL_B", b.url)
        scenario.write_text(text, encoding="utf-8")
        bench_out = tmp_path / "bench"
        argv = ["--scenario", str(scenario), "--quiet", "--no-html", "--out", str(bench_out)]
        assert main(argv) == 0
        out = tmp_path / "run"
        locust.start("local", [
            "--headless", "-u", "2", "-r", "2", "--run-time", "3s", "--stop-timeout", "10",
            "--bench-scenario", str(scenario), "--bench-out", str(out),
            "--json-file", str(tmp_path / "stats"), "--only-summary",
        ])  # fmt: skip
        assert locust.wait("local") == 0, locust.logs()
    reference = _turns(load_result(bench_out / "result.json").requests)
    sent = _turns([RequestRecord.model_validate(row) for row in _records(out)])
    assert set(reference) == {"s00000", "s00001", "s00002"}
    # More sessions than the workload's count: Locust has no phases, the sessions go on.
    assert len(sent) > 3 and all(session.startswith("s") for session in sent)
    assert {"s00000", "s00001"} <= set(sent)
    for session, turns in sent.items():
        assert len(turns) <= 3 and all(r.ok for r in turns), turns
        assert len({r.endpoint for r in turns}) == 1  # the session's own endpoint
        assert {r.routing for r in turns} <= {"affinity", "spill"}
        tokens = [r.input_tokens for r in turns]
        assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)  # it grows
        if session in reference:  # the runner's prompts, the echoed replies included
            assert tokens == [r.input_tokens for r in reference[session][: len(turns)]]


def test_bad_flags_end_the_run_with_one_line(locust: _Locust) -> None:
    locust.start("local", [
        "--headless", "-u", "1", "--run-time", "2s", "--host", "http://127.0.0.1:9",
        "--bench-model", MODEL, "--bench-operation", "shout",
    ])  # fmt: skip
    assert locust.wait("local") == 2, locust.logs()
    log = (locust.folder / "local.log").read_text(encoding="utf-8")
    assert "shared_ollama: invalid scenario" in log and "operation" in log
    assert "Traceback" not in log


def test_report_from_locust_refuses_other_folders(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["report", "--from-locust", str(tmp_path)]) == 2
    assert "no locust_run.json" in capsys.readouterr().err
    (tmp_path / "locust_run.json").write_text('{"schema": "shared_ollama.bench.locust"}')
    (tmp_path / "records.jsonl").write_text('{"seq": "x"}\n')
    assert main(["report", "--from-locust", str(tmp_path)]) == 2
    assert "records.jsonl:1: not a bench record" in capsys.readouterr().err
    assert main(["report"]) == 2


def test_bench_imports_no_locust() -> None:
    """The extra stays optional: the bench, its CLI and the Locust report import no gevent."""
    code = (
        "import sys, shared_ollama.bench.cli, shared_ollama.bench.locust_report; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('locust', 'gevent')))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert done.stdout.strip() == "[]"
