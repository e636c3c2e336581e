"""``python -m shared_ollama.bench [run|compare|report]``: flags, scenario merge, exit codes.

``run`` (the default) validates the scenario, runs it with a progress bar, Ctrl-C stopping
cleanly, and writes JSON, CSV and HTML. Exit codes: 0 ok, 1 regression, 2 bad input, 3 the
warm-up got no answer (each endpoint's health and last error printed) or the prompt-length
calibration failed (one line), 130 interrupted (results still written).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ..records import CallRecord
from .scheduler import Stop

__all__ = ["main"]

_SUBCOMMANDS = ("run", "capacity", "compare", "report", "selftest")


def _num_list(kind: Callable[[str], float]) -> Callable[[str], list[float]]:
    def parse(text: str) -> list[float]:
        try:
            return [kind(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers like 1,4,16: {text!r}") from None

    return parse


def _endpoint(text: str) -> dict[str, str]:
    url, _, kind = text.partition(",")
    if kind and kind not in ("ollama", "openai", "tgi", "auto"):
        raise argparse.ArgumentTypeError(f"kind must be ollama, openai, tgi or auto: {kind!r}")
    return {"url": url.strip(), "kind": kind.strip() or "auto"}


def _run_parser(sub: Any) -> None:
    p = sub.add_parser(
        "run",
        help="run a benchmark (the default)",
        description="Run a benchmark; flags override the scenario file.",
    )
    _bench_flags(p, schedules=True)


def _bench_flags(p: argparse.ArgumentParser, *, schedules: bool) -> None:
    """``run``'s flags; ``capacity`` takes all but the schedules and the goodput SLOs."""
    p.add_argument("--scenario", metavar="FILE", help="TOML scenario file")
    p.add_argument(
        "--simulate",
        action="store_true",
        default=None,
        help="start in-process FakeEngines (one per protocol) and bench them",
    )
    p.add_argument(
        "--endpoint",
        action="append",
        type=_endpoint,
        metavar="URL[,KIND]",
        help="endpoint to bench (repeatable); kind: ollama|openai|tgi|auto",
    )
    p.add_argument("--api-key-env", metavar="VAR", help="env variable holding the endpoints' key")
    p.add_argument("--model", help="logical model name")
    if schedules:
        p.add_argument(
            "--concurrency",
            type=_num_list(int),
            metavar="N,N,...",
            help="closed loop: one phase per concurrency level",
        )
        p.add_argument(
            "--rate",
            type=_num_list(float),
            metavar="R,R,...",
            help="open loop: one phase per rate (requests/s)",
        )
        p.add_argument(
            "--sweep",
            type=int,
            metavar="POINTS",
            help="sweep: synchronous, saturated, then POINTS rates between",
        )
        p.add_argument("--context-sweep", type=_context_sweep, metavar="POINTS[:MAX]",
                       help="POINTS prompt lengths up to the model's context (or MAX tokens), "
                            "one closed-loop phase each: TTFT vs prompt length")  # fmt: skip
    p.add_argument("--arrival", choices=("constant", "poisson"), help="open-loop arrivals")
    p.add_argument("--burstiness", type=float, help="gamma shape (1: Poisson, <1: burstier)")
    p.add_argument("--ramp", type=float, metavar="S", help="ramp-up seconds")
    if schedules:
        p.add_argument("--max-concurrency", type=int, help="sweep: the saturating concurrency")
    p.add_argument("--requests", type=int, help="requests per phase")
    p.add_argument("--duration", type=float, metavar="S", help="seconds per phase")
    p.add_argument("--warmup", type=int, metavar="N", help="warm-up requests (not measured)")
    p.add_argument("--prompt-tokens", metavar="DIST",
                   help="prompt length in the server's own tokens (calibrated): "
                        "N | uniform:MIN:MAX | normal:M:SD")  # fmt: skip
    p.add_argument("--no-calibrate", action="store_true",
                   help="no calibration requests: prompt lengths are in words")  # fmt: skip
    p.add_argument("--recalibrate", action="store_true",
                   help="measure the servers' token counts again (ignore the cache)")  # fmt: skip
    p.add_argument("--max-tokens", metavar="DIST", help="completion length (same forms)")
    p.add_argument("--min-tokens", type=int, metavar="N",
                   help="ask the server for at least N output tokens (options.min_tokens: "
                        "vLLM, SGLang)")  # fmt: skip
    p.add_argument("--ignore-eos", action="store_true", default=None,
                   help="keep generating past end-of-sequence, so every completion is "
                        "exactly --max-tokens long (options.ignore_eos: vLLM, SGLang)")  # fmt: skip
    p.add_argument("--operation", choices=("chat", "generate"))
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--prompts", metavar="FILE.jsonl", help="prompts instead of synthetic ones")
    if schedules:
        p.add_argument("--slo", metavar="ttft:MS,tpot:MS,e2e:MS", help="SLOs for goodput")
    p.add_argument("--seed", type=int)
    p.add_argument("--name", help="run name (output folder prefix)")
    p.add_argument("--out", metavar="DIR", help="output folder")
    p.add_argument("--sample-interval", type=float, metavar="S",
                   help="host and GPU sampler period (default 0.5)")  # fmt: skip
    p.add_argument("--server-sample-interval", type=float, metavar="S",
                   help="servers' /metrics and /api/ps period (default 2)")  # fmt: skip
    p.add_argument("--no-samplers", action="store_true", help="no GPU/host/server sampling")
    p.add_argument("--gpu-hour-price", type=float, metavar="PRICE",
                   help="price of one GPU-hour: adds cost per million tokens")  # fmt: skip
    p.add_argument("--gpus", type=int, metavar="N",
                   help="GPUs serving the pool, for cost (default: NVML's, else 1)")  # fmt: skip
    p.add_argument("--no-html", action="store_true", help="skip the HTML report")
    p.add_argument("--pdf", action="store_true", default=None,
                   help="also write report.pdf (matplotlib)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--http", choices=("auto", "httpx", "aiohttp"),
                   help="the client's HTTP driver (auto: aiohttp when installed)")  # fmt: skip
    _routing_flags(p, ab=schedules)


