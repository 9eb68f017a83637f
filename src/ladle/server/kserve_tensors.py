"""The KServe v2 (Open Inference Protocol) tensor wire format: typed tensors as JSON, and Triton's
binary tensor extension (a JSON header of `Inference-Header-Content-Length` bytes, then each binary
tensor's raw bytes in order). Pure functions from bytes to numpy arrays and back; every refusal is
an APIError(400) naming the field."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass

import numpy as np

from ladle.model.tensor_repository import DATATYPES, TensorModelConfig
from ladle.server.errors import APIError

HEADER_LENGTH = "Inference-Header-Content-Length"


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    is_binary: bool  # answer it as raw bytes after the JSON header


@dataclass(frozen=True)
class InferRequest:
    id: str | None
    inputs: dict[str, np.ndarray]  # by name, checked against the model's config
    num_rows: int  # the batch dimension's size (1 for a model without batching)
    outputs: list[RequestedOutput]  # those asked for, or every output of the model


def bad(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


def parse_infer_request(body: bytes, header_length: str | None, config: TensorModelConfig) -> InferRequest:
    header, binary = _split(body, header_length)
    try:
        data = json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise bad("the request body must be a JSON object with `inputs`")
    raw_inputs = data.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise bad("inputs: a list of tensors is required", "inputs")
    inputs: dict[str, np.ndarray] = {}
    offset = 0
    for i, raw in enumerate(raw_inputs):
        name, array, offset = _input(raw, i, config, binary, offset)
        if name in inputs:
            raise bad(f"inputs[{i}].name: the input {name!r} is given twice", f"inputs[{i}].name")
        inputs[name] = array
    if offset != len(binary):
        raise bad(f"{HEADER_LENGTH}: the body has {len(binary) - offset} bytes after the last binary tensor")
    missing = [s.name for s in config.inputs if s.name not in inputs]
    if missing:
        raise bad(f"inputs: the model {config.name!r} needs the input {missing[0]!r}", "inputs")
    num_rows = _rows(inputs, config)
    return InferRequest(data.get("id"), inputs, num_rows, _outputs(data, config))


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    if not header_length.strip().isdigit():
        raise bad(f"{HEADER_LENGTH}: expected a number of bytes, got {header_length!r}")
    n = int(header_length)
    if n > len(body):
        raise bad(f"{HEADER_LENGTH}: {n} bytes of JSON header, but the body holds only {len(body)} bytes")
    return body[:n], body[n:]


def _input(raw, i: int, config: TensorModelConfig, binary: bytes, offset: int):
    where = f"inputs[{i}]"
    if not isinstance(raw, dict):
        raise bad(f"{where}: expected a tensor object (name, datatype, shape, data)", where)
    name = raw.get("name")
    spec = config.input(name) if isinstance(name, str) else None
    if spec is None:
        known = ", ".join(repr(s.name) for s in config.inputs)
        raise bad(
            f"{where}.name: the model {config.name!r} has no input {name!r} (its inputs: {known})", f"{where}.name"
        )
    datatype = raw.get("datatype")
    if datatype != spec.datatype:
        raise bad(
            f"{where}.datatype: {datatype!r}, but the input {name!r} of {config.name!r} is {spec.datatype}",
            f"{where}.datatype",
        )
    shape = raw.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"{where}.shape: expected a list of non-negative integers, got {shape!r}", f"{where}.shape")
    _check_shape(shape, spec.shape, config, where)
    params = raw.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    if size is not None:
        array, offset = _binary(size, shape, datatype, binary, offset, where)
    else:
        array = _json_data(raw.get("data"), shape, datatype, where)
    return name, array, offset


def _check_shape(shape: list[int], spec_shape: tuple[int, ...], config: TensorModelConfig, where: str) -> None:
    expected = ([-1] if config.max_batch_size else []) + list(spec_shape)
    ok = len(shape) == len(expected) and all(e == -1 or e == s for s, e in zip(shape, expected, strict=True))
    if not ok:
        raise bad(f"{where}.shape: {shape}, but the model {config.name!r} takes {expected} (-1: any)", f"{where}.shape")
    if config.max_batch_size and not 1 <= shape[0] <= config.max_batch_size:
        raise bad(
            f"{where}.shape: a batch of {shape[0]} rows, but {config.name!r} takes 1 to {config.max_batch_size}",
            f"{where}.shape",
        )


def _binary(size, shape, datatype: str, binary: bytes, offset: int, where: str):
    param = f"{where}.parameters.binary_data_size"
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad(f"{param}: expected a number of bytes, got {size!r}", param)
    if offset + size > len(binary):
        raise bad(f"{param}: {size} bytes, but the body holds only {len(binary) - offset} more after the header", param)
    chunk = binary[offset : offset + size]
    count = math.prod(shape)
    if datatype == "BYTES":
        array = _unpack_bytes(chunk, count, param)
    else:
        dtype = np.dtype(DATATYPES[datatype]).newbyteorder("<")
        if size != count * dtype.itemsize:
            raise bad(f"{param}: {size} bytes, but shape {shape} of {datatype} is {count * dtype.itemsize}", param)
        array = np.frombuffer(chunk, dtype=dtype).astype(dtype.newbyteorder("="))
    return array.reshape(shape), offset + size


def _unpack_bytes(chunk: bytes, count: int, param: str) -> np.ndarray:
    items, pos = [], 0
    for _ in range(count):
        if pos + 4 > len(chunk):
            raise bad(f"{param}: the BYTES tensor ends before its {count} elements", param)
        (n,) = struct.unpack_from("<I", chunk, pos)
        if pos + 4 + n > len(chunk):
            raise bad(f"{param}: a BYTES element of {n} bytes runs past the tensor's end", param)
        items.append(chunk[pos + 4 : pos + 4 + n])
        pos += 4 + n
    if pos != len(chunk):
        raise bad(f"{param}: {len(chunk) - pos} bytes left after the BYTES tensor's {count} elements", param)
    return np.array(items, dtype=object)


def _json_data(data, shape: list[int], datatype: str, where: str) -> np.ndarray:
    param = f"{where}.data"
    if data is None:
        raise bad(f"{param}: required (or parameters.binary_data_size with a binary body)", param)
    count = math.prod(shape)
    flat = _flatten(data, param)
    if len(flat) != count:
        raise bad(f"{param}: {len(flat)} values, but shape {shape} holds {count}", param)
    if datatype == "BYTES":
        if not all(isinstance(v, str) for v in flat):
            raise bad(f"{param}: BYTES data are strings", param)
        return np.array([v.encode() for v in flat], dtype=object).reshape(shape)
    wrong = [v for v in flat if not _fits(v, datatype)]
    if wrong:
        raise bad(f"{param}: {wrong[0]!r} is not a {datatype} value", param)
    try:
        return np.array(flat, dtype=DATATYPES[datatype]).reshape(shape)
    except OverflowError:
        raise bad(f"{param}: a value does not fit {datatype}", param) from None


def _fits(v, datatype: str) -> bool:
    """A JSON value of this datatype: true/false for BOOL, integers for the integer types, numbers for FP."""
    if datatype == "BOOL":
        return isinstance(v, bool)
    if isinstance(v, bool):
        return False
    return isinstance(v, (int, float)) if datatype.startswith("FP") else isinstance(v, int)


def _flatten(data, param: str) -> list:
    if not isinstance(data, list):
        return [data]
    out = []
    for v in data:
        out.extend(_flatten(v, param) if isinstance(v, list) else [v])
    return out


def _rows(inputs: dict[str, np.ndarray], config: TensorModelConfig) -> int:
    if not config.max_batch_size:
        return 1
    rows = {len(a) for a in inputs.values()}
    if len(rows) > 1:
        raise bad(f"inputs: every input needs the same batch dimension, got {sorted(rows)}", "inputs")
    return rows.pop()


def _outputs(data: dict, config: TensorModelConfig) -> list[RequestedOutput]:
    params = data.get("parameters") or {}
    default = bool(params.get("binary_data_output", False)) if isinstance(params, dict) else False
    asked = data.get("outputs")
    if asked is None:
        return [RequestedOutput(s.name, default) for s in config.outputs]
    if not isinstance(asked, list):
        raise bad("outputs: expected a list of {name, parameters}", "outputs")
    out = []
    for i, o in enumerate(asked):
        name = o.get("name") if isinstance(o, dict) else None
        if not isinstance(name, str) or config.output(name) is None:
            known = ", ".join(repr(s.name) for s in config.outputs)
            raise bad(
                f"outputs[{i}].name: the model has no output {name!r} (its outputs: {known})", f"outputs[{i}].name"
            )
        p = o.get("parameters") or {}
        out.append(RequestedOutput(name, bool(p.get("binary_data", default)) if isinstance(p, dict) else default))
    return out


def encode_infer_response(
    model_name: str, version: str, request: InferRequest, results: dict[str, np.ndarray], config: TensorModelConfig
) -> tuple[bytes, dict[str, str]]:
    """The response body and its headers: JSON, with the binary outputs' bytes after it if any."""
    outputs, chunks = [], []
    for want in request.outputs:
        spec = config.output(want.name)
        array = np.asarray(results[want.name])
        tensor = {"name": want.name, "datatype": spec.datatype, "shape": list(array.shape)}
        if want.is_binary:
            raw = _pack(array, spec.datatype)
            tensor["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            tensor["data"] = _json_values(array, spec.datatype)
        outputs.append(tensor)
    body = {"model_name": model_name, "model_version": version, "outputs": outputs}
    if request.id is not None:
        body["id"] = request.id
    header = json.dumps(body, separators=(",", ":")).encode()
    if not chunks:
        return header, {"Content-Type": "application/json"}
    return header + b"".join(chunks), {"Content-Type": "application/octet-stream", HEADER_LENGTH: str(len(header))}


def _pack(array: np.ndarray, datatype: str) -> bytes:
    if datatype == "BYTES":
        items = [v if isinstance(v, bytes) else str(v).encode() for v in array.reshape(-1)]
        return b"".join(struct.pack("<I", len(v)) + v for v in items)
    return np.ascontiguousarray(array, dtype=np.dtype(DATATYPES[datatype]).newbyteorder("<")).tobytes()


def _json_values(array: np.ndarray, datatype: str) -> list:
    flat = array.reshape(-1)
    if datatype == "BYTES":
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    return flat.astype(DATATYPES[datatype]).tolist()
