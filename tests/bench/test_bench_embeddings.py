"""`ladle bench embeddings` end to end on a tiny LLM (a short run), and its summaries."""

from __future__ import annotations

import json

import pytest

from helpers import run_ladle
from ladle.bench.embeddings import Load, percentile


def test_percentile_and_summary_count_what_was_measured():
    assert percentile([], 50) is None and percentile([3.0, 1.0, 2.0], 50) == 2.0 and percentile([1.0, 9.0], 99) == 9.0
    load = Load(latencies_s=[0.01, 0.02, 0.03, 0.04], elapsed_s=2.0)
    load.fail(RuntimeError("boom"))
    s = load.summary()
    assert s["requests"] == 4 and s["errors"] == 1 and s["requests_per_s"] == 2.0
    assert s["latency_ms"]["p50"] == 30.0 and s["first_errors"] == ["boom"]


@pytest.mark.slow
def test_bench_embeddings_end_to_end(tiny_models, tmp_path):
    result = run_ladle(
        "bench", "embeddings", "--model", str(tiny_models["llama"].gguf_path), "--duration", "1", "--clients", "8",
        "--llm-streams", "1", "--output-len", "4", "--port", "8391", "--results-dir", str(tmp_path), timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    (path,) = tmp_path.glob("embeddings-*.json")
    report = json.loads(path.read_text())
    batched, single = report["batched"], report["batch_size_1"]
    assert batched["embeddings_alone"]["requests"] > 0 and batched["embeddings_alone"]["errors"] == 0
    assert single["embeddings_alone"]["mean_batch_size"] == 1.0
    assert batched["llm_alone"]["tokens_per_s"] > 0 and batched["mixed"]["llm"]["requests"] >= 1
    assert batched["mixed"]["embeddings"]["requests"] > 0
    assert report["throughput_batched_over_bs1"] is not None and len(report["load_average_at_end"]) == 3
    assert list(tmp_path.glob("embeddings-*.png"))