def _routing_flags(p: argparse.ArgumentParser, *, ab: bool) -> None:
    """Routing workloads, the pool's strategy (or an A/B of several) and --simulate's engines."""
    g = p.add_argument_group("routing workloads and strategies (docs/bench.md)")
    g.add_argument("--workload", choices=("prefix", "sessions"),
                   help="shared prefixes (N system prompts x M users) or multi-turn sessions; "
                        "replaces the scenario's workloads")  # fmt: skip
    g.add_argument("--prefixes", type=int, metavar="N", help="prefix: system prompts")
    g.add_argument("--users", type=int, metavar="M", help="prefix: users per system prompt")
    g.add_argument("--prefix-tokens", type=int, metavar="N", help="prefix: its length (words)")
    g.add_argument("--prefix-share", type=float, metavar="F",
                   help="prefix: share of requests with a shared prefix (0..1)")  # fmt: skip
    g.add_argument("--session-key", choices=("prefix", "user", "none"),
                   help="prefix: the session= each request passes")  # fmt: skip
    g.add_argument("--sessions", type=int, metavar="S", help="sessions: sessions per phase")
    g.add_argument("--turns", type=int, metavar="T", help="sessions: turns per session")
    g.add_argument("--think", metavar="DIST",
                   help="sessions: think time, S | uniform:MIN:MAX | exp:MEAN[:MAX]")  # fmt: skip
    g.add_argument("--system-tokens", type=int, metavar="N",
                   help="sessions: system prompt length (words; 0: none)")  # fmt: skip
    g.add_argument("--no-session-id", action="store_true",
                   help="sessions: pass no session= (the router keys on the prompt)")  # fmt: skip
    g.add_argument("--echo-replies", action="store_true",
                   help="sessions: send the server's replies back in the history (as a chat "
                        "application does), not the drawn ones")  # fmt: skip
    g.add_argument("--strategy", help="the pool's routing strategy")
    if ab:
        g.add_argument("--strategies", metavar="S,S,...",
                       help="run the same workload and seed once per strategy and compare "
                            "(e.g. affinity,least_loaded,round_robin)")  # fmt: skip
    g.add_argument("--sim-engines", metavar="KIND,KIND,...",
                   help="--simulate: one FakeEngine per kind listed (repeats allowed)")  # fmt: skip
    g.add_argument("--sim-cache-tokens", type=int, metavar="N",
                   help="--simulate: each engine's prefix cache in tokens (0: none)")  # fmt: skip
    g.add_argument("--sim-block-tokens", type=int, metavar="N",
                   help="--simulate: prefix cache block size in tokens")  # fmt: skip
    g.add_argument("--sim-prefill-s-per-token", type=float, metavar="S",
                   help="--simulate: prefill seconds per uncached prompt token")  # fmt: skip


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shared_ollama.bench",
        description="Benchmark a pool of Ollama / OpenAI-compatible / TGI servers through "
        "shared_ollama's client. Try: python -m shared_ollama.bench --simulate",
        epilog="run is the default subcommand; see 'run --help' for its flags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{run,capacity,compare,report,selftest}")
    _run_parser(sub)
    _capacity_parser(sub)
    c = sub.add_parser("compare", help="compare two results; non-zero exit on regression")
    c.add_argument("a", metavar="A.json", help="baseline")
    c.add_argument("b", metavar="B.json", help="candidate")
    c.add_argument("--fail-above", metavar="PCT",
                   help="exit 1 when a metric is worse by more (capacity: lower)")  # fmt: skip
    c.add_argument("--metrics", help="comma-separated metric names (vLLM keys, error_rate)")
    r = sub.add_parser("report", help="print a result and write its HTML report")
    r.add_argument("result", metavar="RESULT.json", nargs="?")
    r.add_argument("--from-locust", metavar="DIR",
                   help="first write RESULT.json (default DIR/result.json) from a Locust "
                        "run's --bench-out folder (shared_ollama.bench.locust)")  # fmt: skip
    r.add_argument("--html", metavar="PATH", help="HTML path (default: next to the JSON)")
    r.add_argument("--no-html", action="store_true")
    r.add_argument("--pdf", nargs="?", const="", metavar="PATH",
                   help="also write the PDF report (default path: next to the JSON)")  # fmt: skip
    r.add_argument("--gpu-hour-price", type=float, metavar="PRICE",
                   help="price of one GPU-hour: adds cost per million tokens")  # fmt: skip
    r.add_argument("--gpus", type=int, metavar="N", help="GPUs serving the pool, for the cost")
    _selftest_parser(sub)
    return parser


def _capacity_parser(sub: Any) -> None:
    p = sub.add_parser(
        "capacity",
        help="find the highest load that meets an SLO",
        description="Bracket by doubling the load from --start until the SLO fails, then "
        "bisect to --resolution; each load is measured --repeats times. Pool and workload "
        "flags as for run.",
    )
    p.add_argument("--slo", dest="capacity_slo", required=True, metavar="METRIC<=LIMIT,...",
                   help="e.g. p99_ttft_ms<=500,p99_itl_ms<=50,error_rate<=0.01")  # fmt: skip
    p.add_argument("--search", choices=("concurrency", "rate"), default="concurrency",
                   help="vary closed-loop concurrency or open-loop rate (req/s)")  # fmt: skip
    p.add_argument("--repeats", type=int, default=3,
                   help="measurements per load, for a confidence interval (default 3)")  # fmt: skip
    p.add_argument("--resolution", default="5%", metavar="PCT|STEP",
                   help="stop bisecting at this bracket width (default 5%%)")  # fmt: skip
    p.add_argument("--start", type=float, default=1.0, help="the lowest load (default 1)")
    p.add_argument("--max-load", type=float, default=256.0, help="the highest (default 256)")
    _bench_flags(p, schedules=False)
    p.set_defaults(concurrency=None, rate=None, sweep=None, max_concurrency=None, slo=None)


