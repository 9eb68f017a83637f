from __future__ import annotations

import os
import uuid
import warnings

import pytest

from helpers import ServerProcess

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference implementation must never reach a hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Each architecture as a tiny random-weight model: {arch: TinyModel}."""
    from tiny_models import ARCHS, build_tiny_model

    root = tmp_path_factory.mktemp("tiny")
    return {arch: build_tiny_model(arch, root, seed=i) for i, arch in enumerate(ARCHS)}


@pytest.fixture(scope="session")
def embedded_source():
    from ladle.model.source import resolve_model

    return resolve_model(None)


@pytest.fixture(scope="session")
def embedded_fp32(embedded_source):
    """The embedded model loaded once, in float32, for the tests that need real text."""
    from ladle.model.loader import load_model

    return load_model(embedded_source, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def embedded_server():
    """`ladle serve` on the embedded model, as `make serve` starts it (smaller cache and context)."""
    server = ServerProcess("--max-model-len", "2048", "--kv-cache-memory", "0.5", embeddings=True)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def guarded_server(tiny_models):
    """A tiny model behind an API key, with small limits for the error cases."""
    server = ServerProcess(
        "--model",
        str(tiny_models["llama"].gguf_path),
        "--served-model-name",
        "tiny",
        "--api-key",
        "sk-test-1",
        "--api-key",
        "sk-test-2",
        "--max-request-bytes",
        "4096",
        "--max-num-seqs",
        "1",
        "--max-waiting-requests",
        "2",
        "--kv-cache-memory",
        "0.02",
    )
    yield server
    server.stop()


# -- the metering database: a SQLite file, and a fresh database on the local PostgreSQL ------------
# (skipped with the reason when PostgreSQL does not answer, except under CI=true, where it must)

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
