"""The default ledger never stops the library: an unwritable per-user location degrades to
memory with one warning; a location the user chose that cannot be opened is a ConfigError."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from shared_ollama import (
    ConfigError,
    Endpoint,
    HealthPolicy,
    SharedClient,
    SyncSharedClient,
    UsageConfig,
)
from shared_ollama.testing import FakeEngine
from shared_ollama.usage import ledger as ledger_module
from tests.conftest import FAST

MODEL = "fake-llama"
MSG = [{"role": "user", "content": "hi"}]
OFF = HealthPolicy(enabled=False)


@pytest.fixture(scope="module")
def eng() -> Iterator[FakeEngine]:
    with FakeEngine(kind="ollama", models=(MODEL,), timing=FAST) as e:
        yield e


@pytest.fixture
def blocked_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The per-user default lies under a regular file, so it can never be created (root
    ignores file modes, not this); the one-warning latch is reset for the test."""
    not_a_dir = tmp_path / "not-a-dir"
    not_a_dir.write_text("a file where the data dir should be")
    monkeypatch.delenv("SHARED_OLLAMA_LEDGER", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(not_a_dir))
    monkeypatch.setattr(ledger_module, "_degrade_warned", False)
    return not_a_dir


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r
        for r in caplog.records
        if r.name == "shared_ollama.usage" and r.levelno == logging.WARNING
    ]


def test_unwritable_default_degrades_to_memory_with_one_warning(
    eng: FakeEngine, blocked_default: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ep = Endpoint(eng.url, kind="ollama")
    caplog.set_level(logging.WARNING, "shared_ollama.usage")
    with SyncSharedClient(endpoints=[ep], project="ro", health=OFF) as client:
        for _ in range(3):
            client.chat(model=MODEL, messages=MSG, options={"num_predict": 2})
        summary = client.usage.summary(group_by=("project",))
        assert client.usage.ledger.path == ":memory:"
    assert [(r.project, r.requests) for r in summary] == [("ro", 3)]
    assert summary.persisted is False
    assert summary.dropped == 0
    # A second client in the same process serves too, without repeating the warning.
    with SyncSharedClient(endpoints=[ep], project="ro", health=OFF) as again:
        again.chat(model=MODEL, messages=MSG, options={"num_predict": 2})
        assert again.usage.summary().persisted is False
    [warning] = _warnings(caplog)
    assert "memory" in warning.getMessage()
    assert not (blocked_default / "shared_ollama").exists()


def test_async_client_starts_on_an_unwritable_default(
    eng: FakeEngine, blocked_default: Path
) -> None:
    async def main() -> int:
        async with SharedClient(endpoints=[Endpoint(eng.url, kind="ollama")], health=OFF) as c:
            await c.chat(model=MODEL, messages=MSG, options={"num_predict": 2})
            rows = await c.usage.asummary(group_by=())
            assert rows.persisted is False
            return rows[0].requests

    assert asyncio.run(main()) == 1


def test_explicit_unopenable_location_is_a_config_error(
    eng: FakeEngine, blocked_default: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ep = Endpoint(eng.url, kind="ollama")
    bad = str(blocked_default / "usage.sqlite3")
    with pytest.raises(ConfigError, match="cannot open usage ledger"):
        SyncSharedClient(endpoints=[ep], health=OFF, usage=UsageConfig(path=bad))
    monkeypatch.setenv("SHARED_OLLAMA_LEDGER", bad)
    with pytest.raises(ConfigError, match="cannot open usage ledger"):
        SyncSharedClient(endpoints=[ep], health=OFF)


def test_read_only_mount_as_default_degrades(
    eng: FakeEngine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A read-only filesystem (a container's root), which even root cannot write."""
    mnt = tmp_path / "ro"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here (needs CAP_SYS_ADMIN): {done.stderr}")
    try:
        monkeypatch.delenv("SHARED_OLLAMA_LEDGER", raising=False)
        monkeypatch.setenv("XDG_DATA_HOME", str(mnt))
        monkeypatch.setattr(ledger_module, "_degrade_warned", False)
        with SyncSharedClient(endpoints=[Endpoint(eng.url, kind="ollama")], health=OFF) as c:
            c.chat(model=MODEL, messages=MSG, options={"num_predict": 2})
            summary = c.usage.summary(group_by=())
        assert summary[0].requests == 1
        assert not summary.persisted
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_writable_default_is_persisted(
    eng: FakeEngine, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv("SHARED_OLLAMA_LEDGER", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    with SyncSharedClient(endpoints=[Endpoint(eng.url, kind="ollama")], health=OFF) as c:
        c.chat(model=MODEL, messages=MSG, options={"num_predict": 2})
        assert c.usage.summary().persisted is True
    assert (tmp_path / "xdg" / "shared_ollama" / "usage.sqlite3").exists()
