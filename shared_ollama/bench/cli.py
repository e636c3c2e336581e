"""``python -m shared_ollama.bench [run|compare|report]``: flags, scenario merge, exit codes.

``run`` (the default) validates the scenario, runs it with a progress bar, Ctrl-C stopping
cleanly, and writes JSON, CSV and HTML. Exit codes: 0 ok, 1 regression, 2 bad input, 3 the
warm-up got no answer (each endpoint's health and last error printed), 130 interrupted
(results still written).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from ..records import CallRecord
from .scheduler import Stop

__all__ = ["main"]

_SUBCOMMANDS = ("run", "compare", "report")


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
    p.add_argument("--arrival", choices=("constant", "poisson"), help="open-loop arrivals")
    p.add_argument("--burstiness", type=float, help="gamma shape (1: Poisson, <1: burstier)")
    p.add_argument("--ramp", type=float, metavar="S", help="ramp-up seconds")
    p.add_argument("--max-concurrency", type=int, help="sweep: the saturating concurrency")
    p.add_argument("--requests", type=int, help="requests per phase")
    p.add_argument("--duration", type=float, metavar="S", help="seconds per phase")
    p.add_argument("--warmup", type=int, metavar="N", help="warm-up requests (not measured)")
    p.add_argument("--prompt-tokens", metavar="DIST", help="N | uniform:MIN:MAX | normal:M:SD")
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
    p.add_argument("--slo", metavar="ttft:MS,tpot:MS,e2e:MS", help="SLOs for goodput")
    p.add_argument("--seed", type=int)
    p.add_argument("--name", help="run name (output folder prefix)")
    p.add_argument("--out", metavar="DIR", help="output folder")
    p.add_argument("--sample-interval", type=float, metavar="S", help="sampler period")
    p.add_argument("--no-samplers", action="store_true", help="no GPU/host/server sampling")
    p.add_argument("--no-html", action="store_true", help="skip the HTML report")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m shared_ollama.bench",
        description="Benchmark a pool of Ollama / OpenAI-compatible / TGI servers through "
        "shared_ollama's client. Try: python -m shared_ollama.bench --simulate",
        epilog="run is the default subcommand; see 'run --help' for its flags.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{run,compare,report}")
    _run_parser(sub)
    c = sub.add_parser("compare", help="compare two results; non-zero exit on regression")
    c.add_argument("a", metavar="A.json", help="baseline")
    c.add_argument("b", metavar="B.json", help="candidate")
    c.add_argument("--fail-above", metavar="PCT", help="exit 1 when a metric is worse by more")
    c.add_argument("--metrics", help="comma-separated metric names (vLLM keys, error_rate)")
    r = sub.add_parser("report", help="print a result and write its HTML report")
    r.add_argument("result", metavar="RESULT.json")
    r.add_argument("--html", metavar="PATH", help="HTML path (default: next to the JSON)")
    r.add_argument("--no-html", action="store_true")
    return parser


# -- run: flags -> scenario ------------------------------------------------------------


def _stop_fields(args: argparse.Namespace) -> dict[str, Any]:
    if args.requests is None and args.duration is None:
        return {}
    return {"requests": args.requests, "duration_s": args.duration}


def _flag_schedules(args: argparse.Namespace) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if args.concurrency:
        out.append({"kind": "concurrency", "levels": args.concurrency})
    if args.rate:
        out.append({"kind": "rate", "rates": args.rate})
    if args.sweep is not None:
        out.append({"kind": "sweep", "points": args.sweep})
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


def build_scenario(args: argparse.Namespace) -> Any:
    """Scenario file (or the --simulate demo) with the flags applied, validated."""
    from . import metrics
    from .scenario import read_scenario_file, validate_scenario
    from .simulate import simulate_defaults

    if args.simulate and args.endpoint:
        raise ValueError("--simulate benches its own FakeEngines: drop --endpoint")
    data: dict[str, Any] = {}
    if args.simulate and not args.scenario:
        data = simulate_defaults()
    if args.scenario:
        data = read_scenario_file(args.scenario)
    top = {
        "model": args.model,
        "seed": args.seed,
        "name": args.name,
        "out": args.out,
        "simulate": args.simulate,
    }
    data.update({k: v for k, v in top.items() if v is not None})
    if args.no_html:
        data["html"] = False
    _apply_pool(data, args)
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


async def _run_async(scenario: Any, progress: _Progress | None, console: Console) -> Any:
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
        return await run_scenario(
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


def _write(result: Any, out: Path, html: bool, console: Console) -> None:
    from .result import write_csv, write_json

    paths = [
        write_json(result, out / "result.json"),
        write_csv(result.requests, out / "requests.csv"),
    ]
    if html:
        from .html_report import write_html

        paths.append(write_html(result, out / "report.html"))
    console.print("wrote " + ", ".join(str(p) for p in paths))


def _cmd_run(args: argparse.Namespace, console: Console) -> int:
    from .report import print_summary
    from .scenario import ScenarioError

    try:
        scenario = build_scenario(args)
    except (ScenarioError, ValueError) as exc:
        # One line on stderr, like every CLI of the library (no traceback, nothing echoed).
        text = str(exc).replace(":\n  ", ": ").replace("\n  ", "; ").replace("\n", " ")
        print(f"error: {text}", file=sys.stderr)
        return 2
    from .session import WarmupFailed

    progress = None if args.quiet else _Progress(console)
    try:
        with progress or contextlib.nullcontext():
            result = asyncio.run(_run_async(scenario, progress, console))
    except WarmupFailed as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 3
    print_summary(result, console)
    _write(result, _out_dir(scenario), scenario.html, console)
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

    try:
        result = load_result(args.result)
    except ValueError as exc:
        console.print(f"[red]error:[/] {exc}", highlight=False)
        return 2
    print_summary(result, console)
    if not args.no_html:
        from .html_report import write_html

        path = write_html(result, args.html or Path(args.result).with_name("report.html"))
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
    commands = {"run": _cmd_run, "compare": _cmd_compare, "report": _cmd_report}
    return commands[args.command](args, console)