def _selftest_parser(sub: Any) -> None:
    s = sub.add_parser(
        "selftest",
        help="the driver's own ceiling against an instant server, beside vLLM's client",
    )
    s.add_argument("--requests", type=int, default=2000)
    s.add_argument("--concurrency", type=int, default=64)
    s.add_argument("--tokens", type=int, default=16, help="one-token chunks per stream")
    s.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    s.add_argument("--vllm-python", metavar="PYTHON",
                   help="a Python with vLLM installed: its bench client runs too")  # fmt: skip
    s.add_argument("--tokenizer", metavar="DIR", help="Hugging Face tokenizer for vLLM's client")
    s.add_argument("--json", metavar="PATH", help="also write the figures as JSON")


def _cmd_selftest(args: argparse.Namespace, console: Console) -> int:
    from .selftest import format_table, run_selftest

    if min(args.requests, args.concurrency, args.tokens, args.rounds) < 1:
        console.print("[red]error:[/] counts must be at least 1", highlight=False)
        return 2
    if args.vllm_python is not None and args.tokenizer is None:
        console.print("[red]error:[/] --vllm-python needs --tokenizer", highlight=False)
        return 2
    try:
        result = run_selftest(
            requests=args.requests,
            concurrency=args.concurrency,
            tokens=args.tokens,
            rounds=args.rounds,
            vllm_python=args.vllm_python,
            tokenizer=args.tokenizer,
        )
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 1
    for line in format_table(result):
        console.print(line, highlight=False)
    if args.json:
        Path(args.json).write_text(json.dumps(result.as_dict(), indent=1), encoding="utf-8")
    return 0


# -- run: flags -> scenario ------------------------------------------------------------


def _stop_fields(args: argparse.Namespace) -> dict[str, Any]:
    if args.requests is None and args.duration is None:
        return {}
    return {"requests": args.requests, "duration_s": args.duration}


def _context_sweep(text: str) -> dict[str, Any]:
    points, _, top = text.partition(":")
    try:
        spec: dict[str, Any] = {"kind": "context", "points": int(points)}
        if top:
            spec["up_to"] = int(top)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected POINTS or POINTS:MAX: {text!r}") from None
    return spec


