"""Admission in a running server, made deterministic by holding each model's only slot with a
stream that never ends: a full queue degrades to the `degrade_to` model, then answers 429 with
Retry-After; a request still queued at its deadline (its queue timeout, or the start-by of its
TTFT target) fails with a clear error, never late."""

from __future__ import annotations

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
                         {"name": "small", "model": str(small), **common},
                         {"name": "timed", "model": str(small), "targets": {"ttft_ms": 3000}, **common}]}  # fmt: skip
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
        chat = {"model": "big", "messages": messages, "max_tokens": 3, "queue_timeout": 0.2, "stream": True}
        status, headers, resp = server.request("POST", "/v1/chat/completions", chat)  # a stream's headers
        assert status == 503 and resp["error"]["code"] == "queue_timeout"  # wait for its first token
        assert server.metric("ladle_router_requests_total", model_name="big", outcome="timed_out") == 2
    finally:
        hold[0].close()


def test_a_request_the_prediction_misjudged_is_refused_at_its_start_by_never_served_late(server):
    """`timed` has a TTFT target. Requests that stopped after one token make the predictor expect
    the same of a stream that cannot stop (EOS biased away): the next request is admitted, then
    dropped from the queue when its target's start-by passes, and answered 429 with Retry-After,
    streamed or not; the stream that holds the slot goes on."""
    forced = {"model": "timed", "prompt": "one", "max_tokens": 8, "logit_bias": {"7": 100}, "stop_token_ids": [7]}
    for _ in range(2):
        status, _, body = server.request("POST", "/v1/completions", forced)
        assert status == 200 and body["choices"][0]["finish_reason"] == "stop"
    hold = open_stream(server, "/v1/completions", {"model": "timed", "prompt": "on", "max_tokens": 16000,
                                                   "logit_bias": {"2": -100}})  # fmt: skip
    read_events(hold[1], 2)
    try:
        late = {"model": "timed", "prompt": "late", "max_tokens": 3}
        for body in (late, {**late, "stream": True}):
            status, headers, resp = server.request("POST", "/v1/completions", body)
            assert status == 429 and resp["error"]["code"] == "rate_limit_exceeded", resp
            assert "could not start the request in time for its TTFT target of 3000 ms" in resp["error"]["message"]
            assert int(headers["retry-after"]) >= 1
        assert server.metric("ladle_router_requests_total", model_name="timed", outcome="served") == 5
        assert server.metric("ladle_router_requests_total", model_name="timed", outcome="timed_out") == 2
        assert len(read_events(hold[1], 3)) == 3  # still streaming
    finally:
        hold[0].close()
