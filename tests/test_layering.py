"""Imports go one way: the HTTP layer and the engine's bookkeeping load no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "modules",
    [
        "ladle.server.app, ladle.server.serve, ladle.server.openai_api",
        "ladle.engine.core, ladle.engine.scheduler, ladle.engine.kv_manager, ladle.engine.async_engine",
        "ladle.metering.prometheus, ladle.config",
    ],
)
def test_no_torch_behind_these_modules(modules):
    code = f"import sys\nimport {modules}\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
