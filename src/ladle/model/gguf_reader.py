"""A GGUF reader: the header parsed with `struct` from the memory-mapped file, the tensors as numpy
views of it.

The `gguf` package's GGUFReader builds numpy views for every element of every metadata array:
3.5 s for the embedded model's 49,152-token vocabulary and 48,900 merges, a quarter of a cold
start on a 2-core EPYC. This reads the same header in ~0.1 s and gives the tensors in the same
shapes GGUFReader does (so `gguf.quants.dequantize` takes them as they are). GGUF layout: magic,
version, tensor count, metadata count; metadata (key, value type, value); tensor infos (name,
dimensions innermost first, type, offset); then the data, aligned to `general.alignment` (32).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

MAGIC = b"GGUF"
STRING, ARRAY = 8, 9
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_ITEM_TYPES = {  # tensor types stored as plain numbers; every other type is blocks of bytes
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass
class Tensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: np.ndarray  # dimensions as GGUF lists them, innermost first
    data: np.ndarray  # numbers [outer..., inner], or bytes [outer..., bytes per row] for block types


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def unpack(self, fmt: str):
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values[0] if len(values) == 1 else values

    def string(self) -> str:
        n = self.unpack("Q")
        if n > len(self.buf) - self.pos:
            raise ValueError(f"a string of {n} bytes at offset {self.pos} runs past the end of the file")
        s = bytes(self.buf[self.pos : self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, kind: int) -> Any:
        if kind == STRING:
            return self.string()
        if kind == ARRAY:
            item_kind, count = self.unpack("IQ")
            if count > len(self.buf) - self.pos:
                raise ValueError(f"an array of {count} items at offset {self.pos} runs past the end of the file")
            if item_kind in _SCALARS:
                dtype = np.dtype("<" + _SCALARS[item_kind])
                items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
                self.pos += count * dtype.itemsize
                return items.tolist()
            return [self.value(item_kind) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {kind} at offset {self.pos}")
        return self.unpack(_SCALARS[kind])


def read_gguf(path: Path) -> tuple[dict[str, Any], list[Tensor]]:
    """(metadata, tensors) of a GGUF file; ValueError / struct.error on a file that is not one."""
    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if buf[:4] != MAGIC:
        raise ValueError(f"GGUF magic invalid: expected {MAGIC!r}, found {bytes(buf[:4])!r}")
    c = _Cursor(buf)
    c.pos = 4
    version, tensor_count, kv_count = c.unpack("IQQ")
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported (2 and later are)")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = c.string()
        metadata[key] = c.value(c.unpack("I"))
    infos = []
    for _ in range(tensor_count):
        name = c.string()
        n_dims = c.unpack("I")
        if n_dims > 8:
            raise ValueError(f"tensor {name!r} has {n_dims} dimensions")
        dims = [c.unpack("Q") for _ in range(n_dims)]
        kind, offset = c.unpack("IQ")
        infos.append((name, dims, GGMLQuantizationType(kind), offset))
    alignment = int(metadata.get("general.alignment", 32))
    start = -(-c.pos // alignment) * alignment
    file = np.frombuffer(buf, dtype=np.uint8)  # the same read-only mapping the header came from
    tensors, names = [], set()
    for name, dims, kind, offset in infos:
        if name in names:
            raise ValueError(f"duplicated tensor {name!r}")
        names.add(name)
        count = int(np.prod(dims, dtype=np.int64))
        block_size, type_size = GGML_QUANT_SIZES[kind]
        n_bytes = count * type_size // block_size
        begin = start + offset
        if begin + n_bytes > len(file):
            raise ValueError(f"tensor {name!r} runs past the end of the file")
        outer = tuple(reversed(dims[1:]))
        raw = file[begin : begin + n_bytes]
        if kind in _ITEM_TYPES:
            data = raw.view(_ITEM_TYPES[kind]).reshape(*outer, dims[0])
        else:
            data = raw.reshape(*outer, dims[0] // block_size * type_size)
        tensors.append(Tensor(name, kind, np.array(dims, dtype=np.uint64), data))
    return metadata, tensors
