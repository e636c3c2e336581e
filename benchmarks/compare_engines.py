"""Compare real engines with the bench: vLLM (CPU) and llama.cpp's llama-server, tiny models.

Run from the repository root: ``python benchmarks/compare_engines.py [--out DIR]``.
It starts both servers the way the test suite does (tests/realservers: llama-server built
from source once per machine, vLLM in its own cached venv, tiny generated models), runs the
SAME bench command against each, one after the other, then prints a table and the ``compare``
output. CPU placement is the suite's (docs/engines.md): each server on the first usable CPU,
the bench client on the others. The commands it runs are printed too: they apply unchanged to
servers on GPUs.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.realservers._process import client_cpus
from tests.realservers.llama_server import LlamaServer, find_llama_server, make_tiny_gguf
from tests.realservers.vllm_server import VLLMServer, ensure_tiny_hf_model, ensure_vllm_venv

BENCH = [
    "--model", "tiny-llama", "--concurrency", "1,4,8", "--requests", "48",
    "--prompt-tokens", "64", "--max-tokens", "64", "--warmup", "4", "--quiet",
]  # fmt: skip
ROWS = (
    ("output tok/s", "output_throughput"),
    ("requests/s", "request_throughput"),
    ("TTFT p50 ms", "median_ttft_ms"),
    ("TTFT p99 ms", "p99_ttft_ms"),
    ("TPOT p50 ms", "median_tpot_ms"),
    ("ITL p99 ms", "p99_itl_ms"),
    ("E2E p50 ms", "median_e2el_ms"),
)


def bench(name: str, url: str, out: Path) -> Path:
    """Run the bench CLI against one engine; return its result.json."""
    cmd = [sys.executable, "-m", "shared_ollama.bench", "run", "--endpoint", f"{url},openai",
           "--name", name, "--out", str(out / name), *BENCH]  # fmt: skip
    print("$", shlex.join(["python", *cmd[1:]]), flush=True)
    cpus = client_cpus()
    # The bench client runs beside the server, never on its CPU (the suite's placement policy).
    pin = (lambda: os.sched_setaffinity(0, cpus)) if cpus is not None else None
    subprocess.run(cmd, check=True, preexec_fn=pin)
    return out / name / "result.json"


def phase_rows(path: Path) -> dict[str, dict[str, float]]:
    """vLLM-compatible summary keys per phase of one result."""
    data = json.loads(path.read_text())
    out = {}
    for phase in data["phases"]:
        summary = phase["summary"]
        out[phase["name"]] = {key: summary.get("vllm", {}).get(key) for _, key in ROWS}
    return out


def main() -> None:
    """Start each engine in turn, bench it, print the comparison."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results/engines"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="engines-"))
    gguf = make_tiny_gguf(logs / "tiny.gguf")
    with LlamaServer(gguf, binary=find_llama_server(), log_path=logs / "llama.log") as llama:
        llama_result = bench("llama-server", llama.url, args.out)
    python = ensure_vllm_venv()
    model = ensure_tiny_hf_model(python)
    with VLLMServer(model, python=python, log_path=logs / "vllm.log") as vllm:
        vllm_result = bench("vllm", vllm.url, args.out)
    tables = {"llama-server": phase_rows(llama_result), "vllm": phase_rows(vllm_result)}
    phases = list(tables["vllm"])
    print("\n| metric | " + " | ".join(f"{e} {p}" for p in phases for e in tables) + " |")
    print("|---" * (1 + len(phases) * len(tables)) + "|")
    for label, key in ROWS:
        cells = [tables[e][p].get(key) for p in phases for e in tables]
        print(f"| {label} | " + " | ".join("-" if c is None else f"{c:,.1f}" for c in cells) + " |")
    print()
    cmd = ["python", "-m", "shared_ollama.bench", "compare", str(llama_result), str(vllm_result)]
    print("$", shlex.join(cmd))
    subprocess.run([sys.executable, *cmd[1:]], check=False)


if __name__ == "__main__":
    main()
