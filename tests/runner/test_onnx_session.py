"""ONNX Runtime sessions of a tensor model: a batch of requests run as few calls as their shapes
and max_batch_size allow, each request's outputs equal to running it alone; BYTES tensors in."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

CONFIG = """\
name: varlen
max_batch_size: 8
inputs:
  - {name: x, datatype: FP32, shape: [-1]}
  - {name: tag, datatype: BYTES, shape: []}
outputs:
  - {name: total, datatype: FP32, shape: []}
  - {name: echo, datatype: FP32, shape: [-1]}
  - {name: tag_out, datatype: BYTES, shape: []}
warmup:
  - {name: two rows, batch_size: 2, fill: random}
"""


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """x [N, L] -> total = x summed over L, echo = x; tag [N] -> tag_out (strings pass through)."""
    import onnx
    from onnx import TensorProto, helper

    from ladle.model.tensor_repository import read_model_folder

    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=0),
            helper.make_node("Identity", ["x"], ["echo"]),
            helper.make_node("Identity", ["tag"], ["tag_out"]),
        ],
        "varlen",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"]),
         helper.make_tensor_value_info("tag", TensorProto.STRING, ["N"])],
        [helper.make_tensor_value_info("total", TensorProto.FLOAT, ["N"]),
         helper.make_tensor_value_info("echo", TensorProto.FLOAT, ["N", "L"]),
         helper.make_tensor_value_info("tag_out", TensorProto.STRING, ["N"])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [1])],
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("repo") / "varlen"
    (folder / "1").mkdir(parents=True)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), folder / "1" / "model.onnx")
    (folder / "config.yaml").write_text(CONFIG)
    return read_model_folder(folder)


def _item(rows: int, length: int, seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tags = np.array([f"r{seed}-{i}".encode() for i in range(rows)], dtype=object)
    return {"x": rng.standard_normal((rows, length)).astype(np.float32), "tag": tags}


def test_shapes_are_not_mixed_and_calls_stop_at_max_batch_size(model):
    from ladle.runner.onnx_session import OnnxSessions

    sessions = OnnxSessions(model)
    items = [_item(1, 3, 0), _item(2, 5, 1), _item(2, 3, 2), _item(6, 3, 3), _item(1, 5, 4)]
    assert sessions._calls(items, list(range(5))) == [[0, 2], [3], [1, 4]]  # L=3: 3 rows, then 6 (9 > 8); L=5: 3 rows
    reference = ort.InferenceSession(str(model.model_path), providers=["CPUExecutionProvider"])
    for item, got in zip(items, sessions.run_batch(items), strict=True):
        tags = item["tag"].astype(str).astype(object)
        total, echo, tag_out = reference.run(["total", "echo", "tag_out"], {"x": item["x"], "tag": tags})
        np.testing.assert_allclose(got["total"], total, rtol=1e-6)
        np.testing.assert_array_equal(got["echo"], echo)
        assert got["tag_out"].tolist() == tag_out.tolist() == [t.decode() for t in item["tag"]]


def test_a_failing_call_fails_only_its_items_and_warmup_inputs_run(model):
    from ladle.runner.onnx_session import OnnxRunError, OnnxSessions

    sessions = OnnxSessions(model)
    bad = {"x": np.zeros((1, 3), np.float32), "tag": np.array([b"\xff"], dtype=object)}  # not UTF-8
    good = _item(1, 3, 7)  # the same shape: it would share bad's call
    results = sessions.run_batch([bad, good])
    assert isinstance(results[0], OnnxRunError) and "'tag'" in str(results[0])
    np.testing.assert_allclose(results[1]["total"], good["x"].sum(axis=1), rtol=1e-6)
    ((label, tensors),) = sessions.warmup_inputs()
    assert label == "two rows" and tensors["x"].shape == (2, 1) and tensors["tag"].shape == (2,)
    assert not isinstance(sessions.run_batch([tensors])[0], Exception)
