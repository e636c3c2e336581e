"""Distributed load with Locust: ``SharedOllamaUser`` sends the bench's workloads through
``SyncSharedClient`` and reports every call to Locust (needs the ``locust`` extra).

A locustfile of one line is enough::

    from shared_ollama.bench.locust import SharedOllamaUser  # noqa: F401

then ``locust -f locustfile.py --host http://gpu-1:8000 --bench-model my-model`` (one
process), or ``--master`` on one machine and ``--worker --master-host HOST`` on as many as
needed. Each call is three kinds of Locust entries, named by workload: ``chat`` or
``generate`` (response time: E2E, length: the server's output tokens, failed on error),
``ttft`` (streams; length: the server's prompt tokens) and ``itl`` (one entry per gap
between content chunks). The master aggregates them like any request; its "Aggregated" row
mixes the three kinds, so read the rows by type. With ``--bench-out DIR`` the master also
keeps every call's bench record (workers send theirs with their stats reports), and
``python -m shared_ollama.bench report --from-locust DIR`` makes the usual result and
report from them (``bench.locust_report``). When the master stops, it first has every
worker stop its users (calls in flight end, up to ``--stop-timeout``) and report, so that
Locust's counts and the records hold every call the servers saw.

Flags (each also from the environment: ``LOCUST_BENCH_SCENARIO``, ...): ``--bench-scenario``
(a bench scenario TOML: its pool, workloads, model and seed; schedules are Locust's),
``--bench-model``, ``--bench-prompt-tokens``, ``--bench-max-tokens``,
``--bench-operation``, ``--bench-stream``, ``--bench-seed``, ``--bench-out``. The pool is
``--host`` as a single endpoint, else the scenario's ``[pool]``, else ``SHARED_OLLAMA_CONFIG``
/ ``SHARED_OLLAMA_ENDPOINTS``. Prompt lengths are in words (no calibration requests).
Files named by a flag are read by every process: give workers the same paths.

Gevent: Locust monkey-patches threads, so the client's background threads run as greenlets
of the worker. Health probes and the deadline watchdog (which shuts a blocked socket down)
work as they are and stay on. The usage ledger is off unless the pool configuration sets
``[usage]`` explicitly (as in ``bench run``): its SQLite calls are C calls that gevent cannot
switch away from, so a write, and above all a wait for the lock of a ledger file that other
workers write too, stalls every user of the worker and skews their timings.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import platform
import socket
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from locust import User, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import MasterRunner, WorkerRunner
from pydantic import ValidationError

from ..client import SyncSharedClient
from ..config import Endpoint, PoolConfig, load_config
from ..errors import ConfigError, SharedOllamaError
from ..records import CallRecord
from .locust_report import META_FILE, PHASE, RECORDS_FILE
from .result import RequestRecord
from .scenario import (
    Scenario,
    ScenarioError,
    public_scenario,
    read_scenario_file,
    validate_scenario,
)
from .workload import RequestSpec, Turn, WorkloadMix, echoed

__all__ = [
    "META_FILE",
    "PHASE",
    "RECORDS_FILE",
    "SharedOllamaUser",
    "build_scenario",
]

log = logging.getLogger("shared_ollama.bench.locust")

#: The stats-report key the workers' records travel under.
_REPORT_KEY = "shared_ollama_records"
#: Master -> workers: stop your users now and report; workers -> master: done.
_DRAIN, _DRAINED = "shared_ollama_drain", "shared_ollama_drained"
#: How long past the stop timeout the master waits for the workers to drain.
_DRAIN_GRACE_S = 10.0
_CALL_TAG = "locust.call"
#: ``*_ns`` fields of a RequestRecord that are clock readings (moved to the wall clock).
_CLOCK_FIELDS = (
    "t_scheduled_ns",
    "t_start_ns",
    "t_first_send_ns",
    "t_first_chunk_ns",
    "t_last_token_ns",
    "t_end_ns",
)
#: Computed fields: derived again when a record is read, so not sent.
_DERIVED = {"ttft_ms", "tpot_ms", "e2e_ms", "call_ms", "client_queue_ms", "send_lag_ms"}
#: Records a single-process run keeps in memory before appending them to the file.
_FLUSH_EVERY = 500


def _listen(hook: Any, listener: Callable[..., None]) -> None:
    """``hook.add_listener(listener)`` (locust's EventHook is untyped)."""
    hook.add_listener(listener)


def _add_flags(parser: Any, **_: Any) -> None:
    flags = (
        ("--bench-scenario", "bench scenario TOML: pool, workloads, model, seed"),
        ("--bench-model", "logical model name (overrides the scenario's)"),
        ("--bench-prompt-tokens", "prompt length in words: N | uniform:MIN:MAX | normal:M:SD"),
        ("--bench-max-tokens", "completion length (same forms)"),
        ("--bench-operation", "chat or generate"),
        ("--bench-stream", "true or false: stream the replies (default true)"),
        ("--bench-seed", "seed of the workload draws (each worker adds its index)"),
        ("--bench-out", "master: keep every call's bench record in this folder"),
    )
    for flag, text in flags:
        env = "LOCUST_" + flag.removeprefix("--").replace("-", "_").upper()
        parser.add_argument(flag, env_var=env, default=None, help=text)


def _option(environment: Environment, name: str) -> str | None:
    value = getattr(environment.parsed_options, name, None)
    return None if value in (None, "") else str(value)


def _pool(data: Mapping[str, Any], host: str | None) -> PoolConfig:
    """``--host`` as the only endpoint, else the scenario's pool, else the environment's."""
    raw = data.get("pool")
    try:
        cfg = PoolConfig.model_validate(raw) if raw is not None else load_config()
    except ValidationError as exc:  # never echo the values: an api_key may be among them
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
            for e in exc.errors(include_input=False)
        )
        raise ConfigError(f"invalid [pool] in --bench-scenario: {where}") from None
    if host:
        try:
            cfg = cfg.model_copy(update={"endpoints": [Endpoint(host)]})
        except ValueError:
            raise ConfigError("--host is not a valid endpoint URL") from None
    if not cfg.endpoints:
        raise ConfigError(
            "no endpoints: give --host URL, a [pool] in --bench-scenario, or "
            "SHARED_OLLAMA_CONFIG / SHARED_OLLAMA_ENDPOINTS"
        )
    return cfg