def _flag_schedules(args: argparse.Namespace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if args.concurrency:
        out.append({"kind": "concurrency", "levels": args.concurrency})
    if args.rate:
        out.append({"kind": "rate", "rates": args.rate})
    if args.sweep is not None:
        out.append({"kind": "sweep", "points": args.sweep})
    if (context := getattr(args, "context_sweep", None)) is not None:
        out.append(context)
    return out


def _apply_schedules(data: dict[str, Any], args: argparse.Namespace) -> None:
    if flagged := _flag_schedules(args):
        data["schedules"] = flagged
    elif any(
        v is not None
        for v in (args.requests, args.duration, args.arrival, args.burstiness, args.ramp)
    ):
        data.setdefault("schedules", [{"kind": "concurrency", "levels": [1, 4, 16]}])
    for sched in data.get("schedules", []):
        if not isinstance(sched, dict):
            continue  # let validation say what is wrong with it
        sched.update(_stop_fields(args))
        kind = sched.get("kind", "concurrency")
        extra: dict[str, Any] = {} if kind == "sweep" else {"ramp_s": args.ramp}
        if kind in ("rate", "sweep"):
            extra |= {"arrival": args.arrival, "burstiness": args.burstiness}
        if kind == "sweep":
            extra["max_concurrency"] = args.max_concurrency
        sched.update({k: v for k, v in extra.items() if v is not None})


def _apply_workloads(data: dict[str, Any], args: argparse.Namespace) -> None:
    fields = {
        "prompt_tokens": args.prompt_tokens,
        "max_tokens": args.max_tokens,
        "operation": args.operation,
        "stream": args.stream,
        "prompts_file": args.prompts,
    }
    fields = {k: v for k, v in fields.items() if v is not None}
    options = {"min_tokens": args.min_tokens, "ignore_eos": args.ignore_eos}
    options = {k: v for k, v in options.items() if v is not None}
    if not fields and not options:
        return
    workloads = data.get("workloads") or [{}]
    data["workloads"] = [
        {**w, **fields, "options": {**(w.get("options") or {}), **options}}
        if isinstance(w, dict)
        else w
        for w in workloads
    ]


def _apply_pool(data: dict[str, Any], args: argparse.Namespace) -> None:
    if not args.endpoint:
        return
    key = os.environ.get(args.api_key_env) if args.api_key_env else None
    if args.api_key_env and key is None:
        raise ValueError(f"--api-key-env: ${args.api_key_env} is not set")
    eps = [{**e, "api_key": key} if key else e for e in args.endpoint]
    data["pool"] = {**(data.get("pool") or {}), "endpoints": eps}


def _apply_routing(data: dict[str, Any], args: argparse.Namespace) -> None:
    """--workload and its flags, --strategy and --simulate's engine settings."""
    from .simulate import ROUTING_SIMULATION, routing_defaults

    if args.workload and not (args.simulate and not args.scenario):
        # The --simulate demo already chose it; otherwise it replaces the workloads.
        defaults = routing_defaults(args.workload)
        data["workloads"] = defaults["workloads"]
        for key in ("schedules", "warmup"):
            data.setdefault(key, defaults[key])
        if args.simulate:
            data.setdefault("simulation", dict(ROUTING_SIMULATION))
    prefix = {
        "prefixes": args.prefixes,
        "users": args.users,
        "prefix_tokens": args.prefix_tokens,
        "share": args.prefix_share,
        "session": args.session_key,
    }
    sessions = {
        "count": args.sessions,
        "turns": args.turns,
        "think_s": args.think,
        "system_tokens": args.system_tokens,
        "pass_session": False if args.no_session_id else None,
        "echo_replies": True if args.echo_replies else None,
    }
    for table, given in (("prefix", prefix), ("sessions", sessions)):
        given = {k: v for k, v in given.items() if v is not None}
        if not given:
            continue
        hits = [w for w in data.get("workloads") or [] if isinstance(w, dict) and table in w]
        if not hits:
            flags = ", ".join("--" + k.replace("_", "-") for k in given)
            raise ValueError(f"{flags}: no {table} workload (give --workload {table})")
        for w in hits:
            w[table] = {**(w[table] or {}), **given}
    if args.strategy:
        data["pool"] = {**(data.get("pool") or {}), "strategy": args.strategy}
    sim = {
        "prefix_cache_tokens": args.sim_cache_tokens,
        "prefix_block_tokens": args.sim_block_tokens,
        "prefill_s_per_token": args.sim_prefill_s_per_token,
    }
    if args.sim_engines:
        sim["engines"] = [k.strip() for k in args.sim_engines.split(",") if k.strip()]
    if any(v is not None for v in sim.values()):
        given = {k: v for k, v in sim.items() if v is not None}
        data["simulation"] = {**(data.get("simulation") or {}), **given}


def build_scenario(args: argparse.Namespace) -> Any:
    """Scenario file (or the --simulate demo) with the flags applied, validated."""
    from . import metrics
    from .scenario import read_scenario_file, validate_scenario
    from .simulate import simulate_defaults

    if args.simulate and args.endpoint:
        raise ValueError("--simulate benches its own FakeEngines: drop --endpoint")
    data: dict[str, Any] = {}
    if args.simulate and not args.scenario:
        data = simulate_defaults(args.workload)
    if args.scenario:
        data = read_scenario_file(args.scenario)
    top = {
        "model": args.model,
        "seed": args.seed,
        "name": args.name,
        "out": args.out,
        "simulate": args.simulate,
        "http": getattr(args, "http", None),
    }
    data.update({k: v for k, v in top.items() if v is not None})
    if args.no_html:
        data["html"] = False
    if args.pdf:
        data["pdf"] = True
    cost = {"gpu_hour_price": args.gpu_hour_price, "gpus": args.gpus}
    if any(v is not None for v in cost.values()):
        given = {k: v for k, v in cost.items() if v is not None}
        data["cost"] = {**(data.get("cost") or {}), **given}
    if args.no_calibrate and args.recalibrate:
        raise ValueError("--no-calibrate and --recalibrate: choose one")
    if args.no_calibrate or args.recalibrate:
        data["calibrate"] = "off" if args.no_calibrate else "refresh"
    _apply_pool(data, args)
    _apply_routing(data, args)
    _apply_schedules(data, args)
    _apply_workloads(data, args)
    if args.warmup is not None:
        data["warmup"] = {**(data.get("warmup") or {}), "requests": args.warmup}
    if args.slo:
        data["slo"] = metrics.parse_slo(args.slo)
    samplers = dict(data.get("samplers") or {})
    if args.no_samplers:
        samplers["enabled"] = False
    if args.sample_interval is not None:
        samplers["interval_s"] = args.sample_interval
    if args.server_sample_interval is not None:
        samplers["server_interval_s"] = args.server_sample_interval
    data["samplers"] = samplers
    return validate_scenario(data, args.scenario or "flags")


# -- run: progress, signals, output -----------------------------------------------------


class _Progress:
    """Progress: a rich bar per phase on a terminal, one line per phase start/end otherwise."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.bar = Progress(
            TextColumn("{task.description:<18}"),
            BarColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task: TaskID | None = None
        self._name = ""
        self._by_time = False
        self._ok = self._failed = 0

    def start_phase(self, name: str, stop: Stop) -> None:
        """A bar (or a line) for the phase; its total is requests or seconds."""
        self._by_time = stop.requests is None
        total = stop.duration_s if self._by_time else stop.requests
        self._ok = self._failed = 0
        self._name = name
        if self.live:
            self._task = self.bar.add_task(name, total=total, info="")
        else:
            self.console.print(f"phase {name}: started", highlight=False)

    def record(self, rec: CallRecord) -> None:
        """Count one finished call (the collector's ``on_record`` hook)."""
        if rec.outcome == "ok":
            self._ok += 1
        elif rec.outcome != "cancelled":
            self._failed += 1
        if self._task is None:
            return
        info = f"{self._ok} ok" + (f", {self._failed} failed" if self._failed else "")
        if self._by_time:
            elapsed = self.bar.tasks[self._task].elapsed or 0.0
            self.bar.update(self._task, completed=elapsed, info=info)
        else:
            self.bar.update(self._task, advance=1, info=info)

    def end_phase(self) -> None:
        """Fill the bar (or print the phase's counts)."""
        if self._task is not None:
            task = self.bar.tasks[self._task]
            self.bar.update(self._task, completed=task.total or task.completed)
            self._task = None
        elif not self.live:
            line = f"phase {self._name}: {self._ok} ok, {self._failed} failed"
            self.console.print(line, highlight=False)

    def __enter__(self) -> _Progress:
        if self.live:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live:
            self.bar.stop()


async def _run_async(
    scenario: Any, progress: _Progress | None, console: Console, run: Any = None
) -> Any:
    """``run`` (default ``run_scenario``) with Ctrl-C hooked to the runner's stop."""
    from .runner import Runner
    from .session import run_scenario

    loop = asyncio.get_running_loop()
    hooked: list[int] = []

    def on_runner(runner: Runner) -> None:
        def interrupt() -> None:
            console.print("[yellow]stopping: writing what was measured (again to abort)[/]")
            runner.stop()
            for sig in hooked:  # a second Ctrl-C gets Python's default: abort
                loop.remove_signal_handler(sig)

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, interrupt)
                hooked.append(sig)
            except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
                pass

    try:
        return await (run or run_scenario)(
            scenario,
            progress=progress,
            on_record=progress.record if progress else None,
            on_runner=on_runner,
        )
    finally:
        for sig in hooked:
            loop.remove_signal_handler(sig)


def _out_dir(scenario: Any) -> Path:
    if scenario.out:
        return Path(scenario.out)
    return Path("bench-results") / f"{scenario.name}-{datetime.now():%Y%m%d-%H%M%S}"


def _write(result: Any, out: Path, html: bool, console: Console, pdf: bool = False) -> None:
    from .result import write_csv, write_json

    paths = [
        write_json(result, out / "result.json"),
        write_csv(result.requests, out / "requests.csv"),
    ]
    if html:
        from .html_report import write_html

        paths.append(write_html(result, out / "report.html"))
    if pdf:
        from .pdf_report import write_pdf

        paths.append(write_pdf(result, out / "report.pdf"))
    console.print("wrote " + ", ".join(str(p) for p in paths))


def _cmd_run(args: argparse.Namespace, console: Console) -> int:
    from .report import print_summary
    from .scenario import ScenarioError

    try:
        scenario = build_scenario(args)
        if args.strategies:
            from .ab import parse_strategies

            return _cmd_strategies(scenario, parse_strategies(args.strategies), args, console)
    except (ScenarioError, ValueError) as exc:
        return _input_error(exc)
    from .calibrate import prompt_token_lines

    result = _run_one(scenario, args, console)
    if isinstance(result, int):
        return result
    print_summary(result, console)
    for line in prompt_token_lines(result):
        console.print(line, highlight=False, markup=False)
    _write(result, _out_dir(scenario), scenario.html, console, scenario.pdf)
    return 130 if result.metadata.interrupted else 0


def _run_one(scenario: Any, args: argparse.Namespace, console: Console) -> Any:
    """Run ``scenario`` with the progress display: its result, or the exit code of a
    calibration (see ``_calibration_error``) or warm-up (3) failure."""
    from .session import CalibrationFailed, WarmupFailed

    progress = None if args.quiet else _Progress(console)
    try:
        with progress or contextlib.nullcontext():
            return asyncio.run(_run_async(scenario, progress, console))
    except CalibrationFailed as exc:
        return _calibration_error(exc, console)
    except WarmupFailed as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 3


def _cmd_strategies(
    scenario: Any, strategies: list[str], args: argparse.Namespace, console: Console
) -> int:
    """One run per strategy (same workload and seed), each written to its own folder under
    the output folder, then the comparison (terminal, comparison.json and .html)."""
    from .ab import print_strategies, strategy_scenarios, write_comparison

    out = _out_dir(scenario)
    if not scenario.simulate:
        console.print(
            "[yellow]note:[/] each strategy's prompts start with a salt of their own "
            f"({escape('[ab 1], [ab 2]')}, ...): no run is served from what an earlier one "
            "left in the servers' prompt caches",
            highlight=False,
        )
    results: list[tuple[str, Any]] = []
    paths: list[Path | None] = []
    interrupted = False
    for strategy, one in zip(strategies, strategy_scenarios(scenario, strategies), strict=True):
        console.print(f"[bold]strategy {strategy}[/]", highlight=False)
        result = _run_one(one, args, console)
        if isinstance(result, int):
            return result
        _write(result, out / strategy, scenario.html, console, scenario.pdf)
        results.append((strategy, result))
        paths.append(out / strategy / "result.json")
        if result.metadata.interrupted:
            interrupted = True
            break
    print_strategies(results, console)
    written = write_comparison(results, out, paths)
    console.print("wrote " + ", ".join(str(p) for p in written))
    return 130 if interrupted else 0


def _calibration_error(exc: Exception, console: Console) -> int:
    # One line, never wrapped: the reason can be long (an endpoint's own error).
    text = " ".join(str(exc).split())
    console.print(f"[red]error:[/] {escape(text)}", highlight=False, soft_wrap=True)
    return 3


def _input_error(exc: Exception) -> int:
    # One line on stderr, like every CLI of the library (no traceback, nothing echoed).
    text = str(exc).replace(":\n  ", ": ").replace("\n  ", "; ").replace("\n", " ")
    print(f"error: {text}", file=sys.stderr)
    return 2


# -- capacity ---------------------------------------------------------------------------


def _capacity_spec(args: argparse.Namespace, scenario: Any) -> Any:
    from .capacity import (
        CapacitySpec,
        SearchSpace,
        needs_streams,
        parse_capacity_slo,
        parse_resolution,
    )

    slo = parse_capacity_slo(args.capacity_slo)
    if args.search == "rate" and any(w.sessions is not None for w in scenario.workloads):
        raise ValueError("sessions run in closed loop: use --search concurrency")
    if (stream_only := needs_streams(slo)) and not all(w.stream for w in scenario.workloads):
        raise ValueError(f"--slo {stream_only[0]} needs streamed requests: drop --no-stream")
    step, relative = parse_resolution(args.resolution)
    integer = args.search == "concurrency"
    space = SearchSpace(args.start, args.max_load, step, relative, integer)
    # Each probe has the shape of the scenario's first schedule, as the flags left it.
    first = scenario.schedules[0]
    return CapacitySpec(
        search=args.search,
        slo=slo,
        space=space,
        repeats=args.repeats,
        stop=first.stop(),
        arrival=args.arrival or getattr(first, "arrival", "poisson"),
        burstiness=args.burstiness or getattr(first, "burstiness", 1.0),
        ramp_s=args.ramp if args.ramp is not None else getattr(first, "ramp_s", 0.0),
        resolution_text=args.resolution.strip(),
    )


def _cmd_capacity(args: argparse.Namespace, console: Console) -> int:
    import functools

    from .capacity import print_capacity, probe_line, run_capacity
    from .scenario import ScenarioError
    from .session import CalibrationFailed, WarmupFailed

    try:
        scenario = build_scenario(args)
        spec = _capacity_spec(args, scenario)
    except (ScenarioError, ValueError) as exc:
        return _input_error(exc)

    def on_probe(probe: Any) -> None:
        if not args.quiet:
            console.print(escape(probe_line(spec.search, probe, spec.slo)), highlight=False)

    run = functools.partial(run_capacity, spec=spec, on_probe=on_probe)
    progress = None if args.quiet else _Progress(console)
    try:
        with progress or contextlib.nullcontext():
            result = asyncio.run(_run_async(scenario, progress, console, run))
    except CalibrationFailed as exc:
        return _calibration_error(exc, console)
    except WarmupFailed as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 3
    print_capacity(result.capacity, console)
    _write(result, _out_dir(scenario), scenario.html, console, scenario.pdf)
    return 130 if result.metadata.interrupted else 0


# -- compare, report --------------------------------------------------------------------


def _cmd_compare(args: argparse.Namespace, console: Console) -> int:
    from .compare import DEFAULT_METRICS, compare, parse_threshold, print_deltas
    from .result import load_result

    try:
        threshold = parse_threshold(args.fail_above) if args.fail_above else None
        metrics = args.metrics.split(",") if args.metrics else list(DEFAULT_METRICS)
        a, b = load_result(args.a), load_result(args.b)
        deltas, notes = compare(a, b, threshold_pct=threshold, metrics=metrics)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    print_deltas(deltas, notes, threshold, console)
    return 1 if any(d.regression for d in deltas) else 0


def _cmd_report(args: argparse.Namespace, console: Console) -> int:
    from .report import print_summary
    from .result import load_result

    if args.from_locust is not None:
        from .locust_report import convert

        try:
            args.result = str(convert(args.from_locust, args.result))
        except ValueError as exc:
            return _input_error(exc)
        console.print(f"wrote {args.result}")
    elif args.result is None:
        return _input_error(ValueError("give RESULT.json or --from-locust DIR"))
    try:
        result = load_result(args.result)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    if args.gpu_hour_price is not None:
        from .findings import apply_cost

        try:
            apply_cost(result, args.gpu_hour_price, args.gpus)
        except ValueError as exc:
            return _input_error(exc)
    print_summary(result, console)
    if result.capacity is not None:
        from .capacity import print_capacity

        print_capacity(result.capacity, console)
    if not args.no_html:
        from .html_report import write_html

        path = write_html(result, args.html or Path(args.result).with_name("report.html"))
        console.print(f"wrote {path}")
    if args.pdf is not None:
        from .pdf_report import write_pdf

        path = write_pdf(result, args.pdf or Path(args.result).with_name("report.pdf"))
        console.print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if not args_list or (args_list[0] not in _SUBCOMMANDS and args_list[0] not in ("-h", "--help")):
        args_list.insert(0, "run")
    args = _parser().parse_args(args_list)
    console = Console()
    if not console.is_terminal:  # logs and CI: wide tables beat wrapped ones
        console.width = max(console.width, 160)
    commands = {
        "run": _cmd_run,
        "capacity": _cmd_capacity,
        "compare": _cmd_compare,
        "report": _cmd_report,
        "selftest": _cmd_selftest,
    }
    return commands[args.command](args, console)
