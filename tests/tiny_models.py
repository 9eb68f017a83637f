"""Tiny random-weight models of each architecture, written the way real checkpoints are.

- as a Hugging Face folder, by `transformers` itself (`save_pretrained`, safetensors);
- as an F32 GGUF file, the way llama.cpp's converter writes one: llama.cpp tensor names, q/k rows
  permuted for "llama" models, llama3 rope scaling as a `rope_freqs` tensor, the vocabulary in
  `tokenizer.ggml.*` metadata.

Every model gets a small byte-level BPE tokenizer trained here, so Ladle can load it like any other.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] "
    "+ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = (
    "The quick brown fox jumps over the lazy dog. def main(): return 42\n"
    "Paris is the capital of France. Numbers 0 1 2 3 4 5 6 7 8 9 and 2024.\n"
    "    indented code { x = [1, 2, 3]; }  // comment\n"
) * 20


def train_byte_level_bpe(vocab_size: int = 320):
    """A byte-level BPE tokenizer with three control tokens (ids 0..2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    return tok


@dataclass
class TinyModel:
    name: str  # test id
    hf_dir: Path  # Hugging Face folder (safetensors)
    gguf_path: Path  # F32 GGUF file
    config: object  # the transformers config


ARCHS = {
    "llama": dict(cls="LlamaConfig", extra={}),
    "llama-untied-llama3rope": dict(
        cls="LlamaConfig",
        extra=dict(
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        ),
    ),
    "mistral": dict(cls="MistralConfig", extra=dict(sliding_window=256, tie_word_embeddings=False)),
    "qwen2": dict(cls="Qwen2Config", extra=dict(tie_word_embeddings=True)),
}


def make_config(arch: str, vocab_size: int):
    import transformers

    spec = ARCHS[arch]
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
    )
    kwargs.update(spec["extra"])
    return getattr(transformers, spec["cls"])(**kwargs)


def build_tiny_model(arch: str, root: Path, seed: int = 0, vocab_size: int = 320) -> TinyModel:
    import transformers

    tok = train_byte_level_bpe(vocab_size)
    config = make_config(arch, tok.get_vocab_size())
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init has near-zero norms and biases: make every weight matter
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in name else 0.0))
    model.eval()
    hf_dir = root / f"{arch}-hf"
    model.save_pretrained(hf_dir, safe_serialization=True)
    tok.save(str(hf_dir / "tokenizer.json"))
    (hf_dir / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": SPECIALS[1], "eos_token": SPECIALS[2], "chat_template": CHAT_TEMPLATE})
    )
    gguf_path = root / f"{arch}.gguf"
    write_gguf(model, config, tok, gguf_path)
    return TinyModel(arch, hf_dir, gguf_path, config)


# -- GGUF, as llama.cpp's converter writes it ---------------------------------------------------------

_LAYER = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_tensor_name(hf_name: str) -> str:
    top = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    if hf_name in top:
        return top[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_LAYER[rest]}"


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for q/k of "llama" models (interleaved rotary pairs)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(config) -> np.ndarray:
    rs = config.rope_parameters if hasattr(config, "rope_parameters") else config.rope_scaling
    head_dim = config.hidden_size // config.num_attention_heads
    base = config.rope_parameters.get("rope_theta", 10000.0)
    factor, low, high = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    factors = []
    for i in range(0, head_dim, 2):
        freq = 1.0 / (base ** (i / head_dim))
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_quantized_gguf(tiny: TinyModel, path: Path, linear_type: str) -> Path:
    """The tiny model as a GGUF whose projection weights are quantized (Q4_0, Q4_1, Q8_0)."""
    import tokenizers
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(tiny.hf_dir, dtype=torch.float32)
    tok = tokenizers.Tokenizer.from_file(str(tiny.hf_dir / "tokenizer.json"))
    write_gguf(model, tiny.config, tok, path, linear_type)
    return path


def write_gguf(model, config, tok, path: Path, linear_type: str | None = None) -> None:
    import gguf

    arch = "qwen2" if config.model_type == "qwen2" else "llama"
    w = gguf.GGUFWriter(str(path), arch)
    head_dim = config.hidden_size // config.num_attention_heads
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_block_count(config.num_hidden_layers)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(config.num_key_value_heads)
    w.add_rope_freq_base(config.rope_parameters.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_vocab_size(config.vocab_size)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    add_byte_level_vocab(w, tok, pre="qwen2" if arch == "qwen2" else "default")
    w.add_chat_template(CHAT_TEMPLATE)
    if config.rope_parameters.get("rope_type") == "llama3":
        w.add_tensor("rope_freqs.weight", llama3_rope_factors(config))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        data = tensor.detach().float().numpy().copy()
        if arch == "llama" and "q_proj" in name:
            data = llamacpp_permute(data, config.num_attention_heads)
        elif arch == "llama" and "k_proj" in name:
            data = llamacpp_permute(data, config.num_key_value_heads)
        if linear_type and name.endswith("proj.weight"):
            kind = gguf.GGMLQuantizationType[linear_type]
            w.add_tensor(gguf_tensor_name(name), gguf.quants.quantize(data, kind), raw_dtype=kind)
        else:
            w.add_tensor(gguf_tensor_name(name), data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def add_byte_level_vocab(w, tok, pre: str) -> None:
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [3 if t in SPECIALS else 1 for t in tokens]
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
