"""Closing a client with 200 calls in flight, in a child process under ``-X dev -W error``.

100 plain calls and 80 streams wait on the engine; 20 more streams have taken their first
chunk and are held, unread, by their callers. Close must end every one of them with
``ClientClosed`` (typed; never httpx's or asyncio's own errors), write one ledger row for each,
leave no socket open to the engine and no warning behind.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.realservers.fixtures import HOSTILE, report_line

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("mode", ["async", "sync"])
def test_close_with_200_calls_in_flight(mode: str, tmp_path: Path) -> None:
    ledger = tmp_path / "usage.db"
    command = [sys.executable, "-X", "dev", "-W", "error", "-m",
               "tests.integration._close_child", mode, str(ledger)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    report_line(f"close with 200 calls in flight [{mode}]: {result}", HOSTILE)
    assert result["ends"] == {"ClientClosed": 180, "abandoned-ClientClosed": 20}, result
    assert result["ledger"] == {"error:ClientClosed": 200}, result
    assert result["sockets"] == 0, result
    assert "Warning" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr
