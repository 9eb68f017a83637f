"""The KServe v2 tensor wire format, in milliseconds: JSON and binary tensors in, outputs back,
and each refusal naming its field."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from ladle.model.tensor_repository import TensorModelConfig, TensorSpec
from ladle.server.errors import APIError
from ladle.server.kserve_tensors import encode_infer_response, parse_infer_request

CONFIG = TensorModelConfig(
    name="m",
    inputs=(TensorSpec("x", "FP32", (2,)), TensorSpec("ids", "INT64", (-1,)), TensorSpec("text", "BYTES", ())),
    outputs=(TensorSpec("y", "FP32", (2,)), TensorSpec("names", "BYTES", ())),
    max_batch_size=4,
)


def _binary(tensors: list[tuple[dict, bytes]], params=None) -> tuple[bytes, str]:
    header = {"inputs": [t for t, _ in tensors], **({"parameters": params} if params else {})}
    raw = json.dumps(header).encode()
    return raw + b"".join(b for _, b in tensors), str(len(raw))


def _strings(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(s)) + s for s in items)


def test_json_and_binary_tensors_read_the_same():
    x, ids, text = np.array([[1, 2], [3, 4]], np.float32), np.array([[5, 6, 7], [8, 9, 10]]), [b"a", b"bc"]
    as_json = {"inputs": [
        {"name": "x", "datatype": "FP32", "shape": [2, 2], "data": [[1, 2], [3, 4]]},
        {"name": "ids", "datatype": "INT64", "shape": [2, 3], "data": ids.ravel().tolist()},
        {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["a", "bc"]},
    ]}  # fmt: skip
    j = parse_infer_request(json.dumps(as_json).encode(), None, CONFIG)
    body, length = _binary([
        ({"name": "x", "datatype": "FP32", "shape": [2, 2], "parameters": {"binary_data_size": 16}}, x.tobytes()),
        ({"name": "ids", "datatype": "INT64", "shape": [2, 3], "parameters": {"binary_data_size": 48}}, ids.tobytes()),
        ({"name": "text", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 11}}, _strings(text)),
    ])  # fmt: skip
    b = parse_infer_request(body, length, CONFIG)
    for got in (j, b):
        assert got.num_rows == 2
        np.testing.assert_array_equal(got.inputs["x"], x)
        np.testing.assert_array_equal(got.inputs["ids"], ids)
        assert got.inputs["text"].tolist() == text
        assert got.inputs["x"].dtype == np.float32 and got.inputs["ids"].dtype == np.int64


def test_outputs_binary_by_request_default_or_per_output():
    ok = {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}
    others = [{"name": "ids", "datatype": "INT64", "shape": [1, 1], "data": [1]},
              {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["q"]}]  # fmt: skip
    body = {"inputs": [ok, *others], "parameters": {"binary_data_output": True},
            "outputs": [{"name": "names"}, {"name": "y", "parameters": {"binary_data": False}}]}  # fmt: skip
    request = parse_infer_request(json.dumps(body).encode(), None, CONFIG)
    results = {"y": np.array([[0.5, 0.25]], np.float32), "names": np.array([b"hello"], dtype=object)}
    content, headers = encode_infer_response("m", "1", request, results, CONFIG)
    n = int(headers["Inference-Header-Content-Length"])
    header = json.loads(content[:n])
    assert [o["name"] for o in header["outputs"]] == ["names", "y"]
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 9}
    assert content[n:] == _strings([b"hello"])
    assert header["outputs"][1]["data"] == [0.5, 0.25] and header["outputs"][1]["shape"] == [1, 2]


def _refusal(body, length=None) -> str:
    with pytest.raises(APIError) as e:
        parse_infer_request(body if isinstance(body, bytes) else json.dumps(body).encode(), length, CONFIG)
    assert e.value.status == 400
    return e.value.message


def test_refusals_name_the_field():
    x = {"name": "x", "datatype": "FP32", "shape": [1, 2], "data": [1, 2]}
    ids = {"name": "ids", "datatype": "INT64", "shape": [1, 1], "data": [1]}
    text = {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["q"]}
    assert "inputs: the model 'm' needs the input 'text'" in _refusal({"inputs": [x, ids]})
    assert "inputs[1].data: 1.5 is not a INT64 value" in _refusal({"inputs": [x, {**ids, "data": [1.5]}, text]})
    assert "inputs[2].data: BYTES data are strings" in _refusal({"inputs": [x, ids, {**text, "data": [3]}]})
    assert "inputs[0].datatype" in _refusal({"inputs": [{**x, "datatype": "INT32"}, ids, text]})
    assert "inputs: every input needs the same batch dimension" in _refusal(
        {"inputs": [x, {**ids, "shape": [2, 1], "data": [1, 2]}, text]}
    )
    assert "is given twice" in _refusal({"inputs": [x, x, ids, text]})
    assert "not valid JSON" in _refusal(b"\xff\xfe")
    assert "Inference-Header-Content-Length: expected a number" in _refusal(b"{}", "ten")


def test_binary_refusals_name_the_size_or_the_header():
    x = {"name": "x", "datatype": "FP32", "shape": [1, 2], "parameters": {"binary_data_size": 8}}
    ids = {"name": "ids", "datatype": "INT64", "shape": [1, 1], "parameters": {"binary_data_size": 8}}
    text = {"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 9}}
    good, length = _binary([(x, bytes(8)), (ids, bytes(8)), (text, _strings([b"hello"]))])
    assert parse_infer_request(good, length, CONFIG).inputs["text"].tolist() == [b"hello"]
    assert "inputs[2].parameters.binary_data_size" in _refusal(good[:-1], length)
    assert "the body has 3 bytes after the last binary tensor" in _refusal(good + b"abc", length)
    broken, length = _binary([(x, bytes(8)), (ids, bytes(8)), (text, struct.pack("<I", 50) + b"hello")])
    assert "runs past the tensor's end" in _refusal(broken, length)
    assert "Inference-Header-Content-Length: 99999 bytes" in _refusal(good, "99999")
