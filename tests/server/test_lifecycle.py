"""Disconnects, metrics and the graceful drain, against real server processes."""

from __future__ import annotations

import http.client
import json
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from helpers import ServerProcess

pytestmark = pytest.mark.slow


def open_stream(server, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp


def read_events(resp, count: int) -> list[str]:
    events = []
    while len(events) < count:
        line = resp.readline().decode()
        if line.startswith("data: "):
            events.append(line[6:].strip())
    return events


def engine_idle(server) -> bool:
    m = server.metrics()
    running = sum(v for (n, _), v in m.items() if n == "ladle_num_requests_running")
    waiting = sum(v for (n, _), v in m.items() if n == "ladle_num_requests_waiting")
    usage = sum(v for (n, _), v in m.items() if n == "ladle_kv_cache_usage_perc")
    return running == 0 and waiting == 0 and usage == 0


def test_disconnected_streams_are_aborted_and_free_their_blocks(embedded_server):
    streams = [
        open_stream(embedded_server, {"prompt": f"Story {i}:", "max_tokens": 500, "ignore_eos": True}) for i in range(8)
    ]
    for _, resp in streams:
        read_events(resp, 3)
    assert not engine_idle(embedded_server)
    for conn, _ in streams:
        conn.sock.shutdown(2)
        conn.close()
    cut_at = time.monotonic()
    while not engine_idle(embedded_server):
        assert time.monotonic() - cut_at < 1.0, "requests still running a second after their clients left"
        time.sleep(0.02)
    assert embedded_server.metric("ladle_request_success_total", finished_reason="abort") >= 8


def test_a_non_streaming_client_that_leaves_is_aborted(embedded_server):
    conn = http.client.HTTPConnection("127.0.0.1", embedded_server.port, timeout=1.0)
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps({"prompt": "Long story:", "max_tokens": 1000, "ignore_eos": True}),
        {"Content-Type": "application/json"},
    )
    with pytest.raises(TimeoutError):
        conn.getresponse()
    conn.close()
    deadline = time.monotonic() + 2
    while not engine_idle(embedded_server):
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_metrics_count_exactly_the_tokens_served(embedded_server):
    before = embedded_server.metrics()

    def delta(name):
        now = embedded_server.metrics()
        return sum(v for (n, lbl), v in now.items() if n == name) - sum(
            v for (n, lbl), v in before.items() if n == name
        )

    usages = []
    for body in (
        {"prompt": "One, two,", "max_tokens": 7},
        {"prompt": "Hello", "max_tokens": 5, "n": 2},
        {"prompt": ["Red", "Blue and"], "max_tokens": 3},
    ):
        status, _, resp = embedded_server.request("POST", "/v1/completions", body)
        assert status == 200
        usages.append(resp["usage"])
    status, _, resp = embedded_server.request(
        "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
    )
    usages.append(resp["usage"])
    assert delta("ladle_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    assert delta("ladle_generation_tokens_total") == sum(u["completion_tokens"] for u in usages)
    assert delta("ladle_prompt_cached_tokens_total") == sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert delta("ladle_time_to_first_token_seconds_count") == 6  # samples: 1 + 2 + 2 + 1
    assert delta("ladle_e2e_request_latency_seconds_count") == 6
    assert delta("ladle_http_requests_total") >= 4
    names = {n for n, _ in embedded_server.metrics()}
    for expected in (
        "ladle_time_per_output_token_seconds_bucket",
        "ladle_inter_token_latency_seconds_bucket",
        "ladle_request_queue_time_seconds_bucket",
        "ladle_num_requests_waiting",
        "ladle_kv_cache_usage_perc",
        "ladle_num_preemptions_total",
        "ladle_prefix_cache_queries_total",
        "ladle_prefix_cache_hits_total",
    ):
        assert expected in names


def test_sigterm_drains_in_flight_requests_then_exits_zero(tiny_models):
    server = ServerProcess(
        "--model", str(tiny_models["qwen2"].hf_dir), "--drain-timeout", "60", "--kv-cache-memory", "0.05"
    )
    results = []

    def long_request(i):
        results.append(
            server.request("POST", "/v1/completions", {"prompt": f"tell {i}", "max_tokens": 300, "ignore_eos": True})
        )

    threads = [threading.Thread(target=long_request, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while server.metric("ladle_num_requests_running") < 4:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    server.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    status, headers, body = server.request("POST", "/v1/completions", {"prompt": "late", "max_tokens": 2})
    assert status == 503 and body["error"]["code"] == "draining"
    assert server.request("GET", "/ready")[0] == 503
    assert server.request("GET", "/health")[0] == 200
    for t in threads:
        t.join()
    assert server.proc.wait(60) == 0
    assert len(results) == 4
    for status, _, body in results:
        assert status == 200
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 300


def long_context_copy(model_dir: Path, dest: Path, context: int) -> Path:
    """The same tiny weights with a longer context, so one generation outlasts any drain timeout."""
    shutil.copytree(model_dir, dest)
    config = json.loads((dest / "config.json").read_text())
    config["max_position_embeddings"] = context
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_drain_timeout_aborts_what_is_left(tiny_models, tmp_path):
    # 16,000 tokens take the tiny model many seconds even on a fast machine (about 1 ms a step),
    # far past the 0.5 s drain timeout, so the generation is still running when the timeout hits.
    model = long_context_copy(tiny_models["qwen2"].hf_dir, tmp_path / "qwen2-long", 16384)
    server = ServerProcess(
        "--model",
        str(model),
        "--drain-timeout",
        "0.5",
        "--kv-cache-memory",
        "0.05",
        "--max-model-len",
        "16384",
    )
    conn, resp = open_stream(server, {"prompt": "forever", "max_tokens": 16000, "ignore_eos": True})
    read_events(resp, 2)
    server.proc.send_signal(signal.SIGTERM)
    rest = resp.read().decode()
    finals = [json.loads(line[6:]) for line in rest.splitlines() if line.startswith("data: {")]
    assert finals[-1]["choices"][0]["finish_reason"] == "abort"
    assert rest.rstrip().endswith("data: [DONE]")
    assert server.proc.wait(30) == 0
