"""``bench selftest``: the driver's own ceiling against the instant server, in one run beside
the server's ceiling (a bare aiohttp loop) and vLLM's own bench client."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shared_ollama.bench.cli import main
from tests.realservers.fixtures import report_line

DRIVERS = ("server ceiling (bare aiohttp)", "bench driver (aiohttp)", "bench driver (httpx)")


def test_selftest_reports_every_driver(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "selftest.json"
    code = main(["selftest", "--requests", "256", "--concurrency", "16", "--tokens", "8",
                 "--rounds", "1", "--json", str(out)])  # fmt: skip
    assert code == 0
    figures = json.loads(out.read_text())
    assert set(figures["req_per_s"]) == set(DRIVERS)
    assert all(rate > 0 for rate in figures["req_per_s"].values()), figures
    printed = capsys.readouterr().out
    assert "bench driver / server ceiling" in printed


def test_selftest_beside_vllms_bench_client(
    vllm_python: Path, tiny_hf_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "selftest.json"
    code = main(["selftest", "--requests", "1000", "--concurrency", "64", "--rounds", "1",
                 "--vllm-python", str(vllm_python), "--tokenizer", str(tiny_hf_model),
                 "--json", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr()
    figures = json.loads(out.read_text())["req_per_s"]
    assert figures["vLLM bench client"] > 0, figures
    report_line(
        "selftest, 1000 streams of 16 tokens at c=64 (req/s): "
        + ", ".join(f"{name} {rate:.0f}" for name, rate in figures.items()),
        "bench selftest",
    )


@pytest.mark.parametrize(
    "args",
    [["--requests", "0"], ["--vllm-python", "python3"]],
    ids=["zero-requests", "vllm-without-tokenizer"],
)
def test_selftest_bad_flags_are_one_line_errors(
    args: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["selftest", *args]) == 2
    err = capsys.readouterr().out.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:"), err
