"""Load a model (weights, spec, tokenizer) from any source, in the dtype and on the device asked."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ladle.errors import LadleError, ModelLoadError
from ladle.model.attention import resolve_backend_name
from ladle.model.gguf_loader import GGUFFile
from ladle.model.hf_loader import HFFolder
from ladle.model.packed import pack_linears, packing_available
from ladle.model.quant import cached_input_absmax, quantize_from_gguf, quantize_model
from ladle.model.registry import MODEL_CLASSES
from ladle.model.source import ModelSource
from ladle.model.spec import TransformerSpec
from ladle.model.tokenizer import Tokenizer
from ladle.platform import resolve_device, resolve_dtype

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    source: ModelSource  # where it came from and the name it is served under
    spec: TransformerSpec  # its shape
    tokenizer: Tokenizer  # text ↔ ids, chat template, stop tokens
    model: nn.Module  # a LlamaForCausalLM (or subclass), in eval mode
    dtype: torch.dtype  # dtype of the weights and the KV cache
    device: torch.device  # where the weights live
    max_model_len: int  # longest request (prompt + output) the model serves
    attention_backend: str = "sdpa"  # the attention implementation in use
    quantization: str = "none"  # weight-only quantization of the decoder layers


def open_model_files(source: ModelSource) -> HFFolder | GGUFFile:
    return GGUFFile(source.path) if source.format == "gguf" else HFFolder(source.path)


def load_tokenizer(source: ModelSource) -> Tokenizer:
    files = open_model_files(source)
    return files.tokenizer(files.spec().eos_token_ids)


def load_model(
    source: ModelSource,
    dtype: str = "auto",
    device: str = "auto",
    attention_backend: str = "auto",
    max_model_len: int | None = None,
    quantization: str = "none",
    pack: bool = True,
    calibration_cache: str | None = None,
    calibration_forward=None,
    between: Callable[[], object] | None = None,
) -> LoadedModel:
    """pack=False keeps plain nn.Linear layers (for tools and tests that read the weights) where
    they would be reordered for oneDNN. calibration_cache: a folder where what a load measures is
    kept between loads, w8a8's calibration and the packed linears' row plans (None: measured at
    every load). calibration_forward: w8a8's calibration prefill, (loaded, ids) -> hidden states
    (`ladle.runner.model_runner.prefill_hidden_states`: the runner's, passed down, since the model
    layer builds no steps). between: called between pieces of the load (a tensor read, a layer
    quantized or packed): a compute loop lets the engines already serving step there."""
    started = time.perf_counter()
    files = open_model_files(source)
    spec = files.spec()
    tokenizer = files.tokenizer(spec.eos_token_ids)
    if tokenizer.vocab_size > spec.vocab_size and tokenizer.vocab_size - spec.vocab_size > 1024:
        raise ModelLoadError(
            source.path, f"tokenizer has {tokenizer.vocab_size} tokens, the model only {spec.vocab_size} embeddings"
        )
    device_name = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device_name)
    if max_model_len is not None and max_model_len > spec.max_position_embeddings:
        raise LadleError(
            f"--max-model-len {max_model_len} exceeds the model's context length {spec.max_position_embeddings}"
        )
    max_len = max_model_len or spec.max_position_embeddings
    backend = resolve_backend_name(attention_backend, torch.device(device_name).type)
    model = _build(spec, backend, max_len, torch_dtype, torch.device(device_name))
    loaded = model.load_weights(_as_torch(files.weights(spec), between))
    missing = sorted(model.expected_checkpoint_names() - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(source.path, f"checkpoint lacks tensors the model needs: {shown}")
    if isinstance(files, GGUFFile) and (factors := files.rope_frequency_factors()) is not None:
        model.model.rotary.set_frequency_factors(torch.from_numpy(factors))
    if quantization == "from-gguf":
        if not isinstance(files, GGUFFile):
            raise LadleError("--quantization from-gguf needs a GGUF model; use int8 or int4 for a Hugging Face folder")
        counts = quantize_from_gguf(model, files, spec)
        log.info("from-gguf: %(int4)d projections int4 (exact), %(int8)d int8, %(unchanged)d unchanged", counts)
    elif quantization == "w8a8":
        if device_name != "cpu":
            raise LadleError("--quantization w8a8 runs on CPUs only (int8 x int8 products); use int8 on a GPU")
        if calibration_forward is None:
            raise LadleError("w8a8 calibrates with a prefill: pass calibration_forward (the runner's prefill)")
        float_model = LoadedModel(source, spec, tokenizer, model.eval(), torch_dtype, torch.device("cpu"), max_len)
        stats = cached_input_absmax(float_model, calibration_cache, calibration_forward)
        quantize_model(model, quantization, input_absmax=stats, between=between)
    else:
        quantize_model(model, quantization, between=between)
    if pack and packing_available(torch_dtype, torch.device(device_name)):
        pack_linears(model, calibration_cache, between)
    log.info(
        "loaded %s (%s, %s layers) as %s%s on %s with %s attention in %.1fs",
        source.name,
        spec.architecture,
        spec.num_layers,
        str(torch_dtype).removeprefix("torch."),
        "" if quantization == "none" else f" with {quantization} weights",
        device_name,
        backend,
        time.perf_counter() - started,
    )
    return LoadedModel(
        source, spec, tokenizer, model.eval(), torch_dtype, torch.device(device_name), max_len, backend, quantization
    )


def _build(spec: TransformerSpec, backend: str, max_len: int, dtype: torch.dtype, device: torch.device):
    cls = MODEL_CLASSES[spec.architecture]
    with torch.device("meta"):  # no random initialisation: every parameter is loaded next
        model = cls(spec, attention_backend=backend, max_positions=max_len)
    _materialize(model, device)
    model.tie_weights()
    model.to(dtype)
    model.requires_grad_(False)
    # buffers are not in checkpoints: rebuild them on the real device, in float32
    rotary = model.model.rotary
    rebuilt = type(rotary)(spec, max_len).to(device)
    rotary.inv_freq, rotary.cos_sin = rebuilt.inv_freq, rebuilt.cos_sin
    return model


def _materialize(model: torch.nn.Module, device: torch.device) -> None:
    """Uninitialised storage on `device` for every meta parameter and buffer: what `to_empty` does,
    without its meta `empty_like`, which imports sympy (0.5 s of every cold start)."""

    def empty(t: torch.Tensor) -> torch.Tensor:
        return torch.empty(t.shape, dtype=t.dtype, device=device)

    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None:
                module._parameters[name] = torch.nn.Parameter(empty(p), requires_grad=False)
        for name, b in module._buffers.items():
            if b is not None:
                module._buffers[name] = empty(b)


def _as_torch(weights, between: Callable[[], object] | None = None):
    for name, w in weights:
        yield name, torch.from_numpy(w) if isinstance(w, np.ndarray) else w
        if between is not None:
            between()
