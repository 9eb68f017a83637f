"""The metering database under test: a SQLite file, and a fresh database on the local PostgreSQL
(skipped with the reason when it does not answer, except under CI=true, where it must)."""

from __future__ import annotations

import os
import uuid

import pytest

PG_ADMIN_URL = os.environ.get("LADLE_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def _pg_admin():
    import psycopg

    try:
        return psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as e:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip(f"PostgreSQL at {PG_ADMIN_URL} does not answer: {str(e).strip().splitlines()[0]}")


@pytest.fixture
def postgres_url():
    """A database of its own for one test (created, then dropped): runs never collide."""
    name = "ladle_test_" + uuid.uuid4().hex[:12]
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name
    with _pg_admin() as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def metering_config(request, tmp_path):
    """A MeteringConfig on each database kind."""
    from ladle.config import MeteringConfig

    if request.param == "sqlite":
        return MeteringConfig(data_dir=str(tmp_path / "data"))
    return MeteringConfig(database=request.getfixturevalue("postgres_url"))
