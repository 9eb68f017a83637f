from __future__ import annotations

import os
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
    server = ServerProcess("--max-model-len", "2048", "--kv-cache-memory", "0.5")
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
