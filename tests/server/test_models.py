"""Several models in one server: a config file, routing by name and alias, load and unload at
runtime behind the admin API, eviction by the memory budget and reload on demand, and a model
that fails to load without taking the others down."""

from __future__ import annotations

import threading
import time

import pytest
import yaml

from helpers import ServerProcess

pytestmark = pytest.mark.slow

ADMIN = {"Authorization": "Bearer admin-1"}
USER = {"Authorization": "Bearer user-1"}


def write_config(tmp_path, models, **sections) -> str:
    path = tmp_path / "ladle.yaml"
    path.write_text(yaml.safe_dump({"server": {"api_keys": ["user-1"], "admin_keys": ["admin-1"]}, **sections,
                                    "models": models}))  # fmt: skip
    return str(path)


def tiny(tiny_models, arch, name, **extra) -> dict:
    return {"name": name, "model": str(tiny_models[arch].hf_dir), "dtype": "float32", "kv_cache_memory_gib": 0.02,
            **extra}  # fmt: skip


def complete(server, model, max_tokens=4, headers=USER, **extra):
    body = {"model": model, "prompt": "one two", "max_tokens": max_tokens, "ignore_eos": True, **extra}
    return server.request("POST", "/v1/completions", body, headers)


def wait_state(server, name, state, timeout_s=120):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _, _, body = server.request("GET", "/admin/models", headers=ADMIN)
        states = {m["name"]: m for m in body["models"]}
        if name in states and states[name]["state"] == state:
            return states[name]
        time.sleep(0.1)
    raise AssertionError(f"{name} never became {state}: {states}")


@pytest.fixture(scope="module")
def two_models(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    broken = tmp / "broken.gguf"
    broken.write_bytes(tiny_models["llama"].gguf_path.read_bytes()[:1000])
    path = write_config(tmp, [
        tiny(tiny_models, "llama", "alpha", aliases=["a"]),
        tiny(tiny_models, "qwen2", "beta"),
        {"name": "broken", "model": str(broken), "dtype": "float32"},
    ], routers=[{"name": "auto", "small": "beta", "large": "alpha", "long_prompt_tokens": 100}])  # fmt: skip
    server = ServerProcess("--config", path)
    yield server
    server.stop()


def test_each_name_and_alias_reaches_its_model_and_the_headers_say_so(two_models):
    for requested, served, reason in (("alpha", "alpha", "requested"), ("a", "alpha", "alias of alpha"),
                                      ("beta", "beta", "requested")):  # fmt: skip
        status, headers, body = complete(two_models, requested)
        assert status == 200, body
        assert body["model"] == served and body["usage"]["completion_tokens"] == 4
        assert headers["x-ladle-routed-to"] == served and headers["x-ladle-route-reason"] == reason
    assert two_models.metric("ladle_generation_tokens_total", model_name="alpha") >= 8
    assert two_models.metric("ladle_generation_tokens_total", model_name="beta") >= 4
    assert two_models.metric("ladle_num_requests_running", model_name="beta") == 0  # one collector each


def test_auto_sends_chit_chat_to_the_small_model_and_a_long_code_task_to_the_large(two_models):
    def chat(text):
        body = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 2}
        return two_models.request("POST", "/v1/chat/completions", body, USER)

    status, headers, body = chat("Hi! How are you today?")
    assert status == 200 and body["model"] == "beta"
    assert headers["x-ladle-routed-to"] == "beta" and headers["x-ladle-route-reason"] == "auto: score 0.0 < 1"
    code = "Refactor this so it streams the file:\n```python\n" + "def load(p):\n    return open(p).read()\n" * 12
    status, headers, body = chat(code + "```")
    assert status == 200, body
    assert body["model"] == "alpha"
    assert headers["x-ladle-routed-to"] == "alpha"
    assert headers["x-ladle-route-reason"].startswith("auto: score 2.0 >= 1 (prompt ~")
    assert headers["x-ladle-route-reason"].endswith("tokens, code)")


