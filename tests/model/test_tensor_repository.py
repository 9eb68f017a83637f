"""A model folder's config.yaml: read into frozen dataclasses, and checked against the ONNX model
when its sessions open; every error names the file and the key."""

from __future__ import annotations

import pytest

from ladle.errors import LadleError
from ladle.model.tensor_repository import read_model_folder, scan_repository

pytest.importorskip("skl2onnx")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from ladle.bench.onnx_classifier import build_classifier_repository

    return build_classifier_repository(tmp_path_factory.mktemp("repo"), "iris")


def _edit(folder, old: str, new: str):
    path = folder / "config.yaml"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))
    return text


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("datatype: FP32\n    shape: [4]", "datatype: FP33\n    shape: [4]", "config.yaml: inputs[0]: datatype 'FP33'"),
        ("max_batch_size: 64", "max_batch_sise: 64",
         "config.yaml: max_batch_sise: unknown key (did you mean max_batch_size?)"),
        ("instances: 1", "instances: two", "config.yaml: instances: expected an integer"),
        ("preferred_batch_sizes: [16, 32]", "preferred_batch_sizes: [128]", "exceed max_batch_size 64"),
        ("  - name: one row of zeros\n    batch_size: 1", "  - name: w\n    batch_size: 1\n    fill: noise",
         "config.yaml: warmup[0]: fill 'noise'"),
    ],
)  # fmt: skip
def test_bad_configs_name_the_file_and_the_key(folder, old, new, message):
    original = _edit(folder, old, new)
    try:
        with pytest.raises(LadleError) as e:
            read_model_folder(folder)
        assert message in str(e.value) and str(folder) in str(e.value)
    finally:
        (folder / "config.yaml").write_text(original)


@pytest.mark.parametrize(
    "old, new, message",
    [
        ("  - name: input\n", "  - name: features\n", "inputs[0].name: the model has no input 'features'"),
        ("datatype: FP32\n    shape: [4]", "datatype: FP64\n    shape: [4]", "inputs[0].datatype: FP64 but"),
        ("shape: [4]", "shape: [5]", "inputs[0].shape: [5] but the model's 'input' has [4]"),
        ("shape: [3]", "shape: [3, 2]", "outputs[1].shape"),
    ],
)
def test_configs_that_disagree_with_the_model_fail_at_load(folder, old, new, message):
    pytest.importorskip("onnxruntime")
    from ladle.runner.onnx_session import OnnxSessions

    original = _edit(folder, old, new)
    try:
        model = read_model_folder(folder)
        with pytest.raises(LadleError) as e:
            OnnxSessions(model)
        assert message in str(e.value) and "config.yaml" in str(e.value)
    finally:
        (folder / "config.yaml").write_text(original)


def test_the_newest_version_is_served_and_the_repository_scanned(folder):
    (folder / "3").mkdir()
    try:
        with pytest.raises(LadleError, match="model_filename"):
            read_model_folder(folder)  # version 3 holds no model.onnx
    finally:
        (folder / "3").rmdir()
    assert read_model_folder(folder).version == "1"
    assert scan_repository(folder.parent) == [folder]
