"""Ladle's GGUF header reader gives what the `gguf` package's GGUFReader gives (metadata values and
types, tensor names, types, dimensions, and data in the same shapes), for the embedded Q4_1 model
and for F32 and Q4_0 / Q4_1 / Q8_0 files written by llama.cpp's writer."""

from __future__ import annotations

import numpy as np
import pytest

from ladle.model.gguf_reader import read_gguf
from tiny_models import write_quantized_gguf


def assert_same_as_gguf_package(path):
    from gguf import GGUFReader

    metadata, tensors = read_gguf(path)
    reference = GGUFReader(str(path))
    expected = {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert metadata.keys() == expected.keys()
    for key, value in expected.items():
        assert metadata[key] == value and type(metadata[key]) is type(value), key
    assert [t.name for t in tensors] == [t.name for t in reference.tensors]
    for ours, theirs in zip(tensors, reference.tensors, strict=True):
        assert ours.tensor_type == theirs.tensor_type and list(ours.shape) == list(theirs.shape), ours.name
        assert ours.data.dtype == theirs.data.dtype and ours.data.shape == theirs.data.shape, ours.name
        assert np.array_equal(ours.data, theirs.data), ours.name


def test_embedded_model(embedded_source):
    assert_same_as_gguf_package(embedded_source.path)


@pytest.mark.parametrize("linear_type", [None, "Q4_0", "Q4_1", "Q8_0"])
def test_tiny_models(tiny_models, tmp_path, linear_type):
    tiny = tiny_models["llama"]
    path = tiny.gguf_path if linear_type is None else write_quantized_gguf(tiny, tmp_path / "q.gguf", linear_type)
    assert_same_as_gguf_package(path)


def test_a_huge_array_count_is_an_error_not_an_allocation(tmp_path):
    import struct

    path = tmp_path / "huge.gguf"
    key = b"tokenizer.ggml.tokens"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    path.write_bytes(header + struct.pack("<IIQ", 9, 8, 2**60))  # an array of 2^60 strings
    with pytest.raises(ValueError, match="runs past the end of the file"):
        read_gguf(path)
