"""A sentence-transformers embedding model as an Endpoint (kind "embedding", task "embed"): loaded
on the shared ComputeLoop, its requests' inputs batched by the DynamicBatcher, grouped by token
length (each batch padded to its longest), computed on the compute thread between LLM steps.

`dimensions`: a vector shorter than the model's own is given only where the model says it was
trained for it (`matryoshka_dims` in config_sentence_transformers.json): cut and renormalised.
Elsewhere (MiniLM) any other value is a 400 naming `dimensions`, as OpenAI answers for models
without the parameter; cutting a vector a model was not trained to cut would quietly lose quality.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import numpy as np

from ladle.config import ModelEntry
from ladle.engine.batcher import DynamicBatcher, compute_loop_executor
from ladle.errors import InvalidRequestError
from ladle.model.sentence import SentenceSpec, SentenceTokenizer
from ladle.model.source import resolve_embedding_model
from ladle.router.endpoint import EMBED, BatchedEndpoint, Phase

log = logging.getLogger(__name__)

WARMUP_LENGTHS = (8, 128)  # token lengths of the warm-up batches


@dataclass(frozen=True)
class EmbeddingInfo:
    model_name: str  # the name it is served under
    weights_description: str  # e.g. "22.7M parameters, float32"
    device: str  # cpu, cuda:0
    max_model_len: int  # the longest input, in tokens
    dimensions: int  # the vector's length
    pooling: str  # mean, cls, max, mean_sqrt_len (+ normalized)


@dataclass(frozen=True)
class _Loaded:
    spec: SentenceSpec
    tokenizer: SentenceTokenizer
    encoder: object  # ladle.model.bert.SentenceEncoder
    memory_bytes: int
    info: EmbeddingInfo


class EmbeddingEndpoint(BatchedEndpoint):
    kind = "embedding"
    tasks = frozenset({EMBED})

    def __init__(self, entry: ModelEntry, compute, warmup: bool = True, observe_batch=None):
        super().__init__(entry)
        self.compute = compute
        self.warmup = warmup
        self.observe_batch = observe_batch or (lambda name, record: None)
        self.loaded: _Loaded | None = None
        self.batcher: DynamicBatcher | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        loaded = await self._loading(asyncio.wrap_future(self.compute.submit(self._load)))
        if loaded is None:
            return
        self.loaded, self.memory_bytes = loaded, loaded.memory_bytes
        self.batcher = DynamicBatcher(
            self.name,
            loaded.encoder.embed,
            self.entry.batching,
            compute_loop_executor(self.compute),
            on_batch=lambda record: self.observe_batch(self.name, record),
        )
        self.phase = Phase.WARMING
        if self.warmup:
            await asyncio.wrap_future(self.compute.submit(self._warm_up))
        self.phase, self.ready_since_s = Phase.READY, time.time()

    def _load(self) -> _Loaded:
        import torch

        from ladle.model.bert import SentenceEncoder, describe_size, load_bert, param_bytes

        model_cfg = self.entry.engine.model
        source = resolve_embedding_model(model_cfg.model, self.name)
        spec = SentenceSpec.from_folder(source.path)
        tokenizer = SentenceTokenizer(source.path)
        device = model_cfg.device if model_cfg.device != "auto" else "cpu"
        dtype = {"auto": torch.float32, "float32": torch.float32, "bfloat16": torch.bfloat16}.get(model_cfg.dtype)
        if dtype is None:
            dtype = torch.float16 if model_cfg.dtype == "float16" else torch.float32
        model = load_bert(source.path, dtype, device)
        weights = f"{describe_size(model)} parameters, {str(dtype).removeprefix('torch.')}"
        if model_cfg.runtime == "onnxruntime":
            encoder, memory = self._exported(model, spec, tokenizer.pad_token_id)
            weights = f"{describe_size(model)} parameters, float32, ONNX Runtime"
        else:
            encoder = SentenceEncoder(model, spec.pooling_mode, spec.normalize, tokenizer.pad_token_id)
            memory = param_bytes(model)
        pooling = spec.pooling_mode + (" + normalized" if spec.normalize else "")
        info = EmbeddingInfo(self.name, weights, device, spec.max_seq_length, spec.dimensions, pooling)
        return _Loaded(spec, tokenizer, encoder, memory, info)

    def _exported(self, model, spec: SentenceSpec, pad_token_id: int):
        """The encoder exported to ONNX (in a temporary folder: ONNX Runtime keeps the graph in
        memory) and its session; (encoder, bytes it holds)."""
        import tempfile
        from pathlib import Path

        import torch

        from ladle.model.bert import export_onnx
        from ladle.runner.onnx_session import OnnxSentenceEncoder

        with tempfile.TemporaryDirectory(prefix="ladle-onnx-") as folder:
            path = Path(folder) / "encoder.onnx"
            export_onnx(model, spec.pooling_mode, spec.normalize, path)
            encoder = OnnxSentenceEncoder(path, pad_token_id, spec.dimensions, torch.get_num_threads())
            return encoder, path.stat().st_size

    def _warm_up(self) -> None:
        tok = self.loaded.tokenizer
        for n in WARMUP_LENGTHS:
            n = min(n, self.loaded.spec.max_seq_length)
            self.loaded.encoder.embed([[tok.cls_token_id or 0] + [1000] * (n - 2) + [tok.sep_token_id or 0]] * 2)

    async def close(self) -> None:
        await self._close_batcher()
        self.loaded = None
        self._unloaded()

    # -- state -------------------------------------------------------------------------------------

    @property
    def info(self) -> EmbeddingInfo | None:
        return self.loaded.info if self.loaded is not None else None

    def summary(self) -> str:
        i = self.loaded.info
        return (
            f"{i.model_name} (embeddings: {i.weights_description} on {i.device}, {i.dimensions} dimensions, "
            f"{i.pooling} pooling, max input {i.max_model_len} tokens, batches up to "
            f"{self.entry.batching.max_batch_size} within {self.entry.batching.max_queue_delay_ms:g} ms)"
        )

    # -- requests ----------------------------------------------------------------------------------

    def prepare(self, inputs: list[str] | list[list[int]], truncate: int | None) -> list[list[int]]:
        """Token ids of each input (texts tokenized with [CLS] and [SEP]; ids taken as given),
        checked against the vocabulary and the model's maximum length: longer inputs are cut to
        `truncate` tokens (at most the maximum) where it is given, else refused naming `input`."""
        spec, tok = self.loaded.spec, self.loaded.tokenizer
        if inputs and isinstance(inputs[0], str):
            batch = tok.encode_batch(inputs)
        else:
            batch = [list(ids) for ids in inputs]
        limit = spec.max_seq_length if truncate is None else min(truncate, spec.max_seq_length)
        for i, ids in enumerate(batch):
            if not ids:
                raise InvalidRequestError(f"input[{i}] is an empty list of token ids", param="input")
            bad = next((t for t in ids if not 0 <= t < tok.vocab_size), None)
            if bad is not None:
                raise InvalidRequestError(
                    f"input[{i}] holds the token id {bad}, outside the vocabulary (0..{tok.vocab_size - 1})",
                    param="input",
                )
            if truncate is None and len(ids) > limit:
                raise InvalidRequestError(
                    f"input[{i}] is {len(ids)} tokens long, more than this model's maximum of {limit} tokens: "
                    "shorten it, or set `truncate` (or vLLM's `truncate_prompt_tokens`) to cut it",
                    param="input",
                )
        return [tok.truncate(ids, limit) for ids in batch]

    def check_dimensions(self, dimensions: int | None) -> None:
        spec = self.loaded.spec
        if dimensions is None or dimensions == spec.dimensions or dimensions in spec.matryoshka_dims:
            return
        shorter = (
            f"; it was trained for {', '.join(map(str, spec.matryoshka_dims))} too" if spec.matryoshka_dims else ""
        )
        raise InvalidRequestError(
            f"dimensions: this model gives {spec.dimensions}-dimensional vectors{shorter}; "
            f"it does not support dimensions={dimensions}",
            param="dimensions",
        )

    async def embed(
        self, batch: list[list[int]], dimensions: int | None = None, timeout_s: float | None = None
    ) -> list[np.ndarray]:
        """One float32 vector per input; each input is an item of the batcher (sized by its length)."""
        vectors = await self._submit_all(self.batcher, [(ids, len(ids)) for ids in batch], timeout_s)
        if dimensions is not None and dimensions != self.loaded.spec.dimensions:
            vectors = [self._shorten(v, dimensions) for v in vectors]
        return vectors

    def _shorten(self, vector: np.ndarray, dimensions: int) -> np.ndarray:
        cut = vector[:dimensions]
        if self.loaded.spec.normalize:
            cut = cut / max(float(np.linalg.norm(cut)), 1e-12)
        return cut.astype(np.float32)
