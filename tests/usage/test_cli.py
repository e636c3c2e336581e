"""``python -m shared_ollama usage``: table, JSON and CSV output that parse back."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

import pytest

from shared_ollama.usage import Ledger
from shared_ollama.usage.cli import usage_main

from ._helpers import API_KEY, make_record

S = 1_000_000_000


@pytest.fixture
def ledger_path(tmp_path: Path) -> str:
    path = str(tmp_path / "usage.sqlite3")
    now = time.time()
    with Ledger(path, epoch_offset_ns=0) as ledger:
        for i in range(30):
            ledger.submit(
                make_record(
                    f"r{i}",
                    project="search" if i % 3 else "chatbot",
                    model="llama3.2" if i % 2 else "qwen3",
                    t_start_ns=int((now - (7200 if i < 10 else 60)) * S),
                    duration_ms=10 + i,
                    outcome="error" if i == 7 else "ok",
                    error_type="Timeout" if i == 7 else None,
                    endpoint=f"http://u:{API_KEY}@gpu-a:11434",
                )
            )
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = usage_main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_json_parses_back_and_matches_summary(
    ledger_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "--ledger", ledger_path, "--json")
    assert code == 0
    data = json.loads(out)
    with Ledger(ledger_path) as ledger:
        expected = [r.model_dump() for r in ledger.summary()]
    keys = [
        "project",
        "model",
        "requests",
        "errors",
        "retries",
        "input_tokens",
        "output_tokens",
        "p50_ms",
        "p95_ms",
        "mean_ttft_ms",
    ]
    assert [list(d) for d in data] == [keys] * 4
    assert data == [{k: e[k] for k in keys} for e in expected]
    assert sum(d["requests"] for d in data) == 30
    assert sum(d["errors"] for d in data) == 1


def test_csv_parses_back(ledger_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--ledger", ledger_path, "--csv", "--group-by", "project")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["project"] for r in rows] == ["chatbot", "search"]
    assert {r["project"]: int(r["requests"]) for r in rows} == {"chatbot": 10, "search": 20}
    assert all(int(r["input_tokens"]) == 10 * int(r["requests"]) for r in rows)
    assert float(rows[0]["p50_ms"]) > 0


def test_filters_and_time_window(ledger_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    _, out, _ = _run(capsys, "--ledger", ledger_path, "--json", "--since", "1h")
    assert sum(d["requests"] for d in json.loads(out)) == 20
    _, out, _ = _run(capsys, "--ledger", ledger_path, "--json", "--until", "1h")
    assert sum(d["requests"] for d in json.loads(out)) == 10
    _, out, _ = _run(
        capsys,
        "--ledger",
        ledger_path,
        "--json",
        "--project",
        "search",
        "--model",
        "qwen3",
        "--group-by",
        "none",
    )
    [total] = json.loads(out)
    assert total["requests"] == 10
    assert "project" not in total


def test_plain_table(ledger_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--ledger", ledger_path, "--group-by", "project,error_type")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == [
        "project",
        "error_type",
        "requests",
        "errors",
        "retries",
        "input_tokens",
        "output_tokens",
        "p50_ms",
        "p95_ms",
        "mean_ttft_ms",
    ]
    assert set(lines[1]) <= {"-", " "}
    cells = [line.split() for line in lines[2:]]
    assert [c[:4] for c in cells] == [
        ["chatbot", "-", "10", "0"],
        ["search", "-", "19", "0"],
        ["search", "Timeout", "1", "1"],
    ]
    assert API_KEY not in out


def test_group_by_endpoint_never_shows_credentials(
    ledger_path: str, capsys: pytest.CaptureFixture[str]
) -> None:
    _, out, _ = _run(capsys, "--ledger", ledger_path, "--csv", "--group-by", "endpoint")
    assert "http://gpu-a:11434" in out
    assert API_KEY not in out


def test_empty_result(ledger_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "--ledger", ledger_path, "--project", "nobody")
    assert (code, out.strip()) == (0, "no calls")
    _, out, _ = _run(capsys, "--ledger", ledger_path, "--project", "nobody", "--json")
    assert json.loads(out) == []


def test_errors(ledger_path: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = _run(capsys, "--ledger", str(tmp_path / "missing.db"))
    assert code == 1 and "no usage ledger" in err
    code, _, err = _run(capsys, "--ledger", ledger_path, "--since", "last tuesday")
    assert code == 2 and "not a time" in err
    code, _, err = _run(capsys, "--ledger", ledger_path, "--group-by", "colour")
    assert code == 2 and "unknown group_by" in err
    code, _, _ = _run(capsys, "--json", "--csv")
    assert code == 2
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "--group-by" in out


def test_default_ledger_from_env(
    ledger_path: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("SHARED_OLLAMA_LEDGER", ledger_path)
    code, out, _ = _run(capsys, "--json", "--group-by", "none")
    assert code == 0 and json.loads(out)[0]["requests"] == 30
