"""Every error a client can cause: its status, OpenAI's error body, a message that says what is
wrong. The server keeps serving after each."""

from __future__ import annotations

import threading

import pytest

KEY = {"Authorization": "Bearer sk-test-1"}


def error_of(result, status: int, *fragments: str, param: str | None = None):
    got_status, headers, body = result
    assert got_status == status, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    for f in fragments:
        assert f in err["message"], err["message"]
    if param is not None:
        assert err["param"] == param
    return headers, err


def post(server, path, body, headers=KEY):
    return server.request("POST", path, body, headers=headers)


def test_api_key_required_and_checked(guarded_server):
    error_of(post(guarded_server, "/v1/completions", {"prompt": "hi"}, headers={}), 401, "no API key")
    error_of(
        post(guarded_server, "/v1/completions", {"prompt": "hi"}, headers={"Authorization": "Bearer nope"}),
        401,
        "not valid",
    )
    assert guarded_server.request("GET", "/health")[0] == 200  # probes need no key
    assert guarded_server.request("GET", "/metrics")[0] == 200
    status, _, body = post(
        guarded_server,
        "/v1/completions",
        {"prompt": "hi", "max_tokens": 2},
        headers={"Authorization": "Bearer sk-test-2"},
    )
    assert status == 200 and body["usage"]["completion_tokens"] == 2


def test_unknown_model_and_route(guarded_server):
    error_of(
        post(
            guarded_server, "/v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user", "content": "x"}]}
        ),
        404,
        "gpt-4",
        param="model",
    )
    error_of(guarded_server.request("GET", "/v1/nothing", headers=KEY), 404, "no route")
    error_of(guarded_server.request("GET", "/v1/completions", headers=KEY), 405, "not allowed")


def test_body_too_large(guarded_server):
    error_of(post(guarded_server, "/v1/completions", {"prompt": "x" * 5000}), 413, "larger than 4096 bytes")


@pytest.mark.parametrize("raw", [b"{not json", b"[1, 2]", b"\xff\xfe"])
def test_malformed_json(guarded_server, raw):
    error_of(post(guarded_server, "/v1/completions", raw), 400, "JSON")


@pytest.mark.parametrize(
    "path, body, fragments, param",
    [
        ("/v1/completions", {"prompt": "hi", "top_p": 1.5}, ["top_p"], "top_p"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, ["temperature"], "temperature"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": -5}, ["max_tokens"], "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "n": 0}, ["n must be"], "n"),
        ("/v1/completions", {"prompt": "hi", "stop": ["a"] * 17}, ["stop"], "stop"),
        ("/v1/completions", {"prompt": "hi", "logit_bias": {"x": 1}}, ["logit_bias"], "logit_bias"),
        ("/v1/completions", {"prompt": [999999]}, ["vocabulary"], "prompt"),
        ("/v1/completions", {"prompt": []}, ["prompt"], "prompt"),
        ("/v1/completions", {}, ["prompt", "required"], "prompt"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "many"}, ["max_tokens"], "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "suffix": "x"}, ["suffix"], "suffix"),
        ("/v1/chat/completions", {"messages": "hello"}, ["messages"], "messages"),
        ("/v1/chat/completions", {"messages": []}, ["messages"], "messages"),
        ("/v1/chat/completions", {"messages": [{"content": "x"}]}, ["role"], "messages.0.role"),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "xml"}},
            ["response_format.type"],
            "response_format.type",
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": {"type": "function", "function": {"name": "g"}},
            },
            ["'g'", "does not offer"],
            "tool_choice",
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            ["image_url", "text only"],
            "messages",
        ),
    ],
)
def test_invalid_parameters(guarded_server, path, body, fragments, param):
    error_of(post(guarded_server, path, body), 400, *fragments, param=param)


def test_prompt_over_the_context_names_both_numbers(guarded_server):
    _, err = error_of(post(guarded_server, "/v1/completions", {"prompt": [5] * 600}), 400, "512", "600")
    assert err["code"] == "context_length_exceeded"
    error_of(
        post(guarded_server, "/v1/completions", {"prompt": [5] * 100, "max_tokens": 500}),
        400,
        "512",
        "600",
        "100 in the prompt",
        param="max_tokens",
    )


def test_full_queue_gets_429_with_retry_after(tiny_models, tmp_path):
    """One request runs (max-num-seqs 1), two may wait: the next is turned away at once, with
    Retry-After; the waiting ones are served once the slot frees. Deterministic: the slot is held
    by a stream that does not end, and the queue is awaited, not timed (a queue-wait bound beyond
    that stream's predicted wait leaves the queue bound to decide)."""
    from helpers import ServerProcess, long_context_copy, open_stream, read_events, wait_for_metric

    model = long_context_copy(tiny_models["llama"].hf_dir, tmp_path / "long", 16384)
    server = ServerProcess("--model", str(model), "--dtype", "float32", "--kv-cache-memory", "0.05",
                           "--max-num-seqs", "1", "--max-waiting-requests", "2",
                           "--max-queue-wait", "1e7")  # fmt: skip  # the endless stream's predicted wait is admitted
    try:
        hold = open_stream(server, "/v1/completions", {"prompt": "go", "max_tokens": 16000, "ignore_eos": True})
        read_events(hold[1], 2)
        results = []

        def wait_in_line():
            results.append(server.request("POST", "/v1/completions", {"prompt": "wait", "max_tokens": 3}))

        waiters = [threading.Thread(target=wait_in_line) for _ in range(2)]
        for t in waiters:
            t.start()
        wait_for_metric(server, "ladle_num_requests_waiting", 2)
        status, headers, body = server.request("POST", "/v1/completions", {"prompt": "late", "max_tokens": 3})
        assert status == 429 and int(headers["retry-after"]) >= 1
        assert "overloaded" in body["error"]["message"] and body["error"]["code"] == "rate_limit_exceeded"
        hold[0].close()  # the endless stream leaves: the two waiting requests run
        for t in waiters:
            t.join()
        assert [r[0] for r in results] == [200, 200]
    finally:
        server.stop()


def test_the_server_still_serves_after_all_that(guarded_server):
    status, _, body = post(
        guarded_server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    )
    assert status == 200 and body["choices"][0]["message"]["role"] == "assistant"
    assert guarded_server.metric("ladle_http_requests_total", status="500") == 0


def test_kserve_routes_sit_behind_the_same_keys(guarded_server):
    """/v2 needs the API key (its errors in KServe's format); its health probes do not."""
    assert guarded_server.request("GET", "/v2/health/live")[0] == 200
    assert guarded_server.request("GET", "/v2/health/ready")[0] == 200
    status, _, body = guarded_server.request("GET", "/v2/models/tiny")
    assert status == 401 and set(body) == {"error"} and "no API key" in body["error"]
    status, _, body = guarded_server.request("GET", "/v2/models/tiny", headers={"Authorization": "Bearer sk-test-1"})
    assert status == 200 and body["name"] == "tiny" and body["platform"] == "ladle_llm"
