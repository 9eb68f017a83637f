"""`ladle bench burst`: both modes run against real servers and every request ends in one outcome."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import free_port, run_ladle
from ladle.bench.burst import Outcome, summarize


def test_the_summary_counts_outcomes_and_percentiles_of_every_served_request():
    outcomes = [Outcome(0.0, "served", "big", 0.5), Outcome(0.1, "degraded", "small", 1.0),
                Outcome(0.2, "retried-ok", "big", 0.2, 2, [3], [1.5]), Outcome(0.3, "served", "big", 3.0),
                Outcome(0.4, "retried-rejected", None, None, 2, [1, 2], [0.1, 0.3])]  # fmt: skip
    s = summarize(outcomes, target_s=2.0)
    assert s["counts"] == {"served": 2, "degraded": 1, "retried-ok": 1, "retried-rejected": 1} and s["requests"] == 5
    assert s["ttft_ms"] == {"p50": 1000.0, "p95": 3000.0, "p99": 3000.0}  # answered at the first try
    assert s["ttft_ms_retried_ok"] == {"p50": 200.0, "p95": 200.0, "p99": 200.0}
    assert s["share_over_1.2x_target"] == pytest.approx(1 / 4, abs=1e-4) and s["max_ttft_ms"] == 3000.0
    assert s["rejected_in_ms"] == {"p50": 300.0, "p95": 1500.0, "p99": 1500.0, "max": 1500.0}
    assert s["retry_after_s"] == [1, 2, 3]


@pytest.mark.slow
def test_a_short_burst_against_two_tiny_models(tiny_models, tmp_path):
    common = {"dtype": "float32", "kv_cache_memory_gib": 0.02, "max_num_seqs": 2}
    config = {"models": [
        {"name": "big", "model": str(tiny_models["qwen2"].hf_dir), "targets": {"ttft_ms": 2000}, "degrade_to": "small",
         **common},
        {"name": "small", "model": str(tiny_models["llama"].hf_dir), **common},
    ]}  # fmt: skip
    path = tmp_path / "burst.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run_ladle(
        "bench", "burst", "--config", str(path), "--model", "big", "--duration", "2", "--multiple", "2",
        "--input-len", "8", "--output-len", "4", "--port", str(free_port()), "--results-dir", str(tmp_path),
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (report,) = tmp_path.glob("burst-*.json")
    data = json.loads(report.read_text())
    assert data["ttft_target_ms"] == 2000 and data["rate_per_s"] > 0
    for mode in ("admission_on", "admission_off"):
        summary, requests = data[mode], data["requests"][mode]
        assert summary["requests"] == len(requests) == max(1, round(data["rate_per_s"] * 2))
        assert sum(summary["counts"].values()) == len(requests)
        assert set(summary["counts"]) <= {"served", "degraded", "rejected", "retried-ok", "retried-rejected"}
    assert "failed" not in data["admission_off"]["counts"]
    assert list(tmp_path.glob("burst-*.png"))
    bad = run_ladle("bench", "burst", "--config", str(path), "--model", "small", "--results-dir", str(tmp_path))
    assert bad.returncode == 2 and "needs a TTFT target and a degrade_to model" in bad.stderr
