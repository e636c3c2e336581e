"""Choosing a backend by target, and URL redaction (no server needed)."""

from __future__ import annotations

import pytest

from shared_ollama.errors import ConfigError
from shared_ollama.usage import Ledger
from shared_ollama.usage.backends import is_url, redact, scrub, secrets_of


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:s3cr%40t@db:5432/usage", "postgresql://u:***@db:5432/usage"),
        ("postgres://u:pw@db/usage?sslmode=require", "postgres://u:***@db/usage?sslmode=require"),
        (
            "postgresql://u@db/usage?password=pw&sslmode=require",
            "postgresql://u@db/usage?password=***&sslmode=require",
        ),
        ("postgresql://db/usage", "postgresql://db/usage"),
        ("ledgers/usage.sqlite3", "ledgers/usage.sqlite3"),
    ],
)
def test_redact_hides_passwords(url: str, shown: str) -> None:
    assert redact(url) == shown
    for secret in secrets_of(url):
        assert secret not in redact(url)


def test_scrub_removes_raw_and_decoded_passwords() -> None:
    secrets = secrets_of("postgresql://u:s3cr%40t@db/usage")
    assert scrub("auth failed for s3cr@t and s3cr%40t", secrets) == "auth failed for *** and ***"


def test_backend_is_chosen_by_the_target() -> None:
    assert is_url("postgresql://u:p@h/db") and is_url("POSTGRES://h/db")
    assert not is_url("usage.sqlite3") and not is_url(":memory:")
    with pytest.raises(ConfigError, match="unsupported usage ledger URL") as info:
        Ledger("mysql://root:hunter2@db/usage")
    assert "hunter2" not in str(info.value)
    with Ledger(":memory:") as ledger:
        assert ledger.backend == "sqlite" and not ledger.persisted


def test_unreachable_server_is_a_redacted_config_error() -> None:
    pytest.importorskip("psycopg")
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    with pytest.raises(ConfigError, match="cannot open usage ledger") as info:
        Ledger("postgresql://u:hunter2@127.0.0.1:9/usage", busy_timeout_s=1)
    assert "hunter2" not in str(info.value)
    assert "***" in str(info.value)
