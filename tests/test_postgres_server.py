"""Smoke test of the throwaway PostgreSQL server the tests start (tests/postgres_server.py)."""

from __future__ import annotations

import psycopg
import pytest


def test_fresh_database_accepts_the_role_and_rejects_a_wrong_password(
    postgres_server: object, postgres_db: str, postgres_url: str
) -> None:
    assert postgres_db != postgres_url
    with psycopg.connect(postgres_db) as conn:
        conn.execute("CREATE TABLE t (x int)")
        conn.execute("INSERT INTO t VALUES (1), (2)")
        row = conn.execute("SELECT current_user, count(*) FROM t").fetchone()
    assert row == ("shared_ollama_test", 2)
    password: str = postgres_server.password  # type: ignore[attr-defined]
    assert password not in repr(postgres_server)
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres_db.replace(password, password + "x"), connect_timeout=5)
