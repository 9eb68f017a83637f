"""`ladle convert`: write any model Ladle loads (a GGUF file, a Hugging Face folder) as a plain
Hugging Face folder: config.json, model.safetensors, tokenizer.json, tokenizer_config.json (with
the chat template), generation_config.json. Peers that read only such folders (vLLM,
transformers) can then serve exactly the weights Ladle serves (GGUF blocks dequantized)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ladle.errors import LadleError, ModelLoadError
from ladle.model.gguf_loader import GGUFFile
from ladle.model.loader import open_model_files
from ladle.model.source import ModelSource
from ladle.model.spec import TransformerSpec
from ladle.platform import normalize_dtype_name

HF_CLASSES = {"llama": ("LlamaForCausalLM", "llama"), "qwen2": ("Qwen2ForCausalLM", "qwen2")}


def hf_config(spec: TransformerSpec, dtype_name: str, bos_id: int | None, eos_ids: tuple[int, ...]) -> dict:
    cls, model_type = HF_CLASSES[spec.architecture]
    cfg = {
        "architectures": [cls],
        "model_type": model_type,
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "attention_bias": spec.attention_bias,
        "torch_dtype": dtype_name,
        "bos_token_id": bos_id,
        "eos_token_id": list(eos_ids) if len(eos_ids) > 1 else (eos_ids[0] if eos_ids else None),
    }
    rs = spec.rope_scaling
    if rs.rope_type == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": rs.factor}
    elif rs.rope_type == "llama3":
        cfg["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": rs.factor,
            "low_freq_factor": rs.low_freq_factor,
            "high_freq_factor": rs.high_freq_factor,
            "original_max_position_embeddings": rs.original_max_position_embeddings,
        }
    return cfg


def convert_to_hf(source: ModelSource, out_dir: Path, dtype: str = "bfloat16") -> Path:
    """Write `source` as a Hugging Face folder at `out_dir` (created; must not hold a model yet)."""
    from safetensors.torch import save_file

    dtype_name = normalize_dtype_name(dtype)
    if dtype_name not in ("float32", "bfloat16", "float16"):
        raise LadleError(f"--dtype for convert must be float32, bfloat16 or float16, got {dtype!r}")
    torch_dtype = getattr(torch, dtype_name)
    out_dir = Path(out_dir)
    if (out_dir / "config.json").exists():
        raise LadleError(f"{out_dir} already holds a model (config.json); choose an empty folder")
    files = open_model_files(source)
    spec = files.spec()
    if isinstance(files, GGUFFile) and files.rope_frequency_factors() is not None:
        raise ModelLoadError(source.path, "per-frequency rope factors (rope_freqs) have no Hugging Face config form")
    tokenizer = files.tokenizer(spec.eos_token_ids)

    tensors = {}
    for name, w in files.weights(spec):
        if name == "lm_head.weight" and spec.tie_word_embeddings:
            continue
        t = torch.from_numpy(np.ascontiguousarray(w)) if isinstance(w, np.ndarray) else w
        tensors[name] = t.to(torch_dtype).contiguous()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    special = tokenizer.special
    eos_ids = tuple(tokenizer.stop_token_ids) or spec.eos_token_ids
    config = hf_config(spec, dtype_name, tokenizer.bos_token_id, eos_ids)
    _write_json(out_dir / "config.json", config)
    _write_json(
        out_dir / "generation_config.json",
        {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]},
    )
    tokenizer.backend.save(str(out_dir / "tokenizer.json"))
    tok_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": special.bos_token,
        "eos_token": special.eos_token,
        "add_bos_token": special.add_bos,
        "add_eos_token": special.add_eos,
        "model_max_length": spec.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
    }
    if tokenizer.chat_template is not None:
        tok_config["chat_template"] = tokenizer.chat_template.source
    _write_json(out_dir / "tokenizer_config.json", tok_config)
    return out_dir


def _write_json(path: Path, value: dict) -> None:
    path.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
