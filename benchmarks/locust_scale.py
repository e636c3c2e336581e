"""Locust scale-out: requests/s from 1 and from 2 Locust workers against the same FakeEngine.

Run: ``python benchmarks/locust_scale.py [--users 32] [--duration 10] [--workers 1,2]``.
One FakeEngine (OpenAI kind, its own process, near-zero latency, 8-token streams) serves
every run; each run is a Locust master plus N workers using ``SharedOllamaUser``, all on
127.0.0.1. Requests/s come from the bench records (``report --from-locust``: first call's
start to last call's end), CPU from each process's own counters (psutil), so the table
says whether the workers, the engine or the machine ran out of cores.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, suppress
from pathlib import Path

import psutil

from shared_ollama.bench.locust_report import load_locust_run
from shared_ollama.testing import TimingModel, engine_process

MODEL = "fake-llama"
LOCUSTFILE = "from shared_ollama.bench.locust import SharedOllamaUser  # noqa: F401\n"


def start_engine(stack: ExitStack) -> tuple[str, psutil.Process]:
    """An openai FakeEngine in its own process: 1 ms to the first token, 0.2 ms a token."""
    timing = TimingModel(ttft_base_s=0.001, ttft_per_prompt_token_s=0, itl_s=0.0002)
    engine = stack.enter_context(engine_process("openai", timing=timing, models=[MODEL],
                                                slots=512))  # fmt: skip
    return engine.url, psutil.Process(engine.process.pid)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _cpu_s(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


def run(url: str, engine: psutil.Process, workers: int, users: int, duration: float,
        folder: Path, logs: bool = False) -> dict[str, float]:  # fmt: skip
    """One Locust run: requests/s and the CPU cores each part kept busy."""
    out, port = folder / f"run-{workers}", _free_port()
    quiet = None if logs else subprocess.DEVNULL
    common = [sys.executable, "-m", "locust", "-f", str(folder / "locustfile.py")]
    master = subprocess.Popen(
        [*common, "--headless", "--master", "--master-bind-host", "127.0.0.1",
         "--master-bind-port", str(port), "--expect-workers", str(workers),
         "--expect-workers-max-wait", "60", "-u", str(users), "-r", str(users),
         "--run-time", f"{duration:g}s", "--stop-timeout", "30", "--host", url,
         "--bench-model", MODEL, "--bench-max-tokens", "8", "--bench-prompt-tokens", "16",
         "--bench-out", str(out), "--only-summary", "--json-file", str(out / "stats")],
        stdout=quiet, stderr=quiet,
    )  # fmt: skip
    worker = [*common, "--worker", "--master-host", "127.0.0.1", "--master-port", str(port)]
    procs = [subprocess.Popen(worker, stdout=quiet, stderr=quiet) for _ in range(workers)]
    watched = {p.pid: psutil.Process(p.pid) for p in [master, *procs]}
    last: dict[int, float] = {}
    engine_cpu0 = _cpu_s(engine)
    try:
        deadline = time.monotonic() + duration + 90
        while master.poll() is None and time.monotonic() < deadline:
            for pid, proc in watched.items():  # each process's last reading before it exits
                with suppress(psutil.Error):
                    last[pid] = _cpu_s(proc)
            time.sleep(0.25)
        if master.poll() is None:
            raise RuntimeError("the Locust master did not end in time")
        for p in procs:
            p.wait(timeout=30)
    finally:
        for p in [master, *procs]:
            if p.poll() is None:
                p.kill()
                p.wait()
    result = load_locust_run(out)
    wall = result.summary.duration_s
    stats = json.loads((out / "stats.json").read_text(encoding="utf-8"))
    counted = sum(e["num_requests"] for e in stats if e["method"] in ("chat", "generate"))
    return {
        "rps": result.summary.request_throughput,
        "requests": float(result.summary.requests),
        "locust_requests": float(counted),
        "failed": float(result.summary.failed),
        "workers_cores": sum(last.get(p.pid, 0.0) for p in procs) / wall,
        "master_cores": last.get(master.pid, 0.0) / wall,
        "engine_cores": (_cpu_s(engine) - engine_cpu0) / wall,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run")
    parser.add_argument("--workers", default="1,2", help="worker counts, in order")
    parser.add_argument("--logs", action="store_true", help="show Locust's own output")
    args = parser.parse_args()
    counts = [int(x) for x in args.workers.split(",")]
    load = os.getloadavg()[0]
    print(f"{os.cpu_count()} logical CPUs, load average {load:.2f} before the runs")
    rows: list[tuple[int, dict[str, float]]] = []
    with ExitStack() as stack, tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "locustfile.py").write_text(LOCUSTFILE, encoding="utf-8")
        url, engine = start_engine(stack)
        for n in counts:
            rows.append((n, run(url, engine, n, args.users, args.duration, folder, args.logs)))
    print(f"\n{args.users} users, {args.duration:g} s a run, 8-token streams")
    head = f"{'workers':>7} {'requests':>9} {'Locust':>7} {'failed':>6} {'req/s':>8} {'ratio':>6} "
    print(head + f"{'workers CPU':>11} {'master CPU':>10} {'engine CPU':>10}")
    base = rows[0][1]["rps"] or 1.0
    for n, r in rows:
        print(
            f"{n:>7} {r['requests']:>9.0f} {r['locust_requests']:>7.0f} {r['failed']:>6.0f} "
            f"{r['rps']:>8.1f} "
            f"{r['rps'] / base:>6.2f} {r['workers_cores']:>11.2f} {r['master_cores']:>10.2f} "
            f"{r['engine_cores']:>10.2f}"
        )
    print("(requests: bench records; Locust: the master's count of the same calls; CPU in")
    print(" cores kept busy, whose sum cannot pass the machine's logical CPUs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
