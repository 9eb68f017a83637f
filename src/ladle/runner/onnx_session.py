"""Tensor models run by ONNX Runtime: one InferenceSession per instance, checked against the
repository config at load, and batches of requests run as one call (rows concatenated along the
batch dimension, the outputs split back). The only module that imports onnxruntime."""

from __future__ import annotations

import os
import queue
from dataclasses import dataclass

import numpy as np

from ladle.errors import LadleError
from ladle.model.sentence import pad_batch
from ladle.model.tensor_repository import DATATYPES, TensorModel, TensorSpec

# ONNX Runtime's element types -> KServe datatypes
ORT_TYPES = {
    "tensor(bool)": "BOOL", "tensor(uint8)": "UINT8", "tensor(uint16)": "UINT16", "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64", "tensor(int8)": "INT8", "tensor(int16)": "INT16", "tensor(int32)": "INT32",
    "tensor(int64)": "INT64", "tensor(float16)": "FP16", "tensor(float)": "FP32", "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}  # fmt: skip


@dataclass(frozen=True)
class SessionInfo:
    providers: tuple[str, ...]  # the execution providers the sessions use, best first
    num_threads: int  # intra-op threads per session
    model_bytes: int  # size of the ONNX file


class OnnxSessions:
    """config.instances sessions of one model; run() borrows one, so instances batches run at once."""

    def __init__(self, model: TensorModel, num_cores: int | None = None):
        import onnxruntime as ort

        self.model = model
        cfg = model.config
        cores = num_cores or os.cpu_count() or 1
        threads = max(1, cores // cfg.instances)
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        self._free: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(cfg.instances):
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # no busy-waiting between calls: the cores are shared with the HTTP loop and other models
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            try:
                session = ort.InferenceSession(str(model.model_path), options, providers=providers)
            except Exception as e:  # ORT raises its own (Fail, InvalidProtobuf, ...): a bad file is the user's
                raise LadleError(f"{model.model_path}: ONNX Runtime cannot load it: {e}") from None
            self._free.put(session)
        self._check(session)
        self.info = SessionInfo(tuple(session.get_providers()), threads, model.model_path.stat().st_size)

    def _check(self, session) -> None:
        """The config's inputs and outputs against the graph's: names, datatypes, shapes."""
        cfg = self.model.config
        where = self.model.config_path
        for kind, specs, graph in (
            ("inputs", cfg.inputs, session.get_inputs()),
            ("outputs", cfg.outputs, session.get_outputs()),
        ):
            by_name = {g.name: g for g in graph}
            for i, spec in enumerate(specs):
                g = by_name.get(spec.name)
                if g is None:
                    raise LadleError(
                        f"{where}: {kind}[{i}].name: the model has no {kind[:-1]} {spec.name!r} "
                        f"(its {kind}: {', '.join(by_name)})"
                    )
                _check_spec(spec, g, cfg.max_batch_size, f"{where}: {kind}[{i}]")
            if kind == "inputs":
                missing = [n for n in by_name if cfg.input(n) is None]
                if missing:
                    raise LadleError(f"{where}: inputs: the model also needs {', '.join(missing)}")

    def run(self, inputs: dict[str, np.ndarray], output_names: list[str]) -> list[np.ndarray]:
        session = self._free.get()
        try:
            return session.run(output_names, inputs)
        finally:
            self._free.put(session)

    def run_batch(self, items: list[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray] | Exception]:
        """Each item's outputs: items whose non-batch shapes agree run as one call (concatenated
        along the batch dimension, at most max_batch_size rows a call), others in calls of their
        own; a failing call fails only its items."""
        names = [s.name for s in self.model.config.outputs]
        if self.model.config.max_batch_size == 0:
            return [self._one(item, names) for item in items]
        results: list = [None] * len(items)
        items = list(items)
        for i, item in enumerate(items):  # an item whose tensors ORT cannot take fails alone, before joining
            try:
                items[i] = {k: _ort_value(k, v) for k, v in item.items()}
            except OnnxRunError as e:
                results[i] = e
        for idx in self._calls(items, [i for i in range(len(items)) if results[i] is None]):
            try:
                joined = {k: np.concatenate([items[i][k] for i in idx]) for k in items[idx[0]]}
                outs = self.run(joined, names)
            except Exception as e:  # ORT's errors name the node; the item's request gets a 400 or 500
                for i in idx:
                    results[i] = _as_error(e)
                continue
            start = 0
            for i in idx:
                rows = _rows(items[i])
                results[i] = {n: o[start : start + rows] for n, o in zip(names, outs, strict=True)}
                start += rows
        return results

    def _calls(self, items: list[dict[str, np.ndarray]], indices: list[int]) -> list[list[int]]:
        """The items (of `indices`) of each ONNX Runtime call: same non-batch shapes, rows up to
        max_batch_size."""
        groups: dict[tuple, list[list[int]]] = {}
        for i in indices:
            item = items[i]
            calls = groups.setdefault(tuple((k, v.shape[1:]) for k, v in sorted(item.items())), [[]])
            if calls[-1] and sum(_rows(items[j]) for j in calls[-1]) + _rows(item) > self.model.config.max_batch_size:
                calls.append([])
            calls[-1].append(i)
        return [call for calls in groups.values() for call in calls]

    def _one(self, item, names):
        try:
            item = {k: _ort_value(k, v) for k, v in item.items()}
            return dict(zip(names, self.run(item, names), strict=True))
        except Exception as e:
            return _as_error(e)

    def warmup_inputs(self) -> list[tuple[str, dict[str, np.ndarray]]]:
        cfg = self.model.config
        rng = np.random.default_rng(0)
        out = []
        for w in cfg.warmup:
            batch = (w.batch_size,) if cfg.max_batch_size else ()
            tensors = {}
            for spec in cfg.inputs:
                shape = batch + tuple(1 if d == -1 else d for d in spec.shape)
                dtype = np.dtype(DATATYPES[spec.datatype])
                if spec.datatype == "BYTES":
                    tensors[spec.name] = np.full(shape, "", dtype=object)
                elif w.fill == "random":
                    tensors[spec.name] = rng.standard_normal(shape).astype(dtype)
                else:
                    tensors[spec.name] = (np.ones if w.fill == "ones" else np.zeros)(shape, dtype=dtype)
            out.append((w.name, tensors))
        return out


def _rows(item: dict[str, np.ndarray]) -> int:
    return len(next(iter(item.values())))


def _ort_value(name: str, array: np.ndarray) -> np.ndarray:
    """BYTES tensors (bytes objects) as the strings ONNX Runtime's string tensors take."""
    if array.dtype != object:
        return array
    try:
        return np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else v, otypes=[object])(array)
    except UnicodeDecodeError:
        raise OnnxRunError(f"input {name!r}: a BYTES element is not UTF-8 text (the model takes strings)") from None


class OnnxRunError(LadleError):
    """ONNX Runtime refused the inputs (a shape the graph cannot take): the request's fault."""


def _as_error(e: Exception) -> Exception:
    name = type(e).__name__
    if name in ("InvalidArgument", "Fail", "RuntimeException", "InvalidGraph"):
        return OnnxRunError(f"ONNX Runtime could not run the model on these inputs: {e}")
    return e


def _check_spec(spec: TensorSpec, graph, max_batch_size: int, where: str) -> None:
    datatype = ORT_TYPES.get(graph.type)
    if datatype != spec.datatype:
        actual = datatype or graph.type
        raise LadleError(f"{where}.datatype: {spec.datatype} but the model's {graph.name!r} is {actual}")
    dims = [d if isinstance(d, int) else -1 for d in graph.shape]  # symbolic or None: variable
    if max_batch_size > 0:
        if not dims:
            raise LadleError(f"{where}.shape: max_batch_size > 0 needs a batch dimension; {graph.name!r} is a scalar")
        if dims[0] != -1 and not dims[0] == max_batch_size == 1:
            raise LadleError(
                f"{where}: max_batch_size {max_batch_size} needs a variable batch dimension, but {graph.name!r} "
                f"takes batches of {dims[0]} only (export it with a batch dimension of None)"
            )
        dims = dims[1:]
    ok = len(dims) == len(spec.shape) and all(g == -1 or g == s for g, s in zip(dims, spec.shape, strict=True))
    if not ok:
        raise LadleError(f"{where}.shape: {list(spec.shape)} but the model's {graph.name!r} has {dims}")


class OnnxSentenceEncoder:
    """A sentence encoder exported to ONNX (ladle.model.bert.export_onnx) run by ONNX Runtime on the
    CPU: the same embed(batch) as the torch SentenceEncoder, for the embedding endpoint's
    `runtime: onnxruntime`. One session; it runs on the compute thread like the torch encoder."""

    def __init__(self, path, pad_token_id: int, dimensions: int, num_threads: int):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # the LLM shares the cores
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.pad_token_id = pad_token_id
        self.dimensions = dimensions

    def embed(self, batch: list[list[int]]) -> np.ndarray:
        """One vector per id list, padded to the longest of the batch: float32 [B, H]."""
        ids, mask = pad_batch(batch, self.pad_token_id)
        return self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
