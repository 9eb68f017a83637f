"""`ladle bench compare`: each system started in turn, the same workload through the same load
generator, one table with the ratios; here Ladle on the embedded model against Ladle with int8 weights (vLLM is too
heavy for the suite: its run is recorded in benchmarks/results)."""

from __future__ import annotations

import json
import socket

import pytest

from helpers import run_ladle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_compare_two_ladle_configurations(tmp_path):
    result = run_ladle(
        "bench",
        "compare",
        "--peers",
        "ladle:--quantization int8",
        "--workloads",
        "c1",
        "--num-prompts",
        "2",
        "--port",
        str(free_port()),
        "--results-dir",
        str(tmp_path),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| c1 output tok/s |" in result.stdout
    assert "ladle / ladle --quantization int8" in result.stdout
    (report,) = tmp_path.glob("compare-*.json")
    payload = json.loads(report.read_text())
    systems = payload["results"]
    assert list(systems) == ["ladle", "ladle --quantization int8"]
    for summary in systems.values():
        assert summary["ready_s"] > 0
        assert summary["c1"]["completed"] == 2 and summary["c1"]["output_tokens"] == 2 * 128
    assert len(list(tmp_path.glob("compare-*.log"))) == 2  # each server's log kept beside the results


def test_unknown_workload_and_peer_are_refused(tmp_path):
    result = run_ladle("bench", "compare", "--workloads", "c7", "--results-dir", str(tmp_path))
    assert result.returncode == 2 and "unknown workload c7" in result.stderr
    result = run_ladle("bench", "compare", "--peers", "tgi", "--results-dir", str(tmp_path))
    assert result.returncode == 2 and "unknown peer 'tgi'" in result.stderr
