"""KServe v2 against a real `ladle serve --model-repository`: the official tritonclient.http for
health, metadata, infer (binary and JSON tensors, compared with ONNX Runtime run directly) and the
repository extension; raw requests for the bad inputs; a batch of 8 that forms by count alone."""

from __future__ import annotations

import concurrent.futures
import json
import time

import numpy as np
import pytest

from helpers import ServerProcess, usage_rows

triton = pytest.importorskip("tritonclient.http")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("skl2onnx")

ROWS = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.1, 4.4, 1.4], [6.3, 3.3, 6.0, 2.5]], dtype=np.float32)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    from ladle.bench.onnx_classifier import build_classifier_repository

    root = tmp_path_factory.mktemp("models")
    build_classifier_repository(root, "iris")
    # batches of exactly 8: the delay (60 s) is never reached in a test, so only the count cuts a batch
    build_classifier_repository(root, "iris8", max_batch_size=8, max_queue_delay_ms=60000, preferred_batch_sizes=(8,))
    # the same, with room for 2 queued requests, which then wait 8 s at most: a full queue on demand
    queue = {"max_queue_size": 2, "queue_timeout_s": 8}
    build_classifier_repository(
        root, "held", max_batch_size=8, max_queue_delay_ms=60000, preferred_batch_sizes=(8,), queue=queue
    )
    return root


@pytest.fixture(scope="module")
def server(repo, tiny_models):
    srv = ServerProcess(
        "--model", str(tiny_models["llama"].gguf_path), "--served-model-name", "tiny",
        "--kv-cache-memory", "0.02", "--model-repository", str(repo), "--admin-key", "adm",
        "--usage-log", str(repo / "usage.jsonl"),
    )  # fmt: skip
    srv.usage_log = repo / "usage.jsonl"
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    c = triton.InferenceServerClient(f"127.0.0.1:{server.port}")
    yield c
    c.close()