def build_scenario(environment: Environment) -> Scenario:
    """The scenario the ``--bench-*`` flags and ``--host`` describe (``ConfigError`` or
    ``ScenarioError`` when they describe none)."""
    path = _option(environment, "bench_scenario")
    data: dict[str, Any] = dict(read_scenario_file(path)) if path else {}
    pool = _pool(data, environment.host)
    data["pool"] = pool
    data.pop("schedules", None)  # Locust's users and spawn rate are the schedule
    if (model := _option(environment, "bench_model")) is not None:
        data["model"] = model
    if (seed := _option(environment, "bench_seed")) is not None:
        try:
            data["seed"] = int(seed)
        except ValueError:
            raise ScenarioError(f"--bench-seed must be an integer, got {seed!r}") from None
    fields: dict[str, Any] = {
        "prompt_tokens": _option(environment, "bench_prompt_tokens"),
        "max_tokens": _option(environment, "bench_max_tokens"),
        "operation": _option(environment, "bench_operation"),
        "stream": _option(environment, "bench_stream"),
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    if fields:
        workloads = data.get("workloads") or [{}]
        data["workloads"] = [{**w, **fields} if isinstance(w, dict) else w for w in workloads]
    data["calibrate"] = "off"
    scenario = validate_scenario(data, path or "--bench-* flags")
    # Scenario validation copies the pool: keep knowing whether [usage] was set.
    return scenario.model_copy(update={"pool": pool})


class _Talk:
    """One user's conversation in a sessions workload: the turns left, the messages of the
    last turn sent and the server's reply to it (for ``echo_replies``)."""

    __slots__ = ("reply", "sent", "turns")

    def __init__(self) -> None:
        self.turns: deque[tuple[Turn, RequestSpec]] = deque()
        self.sent: list[dict[str, Any]] | None = None
        self.reply: list[str] = []

    def think_s(self) -> float:
        """Seconds to wait before the next turn (0 before a conversation's first)."""
        return self.turns[0][0].think_s if self.turns else 0.0


class _Process:
    """One Locust process's client, workload mix and records (users share them)."""

    def __init__(self, environment: Environment) -> None:
        self.environment = environment
        self.lock = threading.Lock()
        self.client: SyncSharedClient | None = None
        self.mix: WorkloadMix | None = None
        self.failed: str | None = None
        self.calls = itertools.count(1)
        self.finished: dict[str, CallRecord] = {}
        #: Records not yet sent (worker) or written (single process).
        self.pending: list[dict[str, Any]] = []
        # Monotonic readings become wall-clock ones: workers' monotonic clocks differ.
        self.to_wall_ns = time.time_ns() - time.monotonic_ns()

    @property
    def keeps_records(self) -> bool:
        """Whether the run keeps bench records (``--bench-out``, given to the master)."""
        return _option(self.environment, "bench_out") is not None

    def _listen(self, record: CallRecord) -> None:
        if (call := record.tags.get(_CALL_TAG)) is not None:
            self.finished[call] = record

    def ready(self) -> tuple[SyncSharedClient, WorkloadMix]:
        """The process's client and mix, made at the first call of a test."""
        with self.lock:  # a gevent lock under Locust: other users wait for the start-up
            if self.failed is not None:
                raise StopUser()
            if self.client is None or self.mix is None:
                try:
                    self._start()
                except (ConfigError, ScenarioError, SharedOllamaError, ValueError) as exc:
                    self.failed = " ".join(str(exc).split())
                    log.error("shared_ollama: cannot start the users: %s", self.failed)
                    raise StopUser() from None
            assert self.client is not None and self.mix is not None
            return self.client, self.mix

    def _start(self) -> None:
        scenario = build_scenario(self.environment)
        runner = self.environment.runner
        index = runner.worker_index if isinstance(runner, WorkerRunner) else 0
        # Each worker draws its own requests (and sessions, with system prompts of their
        # own); its session ids name it, so two workers' conversations never share an id.
        # One process sends the bench's own sessions for the seed (ids s00000, ...).
        self.mix = WorkloadMix(
            scenario.workloads,
            scenario.model,
            scenario.seed + index,
            salt=scenario.prompt_salt,
            session_prefix=f"w{index}s" if index else "s",
        )
        usage = None if "usage" in scenario.pool.model_fields_set else False
        client = SyncSharedClient(
            config=scenario.pool, project="bench", usage=usage, listeners=[self._listen]
        )
        client.start()
        self.client = client

    def close(self) -> None:
        """End the test's client (a new test starts a new one)."""
        with self.lock:
            client, self.client, self.mix, self.failed = self.client, None, None, None
        if client is not None:
            client.close()
        self.finished.clear()

    # -- one call -----------------------------------------------------------------------
    def call(self, talk: _Talk) -> float:
        """Send the mix's next request (a sessions workload: the user's next turn) and report
        it to Locust; the seconds the user thinks before its next call."""
        client, mix = self.ready()
        spec = mix.next() if mix.sessions is None else self._turn(mix, talk)
        mix.drawn.clear()  # only the bench's prompt-length report reads it
        call = str(next(self.calls))
        content: list[bool] | None = [] if spec.stream else None
        reply: list[str] | None = [] if mix.echo_replies else None
        error: Exception | None = None
        t0 = time.perf_counter()
        try:
            _exchange(client, spec, {_CALL_TAG: call}, content, reply)
        except Exception as exc:  # library errors are failures; anything else is too
            error = exc
        finally:
            record = self.finished.pop(call, None)
        talk.sent, talk.reply = spec.messages, reply or []
        if record is None:  # refused before it started (a budget, a closed client)
            elapsed_ms = (time.perf_counter() - t0) * 1e3
            self._fire(spec.operation, spec.workload, elapsed_ms, 0, error or _NoRecord())
            return talk.think_s()
        req = RequestRecord.from_call(
            record,
            seq=int(call),
            phase=PHASE,
            workload=spec.workload,
            chunk_content=content,
            session=spec.session,
            history_share=spec.history_share,
        )
        self._report(req, spec, error)
        if self.keeps_records:
            self._keep(req)
        return talk.think_s()

    @staticmethod
    def _turn(mix: WorkloadMix, talk: _Talk) -> RequestSpec:
        """The user's next turn; a new conversation once its last one is done. Locust has
        no phases: the sessions go on (numbered on) past the workload's ``count``."""
        if not talk.turns:
            drawn = mix.next_conversation()
            if drawn is None:
                mix.begin_phase()
                drawn = mix.next_conversation()
            assert drawn is not None
            conv, specs = drawn
            talk.turns.extend(zip(conv.turns, specs, strict=True))
            talk.sent, talk.reply = None, []
        _, spec = talk.turns.popleft()
        return echoed(spec, talk.sent, talk.reply)

    def _report(self, req: RequestRecord, spec: RequestSpec, error: Exception | None) -> None:
        failure = error if error is not None or req.ok else _Failed(req)
        self._fire(spec.operation, spec.workload, req.e2e_ms, req.output_tokens or 0, failure)
        if failure is not None:
            return
        derived = req.derived()
        if derived.ttft_ns is not None:
            self._fire("ttft", spec.workload, derived.ttft_ns / 1e6, req.input_tokens or 0, None)
        for gap in derived.itls_ns:
            self._fire("itl", spec.workload, gap / 1e6, 0, None)

    def _fire(
        self, kind: str, name: str, ms: float, length: int, error: BaseException | None
    ) -> None:
        hook: Any = self.environment.events.request  # locust's EventHook is untyped
        hook.fire(
            request_type=kind,
            name=name,
            response_time=ms,
            response_length=length,
            exception=error,
            context={},
        )

    def _keep(self, req: RequestRecord) -> None:
        shift = self.to_wall_ns
        moved = {f: v + shift for f in _CLOCK_FIELDS if (v := getattr(req, f)) is not None}
        row = req.model_dump(mode="json", exclude=_DERIVED) | moved
        self.pending.append(row)
        if not isinstance(self.environment.runner, WorkerRunner) and (
            len(self.pending) >= _FLUSH_EVERY
        ):
            self.flush()

    def take(self) -> list[dict[str, Any]]:
        """The records not yet handed on, handed over."""
        rows, self.pending = self.pending, []
        return rows

    def flush(self) -> None:
        """Single process: append the pending records to ``--bench-out``."""
        if (out := _option(self.environment, "bench_out")) is not None:
            append_records(Path(out), self.take(), "local")


class _NoRecord(SharedOllamaError):
    """The call left no record (it was refused before it started)."""

    def __init__(self) -> None:
        super().__init__("the call was refused before it started")


class _Failed(SharedOllamaError):
    """The call's record says it failed (its error type names how)."""

    def __init__(self, req: RequestRecord) -> None:
        super().__init__(f"{req.outcome}: {req.error_type or 'unknown'}")


def _exchange(
    client: SyncSharedClient,
    spec: RequestSpec,
    tags: dict[str, str],
    content: list[bool] | None,
    reply: list[str] | None = None,
) -> None:
    """One request as the bench's runner sends it (see ``bench.runner``); ``reply`` (a
    session that echoes replies) gets the reply's text."""
    if content is None:
        opts = spec.call_options()
        session: dict[str, Any] = {} if spec.session is None else {"session": spec.session}
        if spec.operation == "chat":
            text = client.chat(spec.model, spec.messages, options=opts, tags=tags, **session)
            said = text.message.content
        else:
            prompt, system = spec.prompt or "", spec.system
            made = client.generate(
                spec.model, prompt, system=system, options=opts, tags=tags, **session
            )
            said = made.response
        if reply is not None:
            reply.append(said or "")
        return
    # Streams read as content flags, no typed chunk built (the bench runner's way): the call
    # is routed, retried and accounted as any stream, at less CPU per chunk.
    flags = client._content_flags(spec.stream_op(spec.session), tags, text=reply is not None)
    if reply is None:
        content.extend(flags)
        return
    for flag, piece in flags:
        content.append(flag)
        reply.append(piece)


def append_records(out: Path, rows: list[dict[str, Any]], worker: str) -> None:
    """Append bench records (JSON objects) to ``out/records.jsonl``, each with its worker."""
    if not rows:
        return
    out.mkdir(parents=True, exist_ok=True)
    with (out / RECORDS_FILE).open("a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps({**row, "worker": worker}, separators=(",", ":")) + "\n")


# -- per process: state, and the hooks that move records --------------------------------
_PROCESSES: weakref.WeakKeyDictionary[Environment, _Process] = weakref.WeakKeyDictionary()


def _process(environment: Environment) -> _Process:
    proc = _PROCESSES.get(environment)
    if proc is None:
        proc = _PROCESSES[environment] = _Process(environment)
    return proc


def _write_meta(environment: Environment, *, fresh: bool = False, **fields: Any) -> None:
    """Write (``fresh``: start anew, an earlier test's records dropped) or update the run's
    description in ``--bench-out``."""
    out = _option(environment, "bench_out")
    if out is None:
        return
    path = Path(out) / META_FILE
    meta: dict[str, Any] = {}
    if fresh:
        (Path(out) / RECORDS_FILE).unlink(missing_ok=True)
    elif path.exists():
        meta = json.loads(path.read_text(encoding="utf-8"))
    meta.update(fields)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(meta, indent=1), encoding="utf-8")


class _Drain:
    """Master: before a stop, have every worker end its calls and report them.

    Locust's master tells its workers to quit and waits 0.5 s for their last stats reports;
    a worker's users finish their calls in flight first (``--stop-timeout``), so with calls
    longer than that the last calls reached the servers but neither Locust's counts nor the
    records. Draining first makes both complete: each worker stops its users, sends its
    stats (with its last records), then says so; the master waits for all of them.
    """

    def __init__(self, runner: MasterRunner) -> None:
        self.runner = runner
        self.done: set[str] = set()
        self.changed = threading.Event()

    def drained(self, environment: Environment, msg: Any, **_: Any) -> None:
        self.done.add(str(msg.node_id))
        self.changed.set()

    def __call__(self, environment: Environment, **_: Any) -> None:
        workers = {str(c.id) for c in self.runner.clients.all}
        if not workers:
            return
        self.done.clear()
        for worker in workers:
            self.runner.send_message(_DRAIN, None, client_id=worker)
        deadline = time.monotonic() + float(environment.stop_timeout or 0) + _DRAIN_GRACE_S
        while not workers <= self.done and (left := deadline - time.monotonic()) > 0:
            self.changed.wait(min(left, 0.2))  # a gevent wait: the reports keep arriving
            self.changed.clear()
        if missing := workers - self.done:
            log.warning("shared_ollama: %d workers did not report their last calls", len(missing))


def _drain_worker(runner: WorkerRunner) -> None:
    """Stop the users (their calls in flight end first), then send the stats and say so."""
    runner.stop()
    runner._send_stats()  # the worker's own final report (Locust sends it again at quit)
    runner.send_message(_DRAINED)


def _on_init(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        # The records ride the worker's stats reports: the master has every record of the
        # calls Locust itself counted.
        def on_report(client_id: str, data: dict[str, Any]) -> None:
            if rows := _process(environment).take():
                data[_REPORT_KEY] = rows

        def on_drain(environment: Environment, msg: Any, **_: Any) -> None:
            # Its own greenlet: the worker's message loop must not wait for the users.
            threading.Thread(target=_drain_worker, args=(runner,), daemon=True).start()

        _listen(environment.events.report_to_master, on_report)
        runner.register_message(_DRAIN, on_drain)
        return
    if isinstance(runner, MasterRunner):

        def on_worker(client_id: str, data: dict[str, Any]) -> None:
            rows = data.get(_REPORT_KEY)
            if rows and (out := _option(environment, "bench_out")) is not None:
                append_records(Path(out), rows, client_id)

        drain = _Drain(runner)
        runner.register_message(_DRAINED, drain.drained)
        _listen(environment.events.worker_report, on_worker)
        _listen(environment.events.test_stopping, drain)
    # The master and a single process check the flags now: in a headless run a mistake ends
    # the run before any user starts, as one line (the web UI may still be given a host).
    try:
        build_scenario(environment)
    except (ConfigError, ScenarioError) as exc:
        log.error("shared_ollama: %s", " ".join(str(exc).split()))
        if getattr(environment.parsed_options, "headless", False):
            raise SystemExit(2) from None


def _on_test_start(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    opts, runner = environment.parsed_options, environment.runner
    scenario = build_scenario(environment)
    _write_meta(
        environment,
        fresh=True,
        schema="shared_ollama.bench.locust",
        started_at=datetime.now(UTC).isoformat(),
        started_ns=time.time_ns(),
        users=getattr(runner, "target_user_count", None) or getattr(opts, "num_users", None),
        spawn_rate=getattr(runner, "spawn_rate", None) or getattr(opts, "spawn_rate", None),
        workers=runner.worker_count if isinstance(runner, MasterRunner) else 0,
        locust_version=_locust_version(),
        host={
            "hostname": f"{socket.gethostname()} (the Locust master)",
            "platform": platform.platform(),
            "cpu_count_logical": os.cpu_count(),
        },
        scenario=public_scenario(scenario),
        seed=scenario.seed,
    )


def _on_test_stop(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if not isinstance(runner, MasterRunner):
        proc = _process(environment)
        proc.close()
        if not isinstance(runner, WorkerRunner):
            proc.flush()
    if not isinstance(runner, WorkerRunner):
        _write_meta(
            environment, finished_at=datetime.now(UTC).isoformat(), finished_ns=time.time_ns()
        )


def _locust_version() -> str:
    from importlib import metadata

    return metadata.version("locust")


_listen(events.init_command_line_parser, _add_flags)
_listen(events.init, _on_init)
_listen(events.test_start, _on_test_start)
_listen(events.test_stop, _on_test_stop)


class SharedOllamaUser(User):
    """A Locust user that sends the bench's workloads through ``SyncSharedClient``.

    Closed loop: each user sends its next request as soon as its last one ends (subclass and
    set ``wait_time`` for think time). With a sessions workload each user holds one
    conversation at a time: its turns in order, each after the turn's think time (as the
    bench's runner sends them), the session id passed as ``session=``, then the next
    conversation. All users of a process share one client, so routing sees the process's
    whole load.
    """

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self._talk = _Talk()
        self._think_s = 0.0

    def wait_time(self) -> float:
        """Seconds before the next call: a session's think time, else none."""
        return self._think_s

    @task
    def call(self) -> None:
        """One request of the workload mix, reported to Locust."""
        self._think_s = _process(self.environment).call(self._talk)
