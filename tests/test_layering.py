"""Imports go one way: the HTTP layer and the engine's bookkeeping load no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    "modules",
    [
        "ladle.server.app, ladle.server.serve, ladle.server.openai_api, ladle.server.kserve_api",
        "ladle.engine.core, ladle.engine.scheduler, ladle.engine.kv_manager, ladle.engine.async_engine",
        "ladle.metering.prometheus, ladle.config",
    ],
)
def test_no_torch_behind_these_modules(modules):
    code = f"import sys\nimport {modules}\nprint('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


LAYERS = {"cli": 0, "cli_admin": 0, "bench": 1, "eval": 1, "server": 2, "router": 3, "engine": 4, "runner": 5,
          "model": 6, "sample": 6, "spec": 6}  # fmt: skip
LEAVES = {"config", "config_file", "errors", "metering", "platform", "__init__", "__main__"}  # anyone may import


def test_the_server_and_the_registry_load_no_onnxruntime():
    """ONNX Runtime is imported where a tensor model loads (runner/onnx_session.py), not before."""
    modules = "ladle.server.app, ladle.server.kserve_api, ladle.router.registry, ladle.router.onnx"
    code = f"import sys\nimport {modules}\nprint('onnxruntime' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_imports_go_one_way_cli_server_router_engine_runner_model():
    """Every `import ladle.X` (at the top or inside a function) points down the layers or at a
    leaf: nothing below the CLI imports it, no model module reaches for the runner."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "src" / "ladle"
    wrong = []
    for path in root.rglob("*.py"):
        layer = path.relative_to(root).parts[0].removesuffix(".py")
        if layer in LEAVES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in (n for n in names if n.startswith("ladle.")):
                target = name.split(".")[1]
                if target in LEAVES or target == layer:
                    continue
                if LAYERS[target] < LAYERS[layer] or (LAYERS[target] == LAYERS[layer] and layer == "model"):
                    wrong.append(f"{path.relative_to(root)} imports {name}")
    assert not wrong, "imports that run back up: " + "; ".join(wrong)
