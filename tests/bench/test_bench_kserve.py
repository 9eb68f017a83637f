"""`ladle bench kserve`: both modes run against real servers, every request answered, the
batch sizes read from the servers' own /metrics."""

from __future__ import annotations

import json

import pytest

from helpers import free_port, run_ladle

pytest.importorskip("skl2onnx")


@pytest.mark.slow
@pytest.mark.parametrize("client", ["raw", "tritonclient"])
def test_a_short_run_of_both_modes(tmp_path, client):
    result = run_ladle(
        "bench", "kserve", "--concurrency", "4", "--duration", "1", "--warmup", "0.2", "--hidden", "16",
        "--num-layers", "1", "--port", str(free_port()), "--cache-dir", str(tmp_path / "cache"),
        "--results-dir", str(tmp_path), "--client", client, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("kserve-*.json")
    report = json.loads(path.read_text())
    for mode, max_batch in (("batched", 64), ("batch-1", 1)):
        r = report["modes"][mode]
        assert r["max_batch_size"] == max_batch and r["requests"] > 0 and r["failures"] == 0
        assert r["latency_ms"]["p50"] <= r["latency_ms"]["p99"]
        assert len(r["load_average_before"]) == 3
    assert report["modes"]["batch-1"]["mean_batch_size"] == 1.0
    assert report["options"]["client"] == client
    assert report["throughput_ratio"] > 0 and (tmp_path / path.name.replace(".json", ".png")).exists()
