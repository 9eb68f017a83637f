"""`ladle bench throughput` runs the engine the command's flags describe (a user comparing weight
formats offline gets the format asked for, not the default)."""

from __future__ import annotations

import json

from helpers import run_ladle


def test_throughput_runs_with_the_quantization_asked_for(tiny_models, tmp_path):
    model = str(tiny_models["llama"].hf_dir)
    result = run_ladle(
        "bench", "throughput", "-m", model, "-q", "int8", "--dtype", "float32", "--kv-cache-memory", "0.05",
        "--num-prompts", "3", "--input-len", "5", "--output-len", "4", "--results-dir", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "int8 weights, float32 activations" in result.stdout
    (saved,) = tmp_path.glob("throughput-*.json")
    payload = json.loads(saved.read_text())
    assert payload["dtype"] == "int8 weights, float32 activations"
    (ladle,) = payload["results"]
    assert ladle["num_prompts"] == 3 and ladle["output_len"] == 4