def reference(repo, name: str, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    label, probabilities = session.run(["label", "probabilities"], {"input": x})
    return {"label": label, "probabilities": probabilities}


def test_health_and_metadata(client):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("iris")
    meta = client.get_server_metadata()
    assert meta["name"] == "ladle"
    assert {"binary_tensor_data", "model_repository"} <= set(meta["extensions"])
    model = client.get_model_metadata("iris")
    assert model["platform"] == "onnxruntime_onnx" and model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 4]}]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in model["outputs"]} == {
        "label": ("INT64", [-1]),
        "probabilities": ("FP32", [-1, 3]),
    }
    assert client.get_model_config("iris")["max_batch_size"] == 64


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_onnxruntime(client, repo, binary):
    tensor = triton.InferInput("input", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS, binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "label")]
    result = client.infer("iris", [tensor], outputs=outputs)
    ref = reference(repo, "iris", ROWS)
    np.testing.assert_allclose(result.as_numpy("probabilities"), ref["probabilities"], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(result.as_numpy("label"), ref["label"])
    assert result.as_numpy("label").tolist() == [0, 1, 2]  # the three iris species, classified right
    raw = result.get_response()
    assert all(("parameters" in o) == binary for o in raw["outputs"])


def test_infer_with_default_outputs_and_a_filter(client, repo):
    tensor = triton.InferInput("input", [1, 4], "FP32")
    tensor.set_data_from_numpy(ROWS[:1])
    everything = client.infer("iris", [tensor])  # no outputs asked: every output, binary
    assert {o["name"] for o in everything.get_response()["outputs"]} == {"label", "probabilities"}
    only = client.infer("iris", [tensor], outputs=[triton.InferRequestedOutput("probabilities")])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["probabilities"]
    np.testing.assert_allclose(only.as_numpy("probabilities"), reference(repo, "iris", ROWS[:1])["probabilities"])


def test_repository_index_unload_and_load(client):
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["iris8"]["state"] == "READY" and index["tiny"]["state"] == "READY"
    client.unload_model("iris8")
    assert not client.is_model_ready("iris8")
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["iris8"]["state"] == "UNAVAILABLE"
    # unloaded on purpose, it stays unavailable (as Triton's explicit model control): no reload on demand
    x = triton.InferInput("input", list(ROWS.shape), "FP32")
    x.set_data_from_numpy(ROWS)
    with pytest.raises(triton.InferenceServerException, match="unloaded through the model repository API"):
        client.infer("iris8", [x])
    client.load_model("iris8")
    assert client.is_model_ready("iris8")  # (an infer would wait for a batch of 8: the late model's test infers)
    with pytest.raises(triton.InferenceServerException, match="does not exist"):
        client.load_model("nope")


def test_a_folder_added_to_the_repository_after_the_start_loads_through_the_api(server, client, repo):
    from ladle.bench.onnx_classifier import build_classifier_repository

    build_classifier_repository(repo, "late")
    index = {m["name"]: m for m in client.get_model_repository_index()}
    assert index["late"]["state"] == "UNAVAILABLE" and index["late"]["reason"] == "not loaded"
    assert not client.is_model_ready("late")
    client.load_model("late")
    assert client.is_model_ready("late")
    x = triton.InferInput("input", list(ROWS.shape), "FP32")
    x.set_data_from_numpy(ROWS)
    got = client.infer("late", [x]).as_numpy("probabilities")
    assert np.allclose(got, reference(repo, "late", ROWS)["probabilities"], atol=1e-6)
    # a folder whose config is wrong: 400 naming the file
    (repo / "broken" / "1").mkdir(parents=True)
    (repo / "broken" / "config.yaml").write_text("max_batch_size: many\n")
    with pytest.raises(triton.InferenceServerException, match="config.yaml"):
        client.load_model("broken")


def test_tensor_models_in_v1_models_and_the_admin_api(server):
    status, _, body = server.request("GET", "/v1/models")
    assert status == 200 and {"iris", "iris8", "tiny"} <= {m["id"] for m in body["data"]}
    status, _, body = server.request("GET", "/admin/models", headers={"Authorization": "Bearer adm"})
    models = {m["name"]: m for m in body["models"]}
    assert models["iris"]["kind"] == "onnx" and models["tiny"]["kind"] == "llm"
    assert models["iris"]["state"] == "ready" and models["iris"]["memory_bytes"] > 0
    assert models["iris"]["batching"]["max_batch_size"] == 64
    assert models["iris"]["tensor_model"]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [4]}]


def test_llm_on_v2_is_refused_clearly(server):
    status, _, body = server.request("POST", "/v2/models/tiny/infer", body={"inputs": []})
    assert status == 400 and "tiny" in body["error"]


def test_each_infer_is_one_usage_row_of_no_tokens(server):
    assert _infer_raw(server, "iris", _json_request(ROWS), {"X-Request-Id": "kserve-ok"})[0] == 200
    assert _infer_raw(server, "nope", _json_request(ROWS), {"X-Request-Id": "kserve-404"})[0] == 404
    rows = usage_rows(server.usage_log, {"kserve-ok", "kserve-404"})
    ok, missing = rows["kserve-ok"], rows["kserve-404"]
    assert (ok.api, ok.model_requested, ok.model, ok.status, ok.outcome) == (
        "/v2/models/{name}/infer", "iris", "iris", 200, "served")  # fmt: skip
    assert (missing.model_requested, missing.model, missing.status, missing.outcome) == ("nope", None, 404, "rejected")
    assert all(r.prompt_tokens == r.completion_tokens == 0 for r in rows.values())


def _infer_raw(server, name: str, body, headers=None):
    return server.request("POST", f"/v2/models/{name}/infer", body=body, headers=headers)


def _json_request(x, datatype="FP32", name="input", shape=None):
    return {"inputs": [{"name": name, "datatype": datatype, "shape": shape or list(x.shape), "data": x.tolist()}]}