def test_models_lists_every_model_with_its_state_and_a_failure_says_why(two_models):
    status, _, body = two_models.request("GET", "/v1/models", headers=USER)
    models = {m["id"]: m for m in body["data"]}
    assert models["alpha"]["state"] == "ready" and models["alpha"]["aliases"] == ["a"]
    assert models["beta"]["state"] == "ready"
    assert models["broken"]["state"] == "failed" and "corrupt" in models["broken"]["error"]
    assert models["auto"]["router"] == {"small": "beta", "large": "alpha"}
    status, _, body = complete(two_models, "broken")
    assert status == 503 and body["error"]["code"] == "model_load_failed"
    assert "failed to load" in body["error"]["message"] and "corrupt" in body["error"]["message"]
    status, _, body = complete(two_models, "gamma")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    assert "`alpha`, `beta`, `broken`, `auto`" in body["error"]["message"]


def test_the_admin_api_refuses_no_key_and_user_keys(two_models):
    assert two_models.request("GET", "/admin/models")[0] == 401
    status, _, body = two_models.request("GET", "/admin/models", headers=USER)
    assert status == 403 and body["error"]["code"] == "forbidden"
    assert two_models.request("DELETE", "/admin/models/alpha", headers=USER)[0] == 403
    assert two_models.request("GET", "/admin/models", headers=ADMIN)[0] == 200
    assert complete(two_models, "alpha", headers=ADMIN)[0] == 401  # and admin keys are not user keys


def test_a_model_added_at_runtime_serves_once_ready_and_unloading_loses_no_request(two_models, tiny_models):
    entry = tiny(tiny_models, "mistral", "gamma")
    status, _, body = two_models.request("POST", "/admin/models", entry, ADMIN)
    assert status == 202 and body["state"] in ("loading", "warming", "ready")
    assert two_models.request("POST", "/admin/models", entry, ADMIN)[0] == 409
    bad = two_models.request("POST", "/admin/models", {"name": "delta", "max_num_seq": 2}, ADMIN)
    assert bad[0] == 400 and "max_num_seq: unknown key (did you mean max_num_seqs?)" in bad[2]["error"]["message"]
    status, _, body = complete(two_models, "gamma")  # waits for it to load instead of failing
    assert status == 200 and body["model"] == "gamma"
    wait_state(two_models, "gamma", "ready")

    results = []

    def long_one():
        results.append(complete(two_models, "gamma", max_tokens=200))

    threads = [threading.Thread(target=long_one) for _ in range(3)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while two_models.metric("ladle_num_requests_running", model_name="gamma") < 3:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    status, _, body = two_models.request("DELETE", "/admin/models/gamma", headers=ADMIN)
    assert status == 200 and body["state"] == "removed"
    for t in threads:
        t.join()
    assert [r[0] for r in results] == [200] * 3
    assert all(r[2]["usage"]["completion_tokens"] == 200 for r in results)  # drained, not cut
    assert complete(two_models, "gamma")[0] == 404
    assert complete(two_models, "alpha")[0] == 200  # the others never noticed


def test_the_memory_budget_evicts_the_least_recently_used_and_reloads_on_demand(tiny_models, tmp_path):
    path = write_config(tmp_path, [
        tiny(tiny_models, "llama", "first"),
        tiny(tiny_models, "qwen2", "second", load_at_start=False),
        tiny(tiny_models, "mistral", "kept", pinned=True),
    ], registry={"max_loaded_models": 2})  # fmt: skip
    server = ServerProcess("--config", path)
    try:
        states = lambda: {m["id"]: m["state"] for m in server.request("GET", "/v1/models", headers=USER)[2]["data"]}  # noqa: E731
        assert states() == {"first": "ready", "second": "unloaded", "kept": "ready"}
        status, _, body = complete(server, "second")  # loads on demand, evicting `first` (pinned `kept` stays)
        assert status == 200 and body["model"] == "second"
        assert states() == {"first": "unloaded", "second": "ready", "kept": "ready"}
        assert complete(server, "kept")[0] == 200
        assert complete(server, "first")[0] == 200  # reloads, evicting `second`, now the least recently used
        assert states() == {"first": "ready", "second": "unloaded", "kept": "ready"}
    finally:
        server.stop()


def test_without_admin_keys_the_admin_api_is_off(guarded_server):
    status, _, body = guarded_server.request("GET", "/admin/models", headers={"Authorization": "Bearer sk-test-1"})
    assert status == 403 and body["error"]["code"] == "admin_disabled"
