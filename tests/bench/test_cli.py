"""The CLI: scenario errors, --simulate end to end, report, compare exit codes, Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from shared_ollama.bench.cli import main
from shared_ollama.bench.result import load_result, write_json

from .test_compare import _result


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    assert "{run,capacity,compare,report,selftest}" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for flag in (
        "--endpoint",
        "--concurrency",
        "--rate",
        "--requests",
        "--duration",
        "--prompt-tokens",
        "--max-tokens",
        "--stream",
        "--out",
        "--seed",
        "--slo",
    ):
        assert flag in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["--endpoint", "http://a:1", "--model", "m", "--concurrency", "1,0"],
            "levels.1: Input should be greater than or equal to 1",
        ),
        (
            ["--endpoint", "http://a:1", "--model", "m", "--max-tokens", "uniform:9"],
            "max_tokens: Value error, bad length",
        ),
        (["--endpoint", "http://a:1"], "no model"),
        (["--model", "m"], "no endpoints"),
        (["--simulate", "--slo", "ttft:fast"], "bad SLO"),
        (["--scenario", "missing.toml"], "scenario file not found"),
        (["--simulate", "--endpoint", "http://a:1"], "drop --endpoint"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert message in captured.err and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""


def test_bad_flag_syntax_is_argparse_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--concurrency", "1,x"])
    assert info.value.code == 2
    assert "expected numbers like 1,4,16" in capsys.readouterr().err


def test_simulate_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sim"
    code = main(
        [
            "--simulate",
            "--concurrency",
            "1,4",
            "--requests",
            "6",
            "--warmup",
            "3",
            "--slo",
            "ttft:5000",
            "--seed",
            "3",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "phase c=4: started" in printed and "Phases" in printed
    result = load_result(out / "result.json")
    assert [p.name for p in result.phases] == ["c=1", "c=4"]
    assert result.summary.completed == 12 and result.summary.failed == 0
    assert result.metadata.simulate and result.metadata.seed == 3
    assert {e["kind"] for e in result.metadata.endpoints} == {"ollama", "openai", "tgi"}
    assert result.summary.goodput is not None
    assert (out / "requests.csv").read_text(encoding="utf-8").count("\n") == 13
    html = (out / "report.html").read_text(encoding="utf-8")
    assert html.startswith("<!DOCTYPE html>") and "<script" not in html
    assert "data:image/svg+xml;base64," in html
    assert "out" not in result.metadata.scenario  # where it was written is not the scenario


def test_simulate_without_nvidia_ml_py(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # What the README's first command installs: the bench extra, no GPU binding.
    monkeypatch.setitem(sys.modules, "pynvml", None)
    out = tmp_path / "sim"
    argv = ["--simulate", "--concurrency", "1", "--requests", "3", "--warmup", "0"]
    assert main([*argv, "--no-html", "--out", str(out)]) == 0
    result = load_result(out / "result.json")
    assert result.summary.completed == 3 and result.metadata.gpus == []
    assert "gpu: NVML: nvidia-ml-py is not installed" in capsys.readouterr().out


def test_scenario_file_with_flag_overrides(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        'name = "t"\nsimulate = true\n[[workloads]]\nname = "w"\nmax_tokens = 4\n'
        'prompt_tokens = 8\n[[schedules]]\nkind = "rate"\nrates = [20.0]\n'
        'arrival = "constant"\nrequests = 50\n',
        encoding="utf-8",
    )
    out = tmp_path / "o"
    assert (
        main(
            [
                "--scenario",
                str(scenario),
                "--requests",
                "5",
                "--warmup",
                "0",
                "--no-html",
                "--no-samplers",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    result = load_result(out / "result.json")
    assert [p.name for p in result.phases] == ["rate=20/s"]
    assert result.phases[0].planned_requests == 5  # the flag replaced the file's stop rule
    assert result.samples == []
    assert not (out / "report.html").exists()


def test_report_subcommand(tmp_path: Path) -> None:
    path = write_json(_result(100), tmp_path / "r" / "result.json")
    assert main(["report", str(path)]) == 0
    assert (tmp_path / "r" / "report.html").exists()
    assert main(["report", str(tmp_path / "nope.json")]) == 2


def test_compare_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write_json(_result(100), tmp_path / "a.json")
    same = write_json(_result(102), tmp_path / "same.json")
    worse = write_json(_result(150), tmp_path / "worse.json")
    assert main(["compare", str(a), str(same), "--fail-above", "10%"]) == 0
    assert "no regression" in capsys.readouterr().out
    assert main(["compare", str(a), str(worse), "--fail-above", "10%"]) == 1
    assert "regression(s)" in capsys.readouterr().out
    assert main(["compare", str(a), str(worse)]) == 0  # no threshold: deltas only
    assert main(["compare", str(a), str(tmp_path / "missing.json")]) == 2
    assert main(["compare", str(a), str(worse), "--fail-above", "lots"]) == 2
    assert (
        main(["compare", str(a), str(worse), "--metrics", "p99_ttft_ms", "--fail-above", "60"]) == 0
    )


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT delivery differs on Windows")
def test_ctrl_c_stops_cleanly_and_writes_results(tmp_path: Path) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(
        "simulate = true\n[warmup]\nrequests = 0\n[samplers]\nenabled = false\n"
        "[[workloads]]\nmax_tokens = 8\nprompt_tokens = 8\n"
        '[[schedules]]\nkind = "concurrency"\nlevels = [1]\nrequests = 3\n'
        '[[schedules]]\nkind = "concurrency"\nlevels = [2]\nduration_s = 600\n',
        encoding="utf-8",
    )
    out = tmp_path / "o"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": "200"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shared_ollama.bench",
            "--scenario",
            str(scenario),
            "--out",
            str(out),
            "--no-html",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:  # the second phase starting means the first one is measured
        lines.append(line)
        if "phase c=2: started" in line:
            break
    else:
        pytest.fail("the run ended before its second phase:\n" + "".join(lines))
    proc.send_signal(signal.SIGINT)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(lines) + rest
    assert "stopping" in rest
    result = load_result(out / "result.json")
    assert result.metadata.interrupted
    assert result.phases[0].name == "c=1" and result.phases[0].summary.completed == 3
    assert (out / "requests.csv").exists()


def test_dead_endpoint_ends_the_run_after_the_warm_up_with_its_health(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bench against an endpoint that refuses connections does not sit at "warm-up
    started": every warm-up request fails, and the run ends (exit 3) naming the endpoint's
    health, breaker and last error instead of benchmarking nothing."""
    import socket

    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        code = main(["run", "--endpoint", f"{url},ollama", "--model", "m", "--warmup", "1",
                     "--requests", "2", "--no-samplers", "--no-html", "--quiet",
                     "--out", str(tmp_path / "out")])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 3, out
    # The start-up probe found it down: the request waited no_endpoint_s (10 s), not 600 s.
    assert "warm-up: none of 1 requests got an answer (NoEndpointAvailable x1)" in out
    assert "health down" in out and "last error: cannot connect" in out
    assert not (tmp_path / "out" / "result.json").exists()


def test_exact_output_length_flags_reach_every_workload(tmp_path: Path) -> None:
    import argparse

    from shared_ollama.bench.cli import _apply_workloads

    args = argparse.Namespace(
        prompt_tokens=None, max_tokens="64", operation=None, stream=None, prompts=None,
        min_tokens=64, ignore_eos=True,
    )  # fmt: skip
    data = {"workloads": [{"name": "a", "options": {"temperature": 0}}, {"name": "b"}]}
    _apply_workloads(data, args)
    assert [w["options"] for w in data["workloads"]] == [
        {"temperature": 0, "min_tokens": 64, "ignore_eos": True},
        {"min_tokens": 64, "ignore_eos": True},
    ]
    assert all(w["max_tokens"] == "64" for w in data["workloads"])