@pytest.mark.parametrize(
    "body, field",
    [
        (_json_request(ROWS[:, :3]), "inputs[0].shape"),  # 3 features, not 4
        (_json_request(ROWS, datatype="FP64"), "inputs[0].datatype"),
        (_json_request(ROWS, name="features"), "inputs[0].name"),
        (_json_request(ROWS, shape=[3, 5]), "inputs[0].shape"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3]}]}, "inputs[0].data"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 4], "data": ["a", 1, 2, 3]}]},
         "inputs[0].data"),
        ({"inputs": []}, "inputs"),
        ({"inputs": [{"name": "input", "datatype": "FP32", "shape": [65, 4], "data": [0.0] * 260}]}, "inputs[0].shape"),
        ({**_json_request(ROWS), "outputs": [{"name": "logits"}]}, "outputs[0].name"),
    ],
    ids=["wrong-shape", "wrong-datatype", "unknown-input", "shape-vs-model", "too-few-values", "string-in-fp32",
         "missing-input", "batch-too-large", "unknown-output"],
)  # fmt: skip
def test_bad_json_tensors_are_400_naming_the_field(server, body, field):
    status, _, reply = _infer_raw(server, "iris", body)
    assert status == 400, reply
    assert set(reply) == {"error"} and field in reply["error"], reply


def test_malformed_json_unknown_model_and_version(server):
    status, _, reply = _infer_raw(server, "iris", '{"inputs": [')
    assert status == 400 and "not valid JSON" in reply["error"]
    status, _, reply = _infer_raw(server, "nope", _json_request(ROWS))
    assert status == 404 and "nope" in reply["error"]
    status, _, reply = server.request("GET", "/v2/models/iris/versions/7")
    assert status == 404 and "version" in reply["error"]
    status, _, reply = server.request("GET", "/v2/models/nope/ready")
    assert status == 404


def _binary_body(x: np.ndarray, declared_size: int | None = None, header_length_delta: int = 0):
    raw = x.tobytes()
    header = json.dumps({
        "inputs": [{"name": "input", "datatype": "FP32", "shape": list(x.shape),
                    "parameters": {"binary_data_size": declared_size if declared_size is not None else len(raw)}}],
    }).encode()  # fmt: skip
    headers = {"Inference-Header-Content-Length": str(len(header) + header_length_delta)}
    return header + raw, headers


def test_binary_bodies_shorter_than_declared_are_400(server, repo):
    body, headers = _binary_body(ROWS)
    status, _, reply = _infer_raw(server, "iris", body, headers)
    assert status == 200 and [o["name"] for o in reply["outputs"]] == ["label", "probabilities"]  # JSON outputs
    np.testing.assert_allclose(reply["outputs"][1]["data"], reference(repo, "iris", ROWS)["probabilities"].ravel())
    body, headers = _binary_body(ROWS, declared_size=ROWS.nbytes + 8)
    status, _, reply = _infer_raw(server, "iris", body, headers)
    assert status == 400 and "inputs[0].parameters.binary_data_size" in reply["error"]
    body, headers = _binary_body(ROWS)
    status, _, reply = _infer_raw(server, "iris", body[:-4], headers)  # the tensor cut short
    assert status == 400 and "binary_data_size" in reply["error"]
    status, _, reply = _infer_raw(server, "iris", body[:20], headers)  # the header itself cut short
    assert status == 400 and "Inference-Header-Content-Length" in reply["error"]
    body, headers = _binary_body(ROWS, declared_size=ROWS.nbytes - 4)  # fewer bytes than the shape needs
    status, _, reply = _infer_raw(server, "iris", body[:-4], headers)
    assert status == 400 and "binary_data_size" in reply["error"]


