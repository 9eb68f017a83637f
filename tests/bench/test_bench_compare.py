"""`ladle bench compare`: each system started in turn, the same workload through the same load
generator, one table with the ratios; here Ladle on a tiny model against Ladle with int8 weights run from a
checkout's path, two rounds each (vLLM is too heavy for the suite: its run is recorded in benchmarks/results)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from helpers import run_ladle

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_compare_two_ladle_configurations(tmp_path, tiny_models):
    result = run_ladle(
        "bench",
        "compare",
        "--model",
        str(tiny_models["llama"].gguf_path),
        "--peers",
        f"ladle@{ROOT}:--quantization int8",
        "--rounds",
        "2",
        "--workloads",
        "c1",
        "--num-prompts",
        "1",
        "--port",
        str(free_port()),
        "--results-dir",
        str(tmp_path),
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| c1 output tok/s |" in result.stdout
    peer = f"ladle@{ROOT.name} --quantization int8"
    assert f"ladle / {peer}" in result.stdout and "median of 2 rounds" in result.stdout
    (report,) = tmp_path.glob("compare-*.json")
    payload = json.loads(report.read_text())
    assert payload["systems"][peer]["env"]["PYTHONPATH"].split(":")[0] == str(ROOT / "src")
    systems = payload["results"]
    assert list(systems) == ["ladle", peer]
    for system in systems.values():
        assert len(system["rounds"]) == 2
        for run in system["rounds"]:
            assert run["ready_s"] > 0
            assert run["c1"]["completed"] == 1 and run["c1"]["output_tokens"] == 128
    assert len(list(tmp_path.glob("compare-*.log"))) == 4  # each server's log kept beside the results


def test_unknown_workload_and_peer_are_refused(tmp_path):
    result = run_ladle("bench", "compare", "--workloads", "c7", "--results-dir", str(tmp_path))
    assert result.returncode == 2 and "unknown workload c7" in result.stderr
    result = run_ladle("bench", "compare", "--peers", "tgi", "--results-dir", str(tmp_path))
    assert result.returncode == 2 and "unknown peer 'tgi'" in result.stderr
    result = run_ladle("bench", "compare", "--peers", f"ladle@{tmp_path}", "--results-dir", str(tmp_path))
    assert result.returncode == 2 and "not a Ladle checkout" in result.stderr
