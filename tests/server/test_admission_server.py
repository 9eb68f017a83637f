"""Admission in a running server, made deterministic by holding each model's only slot with a
stream that never ends: a full queue degrades to the `degrade_to` model, then answers 429 with
Retry-After; a request still queued at its deadline fails with a clear error, never late."""

from __future__ import annotations

import json
import threading

import pytest
import yaml

from helpers import ServerProcess, long_context_copy, open_stream, read_events, wait_for_metric

pytestmark = pytest.mark.slow
FOREVER = {"prompt": "count", "max_tokens": 16000, "ignore_eos": True}


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("admission")
    big = long_context_copy(tiny_models["qwen2"].hf_dir, tmp / "big", 16384)
    small = long_context_copy(tiny_models["llama"].hf_dir, tmp / "small", 16384)
    common = {"dtype": "float32", "kv_cache_memory_gib": 0.05, "max_num_seqs": 1, "max_waiting_requests": 1}
    # the endless streams make every prediction of a slot's wait huge: a queue-wait bound beyond
    # it leaves the queue bounds in requests to decide, which is what these tests are about
    config = {"admission": {"max_queue_wait_s": 10**7},
              "models": [{"name": "big", "model": str(big), "degrade_to": "small", **common},
                         {"name": "small", "model": str(small), **common}]}  # fmt: skip
    (tmp / "ladle.yaml").write_text(yaml.safe_dump(config))
    s = ServerProcess("--config", str(tmp / "ladle.yaml"))
    yield s
    s.stop()


def test_a_full_queue_degrades_then_is_refused_with_retry_after(server):
    hold_big = open_stream(server, "/v1/completions", {**FOREVER, "model": "big"})
    read_events(hold_big[1], 2)  # big's one slot is taken
    queued = []
    waiter = threading.Thread(target=lambda: queued.append(
        server.request("POST", "/v1/completions", {"model": "big", "prompt": "wait", "max_tokens": 3})))  # fmt: skip
    waiter.start()
    wait_for_metric(server, "ladle_num_requests_waiting", 1, model_name="big")  # ... and its queue is full

    status, headers, body = server.request("POST", "/v1/completions", {"model": "big", "prompt": "hi", "max_tokens": 3})
    assert status == 200 and body["model"] == "small"
    assert headers["x-ladle-routed-to"] == "small"
    assert headers["x-ladle-route-reason"] == "degraded from big: 1 requests are already waiting (limit 1)"
    assert server.metric("ladle_router_requests_total", model_name="small", outcome="degraded") == 1

    hold_small = open_stream(server, "/v1/completions", {**FOREVER, "model": "small"})
    read_events(hold_small[1], 2)
    small_waiter = threading.Thread(target=lambda: queued.append(
        server.request("POST", "/v1/completions", {"model": "small", "prompt": "wait", "max_tokens": 3})))  # fmt: skip
    small_waiter.start()
    wait_for_metric(server, "ladle_num_requests_waiting", 1, model_name="small")
    status, headers, body = server.request("POST", "/v1/completions", {"model": "big", "prompt": "hi", "max_tokens": 3})
    assert status == 429 and body["error"]["code"] == "rate_limit_exceeded"
    assert "1 requests are already waiting (limit 1)" in body["error"]["message"]
    assert int(headers["retry-after"]) >= 1
    assert server.metric("ladle_router_requests_total", model_name="big", outcome="rejected") == 1

    for conn, _ in (hold_big, hold_small):  # leaving aborts the endless streams: the queued ones run
        conn.close()
    waiter.join()
    small_waiter.join()
    assert [q[0] for q in queued] == [200, 200] and {q[2]["model"] for q in queued} == {"big", "small"}


def test_a_request_still_queued_at_its_deadline_fails_clearly(server):
    hold = open_stream(server, "/v1/completions", {**FOREVER, "model": "big"})
    read_events(hold[1], 2)
    try:
        body = {"model": "big", "prompt": "late", "max_tokens": 3, "queue_timeout": 0.2}
        status, headers, resp = server.request("POST", "/v1/completions", body)
        assert status == 503 and resp["error"]["code"] == "queue_timeout"
        assert "waited 0.2 s in the queue without starting" in resp["error"]["message"]
        messages = [{"role": "user", "content": "late"}]
        chat = {"model": "big", "messages": messages, "max_tokens": 3, "queue_timeout": 0.2}
        conn, stream = open_stream(server, "/v1/chat/completions", chat)
        events = read_events(stream, 3)
        errors = [json.loads(e) for e in events if e.startswith("{") and "error" in json.loads(e)]
        assert errors and errors[0]["error"]["code"] == "queue_timeout" and events[-1] == "[DONE]"
        conn.close()
        assert server.metric("ladle_router_requests_total", model_name="big", outcome="timed_out") == 2
    finally:
        hold[0].close()