def test_a_batch_of_eight_forms_and_bad_requests_beside_it_do_not_touch_it(server, repo):
    """iris8 cuts a batch only at 8 items (its delay is 60 s): 8 concurrent rows run as one batch,
    and each gets the outputs ONNX Runtime gives that row alone; malformed requests sent with
    them are refused before the queue and change nothing."""
    before_count = server.metric("ladle_batch_size_count", model_name="iris8")
    before_sum = server.metric("ladle_batch_size_sum", model_name="iris8")
    rng = np.random.default_rng(1)
    rows = (ROWS[rng.integers(0, 3, 8)] + rng.normal(0, 0.3, (8, 4))).astype(np.float32)

    def good(i):
        return _infer_raw(server, "iris8", _json_request(rows[i : i + 1]))

    def bad(i):
        return _infer_raw(server, "iris8", _json_request(rows[i : i + 1, :3]))

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        goods = [pool.submit(good, i) for i in range(8)]
        bads = [pool.submit(bad, i) for i in range(4)]
        good_replies = [f.result() for f in goods]
        bad_replies = [f.result() for f in bads]
    assert all(status == 400 and "inputs[0].shape" in r["error"] for status, _, r in bad_replies)
    assert server.metric("ladle_batch_size_count", model_name="iris8") - before_count == 1
    assert server.metric("ladle_batch_size_sum", model_name="iris8") - before_sum == 8
    for i, (status, _, reply) in enumerate(good_replies):
        assert status == 200, reply
        alone = reference(repo, "iris8", rows[i : i + 1])
        probs = {o["name"]: o for o in reply["outputs"]}["probabilities"]
        np.testing.assert_allclose(probs["data"], alone["probabilities"].ravel(), rtol=1e-5, atol=1e-6)
    assert server.metric("ladle_batch_queue_time_seconds_count", model_name="iris8") >= 8
    assert server.metric("ladle_batch_compute_time_seconds_count", model_name="iris8") >= 1


def test_a_full_queue_is_503_and_queued_requests_time_out(server):
    """`held` cuts batches at 8 but queues 2 at most: two requests wait (seen in the admin API),
    a third is refused at once, and the two end at their queue timeout; none is a 500."""
    admin = {"Authorization": "Bearer adm"}
    x = ROWS[:1]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        waiting = [pool.submit(_infer_raw, server, "held", _json_request(x)) for _ in range(2)]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            models = {m["name"]: m for m in server.request("GET", "/admin/models", headers=admin)[2]["models"]}
            if models["held"]["batching"]["queued"] == 2:
                break
            time.sleep(0.05)
        assert models["held"]["batching"]["queued"] == 2
        status, headers, reply = _infer_raw(server, "held", _json_request(x))
        assert status == 503 and "max_queue_size" in reply["error"] and headers.get("retry-after") == "1"
        for f in waiting:
            status, _, reply = f.result()
            assert status == 503 and "queue timeout" in reply["error"], reply


def test_a_tensor_model_added_and_removed_through_the_admin_api(server, repo, client):
    admin = {"Authorization": "Bearer adm"}
    entry = {"name": "iris-rt", "kind": "onnx", "model": str(repo / "iris")}
    status, _, body = server.request("POST", "/admin/models", body=entry, headers=admin)
    assert status == 202 and body["kind"] == "onnx", body
    client.load_model("iris-rt")  # waits until it is ready
    models = {m["name"]: m for m in server.request("GET", "/admin/models", headers=admin)[2]["models"]}
    assert models["iris-rt"]["batching"]["max_batch_size"] == 64  # from the folder's config.yaml
    tensor = triton.InferInput("input", [1, 4], "FP32")
    tensor.set_data_from_numpy(ROWS[2:])
    assert client.infer("iris-rt", [tensor]).as_numpy("label").tolist() == [2]
    assert server.request("DELETE", "/admin/models/iris-rt", headers=admin)[0] == 200
    assert server.request("GET", "/v2/models/iris-rt")[0] == 404
