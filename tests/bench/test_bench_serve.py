"""`ladle bench serve` against a real server: it loads it, reports, and writes JSON and a plot."""

from __future__ import annotations

import json

import pytest
import yaml

from helpers import ServerProcess, run_ladle
from ladle.bench.serve import RequestResult, parse_slo, served_names, summarize


@pytest.mark.slow
@pytest.mark.parametrize("dataset", ["random", "shared-prefix", "chat"])
def test_bench_serve_end_to_end(embedded_server, tmp_path, dataset):
    result = run_ladle(
        "bench",
        "serve",
        "--base-url",
        embedded_server.url + "/v1",
        "--dataset",
        dataset,
        "--num-prompts",
        "4",
        "--input-len",
        "16",
        "--output-len",
        "4",
        "--prefix-len",
        "32",
        "--sweep",
        "1,2",
        "--warmup",
        "1",
        "--goodput",
        "ttft:60000,tpot:60000",
        "--results-dir",
        str(tmp_path),
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "output tok/s" in result.stdout and "ttft" in result.stdout
    (data_file,) = tmp_path.glob("serve-ladle-*.json")
    data = json.loads(data_file.read_text())
    assert [p["load"] for p in data["points"]] == ["c=1", "c=2"]
    for point in data["points"]:
        assert point["completed"] == 4 and point["failed"] == 0
        if dataset != "chat":  # chat draws its lengths from a spread around the mean
            assert point["output_tokens"] == 16  # ignore_eos: exactly 4 tokens each
        assert point["goodput_requests_per_s"] == pytest.approx(point["request_throughput"])
    assert list(tmp_path.glob("serve-ladle-*.png"))


def test_summary_percentiles_and_goodput():
    results = [RequestResult(True, 10, output_tokens=11, ttft_s=t, e2e_s=t + 1.0) for t in (0.1, 0.2, 0.3, 0.4)]
    results.append(RequestResult(False, 10, error="HTTP 429", status=429))
    s = summarize(results, duration_s=2.0, slo=parse_slo("ttft:250"))
    assert s["completed"] == 4 and s["failures_by_status"] == {"429": 1}
    assert s["ttft"]["p50_ms"] == pytest.approx(200) and s["ttft"]["p99_ms"] == pytest.approx(400)
    assert s["tpot"]["mean_ms"] == pytest.approx(100)  # 1 s over 10 tokens after the first
    assert s["goodput_requests_per_s"] == pytest.approx(1.0)  # two of four within 250 ms, over 2 s
    assert s["output_tokens_per_s"] == pytest.approx(22)
    with pytest.raises(ValueError):
        parse_slo("latency:5")


@pytest.mark.slow
def test_bench_serve_shares_the_load_between_two_models_and_reports_each(tmp_path):
    model = {"kv_cache_memory_gib": 0.05, "max_model_len": 512}  # the embedded model, twice
    config = tmp_path / "two.yaml"
    config.write_text(yaml.safe_dump({"models": [{"name": "a", **model}, {"name": "b", **model}]}))
    server = ServerProcess("--config", str(config))
    try:
        before = {m: server.metric("ladle_request_success_total", model_name=m) for m in ("a", "b")}
        result = run_ladle(
            "bench", "serve", "--base-url", server.url + "/v1",
            "--served-model-name", "a,b", "--num-prompts", "6", "--input-len", "8", "--output-len", "3",
            "--concurrency", "2", "--warmup", "0", "--results-dir", str(tmp_path), timeout=300,
        )  # fmt: skip
        after = {m: server.metric("ladle_request_success_total", model_name=m) for m in ("a", "b")}
    finally:
        server.stop()
    assert result.returncode == 0, result.stderr
    assert "model a: 3/3 ok" in result.stdout and "model b: 3/3 ok" in result.stdout
    assert after["a"] - before["a"] == 3 and after["b"] - before["b"] == 3  # the server saw the split
    (data_file,) = tmp_path.glob("serve-ladle-*.json")
    (point,) = json.loads(data_file.read_text())["points"]
    assert point["completed"] == 6
    per = point["per_model"]
    assert set(per) == {"a", "b"} and all(p["completed"] == 3 and p["output_tokens"] == 9 for p in per.values())
    assert per["a"]["output_tokens"] + per["b"]["output_tokens"] == point["output_tokens"]


def test_served_names_are_a_list_without_repeats():
    assert served_names(None) == [] and served_names(" a, b ,") == ["a", "b"]
    with pytest.raises(ValueError, match="names a model twice"):
        served_names("a,a")


def test_the_flags_defaults_are_the_options_dataclass_defaults():
    from ladle.bench.serve import ServeBenchOptions
    from ladle.cli import build_parser

    assert ServeBenchOptions.from_namespace(build_parser().parse_args(["bench", "serve"])) == ServeBenchOptions()
